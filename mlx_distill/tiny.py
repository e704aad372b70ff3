"""Tiny random-weight models and small trained tokenizers with chat templates.

Used by the tests, the benchmarks and anyone who wants a smoke test without downloads.
The folder is a standard Hugging Face / mlx-lm model folder (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with a chat template),
so `mlx_lm.load`, `mlx_lm server` and `transformers.AutoModelForCausalLM` all read it.

Two tokenizer families, so that cross-tokenizer distillation can be tested without downloads:

- ``kind="bytelevel"`` (default): byte-level BPE (GPT-2 / Qwen2.5 / Llama-3 / SmolLM2 style:
  tokens spelled in the byte alphabet, ``Ġ`` for a space) with a ChatML template
  (``<|im_start|>user ... <|im_end|>``), trained on `synthetic_texts`.
- ``kind="metaspace"``: a BPE model with a Metaspace pre-tokenizer and SentencePiece-style byte
  fallback (Llama-2 / Mistral style: ``▁`` for a space, ``<0x23>`` byte pieces), a Gemma-like
  template (``<start_of_turn>user ... <end_of_turn>``), trained on `synthetic_texts_alt`, other
  text with other phrasing. Its decoder is the one mlx-lm recognises as SentencePiece
  (`SPMStreamingDetokenizer`). Numbers stay whole pieces where the training text made them
  pieces ("▁74"), while the byte-level family, loaded as transformers loads a qwen2 model
  (Qwen2's pre-tokenizer), splits digits one by one ("Ġ" "7" "4"): the two split the same text
  differently at most positions.

A transformers >= 5 caveat that shapes `build_model`: the tokenizer class follows config.json's
model_type, and for qwen2 it is rebuilt from vocab + merges with Qwen2's own pre-tokenizer
(digits one by one), whatever tokenizer.json says.
"""

import json
import random
from pathlib import Path
from typing import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Gemma-like: the assistant is "model", turns end with <end_of_turn>; system text is its own turn
# (Gemma folds it into the first user turn; a turn of its own keeps the template short).
TURNS_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' "
    "+ message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
METASPACE_SPECIAL_TOKENS = ["<pad>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<think>", "</think>"]
KINDS = ("bytelevel", "metaspace")


def synthetic_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """Arithmetic word problems and solutions: enough to train a byte-level BPE."""
    rng = random.Random(seed)
    names = ["Ann", "Bob", "Carla", "Dev", "Eli", "Fay"]
    items = ["apples", "books", "coins", "eggs", "pens", "cards"]
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        who, what = rng.choice(names), rng.choice(items)
        out.append(f"{who} has {a} {what} and buys {b} more. How many {what} does {who} have now?")
        out.append(f"{who} has {a} + {b} = {a + b} {what}.\n#### {a + b}")
        out.append(f"The answer is \\boxed{{{a * b}}} because {a} * {b} = {a * b}.")
    return out


def synthetic_texts_alt(n: int = 2000, seed: int = 1) -> list[str]:
    """Other text for the other tokenizer family: the same kind of content (numbers, names,
    objects, arithmetic) in other words and layouts, so the two vocabularies overlap in part."""
    rng = random.Random(seed)
    names = ["Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Ann", "Bob"]
    items = ["marbles", "stamps", "shells", "apples", "tickets", "coins"]
    verbs = ["finds", "gets", "wins", "loses", "gives away"]
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        who, what, verb = rng.choice(names), rng.choice(items), rng.choice(verbs)
        total = a - b if verb in ("loses", "gives away") else a + b
        op = "-" if total < a else "+"
        out.append(f"Q: {who} had {a} {what}. Then {who} {verb} {b}. How many {what} now?")
        out.append(f"A: We compute {a} {op} {b}, which gives {total}.\nSo the result is {total}.")
        out.append(f"Therefore, {who} ends with {total} {what};\n{a} {op} {b} = {total} in total.")
    return out


def build_tokenizer(out_dir: str | Path, texts: Iterable[str] | None = None, vocab_size: int | None = None,
                    kind: str = "bytelevel"):
    """Train a tokenizer of family `kind` (see the module docstring) and save it as a transformers
    fast tokenizer with its chat template. `vocab_size` defaults to 512 (bytelevel: 256 byte
    symbols, 5 special tokens and merges) and 320 (metaspace: characters, 6 special tokens and
    merges, the 256 byte pieces of the fallback on top: 576 in all). The BPE trainer
    treats vocab_size as a cap: on a small, repetitive text it stops when no pair is left to merge."""
    if kind == "metaspace":
        return _build_metaspace(out_dir, texts, 320 if vocab_size is None else vocab_size)
    if kind != "bytelevel":
        raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
    vocab_size = 512 if vocab_size is None else vocab_size
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) if texts is not None else synthetic_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _build_metaspace(out_dir: str | Path, texts: Iterable[str] | None, vocab_size: int):
    """BPE + Metaspace (prepend "▁" to the first word only) + byte fallback, as Llama-2 and
    Mistral tokenizers (SentencePiece BPE) are laid out: runs of newlines are pieces of their own
    (so no piece joins a template's newline to the completion's first word), and the decoder is
    the SentencePiece one (▁ -> space, byte pieces fused, the leading space stripped)."""
    import json as _json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # (A Unigram model, Gemma's, was tried first: the `tokenizers` Unigram trainer keeps almost
    # only single characters on small repetitive texts, so the pieces a test needs never appear.)
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n+"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=METASPACE_SPECIAL_TOKENS,
                                  show_progress=False)
    tok.train_from_iterator(list(texts) if texts is not None else synthetic_texts_alt(), trainer)
    # byte fallback: every character the pieces do not cover becomes its UTF-8 bytes <0xNN>
    spec = _json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]  # piece -> id; merges refer to pieces, so new ids go at the end
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    tok = Tokenizer.from_str(_json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<end_of_turn>", pad_token="<pad>",
                                   unk_token="<unk>", bos_token=None)
    fast.chat_template = TURNS_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def tokenizer_kind(tokenizer_dir: str | Path) -> str:
    """The family of a saved tokenizer: "metaspace" when its pre-tokenizer uses Metaspace, else "bytelevel"."""
    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    return "metaspace" if '"Metaspace"' in json.dumps(spec.get("pre_tokenizer")) else "bytelevel"


def model_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 intermediate: int = 128, model_type: str = "qwen2", tie: bool = True, **extra) -> dict:
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    cfg = {
        "architectures": [arch], "model_type": model_type, "hidden_size": hidden,
        "num_hidden_layers": layers, "intermediate_size": intermediate,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": tie, "torch_dtype": "float32", "hidden_act": "silu",
        "attention_bias": model_type == "qwen2", "bos_token_id": None,
    }
    cfg.update(extra)
    return cfg


def build_model(out_dir: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0,
                texts: Iterable[str] | None = None, kind: str = "bytelevel", **cfg_kw) -> Path:
    """Write a random-weight model folder (with a tokenizer) that mlx-lm and transformers load.
    Without `tokenizer_dir` a tokenizer of family `kind` is trained on `texts`.

    The architecture (`model_type`) defaults to qwen2 for a byte-level tokenizer and llama for a
    metaspace one. A metaspace tokenizer under qwen2 is refused: transformers >= 5 picks the
    tokenizer class from config.json's model_type and rebuilds a Qwen2 tokenizer (byte-level)
    from the vocabulary, which mangles every Metaspace piece."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tok = build_tokenizer(out_dir, texts, kind=kind)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.save_pretrained(out_dir)
        kind = tokenizer_kind(tokenizer_dir)
    cfg_kw.setdefault("model_type", "llama" if kind == "metaspace" else "qwen2")
    if kind == "metaspace" and cfg_kw["model_type"] == "qwen2":
        raise ValueError("a metaspace tokenizer needs model_type='llama': transformers would load it as a "
                         "byte-level Qwen2 tokenizer under model_type='qwen2'")
    cfg = model_config(vocab_size=len(tok), **cfg_kw)
    cfg["eos_token_id"] = tok.convert_tokens_to_ids(tok.eos_token)
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(cfg))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir
