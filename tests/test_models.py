"""`models.resolve_model`, the one resolver behind every `--model` (and `--teacher`, `--kd-teacher`),
and the `-h` of every command.

No test needs the network: Hub ids are resolved against a fake Hugging Face cache built in tmp_path,
under HF_HUB_OFFLINE=1, and the unreachable Hub is simulated by the error huggingface_hub raises.
"""

import importlib
import os
import shutil
import subprocess
import sys

import pytest
from helpers import arith_records, write_jsonl

from mlx_distill import cli, embedded, models
from mlx_distill.io import InputError

HUB_ID = "mlx-community/Qwen2.5-0.5B-Instruct-4bit"


def fake_hub_cache(root, repo_id, src):
    """The layout huggingface_hub reads: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF cache in tmp_path, offline (snapshot_download reads constants.HF_HUB_CACHE per call)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# ----------------------------------------------------------------------------- what resolves
def test_embedded_names_resolve_to_the_converted_folder():
    folder = str(embedded.ensure_smollm2())
    assert models.resolve_model("smollm2") == folder
    assert models.resolve_model("SmolLM2-135M-Instruct") == folder
    assert models.resolve_model(folder) == folder  # idempotent: loaders may resolve again


def test_local_model_folder_is_returned(tiny_model, tmp_path, monkeypatch):
    assert models.resolve_model(str(tiny_model)) == str(tiny_model)
    monkeypatch.chdir(tiny_model.parent)
    assert models.resolve_model(f"./{tiny_model.name}") == str(tiny_model)  # absolute, for manifests


def test_local_folder_named_like_the_embedded_model_wins_and_must_be_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    with pytest.raises(InputError, match=r"--model smollm2: not a model folder \(looked for smollm2/config.json\)"):
        models.resolve_model("smollm2")


def test_hub_id_found_in_the_local_cache_without_network(tiny_model, hub_cache):
    snap = fake_hub_cache(hub_cache, HUB_ID, tiny_model)
    assert os.path.realpath(models.resolve_model(HUB_ID)) == os.path.realpath(snap)


# ----------------------------------------------------------------------------- what is refused, in one line
def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError) as e:
        models.resolve_model(str(tmp_path))
    msg = one_line(e)
    assert f"--model {tmp_path}: not a model folder (looked for {tmp_path}/config.json)" in msg
    assert "smollm2" in msg and "repo id" in msg


def test_adapter_folder_says_to_pass_the_base_model(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match=r"adapter \(run\) folder.*base model"):
        models.resolve_model(str(tmp_path), flag="--model")


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(InputError, match=r"is a file, not a model folder \(a GGUF file"):
        models.resolve_model(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("name", ["./qwen", "../qwen", "models/qwen/", "a/b/c", "~/no-such-model-here"])
def test_mistyped_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as e:
        models.resolve_model(name, flag="--teacher")
    msg = one_line(e)
    assert msg.startswith(f"--teacher {name}: no such folder (looked for ")
    assert "Repo id must be" not in msg


def test_hub_id_offline_and_not_cached(hub_cache):
    with pytest.raises(InputError) as e:
        models.resolve_model(HUB_ID)
    msg = one_line(e)
    assert msg.startswith(f"--model {HUB_ID}: no such local folder, and not in the Hugging Face cache ({hub_cache})")
    assert "HF_HUB_OFFLINE=1" in msg


def test_hub_unreachable(hub_cache, monkeypatch):
    """What snapshot_download raises when the Hub cannot be reached: LocalEntryNotFoundError from a ConnectError."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(repo_id, local_files_only=False, **kw):
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as cause:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from cause

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(InputError) as e:
        models.resolve_model(HUB_ID)
    msg = one_line(e)
    assert "the Hub could not be reached (ConnectionError: [Errno -2] Name or service not known)" in msg
    assert "HF_HOME" in msg and "HF_HUB_OFFLINE" in msg


def test_hub_repo_not_found(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(repo_id, local_files_only=False, **kw):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
        Exception.__init__(err, "404 Client Error. Repository Not Found")
        raise err

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(InputError) as e:
        models.resolve_model("acme/no-such-model", flag="--kd-teacher")
    assert one_line(e).startswith("--kd-teacher acme/no-such-model: no such local folder, and no such repo on the "
                                  "Hugging Face Hub")


def test_empty_name():
    with pytest.raises(InputError, match=r"^--teacher: no model given"):
        models.resolve_model("", flag="--teacher")


# ----------------------------------------------------------------------------- through the CLI
def run_cli(*args, cwd, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mlx_distill", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["not-a-model", "mistyped-path", "hub-offline"])
def test_train_bad_model_is_one_error_line(case, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", arith_records(8, seed=0))
    write_jsonl(data / "valid.jsonl", arith_records(4, seed=1, start=100))
    (tmp_path / "empty").mkdir()
    model = {"not-a-model": "./empty", "mistyped-path": "./qwen", "hub-offline": HUB_ID}[case]
    env = {"HF_HUB_CACHE": str(tmp_path / "hf-cache")}  # an empty cache, whatever the machine has
    r = run_cli("train", "--model", model, "--data", str(data), "--out", str(tmp_path / "run"), "--iters", "1",
                cwd=tmp_path, env_extra=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --model {model}: "), r.stderr
    expected = {"not-a-model": "not a model folder (looked for ./empty/config.json)",
                "mistyped-path": "no such folder (looked for ./qwen/config.json)",
                "hub-offline": "HF_HUB_OFFLINE=1"}[case]
    assert expected in lines[0]
    assert not (tmp_path / "run" / "adapters.safetensors").exists()


# ----------------------------------------------------------------------------- -h of every command
@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_prints_cleanly(command, capsys):
    module, func, _ = cli.COMMANDS[command]
    try:
        getattr(importlib.import_module(module), func)(["-h"])  # argparse exits 0; `study -h` returns
    except SystemExit as e:
        assert e.code in (0, None)
    out, err = capsys.readouterr()
    assert out.strip().startswith("usage:") and not err
    # a literal % in a help string used to be %-formatted by argparse into the action's dict
    assert "option_strings" not in out and "Traceback" not in out


def test_portable_name_keeps_a_hub_id_and_resolves_paths(tmp_path, monkeypatch):
    from mlx_distill.models import portable_name

    monkeypatch.chdir(tmp_path)
    snap = "/cache/hub/models--Qwen--Qwen2.5-0.5B/snapshots/abc"
    assert portable_name("Qwen/Qwen2.5-0.5B-Instruct", snap) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert portable_name("smollm2", "/c/smollm2-135m-instruct") == "/c/smollm2-135m-instruct"
    (tmp_path / "local").mkdir()
    assert portable_name("local", str(tmp_path / "local")) == str(tmp_path / "local")  # a folder, not a repo id
    assert portable_name("./x/y/z", "/abs/x/y/z") == "/abs/x/y/z"


def test_quantized_layers_on_blas_match_mlx_quantized_matmul(tiny_model, tmp_path):
    """On a CPU, `load_mlx` routes 4-bit layers through dequantize-then-matmul (60x faster here than
    MLX's CPU quantized matmul): the logits and the LoRA gradients must be those of
    `mx.quantized_matmul`, for training-sized inputs (>= 32 rows) and for decode-sized ones."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm import convert, load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    q = tmp_path / "q4"
    convert(str(tiny_model), mlx_path=str(q), quantize=True, q_bits=4, q_group_size=32)
    plain, _ = load(str(q))
    fast, _ = models.load_mlx(str(q))
    layers = [m for _, m in fast.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert layers and all(type(m).__name__.startswith("CPUQuantized") for m in layers)
    assert models.use_blas_for_quantized(load(str(tiny_model))[0]) == 0  # a float model: nothing to switch

    def lora_grads(model, x):
        model.freeze()
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
        mx.random.seed(1)  # the same nonzero adapter in both models (lora_b starts at zero)
        model.update(tree_map(lambda a: 0.05 * mx.random.normal(a.shape), model.trainable_parameters()))
        value, grads = nn.value_and_grad(model, lambda m: (m(x) ** 2).mean())(model)
        return value.item(), dict(tree_flatten(grads))

    for x in (mx.random.randint(0, 500, (4, 10)), mx.random.randint(0, 500, (3, 1))):  # BLAS path; decode-sized
        a, b = plain(x), fast(x)
        assert mx.abs(a - b).max().item() <= 1e-4 * mx.abs(a).max().item()
    x = mx.random.randint(0, 500, (4, 12))
    (va, ga), (vb, gb) = lora_grads(plain, x), lora_grads(fast, x)
    assert abs(va - vb) <= 1e-4 * abs(va)
    assert ga and ga.keys() == gb.keys()
    for k in ga:
        assert mx.abs(ga[k] - gb[k]).max().item() <= 1e-3 * (mx.abs(ga[k]).max().item() or 1.0), k


@pytest.mark.parametrize("compiled", [False, True])
def test_quantized_layers_on_blas_keep_no_float_copy_for_the_backward_pass(compiled):
    """The dequantize-then-matmul path must keep QLoRA's memory: a bounded number of float32 weight
    copies in flight, not one per layer. Untied, MLX ran every layer's dequantize first (all copies
    at once), and `mx.compile` merged the forward and backward dequantize into one node, alive until
    the backward pass. Measured with the tie, at 8 and 16 layers alike: ~4 copies, ~7 compiled."""
    import mlx.core as mx
    import mlx.nn as nn

    width, depth = 1024, 24
    copy = width * width * 4  # one layer's float32 weight: 4 MB

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.QuantizedLinear.from_linear(nn.Linear(width, width, bias=False), 64, 4)
                           for _ in range(depth)]
            self.gain = mx.ones((width,))  # the only trained parameter, below every layer

        def __call__(self, x):
            x = x * self.gain
            for layer in self.layers:
                x = layer(x)
            return x

    mx.random.seed(0)
    model = Chain()
    assert models.use_blas_for_quantized(model) == depth
    model.freeze()
    model.unfreeze(keys=["gain"], recurse=False)
    x = mx.random.normal((64, width))  # >= 32 rows: the BLAS path
    vg = nn.value_and_grad(model, lambda m: (m(x) ** 2).mean())
    grad = lambda: vg(model)[1]["gain"]
    step = mx.compile(grad, inputs=[model.state], outputs=[model.state]) if compiled else grad
    mx.eval(step())  # compile / warm up
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(step())
    above = mx.get_peak_memory() - base
    assert above < depth * copy / 2, f"{above / 1e6:.1f} MB above the weights; all {depth} float copies: {depth * copy / 1e6:.0f} MB"
