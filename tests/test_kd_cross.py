"""Cross-tokenizer KD evidence (issue 12, item 5): two tiny tokenizer families that split the
same text differently, the `logits` -> `train --kd` path between them, and a learning test.

The pair: `tiny_model` (byte-level BPE, ChatML template, trained on `tiny.synthetic_texts`)
teaches `tiny_metaspace` (Unigram + Metaspace with byte fallback, whole-number pieces, Gemma-like `<start_of_turn>` template, trained on `tiny.synthetic_texts_alt`)."""

import json

import numpy as np
import pytest

from mlx_distill import data
from mlx_distill.io import read_json, read_jsonl
from mlx_distill.paths import REPO

from helpers import arith_records, write_jsonl

TEMPLATE = str(REPO / "prompts" / "train_user.txt")


def _hf_tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def token_spans(tok, text: str) -> list[tuple[int, int]]:
    """(start, end) character span of every token of `text` (no special tokens). A token that
    covers no character of its own (SentencePiece's prepended "▁", the 2nd..nth byte piece of
    one character) gets the span its tokenizer reports, which repeats its neighbour's: such a
    token never counts as agreeing unless the other side has the same duplicate."""
    return [tuple(s) for s in tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]]


def disagreement(teacher_tok, student_tok, texts) -> tuple[float, int]:
    """Share of student token positions whose character span is not exactly one teacher
    token's span (the positions a by-position or by-span-equality alignment cannot give a
    one-to-one teacher distribution), and the number of student positions."""
    total = differ = 0
    for text in texts:
        t = set(token_spans(teacher_tok, text))
        s = token_spans(student_tok, text)
        total += len(s)
        differ += sum(x not in t for x in s)
    return differ / total, total


# ----------------------------------------------------------------------------- the two families
def test_metaspace_family_is_a_complete_mlx_lm_tokenizer(tiny_metaspace, tiny_model):
    """mlx_lm.load picks its SentencePiece streaming detokenizer; byte fallback round-trips
    text the pieces do not cover; the chat template and end of turn are Gemma-like, not ChatML."""
    from mlx_lm import load
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

    _, stok = load(str(tiny_metaspace))
    _, ttok = load(str(tiny_model))
    assert isinstance(stok.detokenizer, SPMStreamingDetokenizer)
    assert isinstance(ttok.detokenizer, BPEStreamingDetokenizer)
    text = "Ann has 12 + 36 = 48 coins.\n#### 48 caf\u00e9 \U0001F600"
    msgs = [{"role": "user", "content": "What is 12 + 36?"}, {"role": "assistant", "content": text}]
    ids = stok.apply_chat_template(msgs, return_dict=False)
    rendered = stok.decode(ids)
    assert rendered == ("<start_of_turn>user\nWhat is 12 + 36?<end_of_turn>\n"
                        f"<start_of_turn>model\n{text}<end_of_turn>\n")
    assert "<|im_start|>" in ttok.decode(ttok.apply_chat_template(msgs, return_dict=False))
    pieces = stok.convert_ids_to_tokens(ids)
    assert "<0xC3>" in pieces and "<0xF0>" in pieces  # é and the emoji as UTF-8 byte pieces
    assert "▁12" in pieces  # a number as one piece (the byte-level side: "Ġ" "1" "2")
    prompt = stok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_dict=False)
    det = stok.detokenizer
    det.reset()
    for i in ids[len(prompt):]:
        det.add_token(i)
    det.finalize()
    assert det.text == text + "<end_of_turn>\n"
    assert stok.eos_token_ids == {stok.convert_tokens_to_ids("<end_of_turn>")}
    cfg = read_json(tiny_metaspace / "config.json")
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == len(stok._tokenizer) != len(ttok._tokenizer)


def test_metaspace_under_qwen2_is_refused(tmp_path):
    """transformers >= 5 would load a Metaspace tokenizer as a byte-level Qwen2 one under a
    qwen2 config.json, silently dropping every "▁" and byte piece: build_model refuses it."""
    from mlx_distill.tiny import build_model

    with pytest.raises(ValueError, match="model_type='llama'"):
        build_model(tmp_path / "m", kind="metaspace", model_type="qwen2")


def test_the_pair_splits_completions_differently(tiny_model, tiny_metaspace):
    """Issue 12 asks for >= 30% of positions split differently. Measured on the completions of
    `arith_records(200)` (the corpus most KD tests use): 52.7% of the student's 2882 completion
    positions have no teacher token with the same span (numbers: teacher "Ġ" "4" "1", student
    "▁41"; " +": teacher "Ġ+", student "▁" "+"; "####": one teacher token, four student byte
    pieces), and the vocabularies differ."""
    ttok, stok = _hf_tok(tiny_model), _hf_tok(tiny_metaspace)
    texts = [data.render_assistant(r) for r in arith_records(200)]
    share, n = disagreement(ttok, stok, texts)
    print(f"student completion positions {n}, split differently {share:.1%}")
    assert share >= 0.30, share
    # and it is the tokenizers that differ, not the measure: a tokenizer agrees with itself
    assert disagreement(ttok, ttok, texts)[0] == 0.0
    tv, sv = set(ttok.get_vocab()), set(stok.get_vocab())
    assert len(tv & sv) < 0.2 * len(sv)  # the token strings themselves barely overlap
