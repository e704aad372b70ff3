"""The one teacher interface: ``Teacher.score(tokens, top_k, start) -> TeacherScores``, and the
local MLX implementation (same tokenizer as the student)."""

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class TeacherScores:
    """Teacher scores of a token batch (B, L) at positions t = start .. L-2 (predicting t+1)."""

    ids: np.ndarray  # (B, T, K) int32; empty slots hold id 0
    logprobs: np.ndarray  # (B, T, K) float32 log-probabilities over the whole vocabulary (T = 1); empty: -inf
    tail: np.ndarray  # (B, T) float32 log(1 - sum_K p): the teacher's mass outside its top-K
    token_logprobs: np.ndarray  # (B, T) float32 log p_teacher(token t+1)


@runtime_checkable
class Teacher(Protocol):
    name: str

    def score(self, tokens: np.ndarray, top_k: int, start: int = 0) -> TeacherScores:
        """Teacher-forced scores of `tokens` (B, L) int32 at positions start .. L-2."""


def log1mexp_np(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0 (NumPy), -inf where x == 0."""
    x = np.minimum(np.asarray(x, np.float64), 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -0.6931, np.log(-np.expm1(x)), np.log1p(-np.exp(x))).astype(np.float32)


class MLXTeacher:
    """A local MLX model as `Teacher` (same tokenizer as the student). Teacher ids at or beyond
    the student's embedding rows (`vocab_size`) become empty slots, as in online KD."""

    def __init__(self, model, name: str, vocab_size: int):
        self.model, self.name, self.vocab_size = model, name, vocab_size

    def score(self, tokens: np.ndarray, top_k: int, start: int = 0) -> TeacherScores:
        import mlx.core as mx

        from mlx_distill.backends.ops import ops

        x = mx.array(np.asarray(tokens, np.int32))
        z = self.model(x[:, :-1])[:, start:].astype(mx.float32)
        o = ops(z)
        lse = o.logsumexp(z, -1)
        idx = o.topk_idx(z, top_k)
        val = mx.take_along_axis(z, idx, axis=-1)
        order = mx.argsort(-val, axis=-1)
        idx, val = mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(val, order, axis=-1) - lse
        tok = mx.take_along_axis(z, x[:, start + 1:, None], axis=-1)[..., 0] - lse[..., 0]
        mx.eval(idx, val, tok)
        ids, lps = np.array(idx), np.array(val)
        outside = ids >= self.vocab_size
        lps = np.where(outside, -np.inf, lps).astype(np.float32)
        tail = log1mexp_np(np.log(np.maximum(np.exp(lps.astype(np.float64)).sum(-1), 1e-300)))
        return TeacherScores(np.where(outside, 0, ids).astype(np.int32), lps, tail, np.array(tok, np.float32))


# ----------------------------------------------------------------------------- tokenizer identity
def _hf(tokenizer):
    """The Hugging Face tokenizer inside mlx-lm's TokenizerWrapper (or the tokenizer itself)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def vocab_strings(tokenizer) -> list[str]:
    """Token string of every id (added/special tokens included); '' for unused ids."""
    vocab = _hf(tokenizer).get_vocab()
    out = [""] * (max(vocab.values()) + 1)
    for s, i in vocab.items():
        out[i] = s
    return out


def tokenizer_fingerprint(tokenizer, strings: list[str] | None = None) -> str:
    """sha256 of the id -> token-string table: equal fingerprints tokenise identically
    as far as ids go (same vocabulary, same ids)."""
    strings = vocab_strings(tokenizer) if strings is None else strings
    return hashlib.sha256(json.dumps(strings, ensure_ascii=False).encode()).hexdigest()
