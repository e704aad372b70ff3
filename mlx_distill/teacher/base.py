"""The one teacher interface and what every teacher and the store share.

``Teacher.score(tokens, top_k, start, lengths) -> TeacherScores``: teacher-forced scores of a
token batch. Its implementations, one per kind of teacher: `teacher.local.LocalTeacher` (a model
on this machine, MLX or torch), `teacher.remote.RemoteTeacher` (a vLLM server). The `logits`
command stores what `score` returns; online KD serves it to the student each step
(`teacher.local.OnlineTeacher` for a teacher of the student's tokenizer,
`teacher.cross.OnlineCrossTeacher` across tokenizers); on-policy KD scores rollouts with it.

Also here: the identities that stores and teachers are checked by (tokenizer fingerprint, token
hashes, model-folder fingerprint) and the first loss position of an example.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class TeacherScores:
    """Teacher scores of a token batch (B, L) at positions t = start .. L-2 (predicting t+1)."""

    ids: np.ndarray  # (B, T, K) int32; empty slots hold id 0
    logprobs: np.ndarray  # (B, T, K) float32 log-probabilities over the whole vocabulary (T = 1); empty: -inf
    tail: np.ndarray  # (B, T) float32 log(1 - sum_K p): the teacher's mass outside its top-K
    token_logprobs: np.ndarray  # (B, T) float32 log p_teacher(token t+1); NaN: unknown (padding, a failed row)


@runtime_checkable
class Teacher(Protocol):
    """A teacher: its tokenizer, its vocabulary rows, and teacher-forced top-K scores.

    ``score_vocab`` (None: keep every id) makes ids at or beyond it empty slots: the student's
    embedding rows when the student shares the teacher's tokenizer (online and on-policy KD)."""

    name: str
    tokenizer: Any
    vocab_size: int
    score_vocab: int | None

    def score(self, tokens: np.ndarray, top_k: int, start: int = 0,
              lengths: np.ndarray | None = None) -> TeacherScores:
        """Teacher-forced scores of `tokens` (B, L) int32 at positions start .. L-2. `lengths` (B,): each
        row's real length (right padding after it is never sent to a server; positions past it are
        empty slots with NaN token log-probabilities)."""

    def fingerprint(self) -> dict:
        """What scored a store (the store's manifest ``teacher``; ``weights`` is what --resume compares)."""


def log1mexp_np(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0 (NumPy), -inf where x == 0."""
    x = np.minimum(np.asarray(x, np.float64), 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -0.6931, np.log(-np.expm1(x)), np.log1p(-np.exp(x))).astype(np.float32)


def finish_scores(ids: np.ndarray, lps: np.ndarray, tok: np.ndarray, score_vocab: int | None) -> TeacherScores:
    """TeacherScores from a top-K (sorted) and the actual tokens' log-probabilities: ids at or beyond
    `score_vocab` become empty slots (id 0, -inf), then the tail bucket log(1 - sum p) of what is left."""
    ids, lps = np.asarray(ids), np.asarray(lps, np.float32)
    if score_vocab is not None:
        outside = ids >= score_vocab
        ids, lps = np.where(outside, 0, ids), np.where(outside, -np.inf, lps)
    tail = log1mexp_np(np.log(np.maximum(np.exp(lps.astype(np.float64)).sum(-1), 1e-300)))
    return TeacherScores(ids.astype(np.int32), lps.astype(np.float32), tail, np.asarray(tok, np.float32))


def first_target(prompt_len: int) -> int:
    """First target index in the loss (see `data.loss_mask`)."""
    return max(int(prompt_len) - 1, 0)


# ----------------------------------------------------------------------------- identities
def tokens_sha(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def teacher_fingerprint(path: str | Path) -> dict:
    """Cheap identity of a model folder: config hash, weight file names/sizes and a hash of
    each file's first MiB (hashing 15 GB of weights would cost minutes)."""
    p = Path(path)
    out = {"path": str(p)}
    if (p / "config.json").is_file():
        out["config_sha256"] = hashlib.sha256((p / "config.json").read_bytes()).hexdigest()
    h = hashlib.sha256()
    files = sorted(p.glob("*.safetensors"))
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    out["weights"] = {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "sha256_heads": h.hexdigest()}
    return out


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


def model_vocab_rows(path: str | Path, tokenizer) -> int:
    """Embedding rows of a model folder (config.json ``vocab_size``), else its tokenizer's size."""
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        v = c.get("vocab_size") or c.get("text_config", {}).get("vocab_size")
        if v:
            return int(v)
    return len(vocab_strings(tokenizer))
