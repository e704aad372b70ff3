"""The top-M store: a folder of teacher scores keyed by example id and token position (storage only).

Written by the `logits` command (`StoreWriter`), read by `train --kd` (`TopMStore`). Nothing here
runs a model; a teacher is never a store, and a store is never a teacher's base class.

Folder::

    manifest.json               teacher + tokenizer fingerprints, M, dtypes, config, and per example:
                                shard, rows, first target index, length, prompt_len, sha256 of the tokens,
                                sha256 and length of the completion text (`align.completion_text`)
    vocab.json                  the teacher's token strings by id
    pieces.json                 the bytes each teacher token spells, and its special tokens (alignment)
    shard-00000.safetensors     ids (N, M) int32 | logprobs (N, M) float16 | actual (N,) float32 |
                                tokens (n,) int32 | ends (n,) int32

Row r of a shard is one target index t of one example (the prediction of token t+1); its M slots
are sorted by decreasing teacher log-probability (log-probabilities over the whole vocabulary at
T = 1). ``actual`` is the teacher's log-probability of the token actually there (NaN: unknown),
``tokens`` the exact token ids scored for each example, ``ends`` the byte offset where each scored
token ends in the completion text (cross-tokenizer alignment, `teacher.align`).

Format 3 (the default for new stores) keeps the same fields, compactly coded (`teacher.codec`: ids
exact, log-probs >= -12 within 0.02 nats, ~46 B per completion token at M = 25 against ~180 for
format 2), and adds the *sampled* store (``logits --sampled-k N``: per position the distinct ids of
N draws from the teacher's tempered distribution with their counts; manifest ``sampled``: N,
temperature, seed). Formats 2 and 3 are read; a format-1 folder (before cross-tokenizer alignment)
is refused with the fix. A shard is encoded in `encode_shard` and decoded in `decode_shard`.

Reading is lazy: a shard is mapped, not loaded (format 2: `codec.map_safetensors`; format 3:
`codec.LazyShard` decodes one chunk of examples at a time), and at most ``OPEN_SHARDS`` shards are
open at once, so a store larger than memory trains.
"""

from pathlib import Path
from typing import Callable

import numpy as np

from mlx_distill.io import InputError, atomic_path, read_json
from mlx_distill.teacher import align, codec
from mlx_distill.teacher.base import first_target, tokens_sha
from mlx_distill.teacher.plan import Planned, Planner

FORMAT = 3  # 2: + the teacher's completion offsets, text hash and token log-probabilities (cross-tokenizer);
# 3: the same, compact (`teacher.codec`), and sampled stores
READS = (2, 3)
OPEN_SHARDS = 4  # shards mapped at once while reading (each keeps a few decoded chunks)
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
PIECES = "pieces.json"
DTYPES = {"ids": "int32", "logprobs": "float16", "tokens": "int32", "actual": "float32",
          "ends": "int32 (byte offsets in the completion text, align.completion_text)",
          "values": "teacher logit - logsumexp over the teacher vocabulary (T = 1)"}
DTYPES_COMPACT = {"shard": "uint8 arrays coded by mlx_distill.teacher.codec (format 3)",
                  "ids": "exact", "logprobs": f"within {codec.MAX_ERROR:.2f} nats of float32 for values >= {codec.FLOOR}",
                  "values": DTYPES["values"] + "; a sampled store: log p_T at its temperature, with counts"}


# ----------------------------------------------------------------------------- one shard
def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def encode_shard(items: list, k: int, tokenizer, fmt: int = 2, sampled: bool = False) -> tuple[dict, dict, int]:
    """Scored examples [(example, ids (n, M), logprobs (n, M), actual (n,)[, counts (n, N)])] -> (the
    shard's arrays, their manifest entries {id: ...}, payload bytes: ids + log-probabilities, or in
    format 3 the coded rows). Format 3 arrays carry their safetensors metadata under ``"__meta__"``."""
    if fmt == 3:
        return _encode_compact(items, k, tokenizer, sampled)
    ids = np.concatenate([b[1] for b in items]).astype(np.int32)
    lps = np.concatenate([b[2] for b in items]).astype(np.float16)
    toks = np.concatenate([b[0].tokens for b in items]).astype(np.int32)
    actual = np.concatenate([b[3] for b in items]).astype(np.float32)
    row = tok = 0
    entries, ends = {}, []
    for e, i, _, _ in items:
        text, e_ends = align.completion_text(tokenizer, e.tokens[e.prompt_len:])
        ends.append(np.concatenate([np.zeros(e.prompt_len, np.int64), e_ends]))
        entries[e.id] = {"shard": k, "row": row, "n": int(len(i)), "first": first_target(e.prompt_len),
                         "tok": tok, "length": int(len(e.tokens)), "prompt_len": int(e.prompt_len),
                         "sha256": tokens_sha(e.tokens), "text_sha256": align.text_sha(text),
                         "text_bytes": len(text)}
        row, tok = row + len(i), tok + len(e.tokens)
    arrays = {"ids": ids, "logprobs": lps, "tokens": toks, "actual": actual,
              "ends": np.concatenate(ends).astype(np.int32)}
    return arrays, entries, int(ids.nbytes + lps.nbytes)


def _encode_compact(items: list, k: int, tokenizer, sampled: bool) -> tuple[dict, dict, int]:
    row = tok = 0
    entries, blocks = {}, []
    for it in items:
        e, i, lp, act = it[:4]
        text, e_ends = align.completion_text(tokenizer, e.tokens[e.prompt_len:])
        ends = np.concatenate([np.zeros(e.prompt_len, np.int64), e_ends])
        first = first_target(e.prompt_len)
        blocks.append(codec.example_block(e.tokens, e.prompt_len, first, i, lp, act, ends,
                                          counts=it[4] if sampled else None))
        entries[e.id] = {"shard": k, "row": row, "n": int(len(i)), "first": first,
                         "tok": tok, "length": int(len(e.tokens)), "prompt_len": int(e.prompt_len),
                         "sha256": tokens_sha(e.tokens), "text_sha256": align.text_sha(text),
                         "text_bytes": len(text)}
        row, tok = row + len(i), tok + len(e.tokens)
    width = int(items[0][1].shape[1]) if items else 1
    arrays, meta = codec.encode_shard(blocks, width, sampled=sampled)
    return {**arrays, "__meta__": meta}, entries, int(arrays["rows"].nbytes + arrays["table"].nbytes)


def decode_shard(path: Path, fmt: int = 2):
    """A shard file -> its arrays by `encode_shard`'s names, mapped (read when sliced)."""
    if fmt == 3:
        return codec.LazyShard(path)
    return codec.map_safetensors(path)


def write_shard(path: Path, arrays: dict) -> int:
    """Write one shard atomically; its size in bytes."""
    from safetensors.numpy import save_file

    arrays = dict(arrays)
    meta = arrays.pop("__meta__", None)
    with atomic_path(path) as tmp:
        if meta is not None:
            codec.write_shard(tmp, arrays, meta)
        else:
            save_file(arrays, str(tmp), metadata={"format": "mlx_distill.teacher.logits/2"})
    return path.stat().st_size


def bytes_per_token(shards: list) -> dict:
    pos = sum(s["positions"] for s in shards)
    payload = sum(s["payload_bytes"] for s in shards)
    files = sum(s["bytes"] for s in shards)
    return {"positions": pos, "payload_bytes_per_token": round(payload / pos, 2) if pos else 0.0,
            "file_bytes_per_token": round(files / pos, 2) if pos else 0.0}


# ----------------------------------------------------------------------------- writing
class StoreWriter:
    """Appends scored examples to a store folder, `shard_size` examples a shard: each shard is written
    atomically, then the manifest (`save_manifest`) that lists it; a crash in between leaves an
    unreferenced file that the next shard overwrites."""

    def __init__(self, out: Path, manifest: dict, tokenizer, save_manifest: Callable[[], None]):
        self.out, self.tokenizer, self.save_manifest = Path(out), tokenizer, save_manifest
        self.shards, self.done = manifest["shards"], manifest["examples"]
        self.fmt, self.sampled = int(manifest.get("format", FORMAT)), bool(manifest.get("sampled"))
        self.buf: list = []

    def __len__(self) -> int:
        return len(self.buf)

    def add(self, example, ids: np.ndarray, logprobs: np.ndarray, actual: np.ndarray,
            counts: np.ndarray | None = None) -> None:
        self.buf.append((example, ids, logprobs, actual) + ((counts,) if counts is not None else ()))

    def flush(self) -> None:
        if not self.buf:
            return
        items = self.buf[:]
        self.buf.clear()  # taken even if writing fails: a `finally: flush()` must not write them twice
        k = len(self.shards)
        arrays, entries, payload = encode_shard(items, k, self.tokenizer, self.fmt, self.sampled)
        nbytes = write_shard(self.out / shard_name(k), arrays)
        self.shards.append({"file": shard_name(k), "examples": len(items), "positions": sum(len(b[1]) for b in items),
                            "payload_bytes": payload, "bytes": nbytes})
        self.done.update(entries)
        self.save_manifest()


# ----------------------------------------------------------------------------- reading
class TopMStore(Planned):
    """Read a logits folder, check it against the student's examples, serve KD batch arrays.

    `check` must see an example before `batch_arrays` serves it; both are the store's `Planner`
    (`teacher.plan`: the alignment modes, the coverage check and its messages)."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            raise InputError(f"{self.dir}: no {MANIFEST}; create teacher logits with "
                             "`python -m mlx_distill logits --teacher MODEL --data CORPUS --out DIR`")
        man = read_json(mpath)
        if man.get("stage") != "logits" or man.get("format") not in READS:
            old = man.get("stage") == "logits" and isinstance(man.get("format"), int) and man["format"] < min(READS)
            raise InputError(f"{mpath}: not a logits folder of format 2 or 3 (stage {man.get('stage')!r}, format "
                             f"{man.get('format')!r})" + ("; it was written before cross-tokenizer alignment "
                                                         "(format 2 adds the teacher's text offsets and token "
                                                         "log-probabilities)" if old else "")
                             + "; re-extract with this version: `python -m mlx_distill logits ... --out NEW_DIR`")
        self.manifest = man
        self.sampled = man.get("sampled") or None  # {n, temperature, seed}: a sampled store
        self.m = int(self.sampled["n"]) if self.sampled else int(man["top_m"])
        self.format = int(man["format"])
        self.entries = man["examples"]
        self._shards: dict[int, object] = {}  # the open shards, least recently used first (OPEN_SHARDS)
        conf = man.get("config", {})
        self.planner = Planner(self, self.m, man["tokenizer"]["fingerprint"], str(self.dir),
                               {"teacher": conf.get("teacher", "TEACHER"), "data": conf.get("data", "CORPUS"),
                                "dir": str(self.dir)})

    # -------------------------------------------------------------- storage
    def shard(self, k: int):
        if k in self._shards:
            self._shards[k] = self._shards.pop(k)  # most recently used last
            return self._shards[k]
        f = self.dir / self.manifest["shards"][k]["file"]
        if not f.is_file():
            raise InputError(f"{f}: shard listed in {self.dir / MANIFEST} is missing; re-extract with --resume "
                             "into a fresh folder")
        self._shards[k] = decode_shard(f, self.format)
        while len(self._shards) > OPEN_SHARDS:  # unmapped once nothing refers to it
            self._shards.pop(next(iter(self._shards)))
        return self._shards[k]

    def counts(self, example_id: str) -> np.ndarray:
        """A sampled store: (n, N) int32, how often each slot's id was drawn (0: empty slot)."""
        e = self.entries[example_id]
        return np.asarray(self.shard(e["shard"])["counts"][e["row"]: e["row"] + e["n"]])

    def scored_tokens(self, example_id: str) -> np.ndarray:
        e = self.entries[example_id]
        return np.asarray(self.shard(e["shard"])["tokens"][e["tok"]: e["tok"] + e["length"]])

    def teacher_ends(self, example_id: str) -> np.ndarray:
        """End offset (bytes of the shared completion text) of every scored token."""
        e = self.entries[example_id]
        return self.shard(e["shard"])["ends"][e["tok"]: e["tok"] + e["length"]].astype(np.int64)

    def rows(self, example_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n, M) int32, logprobs (n, M) float16 (format 2) / float32 (format 3)) of one example,
        target indices first..first+n-1 (a sampled store: the distinct drawn ids and log p_T)."""
        e = self.entries[example_id]
        s = self.shard(e["shard"])
        return np.asarray(s["ids"][e["row"]: e["row"] + e["n"]]), np.asarray(s["logprobs"][e["row"]: e["row"] + e["n"]])

    def token_logprobs(self, example_id: str) -> np.ndarray:
        """(n,) float32: the teacher's log-probability of the token actually there (NaN: unknown)."""
        e = self.entries[example_id]
        return self.shard(e["shard"])["actual"][e["row"]: e["row"] + e["n"]].astype(np.float32)

    def unknown_logprobs(self, example_id: str) -> np.ndarray:
        """Cumulative count of rows whose token log-probability is unknown (NaN), length n + 1."""
        return np.concatenate([[0], np.cumsum(np.isnan(self.token_logprobs(example_id)))])

    def teacher_pieces(self) -> "align.Pieces":
        strings = read_json(self.dir / self.manifest["tokenizer"]["file"])
        return align.Pieces.from_json(read_json(self.dir / PIECES), strings)

    # -------------------------------------------------------------- checking and serving (the planner)
    def check(self, examples: list, student_vocab_size: int, tokenizer, min_coverage: float = 0.95,
              where: str = "train", mode: str = "auto") -> dict:
        """Plan how every example's loss positions read the store; report and enforce coverage."""
        return self.planner.check(examples, student_vocab_size, tokenizer, min_coverage, where, mode)

    def batch_arrays(self, batch, top_k: int | None = None) -> dict:
        return self.planner.batch_arrays(batch, top_k)
