"""`export`: the fused folder loads in mlx-lm and gives the adapter's logits; GGUF for llama, refusal otherwise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_distill.config import ExportConfig, TrainConfig, build
from mlx_distill.io import InputError, sha256_file

from helpers import arith_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TOKENS = [[1, 5, 9, 30, 42, 7, 100, 3]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("export-corpus")
    write_jsonl(d / "train.jsonl", arith_records(8))
    write_jsonl(d / "valid.jsonl", arith_records(4, seed=1, start=1000))
    return d


def _train(model, corpus, out, **kw):
    from mlx_distill.training import train

    # a large learning rate, so the adapter moves the logits well above the tolerance below
    cfg = dict(model=str(model), data=str(corpus), out=str(out), iters=2, batch_size=4, val_every=2, report_every=1,
               save_every=100, max_seq_length=256, lora_layers=-1, learning_rate=2e-2, warmup=0, patience=0, seed=0)
    cfg.update(kw)
    train.run(build(TrainConfig, cfg), quiet=True)
    return out


@pytest.fixture(scope="module")
def qwen_run(tiny_model, corpus, tmp_path_factory):
    return _train(tiny_model, corpus, tmp_path_factory.mktemp("qwen") / "run")


@pytest.fixture(scope="module")
def llama_run(tiny_llama, corpus, tmp_path_factory):
    return _train(tiny_llama, corpus, tmp_path_factory.mktemp("llama") / "run")


def _logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_export_round_trip_gives_the_adapters_logits(kind, tiny_model, corpus, qwen_run, tmp_path):
    from mlx_lm import load

    from mlx_distill.export import export

    run = qwen_run if kind == "lora" else _train(tiny_model, corpus, tmp_path / "dora", fine_tune_type="dora")
    out = tmp_path / "exported"
    man = export(build(ExportConfig, dict(run=str(run), out=str(out))), quiet=True)
    with_adapter, _ = load(str(tiny_model), adapter_path=str(run))
    fused, _ = load(str(out))
    base, _ = load(str(tiny_model))
    ref, got = _logits(with_adapter), _logits(fused)
    assert ref.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()  # fused == base + adapter
    assert np.abs(_logits(base) - ref).max() > 100 * 1e-4 * np.abs(ref).max()  # and the adapter mattered
    # the fused folder is a plain model: no LoRA layers, no adapter files
    assert not any("lora" in n for n, _ in fused.named_modules())
    assert not (out / "adapters.safetensors").exists()
    # the manifest: run, base model, adapter hashes
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(man, default=str))
    assert saved["stage"] == "export" and saved["run"]["path"] == str(run.resolve())
    assert saved["run"]["best_iter"] == json.loads((run / "manifest.json").read_text())["result"]["best_iter"]
    assert saved["adapter"]["fine_tune_type"] == kind
    assert saved["adapter"]["sha256"]["adapters.safetensors"] == sha256_file(run / "adapters.safetensors")
    assert saved["base_model"]["name"] == str(tiny_model) and saved["base_model"]["model_type"] == "qwen2"
    assert saved["base_model"]["config_sha256"] and saved["fused_modules"] > 0 and saved["gguf"] is None
    # outputs get the same permissions as every other file (safetensors writers used to make 0600)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_dequantize_a_qlora_run(tiny_llama, corpus, tmp_path):
    """A LoRA on a 4-bit base, exported with --dequantize: float weights, the quantized model + adapter's
    logits; --gguf on the quantized base without --dequantize is refused."""
    from mlx_lm import convert, load

    from mlx_distill.export import export

    q4 = tmp_path / "q4"
    convert(str(tiny_llama), mlx_path=str(q4), quantize=True, q_bits=4, q_group_size=32)
    run = _train(q4, corpus, tmp_path / "run")
    with pytest.raises(InputError, match="add --dequantize"):
        export(build(ExportConfig, dict(run=str(run), out=str(tmp_path / "x"), gguf=True)), quiet=True)
    out = tmp_path / "exported"
    man = export(build(ExportConfig, dict(run=str(run), out=str(out), dequantize=True, gguf=True)), quiet=True)
    assert man["dequantized"] and not man["quantized"] and (out / "model.gguf").is_file()
    assert "quantization" not in json.loads((out / "config.json").read_text())
    ref = _logits(load(str(q4), adapter_path=str(run))[0])
    got = _logits(load(str(out))[0])
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_gguf_on_llama(llama_run, tmp_path):
    import mlx.core as mx

    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "export", str(llama_run), "--out", str(out), "--gguf"],
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and ".exported-" not in r.stdout  # no temporary path in the log
    man = json.loads((out / "manifest.json").read_text())
    assert man["gguf"]["file"] == "model.gguf" and man["base_model"]["model_type"] == "llama"
    tensors, meta = mx.load(str(out / "model.gguf"), return_metadata=True)
    assert str(meta["general.architecture"]) == "llama"
    fused = mx.load(str(out / "model.safetensors"))
    assert len(tensors) == len(fused)
    # unpermuted projections carry the fused weights exactly (q/k are permuted for llama.cpp's rope)
    for gguf_name, name in (("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                            ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight")):
        assert np.array_equal(np.array(tensors[gguf_name]), np.array(fused[name]))


def test_refusals_are_one_line(qwen_run, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mlx_distill", "export", *map(str, args)], cwd=REPO, env=ENV,
                              capture_output=True, text=True)

    out = tmp_path / "x"
    r = cli(qwen_run, "--out", out, "--gguf")  # qwen2: mlx-lm's GGUF export is llama-family only
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "llama, mistral, mixtral" in r.stderr and "'qwen2'" in r.stderr and not out.exists()
    r = cli(tmp_path, "--out", out)  # not a run folder
    assert r.returncode == 2 and "adapters.safetensors" in r.stderr and r.stderr.count("\n") == 1
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli(qwen_run, "--out", out)
    assert r.returncode == 2 and "--overwrite" in r.stderr and (out / "keep.txt").read_text() == "mine"
    r = cli(qwen_run, "--out", qwen_run / "fused")
    assert r.returncode == 2 and "run folder" in r.stderr
    from mlx_distill.export import export

    with pytest.raises(InputError, match="--out DIR is required"):
        export(ExportConfig(run=str(qwen_run)))


@pytest.mark.slow
def test_smollm2_export_with_gguf(tmp_path):
    """The embedded SmolLM2 (llama architecture): a 1-step adapter, fused, with GGUF, same logits."""
    from mlx_lm import load

    from mlx_distill.embedded import ensure_smollm2
    from mlx_distill.export import export

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "train.jsonl", arith_records(4))
    write_jsonl(corpus / "valid.jsonl", arith_records(2, seed=1, start=1000))
    run = _train("smollm2", corpus, tmp_path / "run", iters=1, val_every=1, batch_size=2, lora_layers=2,
                 learning_rate=1e-3)
    out = tmp_path / "exported"
    man = export(build(ExportConfig, dict(run=str(run), out=str(out), gguf=True)), quiet=True)
    assert man["base_model"]["name"] == "smollm2" and (out / "model.gguf").stat().st_size > 100e6
    ref = _logits(load(str(ensure_smollm2()), adapter_path=str(run))[0])
    got = _logits(load(str(out))[0])
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
