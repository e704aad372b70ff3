"""Store format 3: the compact coding of one shard of teacher targets, and a lazy shard reader.

A shard holds, for a run of examples, one *row* per scored position (the teacher's targets for
predicting the next token) and the scored token ids and their byte ends (what the cross-tokenizer
alignment needs). A row is a set of (token id, teacher log-probability) slots: the top-M
(``kind="topm"``; empty ``-inf`` slots are left out, so a row has 0..M slots) or the distinct ids
of N draws with their counts (``kind="sampled"``, `logits --sampled-k`). Per row also the log-prob
of the token actually there (``actual``); for top-M, the teacher mass outside the row (the tail
bucket of `losses.kd_loss`, at T = 1) is kept through the top slot (below).

How each field is coded (chosen by measurement on the demo corpus scored by SmolLM2 at M = 25,
2835 positions, bytes per position after compression; `scripts/bench_kd.py` has the totals):

- **ids.** Each shard ranks the teacher ids it uses by frequency (the ``table``: rank -> id; a
  frequent token gets a small rank). Each row's ranks are sorted ascending and delta-coded (the
  first rank as is, then gaps - 1), in the narrowest unsigned integer width that holds the
  shard's largest gap (the per-shard width: 1, 2 or 4 bytes), byte planes apart, then LZMA2.
  Measured: raw ids sorted and delta-coded 18.8 B, frequency ranks 13.7 B (+ the table, amortised
  over the shard); the ids in rank order instead cost 26.5 B.
- **log-probs.** Relative to the row's top value: ``top`` as a 16-bit level of 0.001 nats (error
  <= 0.0005); each slot's gap ``d = top - lp >= 0`` on a uniform grid of ``LP_STEP`` = 0.039 nats
  down to ``FLOOR`` = -12 (so every log-prob >= -12 is within 0.0195 + 0.0005 = 0.02 nats of the
  float32 value), and a coarse grid of ``COARSE_STEP`` = 0.5 nats below it (error <= 0.25 there:
  a probability < 6e-6). 16-bit levels, byte planes, LZMA2: about 24 B at M = 25 (step 0.03 and
  no coarse grid: 26.9 B; ids sorted by rank make the log-probs unordered, and the order that
  would make them cheap, by value, makes the ids dearer: measured, both orders total ~40 B).
- **tail mass.** Rounding every slot by up to 0.02 nats moves the row's mass by up to 2%, which
  is the whole rest when the top-M hold 99.5%: measured on the demo store, the tail-bucket KD loss
  (T = 2) was 1.4% off format 2. So the row's top slot (its index and a 16-bit correction of 1e-4
  nats) is set so that the row's mass equals the float32 mass, within the same 0.02-nat bound:
  0.14% off, for ~1.3 B/token (a stored tail field cost the same and did not fix the loss).
- **actual**: when the token actually there is in its row (97% on the demo store), the index of its
  slot (its log-prob is that slot's); else a 16-bit level of 0.002 nats (error <= 0.001).
  **counts** (sampled: one byte, N <= 255), slots per row (one byte while M <= 255).
- **tokens** (the scored ids, 2 or 4 bytes) and **ends** (byte offsets, coded as each token's
  byte length): one LZMA2 stream per shard (the repeated system prompt compresses away).

Rows are compressed in chunks of whole examples (``CHUNK_ROWS`` rows or a few more), so that a
random example costs one small decode (training reads examples in shuffled order), not the whole shard. Everything is stored as
uint8 arrays in a safetensors file (header, then raw bytes): `ShardFile` maps it (``np.memmap``)
and decodes only the chunk asked for, so a store larger than memory can be read.

Why LZMA2 and not zlib: 8% smaller on these streams (the 48 B/token target has little slack);
decoding stays a small share of a KD step (bench_kd: decode % of step).
"""

import json
import lzma
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np

FORMAT = 3
LP_STEP = 0.039  # grid of d = top - lp for lp >= FLOOR
TOP_STEP = 0.001  # grid of the row's top log-prob
FLOOR = -12.0  # log-probs >= FLOOR are within MAX_ERROR of float32
COARSE_STEP = 0.5  # grid below FLOOR
MAX_ERROR = LP_STEP / 2 + TOP_STEP / 2  # 0.02 nats, for log-probs >= FLOOR (the top slot: within it too)
ACTUAL_STEP = 0.002
CORR_STEP = 1e-4  # the top slot's mass correction (`_mass_fix`)
CHUNK_ROWS = 1024  # a chunk closes once it holds this many rows (whole examples)
NAN16 = 65535  # the 16-bit level of NaN (unknown) / -inf (no mass)
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]  # measured: as small as 9 on these streams, 3x faster to write


def _pack(raw: bytes) -> bytes:
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_FILTERS)


def _unpack(blob) -> bytes:
    return lzma.decompress(bytes(blob), format=lzma.FORMAT_RAW, filters=_FILTERS)


def _width(maxval: int) -> int:
    return 1 if maxval < 1 << 8 else 2 if maxval < 1 << 16 else 4


def _planes(a: np.ndarray, w: int) -> bytes:
    """Unsigned values in `w` bytes each, written as w byte planes (low bytes first)."""
    b = np.ascontiguousarray(np.asarray(a).astype(f"<u{w}")).view(np.uint8).reshape(-1, w)
    return b.T.tobytes()


def _unplanes(buf: memoryview | bytes, n: int, w: int) -> np.ndarray:
    b = np.frombuffer(buf, np.uint8, count=n * w).reshape(w, n).T
    return np.ascontiguousarray(b).view(f"<u{w}").reshape(n).astype(np.int64)


# ----------------------------------------------------------------------------- scalar quantizers
def quantize_top(top: np.ndarray) -> np.ndarray:
    return np.clip(np.round(-np.asarray(top, np.float64) / TOP_STEP), 0, NAN16 - 1).astype(np.int64)


def dequantize_top(q: np.ndarray) -> np.ndarray:
    return -np.asarray(q, np.float64) * TOP_STEP


def _fine_levels(top: np.ndarray) -> np.ndarray:
    """Per row n0: gaps d < (n0 + 0.5) * LP_STEP are on the fine grid (covers every lp >= FLOOR)."""
    return np.ceil(np.maximum(top - FLOOR, 0.0) / LP_STEP).astype(np.int64)


def quantize_gap(d: np.ndarray, top: np.ndarray) -> np.ndarray:
    """d = top - lp (>= 0, `top` the dequantized row top, broadcast per slot) -> 16-bit level."""
    d = np.maximum(np.asarray(d, np.float64), 0.0)
    n0 = _fine_levels(top)
    edge = (n0 + 0.5) * LP_STEP
    fine = np.round(d / LP_STEP)
    coarse = n0 + 1 + np.round(np.maximum(d - edge, 0.0) / COARSE_STEP)
    q = np.where(d < edge, fine, coarse)
    q = np.where(np.isfinite(d), q, NAN16 - 1)
    return np.clip(q, 0, NAN16 - 1).astype(np.int64)


def dequantize_gap(q: np.ndarray, top: np.ndarray) -> np.ndarray:
    q = np.asarray(q, np.int64)
    n0 = _fine_levels(top)
    edge = (n0 + 0.5) * LP_STEP
    return np.where(q <= n0, q * LP_STEP, edge + (q - n0 - 1) * COARSE_STEP)


def _quantize_neg(x: np.ndarray, step: float) -> np.ndarray:
    """A value <= 0 (NaN / -inf allowed) as a 16-bit level of -x."""
    x = np.asarray(x, np.float64)
    q = np.clip(np.round(-np.minimum(np.nan_to_num(x, nan=0.0, neginf=-1e9), 0.0) / step), 0, NAN16 - 1)
    return np.where(np.isfinite(x), q, NAN16).astype(np.int64)


def _dequantize_neg(q: np.ndarray, step: float, missing: float) -> np.ndarray:
    q = np.asarray(q, np.int64)
    return np.where(q == NAN16, missing, -q * step).astype(np.float32)


def tail_logmass(lps: np.ndarray) -> np.ndarray:
    """log(1 - sum exp(lps)) per row (float64; -inf when the row holds all the mass)."""
    lp = np.asarray(lps, np.float64)
    s = np.exp(np.where(np.isfinite(lp), lp, -np.inf)).sum(-1)
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(1.0 - s, 0.0))


# ----------------------------------------------------------------------------- rows
def _encode_rows(ids: np.ndarray, lps: np.ndarray, actual: np.ndarray, targets: np.ndarray | None,
                 counts: np.ndarray | None, rank_of: np.ndarray, widths: dict) -> bytes:
    """One chunk of rows -> its raw (uncompressed) bytes; see the module docstring."""
    keep = np.isfinite(lps) & (lps > -np.inf) if counts is None else counts > 0
    k = keep.sum(1)
    ranks = np.where(keep, rank_of[np.where(keep, ids, 0)], np.iinfo(np.int64).max)
    order = np.argsort(ranks, axis=1, kind="stable")
    r_sorted = np.take_along_axis(ranks, order, 1)
    lp_sorted = np.take_along_axis(np.asarray(lps, np.float64), order, 1)
    top = np.where(k > 0, np.max(np.where(keep, lps, -np.inf), 1, initial=-np.inf), 0.0)
    qtop = quantize_top(top)
    topd = dequantize_top(qtop)
    slot = np.arange(ids.shape[1])[None, :] < k[:, None]  # the first k sorted slots are the kept ones
    gaps = np.diff(np.where(slot, r_sorted, 0), axis=1, prepend=-1) - 1
    gaps[:, 0] = np.where(k > 0, r_sorted[:, 0], 0)
    gaps = gaps[slot]
    lv = quantize_gap(topd[:, None] - lp_sorted, topd[:, None])
    levels = lv[slot]
    # the token actually there is in its row ~97% of the time: then its slot (1 + index in the
    # rank-sorted row) stands for its log-prob; else 0 and the value itself (16-bit level)
    ids_sorted = np.take_along_axis(np.asarray(ids, np.int64), order, 1)
    hit = slot & (ids_sorted == (np.asarray(targets, np.int64)[:, None] if targets is not None else -1))
    hit &= np.isfinite(np.asarray(actual))[:, None]
    aslot = np.where(hit.any(1), hit.argmax(1) + 1, 0)
    parts = [_planes(k, widths["k"]), _planes(qtop, 2), _planes(gaps, widths["gap"]), _planes(levels, 2),
             _planes(aslot, widths["k"]), _planes(_quantize_neg(np.asarray(actual)[aslot == 0], ACTUAL_STEP), 2)]
    if counts is None:  # top-M: the row's mass kept exact through its top slot (see `_mass_fix`)
        tslot, corr = _mass_fix(lp_sorted, slot, lv, topd)
        parts += [_planes(tslot, widths["k"]), _planes(corr, 2)]
    else:
        parts.append(np.take_along_axis(counts, order, 1)[slot].astype(np.uint8).tobytes())
    return b"".join(parts)


def _mass_fix(lp_sorted: np.ndarray, slot: np.ndarray, lv: np.ndarray, topd: np.ndarray):
    """(index of each row's top slot, its 16-bit zigzag correction in CORR_STEP units).

    The tail bucket (`losses.kd_loss(tail=True)`) is 1 - the row's mass: with the rest small
    (0.005 when the top-M hold 99.5%), rounding every slot by up to 0.02 nats could move it by
    its own size. So the top slot's value is set to what makes the row's mass equal the
    float32 mass, within the same error bound; the tail then needs no field of its own."""
    R = len(lp_sorted)
    if not R:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    true = np.where(slot, lp_sorted, -np.inf)
    j = np.argmax(true, 1)
    deq = np.where(slot, topd[:, None] - dequantize_gap(lv, topd[:, None]), -np.inf)
    vj = deq[np.arange(R), j]
    others = np.exp(deq).sum(1) - np.exp(vj)
    mass = np.exp(true).sum(1)
    tj = true[np.arange(R), j]
    bound = MAX_ERROR - CORR_STEP
    with np.errstate(divide="ignore", invalid="ignore"):  # rows without slots: -inf - -inf, set to 0 below
        want = np.clip(np.log(np.maximum(mass - others, 1e-300)), tj - bound, tj + bound)
        corr = np.round((want - vj) / CORR_STEP)
    corr = np.where(np.isfinite(corr), np.clip(corr, -32767, 32767), 0).astype(np.int64)
    return j, np.where(corr >= 0, 2 * corr, -2 * corr - 1)


def _decode_rows(raw: bytes, R: int, width: int, table: np.ndarray, widths: dict, sampled: bool) -> dict:
    """Inverse of `_encode_rows`: ids (R, width) int32 (0 in empty slots), logprobs (R, width)
    float32 sorted descending (-inf in empty slots), actual (R,), and tail (R,) or counts (R, width)."""
    mv = memoryview(raw)
    pos = 0

    def take(n, w):
        nonlocal pos
        out = _unplanes(mv[pos: pos + n * w], n, w)
        pos += n * w
        return out

    k = take(R, widths["k"])
    topd = dequantize_top(take(R, 2))
    S = int(k.sum())
    gaps = take(S, widths["gap"])
    levels = take(S, 2)
    aslot = take(R, widths["k"])
    miss = aslot == 0
    actual = np.empty(R, np.float32)
    actual[miss] = _dequantize_neg(take(int(miss.sum()), 2), ACTUAL_STEP, np.nan)
    if sampled:
        cnt = np.frombuffer(mv[pos: pos + S], np.uint8).astype(np.int64)
    else:
        tslot, z = take(R, widths["k"]), take(R, 2)
        corr = np.where(z % 2 == 0, z // 2, -(z + 1) // 2) * CORR_STEP
    row = np.repeat(np.arange(R), k)
    start = np.cumsum(k) - k
    col = np.arange(S) - np.repeat(start, k)
    # ranks: the first of each row as is, then previous + gap + 1
    step = np.where(col == 0, gaps, gaps + 1)
    cs = np.cumsum(step)
    base = np.zeros(R, np.int64)
    nz = k > 0
    base[nz] = cs[start[nz]] - step[start[nz]]
    ranks = cs - np.repeat(base, k)
    lp = (np.repeat(topd, k) - dequantize_gap(levels, np.repeat(topd, k))).astype(np.float32)
    ids = np.zeros((R, width), np.int32)
    lps = np.full((R, width), -np.inf, np.float32)
    ids[row, col] = table[ranks]
    lps[row, col] = lp
    if not sampled:
        has = k > 0
        lps[np.nonzero(has)[0], tslot[has]] += corr[has].astype(np.float32)
    actual[~miss] = lps[~miss, aslot[~miss] - 1]  # the actual token's slot (before the sort below)
    order = np.argsort(-lps, axis=1, kind="stable")
    out = {"ids": np.take_along_axis(ids, order, 1), "logprobs": np.take_along_axis(lps, order, 1),
           "actual": actual}
    if sampled:
        c = np.zeros((R, width), np.int32)
        c[row, col] = cnt
        out["counts"] = np.take_along_axis(c, order, 1)
    else:
        out["tail"] = tail_logmass(out["logprobs"]).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- shards
def encode_shard(blocks: list[dict], width: int, sampled: bool = False) -> tuple[dict, dict]:
    """Examples -> (uint8 arrays, metadata strings) of one format-3 shard.

    Each block is one example: ``ids`` (n, width) int, ``logprobs`` (n, width) float (-inf: empty
    slot; top-M rows need not be sorted), ``actual`` (n,), ``tokens`` (L,) int, ``ends`` (L,) int
    (non-decreasing), optionally ``targets`` (n,) int, the token actually there at each row (then
    ``actual`` costs a slot index when that token is in the row), and with ``sampled`` ``counts``
    (n, width) int (0: empty slot). `width` is M
    (top-M) or N (sampled: the distinct ids of N draws fit in N slots)."""
    ids_all = [np.asarray(b["ids"], np.int64) for b in blocks]
    lps_all = [np.asarray(b["logprobs"], np.float32) for b in blocks]
    if sampled:
        used = [i[np.asarray(b["counts"]) > 0] for i, b in zip(ids_all, blocks)]
    else:
        used = [i[np.isfinite(lp)] for i, lp in zip(ids_all, lps_all)]
    flat = np.concatenate(used) if used else np.zeros(0, np.int64)
    uniq, cnt = np.unique(flat, return_counts=True)
    table = uniq[np.lexsort((uniq, -cnt))]  # rank -> id, most frequent first (ties: by id)
    rank_of = np.zeros(int(table.max()) + 1 if len(table) else 1, np.int64)
    rank_of[table] = np.arange(len(table))
    widths = {"k": _width(width), "gap": _width(len(table)), "table": _width(int(table.max()) if len(table) else 0)}
    chunks, rows, first_ex = [], [0], []
    bounds, c = [], 0
    while c < len(blocks):  # whole examples per chunk, CHUNK_ROWS rows or more
        e, n = c, 0
        while e < len(blocks) and (n < CHUNK_ROWS or e == c):
            n, e = n + len(ids_all[e]), e + 1
        bounds.append((c, e))
        c = e
    for c, e in bounds:
        part = blocks[c: e]
        ids = np.concatenate(ids_all[c: e]).reshape(-1, width)
        lps = np.concatenate(lps_all[c: e]).reshape(-1, width)
        actual = np.concatenate([np.asarray(b["actual"], np.float32).reshape(-1) for b in part])
        tg = [b.get("targets") for b in part]
        targets = None if any(t is None for t in tg) else np.concatenate([np.asarray(t, np.int64) for t in tg])
        counts = np.concatenate([np.asarray(b["counts"]) for b in part]).reshape(-1, width) if sampled else None
        chunks.append(_pack(_encode_rows(ids, lps, actual, targets, counts, rank_of, widths)))
        rows.append(rows[-1] + len(ids))
        first_ex.append(c)
    offsets = np.cumsum([0] + [len(b) for b in chunks]).astype(np.int64)
    tokens = np.concatenate([np.asarray(b["tokens"], np.int64) for b in blocks]) if blocks else np.zeros(0, np.int64)
    lengths = []
    for b in blocks:
        e = np.asarray(b["ends"], np.int64)
        d = np.diff(e, prepend=0)
        if len(d) and d.min() < 0:
            raise ValueError("token ends must be non-decreasing within an example")
        lengths.append(d)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    widths.update(tokens=_width(int(tokens.max()) if len(tokens) else 0),
                  ends=_width(int(lengths.max()) if len(lengths) else 0))
    arrays = {
        "table": np.frombuffer(_pack(_planes(table, widths["table"])), np.uint8),
        "rows": np.frombuffer(b"".join(chunks), np.uint8),
        "chunk_offsets": offsets.view(np.uint8),
        "chunk_rows": np.asarray(rows, np.int64).view(np.uint8),
        "chunk_examples": np.asarray(first_ex + [len(blocks)], np.int64).view(np.uint8),
        "tokens": np.frombuffer(_pack(_planes(tokens, widths["tokens"]) + _planes(lengths, widths["ends"])), np.uint8),
    }
    meta = {"format": f"mlx_distill.teacher.store/{FORMAT}", "kind": "sampled" if sampled else "topm",
            "width": str(width), "widths": json.dumps(widths), "table_size": str(len(table)),
            "n_tokens": str(len(tokens)), "chunk_rows": str(CHUNK_ROWS), "examples": str(len(blocks)),
            "lp_step": str(LP_STEP), "floor": str(FLOOR)}
    return arrays, meta


def write_shard(path: str | Path, arrays: dict, meta: dict) -> None:
    from safetensors.numpy import save_file

    # safetensors refuses zero-length arrays on some versions: pad empty ones to one byte (the
    # lengths that matter are in the metadata and the offsets)
    save_file({k: (v if v.size else np.zeros(1, np.uint8)) for k, v in arrays.items()}, str(path), metadata=meta)


class ShardFile:
    """A format-3 shard, mapped (not read): the header is parsed, each chunk of rows decoded on
    demand (the last `cache` decoded chunks are kept); tokens/ends are decoded on first use."""

    def __init__(self, path: str | Path, cache: int = 8):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.meta = header.pop("__metadata__", {})
        if not self.meta.get("format", "").endswith(f"/{FORMAT}"):
            raise ValueError(f"{self.path}: not a format-{FORMAT} shard ({self.meta.get('format')!r})")
        self._map = np.memmap(self.path, np.uint8, mode="r")
        self._base = 8 + n
        self._spans = {k: tuple(v["data_offsets"]) for k, v in header.items()}
        self.width = int(self.meta["width"])
        self.sampled = self.meta["kind"] == "sampled"
        self.widths = json.loads(self.meta["widths"])
        self.chunk_examples = np.frombuffer(self._bytes("chunk_examples"), np.int64)
        self.offsets = np.frombuffer(self._bytes("chunk_offsets"), np.int64)
        self.chunk_rows = np.frombuffer(self._bytes("chunk_rows"), np.int64)
        size = int(self.meta["table_size"])
        self.table = _unplanes(_unpack(self._raw("table")), size, self.widths["table"]) if size else np.zeros(1, np.int64)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cache_size = cache
        self._tokens = None

    def _raw(self, name: str):
        a, b = self._spans[name]
        return self._map[self._base + a: self._base + b]

    def _bytes(self, name: str) -> bytes:
        return bytes(self._raw(name))

    def close(self) -> None:
        self._cache.clear()
        self._map = None  # the mapping goes when the last view does

    def tokens_and_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n,) int32, byte lengths (n,) int64) of every scored token of the shard; an
        example's end offsets are the cumulative sum of its slice (`ends_of`)."""
        if self._tokens is None:
            n = int(self.meta["n_tokens"])
            raw = _unpack(self._raw("tokens"))
            wt, we = self.widths["tokens"], self.widths["ends"]
            self._tokens = (_unplanes(raw[: n * wt], n, wt).astype(np.int32), _unplanes(raw[n * wt:], n, we))
        return self._tokens

    def empty(self, name: str) -> np.ndarray:
        """A zero-row array of a row field."""
        shapes = {"ids": ((0, self.width), np.int32), "logprobs": ((0, self.width), np.float32),
                  "counts": ((0, self.width), np.int32), "actual": ((0,), np.float32), "tail": ((0,), np.float32)}
        shape, dt = shapes[name]
        return np.zeros(shape, dt)

    def chunk_of(self, c: int) -> dict:
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        R = int(self.chunk_rows[c + 1] - self.chunk_rows[c])
        a, b = int(self.offsets[c]), int(self.offsets[c + 1])
        lo = self._spans["rows"][0]
        raw = _unpack(self._map[self._base + lo + a: self._base + lo + b])
        out = _decode_rows(raw, R, self.width, self.table, self.widths, self.sampled)
        self._cache[c] = out
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def rows(self, example_index: int, row: int, n: int) -> dict:
        """The decoded fields of rows row..row+n of the shard, which belong to its example
        `example_index` (so one chunk holds them all)."""
        c = int(np.searchsorted(self.chunk_examples, example_index, side="right")) - 1
        ch = self.chunk_of(c)
        r0 = row - int(self.chunk_rows[c])
        return {k: v[r0: r0 + n] for k, v in ch.items() if v is not None}


def ends_of(lengths: np.ndarray) -> np.ndarray:
    """One example's token byte lengths (a slice of `ShardFile.tokens_and_lengths`' second array) ->
    its end offsets."""
    return np.cumsum(np.asarray(lengths, np.int64))


class _Field:
    """One field of a `LazyShard`, sliced by rows (or tokens) like the format-2 array it replaces."""

    def __init__(self, shard: "LazyShard", name: str):
        self.shard, self.name = shard, name

    def __getitem__(self, s: slice) -> np.ndarray:
        return self.shard.slice(self.name, s.start or 0, s.stop)


class LazyShard:
    """A format-3 shard behind the format-2 interface: ``shard["ids"][a:b]``, ``["logprobs"]``,
    ``["actual"]``, ``["tail"]`` / ``["counts"]`` (rows a..b, decoded from the chunks that hold
    them), ``["tokens"]`` and ``["ends"]`` (scored tokens a..b; an ``ends`` slice must be one
    whole example, as `TopMStore` takes it)."""

    FIELDS = ("ids", "logprobs", "actual", "tail", "counts", "tokens", "ends")

    def __init__(self, path: str | Path, cache: int = 8):
        self.file = ShardFile(path, cache)

    def __getitem__(self, name: str) -> _Field:
        if name not in self.FIELDS:
            raise KeyError(name)
        return _Field(self, name)

    def __contains__(self, name: str) -> bool:
        return name in self.FIELDS and not (name == "counts" and not self.file.sampled) and \
            not (name == "tail" and self.file.sampled)

    def slice(self, name: str, a: int, b: int) -> np.ndarray:
        f = self.file
        if name in ("tokens", "ends"):
            tok, lengths = f.tokens_and_lengths()
            return tok[a:b] if name == "tokens" else ends_of(lengths[a:b]).astype(np.int32)
        rows = f.chunk_rows
        last = len(rows) - 2  # the last chunk
        if last < 0 or b is None:
            b = int(rows[-1]) if b is None else b
        if last < 0 or b <= a:
            return f.empty(name)
        c0 = min(int(np.searchsorted(rows, a, side="right")) - 1, last)
        c1 = min(int(np.searchsorted(rows, b - 1, side="right")) - 1, last)
        parts = []
        for c in range(c0, c1 + 1):
            ch = f.chunk_of(c)
            lo, hi = max(a, int(rows[c])) - int(rows[c]), min(b, int(rows[c + 1])) - int(rows[c])
            parts.append(ch[name][lo:hi])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def example_block(tokens: np.ndarray, prompt_len: int, first: int, ids: np.ndarray, logprobs: np.ndarray,
                  actual: np.ndarray, ends: np.ndarray, counts: np.ndarray | None = None) -> dict:
    """One example's `encode_shard` block from what `logits` has at hand (rows first..first+n-1;
    the token actually there at row r is tokens[first + r + 1])."""
    n = len(ids)
    b = {"ids": ids, "logprobs": np.asarray(logprobs, np.float32), "actual": actual, "tokens": tokens,
         "ends": ends, "targets": np.asarray(tokens)[first + 1: first + 1 + n]}
    if counts is not None:
        b["counts"] = counts
    return b


# ----------------------------------------------------------------------------- the sampled store
def example_seed(seed: int, example_id: str) -> np.random.Generator:
    """The generator of one example's draws: keyed by the store's seed and the example id (never
    by batch), so a resumed or re-batched run draws the same tokens."""
    import hashlib

    h = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), h])


def draw_rows(logits: np.ndarray, n: int, temperature: float, rng: np.random.Generator) -> dict:
    """Teacher logits (L, V) of one example's scored positions -> N draws per position, with
    replacement, from p_T = softmax(logits / T), as ``ids`` (L, N) int32 (the distinct ids first,
    0 after), ``counts`` (L, N) int32 (0: empty slot) and ``logprobs`` (L, N) float32 = log p_T(id)
    (-inf in empty slots): the rows of a sampled shard (`encode_shard(..., sampled=True)`)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1, keepdims=True))
    logp = z - lse
    cdf = np.cumsum(np.exp(logp), -1)
    u = rng.random((len(z), n)) * cdf[:, -1:]
    x = np.stack([np.searchsorted(cdf[r], u[r], side="right") for r in range(len(z))]) if len(z) else \
        np.zeros((0, n), np.int64)
    x = np.minimum(x, z.shape[-1] - 1)
    s = np.sort(x, -1)
    start = np.ones_like(s, bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    run = np.cumsum(start, -1) - 1
    rows = np.repeat(np.arange(len(s)), n)
    ids = np.zeros((len(s), n), np.int64)
    counts = np.zeros((len(s), n), np.int32)
    ids[rows, run.ravel()] = s.ravel()
    np.add.at(counts, (rows, run.ravel()), 1)
    lp = np.where(counts > 0, np.take_along_axis(logp, ids, -1), -np.inf).astype(np.float32)
    return {"ids": ids.astype(np.int32), "counts": counts, "logprobs": lp}


def map_safetensors(path: str | Path) -> dict:
    """A safetensors file's arrays as read-only views of one memory map (nothing is read until
    sliced): how a format-2 shard is opened lazily."""
    dtypes = {"I32": np.int32, "I64": np.int64, "F16": np.float16, "F32": np.float32, "U8": np.uint8,
              "BF16": None}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    mm = np.memmap(path, np.uint8, mode="r")
    out = {}
    for name, h in header.items():
        dt = dtypes.get(h["dtype"])
        if dt is None:
            raise ValueError(f"{path}: tensor {name} has dtype {h['dtype']}, not one a logits store writes")
        a, b = h["data_offsets"]
        out[name] = mm[8 + n + a: 8 + n + b].view(dt).reshape(h["shape"])
    return out
