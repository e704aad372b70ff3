"""Tiny random-weight models and a small trained tokenizer with a chat template.

Used by the tests, the benchmarks and anyone who wants a smoke test without downloads.
The folder is a standard Hugging Face / mlx-lm model folder (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with a ChatML chat template),
so `mlx_lm.load`, `mlx_lm server` and `transformers.AutoModelForCausalLM` all read it.
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


def build_tokenizer(out_dir: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
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
                texts: Iterable[str] | None = None, **cfg_kw) -> Path:
    """Write a random-weight model folder (with a tokenizer) that mlx-lm and transformers load."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tok = build_tokenizer(out_dir, texts)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.save_pretrained(out_dir)
    cfg = model_config(vocab_size=len(tok), **cfg_kw)
    cfg["eos_token_id"] = tok.convert_tokens_to_ids("<|im_end|>")
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(cfg))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir
