"""Teacher <-> student alignment: which teacher signal each student completion position gets.

The teacher scored an example inside *its* chat template; the student trains on it inside
its own. What both share is the completion text (the assistant's content), so alignment is
computed on that text, never on the templates::

    text = "Ann has 48 coins."
    teacher (byte-level BPE)   | Ann | has | 48    | coins | . |
    student (Metaspace/Unigram)| Ann | has | 4 | 8 | coins | . |
    class of the student token   m     m     spans   m       m

Each student completion token (the position predicting it) falls in one class:

- ``exact``: same tokenizer (equal fingerprints); ids map directly, every position aligns.
- ``matched``: the student token's text span equals a teacher token's span, so both models
  predict it from the same text. The teacher's top-M candidates are mapped into the student
  vocabulary by the bytes they decode to (`vocab_map`); candidates the student cannot spell
  as one token go to the "rest of vocabulary" bucket of `losses.kd_loss` and are counted.
- ``spans``: tokens whose boundaries disagree are grouped into the smallest spans where both
  sides start and end together (as TRL's GOLD trainer groups them). The span's signal is the
  probability of its text: the teacher's sequence log-probability (sum of its tokens'
  log-probabilities, stored by `logits`) against the student's chain rule over its own tokens
  (`losses.kd_loss`, ``span_*`` arguments, for why a binary KL).
- ``uld`` (``--kd-align uld`` instead of spans): the span's student positions are paired in
  order with its teacher positions (ULD, Boizard et al. 2024, pairs by position) and compared
  by the distance between their sorted probability vectors, which needs no vocabulary map.
- ``none``: no teacher signal: the text differs (`completion_text`), the token lies outside
  the shared text (templates, end-of-turn whitespace), or a group never closes.

Offsets are counted in UTF-8 bytes of the text, not characters: byte-level BPE and byte
fallback tokens can end inside a character, and bytes give both sides one exact unit. A
token's *piece* is the bytes it adds to the decoded text (`token_pieces`): byte-level BPE
pieces go through the GPT-2 byte alphabet, SentencePiece pieces turn ``▁`` into a space and
``<0xNN>`` into byte NN; special tokens (end-of-turn markers, ``<|im_start|>``) add nothing.
The shared text is the decoded completion with its outer whitespace stripped, so a
SentencePiece leading space or a template's newline after the end-of-turn marker does not
count; its sha256 is stored by `logits` and compared on load.

Public API (NumPy; all arrays int64):

    pieces = token_pieces(tok)                       # bytes per id (cached per tokenizer)
    text, ends = completion_text(tok, ids)           # shared text + end offset per token
    ends = token_offsets(tok, ids, text)             # the same against a given text
    al = align(teacher_ends, student_ends)           # Alignment: classes, partners, spans
    m = vocab_map(teacher_tok, student_tok)          # teacher id -> student id, -1 if none
"""

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

NONE, EXACT, MATCHED, SPANS, ULD = 0, 1, 2, 3, 4
CLASS_NAMES = {NONE: "none", EXACT: "exact", MATCHED: "matched", SPANS: "spans", ULD: "uld"}
MODES = ("auto", "exact", "matched", "spans", "uld")


# ----------------------------------------------------------------------------- token pieces
def _hf(tokenizer):
    """The transformers tokenizer inside mlx-lm's TokenizerWrapper (or the tokenizer itself;
    a transformers fast tokenizer's own ``_tokenizer`` is the bare Rust one, not wanted here)."""
    if type(tokenizer).__module__.startswith("mlx_lm"):
        return getattr(tokenizer, "_tokenizer", tokenizer)
    return tokenizer


@lru_cache(maxsize=1)
def _byte_decoder() -> dict:
    """GPT-2's printable stand-in character -> byte (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_types(hf) -> set:
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        return set()
    dec = json.loads(backend.to_str()).get("decoder") or {}
    out, todo = set(), [dec]
    while todo:
        d = todo.pop()
        if isinstance(d, dict):
            out.add(d.get("type"))
            todo.extend(d.get("decoders") or [])
    return out


@dataclass
class Pieces:
    """A tokenizer's spelling, all alignment needs of it: the bytes of every id, which ids are
    special, and the raw token strings (to match special tokens by name). `logits` stores the
    teacher's (`to_json`) so `train` aligns without the teacher's tokenizer files."""

    pieces: list
    special: np.ndarray
    strings: list

    def to_json(self) -> dict:
        return {"pieces": [p.hex() for p in self.pieces], "special": np.nonzero(self.special)[0].tolist()}

    @classmethod
    def from_json(cls, d: dict, strings: list) -> "Pieces":
        pieces = [bytes.fromhex(h) for h in d["pieces"]]
        special = np.zeros(len(pieces), bool)
        special[np.asarray(d["special"], np.int64)] = True
        return cls(pieces, special, list(strings) + [""] * (len(pieces) - len(strings)))


_PIECES: dict = {}  # id(hf) -> (hf, Pieces); the tokenizer is kept alive with its entry


def pieces_of(tokenizer) -> Pieces:
    """The `Pieces` of a tokenizer (transformers, mlx-lm's wrapper, or a `Pieces` itself);
    computed once per tokenizer object."""
    if isinstance(tokenizer, Pieces):
        return tokenizer
    hf = _hf(tokenizer)
    hit = _PIECES.get(id(hf))
    if hit is not None and hit[0] is hf:
        return hit[1]
    vocab = hf.get_vocab()
    n = max(vocab.values()) + 1
    bytelevel = "ByteLevel" in _decoder_types(hf)
    bd = _byte_decoder()
    pieces, strings = [b""] * n, [""] * n
    for s, i in vocab.items():
        strings[i] = s
        if bytelevel and all(c in bd for c in s):
            pieces[i] = bytes(bd[c] for c in s)
        elif not bytelevel and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            try:
                pieces[i] = bytes([int(s[3:5], 16)])  # SentencePiece byte fallback
            except ValueError:
                pieces[i] = s.encode()
        elif not bytelevel:
            pieces[i] = s.replace("\u2581", " ").encode()
        else:
            pieces[i] = s.encode()
    special = np.zeros(n, bool)
    for i, tok in getattr(hf, "added_tokens_decoder", {}).items():
        if i < n:
            if getattr(tok, "special", False):
                special[i] = True
            else:  # added (non-special) tokens are spelled as they are, in any family
                pieces[i] = tok.content.encode()
    for i in getattr(hf, "all_special_ids", []) or []:
        if 0 <= i < n:
            special[i] = True
    for i in np.nonzero(special)[0]:
        pieces[i] = b""
    out = Pieces(pieces, special, strings)
    _PIECES[id(hf)] = (hf, out)
    return out


def token_pieces(tokenizer) -> list[bytes]:
    """The bytes each id adds to the decoded text (b"" for special tokens)."""
    return pieces_of(tokenizer).pieces


def special_mask(tokenizer) -> np.ndarray:
    """(vocab,) bool: special tokens (chat-template markers, end of turn, padding)."""
    return pieces_of(tokenizer).special


# ----------------------------------------------------------------------------- offsets
def _raw(tokenizer, ids) -> tuple[bytes, np.ndarray]:
    pieces = token_pieces(tokenizer)
    ids = np.asarray(ids, np.int64)
    parts = [pieces[i] if 0 <= i < len(pieces) else b"" for i in ids.tolist()]
    ends = np.cumsum([len(p) for p in parts], dtype=np.int64) if parts else np.zeros(0, np.int64)
    return b"".join(parts), ends


def completion_text(tokenizer, ids) -> tuple[bytes, np.ndarray]:
    """(text, ends) of a token sequence: `text` is the UTF-8 of the decoded tokens (special
    tokens add nothing) with outer whitespace stripped: the text both sides of a pair share.
    ``ends[k]`` is where token k ends in `text`, in bytes, clipped to [0, len(text)]: tokens
    before the text (a prompt, a leading newline) end at 0, tokens after it at len(text)."""
    raw, ends = _raw(tokenizer, ids)
    text = raw.strip()
    lead = len(raw) - len(raw.lstrip())
    return text, np.clip(ends - lead, 0, len(text))


def token_offsets(tokenizer, ids, text) -> np.ndarray:
    """End offset (UTF-8 bytes) in `text` of every token of `ids`, clipped to [0, len(text)].
    `text` (str or bytes) must occur in the tokens' decoded text; ValueError otherwise."""
    raw, ends = _raw(tokenizer, ids)
    t = text.encode() if isinstance(text, str) else bytes(text)
    at = raw.find(t)
    if at < 0:
        raise ValueError(f"text {t[:40]!r}... does not occur in the decoded tokens {raw[:60]!r}...")
    return np.clip(ends - at, 0, len(t))


def text_sha(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


# ----------------------------------------------------------------------------- alignment
@dataclass
class Alignment:
    """Per student token k (the position predicting it is k - 1):

    cls[k]      NONE, MATCHED or SPANS (`align` never returns EXACT or ULD: the caller
                decides those from the tokenizers and --kd-align);
    partner[k]  MATCHED: the teacher token with the same span; SPANS: the first teacher token
                of the span; -1 otherwise;
    group[k]    SPANS: index into the span arrays; -1 otherwise.

    Spans (one row per group): student tokens ``s0[g] .. s1[g]`` and teacher tokens
    ``t0[g] .. t1[g]`` (inclusive) cover the same text."""

    cls: np.ndarray
    partner: np.ndarray
    group: np.ndarray
    s0: np.ndarray
    s1: np.ndarray
    t0: np.ndarray
    t1: np.ndarray

    def counts(self) -> dict:
        c = np.bincount(self.cls, minlength=5)
        return {"matched": int(c[MATCHED]), "spans": int(c[SPANS]), "none": int(c[NONE])}


def _starts(ends: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(1, np.int64), ends[:-1]]) if len(ends) else ends


def align(teacher_ends, student_ends) -> Alignment:
    """Align two tokenisations of one text, given each token's end offset in it (nondecreasing,
    as `completion_text` returns them; a token starts where the previous one ends; zero-width
    tokens lie outside the text or are special).

    Common boundaries are the offsets where both sides end a (non-empty) token, plus 0. Between
    two consecutive common boundaries lies one group: one student and one teacher token is a
    MATCHED pair, anything else a span. The token right after each side's last non-empty token
    (the end-of-turn marker, or whitespace the shared text strips) is MATCHED to its
    counterpart, and so on in order (a template's end-of-turn marker, then its newline): the
    first pair predicts the end of the text from the whole text. Vectorised; O(n log n)."""
    te, se = np.asarray(teacher_ends, np.int64), np.asarray(student_ends, np.int64)
    ts, ss = _starts(te), _starts(se)
    tw, sw = te > ts, se > ss
    n = len(se)
    cls = np.zeros(n, np.int8)
    partner = np.full(n, -1, np.int64)
    group = np.full(n, -1, np.int64)
    empty = np.zeros(0, np.int64)
    if not tw.any() or not sw.any():
        return Alignment(cls, partner, group, empty, empty, empty, empty)
    bounds = np.concatenate([[0], np.intersect1d(te[tw], se[sw])])
    t_idx, s_idx = np.nonzero(tw)[0], np.nonzero(sw)[0]
    tg = np.searchsorted(bounds, ts[t_idx], side="right") - 1
    sg = np.searchsorted(bounds, ss[s_idx], side="right") - 1
    closed = len(bounds) - 1  # groups 0 .. closed-1 end on a common boundary
    nt = np.bincount(tg, minlength=closed + 1)
    ns = np.bincount(sg, minlength=closed + 1)
    first_t = np.full(closed + 1, -1, np.int64)
    first_t[tg[::-1]] = t_idx[::-1]  # first teacher token of each group
    last_t = np.full(closed + 1, -1, np.int64)
    last_t[tg] = t_idx
    first_s = np.full(closed + 1, -1, np.int64)
    first_s[sg[::-1]] = s_idx[::-1]
    last_s = np.full(closed + 1, -1, np.int64)
    last_s[sg] = s_idx
    ok = (sg < closed) & (nt[sg] > 0)
    match = ok & (ns[sg] == 1) & (nt[sg] == 1)
    span = ok & ~match
    cls[s_idx[match]] = MATCHED
    partner[s_idx[match]] = first_t[sg[match]]
    # spans: every student token from the group's first to its last (zero-width ones inside too)
    gids = np.unique(sg[span])
    g_of = np.full(closed + 1, -1, np.int64)
    g_of[gids] = np.arange(len(gids))
    s0, s1, t0, t1 = first_s[gids], last_s[gids], first_t[gids], last_t[gids]
    if len(gids):
        lens = s1 - s0 + 1
        members = np.repeat(s0, lens) + (np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens))
        owner = np.repeat(np.arange(len(gids)), lens)
        cls[members] = SPANS
        group[members] = owner
        partner[members] = t0[owner]
    # the tokens after the text (end-of-turn markers and what follows them), paired in order: the
    # first pair is predicted from the whole text by both sides
    if se[s_idx[-1]] == te[t_idx[-1]] and cls[s_idx[-1]] != NONE:
        k = min(n - s_idx[-1] - 1, len(te) - t_idx[-1] - 1)
        cls[s_idx[-1] + 1: s_idx[-1] + 1 + k] = MATCHED
        partner[s_idx[-1] + 1: s_idx[-1] + 1 + k] = np.arange(t_idx[-1] + 1, t_idx[-1] + 1 + k)
    return Alignment(cls, partner, group, s0, s1, t0, t1)


# ----------------------------------------------------------------------------- vocabularies
def vocab_map(teacher, student, extra: dict | None = None) -> np.ndarray:
    """(teacher vocab,) int64: the student id spelling the same bytes as each teacher id, -1
    when the student has no such single token. `teacher` and `student` are tokenizers or
    `Pieces`. Special tokens map by their name (both ChatML: ``<|im_end|>`` -> ``<|im_end|>``);
    `extra` adds pairs (teacher id -> student id), e.g. one end-of-turn marker to the other.
    Where several student ids spell the same bytes, a regular piece wins over a byte-fallback
    ``<0xNN>`` piece."""
    t, s = pieces_of(teacher), pieces_of(student)
    index: dict = {}
    for i, p in enumerate(s.pieces):
        if p and not s.special[i]:
            j = index.get(p)
            if j is None or (s.strings[j].startswith("<0x") and len(s.strings[j]) == 6):
                index[p] = i
    special_index = {s.strings[i]: int(i) for i in np.nonzero(s.special)[0] if s.strings[i]}
    out = np.full(len(t.pieces), -1, np.int64)
    for i, p in enumerate(t.pieces):
        if t.special[i]:
            out[i] = special_index.get(t.strings[i], -1)
        elif p:
            out[i] = index.get(p, -1)
    for a, b in (extra or {}).items():
        if 0 <= a < len(out):
            out[a] = b
    return out
