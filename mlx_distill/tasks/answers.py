"""Answer extraction and equivalence: pure functions, with "invalid" as its own outcome.

The one home of every answer helper: think splitting, boxed and gold extraction, final-answer
location, GSM8K numbers, MATH equivalence, repetition loops and the judge-verdict parser.

Two kinds of gold answer (a benchmark's kind comes from its task definition; only these two
names are accepted here):

* ``gsm8k`` (also AIME/AMC-style integers): numeric equality. The official GSM8K grader
  (openai/grade-school-math, ``grade_school_math/dataset.py``) extracts ``#### (\\-?[0-9\\.\\,]+)``,
  deletes commas and compares strings; lm-evaluation-harness (``lm_eval/tasks/gsm8k/gsm8k.yaml``)
  adds a "flexible-extract" filter that takes the last number of the response. We do both, but
  compare *exact numbers*, not strings (``"18.0" == "18"``), and read what models really write:
  a sign before or after ``$`` (``-$5``, ``$-5``), the Unicode minus and a dash used as a sign,
  thousands grouped by commas, spaces or thin spaces (``1 000 000``, ``1\\,000``), units and
  ``%`` around the number, ``x = 5`` and ``16 * 2 = 32 bolts`` (the right-hand side of the last
  ``=``), and LaTeX numbers evaluated exactly (``10^3``, ``2^{10}``, ``\\sqrt{16}``,
  ``\\dfrac{3}{4}``, ``1\\frac12``). What cannot be evaluated exactly (``\\sqrt{2}``, ``\\pi``,
  ``18 dollars and 5 cents``) is ``invalid`` ("unparsable"), never read as its last digit.
* ``math`` (MATH, MATH-500, competition answers in LaTeX): compared with Hugging Face
  ``math-verify``, gold first (``verify(gold, pred)``: the function is not symmetric). Its own
  timeouts use ``signal.alarm``, which only works in the main thread, so we call it with
  ``parsing_timeout=None`` / ``timeout_seconds=None`` and enforce our own timeout that works in
  any thread (``_call_with_timeout``).

Where the final answer is (``_locate``), on the text after ``</think>``:

1. The *last* of these markers in the text wins: ``#### x``; ``\\boxed{x}`` / ``\\fbox{x}``;
   a "Final Answer:" or "the final answer is" sentence (the Minerva format "Final Answer: The
   final answer is 7.78. I hope it is correct." reads 7.78). So an intermediate box loses to a
   later "the final answer is $10,455$", and a final-answer sentence that itself holds a box is
   read through that box (the box comes after the marker).
2. Without any of them, "the answer is X" / "Answer: X" (unless X is a whole sentence).
3. Otherwise, for ``gsm8k``, the last number of the text (lm-eval's flexible extract); a number
   that is part of a LaTeX expression (``$10^3$``, ``\\frac{3}{4}``) brings the whole expression.
   For ``math``, the last math span (``$…$``, ``\\(…\\)``, ``\\[…\\]``) or number, whichever
   comes later (Math-Verify reads unmarked prose the same way).

A marker's answer is the rest of its sentence, math spans kept whole; a sentence that names
its answer ("The largest $n$ is 34.") gives what follows its last "is"/"are"/"equals", or the
one number / math span in it.

When the gold has several parts (``-2, 1``; ``(1,2),(2,1)``; ``k = 45, n = 2``) and the answer
is a run of adjacent boxes (``\\boxed{-2} and \\boxed{1}``), the run is graded as one answer
(math-verify compares the parts as a set); a single-part gold uses the last box.

The extracted answer is the final number or expression: for ``gsm8k`` the number text
(``16 * 2 = 32 bolts`` -> ``32``), for ``math`` the marker's content (``x = 5`` -> ``5``).

A response is ``invalid`` (counted apart from ``wrong``) when no final answer can be found or
the found answer cannot be read as a number / expression.
"""

from __future__ import annotations

import collections
import ctypes
import math
import re
import threading
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from mlx_distill.config import CorpusConfig

KINDS = ("gsm8k", "math")

# The answer-format instruction every prompt asks with ({format_instruction} in prompts/*.txt):
# training (data.record_to_messages), evaluation (evaluate.render_user) and the corpus solver.
FORMAT_INSTRUCTIONS = {
    "####": "Solve the problem step by step. Write the final answer on the last line as '#### <answer>'.",
    "boxed": "Solve the problem step by step. Put the final answer within \\boxed{}.",
}


def normalise_kind(kind: str) -> str:
    """``kind`` itself when it is one of ``KINDS``. Benchmark names (math500, aime24, ...) are mapped
    to their kind by the task registry, not here."""
    if kind in KINDS:
        return kind
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS} "
                     "(a benchmark's answer kind comes from its task definition)")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None   # the final answer found in the response (None: no final answer)
    status: str             # "correct" | "wrong" | "invalid"
    gold: str               # the gold answer as compared (after ####-stripping / unboxing)
    method: str             # "numeric" | "math-verify" | "string" | "none"
    reason: str = ""        # why invalid: "no answer", "unparsable", "timeout"

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- <think>
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def split_think(text: str | None) -> tuple[str | None, str | None]:
    """(thinking, final) of a response, both stripped.

    ``"<think>r</think>a"`` -> ``("r", "a")``; a lone ``</think>`` (the opening tag was in the
    prompt) counts as closed: ``"r</think>a"`` -> ``("r", "a")``; a ``<think>`` never closed (a
    reasoning model cut off while thinking) has no final answer: ``"<think>r"`` -> ``("r", None)``;
    no tag at all: ``(None, text)``. With several blocks, the final text follows the last
    ``</think>``."""
    text = text or ""
    if _THINK_CLOSE in text:
        head, _, tail = text.rpartition(_THINK_CLOSE)
        if _THINK_OPEN in head:
            head = head.split(_THINK_OPEN, 1)[1]
        return head.strip(), tail.strip()
    if _THINK_OPEN in text:
        return text.split(_THINK_OPEN, 1)[1].strip(), None
    return None, text.strip()


def final_text(text: str | None) -> str | None:
    """The text graded: after the last ``</think>``; None when a ``<think>`` is never closed."""
    return split_think(text)[1]


# ----------------------------------------------------------------------------- boxes and markers
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """Every top-level ``\\boxed{…}`` / ``\\fbox{…}`` (braces balanced) and brace-less ``\\boxed 5``,
    as (start, end, content) in text order; a box nested in another is part of its content."""
    out: list[tuple[int, int, str]] = []
    done = 0
    closing = None
    for m in _BOX_RE.finditer(text or ""):
        if m.start() < done:
            continue
        j = m.end()
        if text.startswith("{", j):
            if closing is None:
                closing = _closing_braces(text)
            k = closing.get(j)
            if k is None:
                continue  # never closed: not an answer
            out.append((m.start(), k + 1, text[j + 1:k].strip()))
            done = k + 1
        else:  # MATH has a few "\boxed 2" (train/algebra): the next token
            tok = re.match(r"[^\s${}]+", text[j:])
            if tok:
                out.append((m.start(), j + tok.end(), tok.group().rstrip(".")))
                done = j + tok.end()
    return out


def _closing_braces(text: str) -> dict[int, int]:
    """{position of '{': position of its matching '}'}, in one pass (linear even for many unclosed boxes)."""
    out, stack = {}, []
    for i, c in enumerate(text):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            out[stack.pop()] = i
    return out


def last_boxed(text: str) -> tuple[int, str] | None:
    """(position, content) of the last box, as in the MATH repository's ``last_boxed_only_string``."""
    b = _boxes(text or "")
    return (b[-1][0], b[-1][2]) if b else None


def boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{}`` / ``\\fbox{}`` (or ``\\boxed 5``), a trailing '.' stripped; None if absent."""
    b = last_boxed(text)
    return None if b is None else b[1].rstrip().rstrip(".").rstrip()


def all_boxed(text: str) -> list[str]:
    """The contents of every top-level box, in order."""
    return [b[2] for b in _boxes(text or "")]


def last_hashes(text: str) -> tuple[int, str] | None:
    """(position, rest of the line) of the last ``#### x`` (GSM8K's final-answer marker)."""
    hits = list(re.finditer(r"####[ \t]*([^\n]*)", text or ""))
    if not hits:
        return None
    m = hits[-1]
    return m.start(), m.group(1).strip()


def gsm8k_gold(answer: str | int | float, strict: bool = False) -> str:
    """The gold final answer of a GSM8K record: the text after the last ``####``, thousands commas
    removed (``1,600`` -> ``1600``). Without ``####`` the whole text (or, with ``strict``, a
    ValueError); a number is returned as its text (``27.0`` -> ``27``)."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(int(answer)) if float(answer).is_integer() else str(answer)
    answer = str(answer)
    if "####" not in answer:
        if strict:
            raise ValueError("no '####' in GSM8K answer")
        gold = answer.strip()
    else:
        gold = answer.rsplit("####", 1)[1].strip()
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", gold)


# "Final Answer:", "**Final Answer:**", "The final answer is", "My final answer to this is:".
_FINAL_RE = re.compile(r"\bfinal\s+answer\b[^\n.:,$]{0,40}?(?:\bis\b|:)(?:\s*\*+)?\s*:?", re.I)
# The weaker "the answer is X" / "Answer: X", used only when no other marker is present.
_SAID_RE = re.compile(r"\banswer(?:\s+is\b|\s*:|(?=\s*(?:\$|\\\[|\\\()))\s*:?", re.I)
# Math spans and sentence ends: a period is a sentence end only outside a span.
_SPAN_RE = re.compile(r"\$\$[^$]+?\$\$|\$[^$\n]+?\$|\\\(.{1,1000}?\\\)|\\\[.{1,1000}?\\\]|(\.(?=\s|$)|\n)", re.S)
_HOPE_RE = re.compile(r"\bI hope it is correct", re.I)
_MATH_SPAN_RE = re.compile(r"\$\$([^$]+?)\$\$|\$([^$\n]+?)\$|\\\((.{1,1000}?)\\\)|\\\[(.{1,1000}?)\\\]", re.S)
_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}\b")  # a word, not a \command


def _is_prose(s: str) -> bool:
    """Three words or more: a sentence, not an answer."""
    return len(_WORD_RE.findall(s)) >= 3


def _mathy(s: str) -> bool:
    return bool(re.search(r"[\d\\]", s))


def _unwrap(ans: str) -> str:
    """Strip what surrounds an answer sentence: quotes, markdown, math delimiters, end punctuation."""
    prev = None
    while ans != prev:
        prev = ans
        ans = ans.replace('\\"', '"').strip().strip("*`\"'").strip()
        ans = ans.rstrip(".,;:!").strip()
        for a, b in (("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")):
            if len(ans) > len(a) + len(b) and ans.startswith(a) and ans.endswith(b):
                inner = ans[len(a):-len(b)]
                if a != "$" or "$" not in inner:
                    ans = inner
                    break
    if re.search(r"(?<!\\)\$", ans):  # several spans in one sentence ("$12$ and $13$"): drop the delimiters
        ans = re.sub(r"(?<!\\)\$", "", ans).strip()
    return ans


def _answer_after(text: str, end: int) -> str:
    """The answer a marker introduces: the rest of its sentence, or the next line if its own is empty."""
    rest = text[end:].lstrip(" \t*:")
    if rest.startswith("\n"):
        rest = rest.lstrip()
    hope = _HOPE_RE.search(rest)
    if hope:
        rest = rest[:hope.start()]
    for m in _SPAN_RE.finditer(rest):
        if m.group(1) is not None:
            rest = rest[:m.start()]
            break
    ans = _unwrap(rest)
    if _is_prose(ans):
        # "The largest $n$ is 34" -> "34", "34 is the largest" -> "34"; "Jane started 3 hours ago" -> "3"
        verbs = list(re.finditer(r"\s(?:is|are|was|equals)\s", ans))
        if verbs:
            head, tail = _unwrap(ans[:verbs[-1].start()]), _unwrap(ans[verbs[-1].end():])
            if _mathy(tail) and not _mathy(head):
                return tail
            if _mathy(head) and not _mathy(tail) and not _is_prose(head):
                return head
        t = _signs_and_spaces(ans)
        found = [m.group() for m in _MATH_SPAN_RE.finditer(t)]
        found += _NUM_RE.findall(_MATH_SPAN_RE.sub(" ", t))
        if len(found) == 1:
            return _unwrap(found[0])
    return ans


def _box_run(text: str, boxes: list[tuple[int, int, str]]) -> list[str]:
    """The last box and the boxes right before it (separated only by a short connecting text,
    such as ", ", " and ", ``\\quad \\text{and} \\quad``): one answer written in several boxes."""
    run = [boxes[-1]]
    for b in reversed(boxes[:-1]):
        gap = text[b[1]:run[0][0]]
        if len(gap) > 60 or "\n\n" in gap or re.search(r"[.!?]\W*\s[A-Z]", gap):  # not across sentences
            break
        run.insert(0, b)
    return [b[2] for b in run]


def gold_parts(gold: str) -> int:
    """How many answers a gold holds: top-level items separated by ',' ';' 'and' 'or' ``\\quad``
    (``-2, 1`` -> 2, ``\\{1,2,3\\}`` -> 3, ``[0,1)`` and ``(1,2)`` -> 1)."""
    s = re.sub(r"\\left|\\right", "", str(gold)).strip()
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2]
    elif s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    s = re.sub(r"\\q?quad|\\text\s*\{\s*(?:and|or)\s*\}|\b(?:and|or)\b|;", ",", s)
    depth, parts, cur = 0, 0, ""
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts += bool(cur.strip())
            cur = ""
        else:
            cur += c
    return parts + bool(cur.strip())


def _locate(text: str, kind: str, parts: int = 1) -> str | None:
    """The raw final answer of a final text (see the module docstring for the order), or None."""
    cands = []  # (position, answer)
    boxes = _boxes(text)
    if boxes:
        run = _box_run(text, boxes) if parts > 1 else [boxes[-1][2]]
        cands.append((boxes[-1][0], ", ".join(run) if len(run) > 1 else run[-1]))
    h = last_hashes(text)
    if h and h[1]:
        cands.append(h)
    finals = list(_FINAL_RE.finditer(text))
    if finals:
        ans = _answer_after(text, finals[-1].end())
        # after a box or '####', words alone ("... the final answer is a common one") are prose, not an answer
        if ans and (not cands or re.search(r"[\d\\$]", ans)):
            cands.append((finals[-1].start(), ans))
    if cands:
        return max(cands, key=lambda c: c[0])[1]
    said = list(_SAID_RE.finditer(text))
    if said:
        ans = _answer_after(text, said[-1].end())
        if ans and not _is_prose(ans) and (kind != "gsm8k" or re.search(r"\d", ans)):
            return ans
    if kind == "gsm8k":
        return last_number(text)
    m = _last_math(text)  # unmarked prose: its last math span or number
    return None if m is None else m[1]


def _last_math(text: str) -> tuple[int, str] | None:
    """(position, content) of whichever comes last: a math span (``$…$``, ``\\(…\\)``, ``\\[…\\]``)
    or a number outside spans."""
    t = _signs_and_spaces(text)
    best = None
    for m in _MATH_SPAN_RE.finditer(t):
        inner = next(g for g in m.groups() if g is not None).strip()
        if inner:
            best = (m.start(), inner)
    num = _last_number_at(_MATH_SPAN_RE.sub(lambda m: " " * len(m.group()), t))
    if num is not None and (best is None or num[0] > best[0]):
        best = num
    return best


def extract_answer(text: str, kind: str, parts: int = 1) -> str | None:
    """The final answer of a response (the final number for ``gsm8k``), or None.

    `parts`: how many answers the gold holds (``gold_parts``); above 1, a run of adjacent boxes
    is read as one answer."""
    kind = normalise_kind(kind)
    text = final_text(text)
    if text is None:
        return None
    raw = _locate(text, kind, parts)
    if raw is None:
        return None
    return _display(raw, kind)


def _display(raw: str, kind: str) -> str:
    if kind == "gsm8k":
        return numeric_text(raw) or raw
    m = re.fullmatch(r"\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(-?\d[\d.,/]*)\s*", raw)  # 'x = 5' -> '5'
    return m.group(1) if m else raw


# ----------------------------------------------------------------------------- GSM8K numbers
_MINUS = "\u2212\ufe63\uff0d"          # minus signs: always a minus
_DASHES = "\u2012\u2013\u2014"          # figure/en/em dash: a minus only where a sign stands
_THIN = "\u2009\u202f\u00a0"            # thin, narrow no-break and no-break spaces
_UNIT_SYMBOLS = "€£¥¢₹°²³%"


def _signs_and_spaces(s: str) -> str:
    """Unicode minus and sign dashes -> '-', LaTeX thousands separators -> their characters."""
    for c in _MINUS:
        s = s.replace(c, "-")
    s = re.sub(rf"(?<![\w.])[{_DASHES}](?=\$?\d|\\\$)", "-", s)
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "\u2009").replace("~", " ")
    return s


def _ungroup(s: str) -> str:
    """Remove thousands separators: 1,234,567 / 1 234 567 / 1\u2009234 -> 1234567 (groups of three only)."""
    return re.sub(rf"(?<![\d.,])(\d{{1,3}})((?:[,{_THIN} ]\d{{3}})+)(?!\d)",
                  lambda m: m.group(1) + re.sub(rf"[,{_THIN} ]", "", m.group(2)), s)


def numeric_text(s: str) -> str:
    """The number (or LaTeX number expression) an answer states, as text: its box's content; text
    wrappers, units, currency, %, ``$`` and spacing removed; the right-hand side of the last ``=``
    (or ``\\approx``): ``'16 * 2 = 32 bolts'`` -> ``'32'``, ``'x = -$5'`` -> ``'-5'``,
    ``'\\boxed{\\frac{3}{4}}'`` -> ``'\\frac{3}{4}'``."""
    s = str(s).strip()
    b = _boxes(s)
    if b:
        s = b[-1][2]
    s = _signs_and_spaces(s)
    s = re.sub(r"\\(?:text\w*|mathrm|mbox|operatorname)\s*{([^{}]*)}", r" \1 ", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|\\left|\\right|\\displaystyle", "", s)
    s = re.sub(r"\\q?quad|\\[;: ]", " ", s)
    s = s.replace("\\$", "$").replace("\\%", "%").replace("**", "")
    sides = [p for p in re.split(r"=|\\approx|≈", s) if p.strip()]
    if sides:
        s = sides[-1]
    s = s.replace("$", " ")
    for c in _UNIT_SYMBOLS:
        s = s.replace(c, " ")
    if not re.search(r"\d[eE][-+]?\d", s):
        s = re.sub(r"(?<![\\A-Za-z])[A-Za-z]+(?:'[a-z]+)?\.?", " ", s)  # unit words, not \commands
    s = re.sub(r"\s+", " ", s).strip().strip(",;:!?").strip()
    return s.rstrip(".").strip()


class _NotExact(Exception):
    pass


_TOKEN_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+|\\[A-Za-z]+|[-+*/^(){}\[\]×÷·])")
_FRACS = ("\\frac", "\\dfrac", "\\tfrac", "\\cfrac")
_MUL = {"*": "*", "×": "*", "·": "*", "\\times": "*", "\\cdot": "*", "/": "/", "÷": "/", "\\div": "/"}


def _tokens(s: str) -> list[tuple[str, bool]] | None:
    """(token, preceded by space) pairs; None when something that is not arithmetic is present."""
    out, i = [], 0
    while i < len(s):
        m = _TOKEN_RE.match(s, i)
        if not m:
            return None if s[i:].strip() else out
        out.append((m.group(1), m.start(1) > m.start()))
        i = m.end()
    return out


def _root(x: Fraction, n: int) -> Fraction:
    """The exact n-th root of x, or _NotExact."""
    if n <= 0 or (x < 0 and n % 2 == 0):
        raise _NotExact
    sign = -1 if x < 0 else 1
    out = []
    for v in (abs(x.numerator), x.denominator):
        if v.bit_length() > 4000:
            raise _NotExact
        r = math.isqrt(v) if n == 2 else round(v ** (1.0 / n))
        r = next((c for c in (r - 1, r, r + 1) if c >= 0 and c ** n == v), None)
        if r is None:
            raise _NotExact
        out.append(r)
    return sign * Fraction(out[0], out[1])


def _power(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator > 12 or abs(exp.numerator) > 10_000:
        raise _NotExact
    if base == 0 and exp < 0:
        raise ZeroDivisionError
    size = max(abs(base.numerator), base.denominator).bit_length() * abs(exp.numerator)
    if size > 100_000:  # an answer this large is not a number anyone wrote down
        raise _NotExact
    if exp.denominator != 1:
        base = _root(base, exp.denominator)
    return base ** exp.numerator


class _Exact:
    """Exact evaluation of + - * / ^, parentheses, ``\\frac``, ``\\sqrt`` over fractions (no eval())."""

    def __init__(self, toks):
        self.toks, self.i = toks, 0

    def peek(self):
        return self.toks[self.i][0] if self.i < len(self.toks) else None

    def take(self, want=None):
        t = self.peek()
        if t is None or (want is not None and t != want):
            raise _NotExact
        self.i += 1
        return t

    def expr(self):
        v = self.term()
        while self.peek() in ("+", "-"):
            v = v + self.term() if self.take() == "+" else v - self.term()
        return v

    def term(self):
        v = self.factor()
        while True:
            t = self.peek()
            if t in _MUL:
                self.take()
                r = self.factor()
                v = v * r if _MUL[t] == "*" else v / r
            elif t in ("(", "\\sqrt", *_FRACS) and not self.toks[self.i][1]:
                v = v * self.factor()  # implicit product, written without a space: 2(3), 2\sqrt{4}
            else:
                return v

    def factor(self):
        if self.peek() in ("-", "+"):
            return -self.factor() if self.take() == "-" else self.factor()
        v = self.atom()
        if self.peek() == "^":
            self.take()
            if self.peek() in ("-", "+"):
                e = -self.atom() if self.take() == "-" else self.atom()
            else:
                e = self.atom()
            v = _power(v, e)
        return v

    def arg(self):
        """A command's argument: a {group} or a single character (``\\frac12``)."""
        t = self.peek()
        if t is not None and t[0].isdigit() and len(t) > 1:
            self.toks[self.i] = (t[1:], False)
            return Fraction(int(t[0]))
        return self.atom()

    def atom(self):
        t = self.take()
        if t[0].isdigit() or t[0] == ".":
            v = Fraction(Decimal(t))
            if self.peek() in _FRACS and "." not in t and not self.toks[self.i][1]:
                return v + self.atom()  # a mixed number: 1\frac{1}{2} = 1.5
            return v
        if t in ("(", "{", "["):
            v = self.expr()
            self.take({"(": ")", "{": "}", "[": "]"}[t])
            return v
        if t in _FRACS:
            num = self.arg()
            return num / self.arg()
        if t == "\\sqrt":
            n = 2
            if self.peek() == "[":
                self.take()
                n = self.expr()
                self.take("]")
                if n.denominator != 1:
                    raise _NotExact
            return _root(self.arg(), int(n))
        raise _NotExact


def _eval_exact(s: str) -> Fraction | None:
    toks = _tokens(s)
    if not toks:
        return None
    p = _Exact(toks)
    try:
        v = p.expr()
    except (_NotExact, ZeroDivisionError, InvalidOperation, ValueError, OverflowError, RecursionError):
        return None
    return v if p.i == len(toks) else None


def _parse_number(t: str) -> Fraction | None:
    t = _ungroup(t.strip())
    if not t:
        return None
    m = re.fullmatch(r"(-?)\s*(\d+)\s+(\d+)\s*/\s*(\d+)", t)  # a mixed number: 1 1/2
    if m and int(m.group(4)):
        v = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return -v if m.group(1) else v
    return _eval_exact(t)


def to_number(s: str | int | float | None) -> Fraction | None:
    """Read a GSM8K-style answer as an exact number: '1,000' '$18.00' '18 dollars' '20%' '-$3'
    '3/4' '\\frac{3}{4}' '1 1/2' 'x = 5' '\\boxed{5}' '10^3' '\\sqrt{16}'. None if it is not one
    exactly readable number ('1, 2', '\\sqrt{2}', '18 dollars and 5 cents')."""
    if s is None or isinstance(s, bool):
        return None
    if isinstance(s, (int, float)):
        return Fraction(Decimal(str(s))) if math.isfinite(s) else None
    return _parse_number(numeric_text(s))


# A number in free text: thousands-grouped or plain, decimals, a simple fraction a/b.
_NUM = rf"-?(?:\d{{1,3}}(?:[,{_THIN} ]\d{{3}})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+"
_NUM_RE = re.compile(r"(?<![\w.])(" + _NUM + r")")


def last_number(text: str) -> str | None:
    """The last number in `text` (lm-eval's "flexible-extract"): '$1,234.50.' -> '1,234.50'.
    A number inside a LaTeX expression brings the expression (``$10^3$`` -> ``10^3``, never '3')."""
    m = _last_number_at(_signs_and_spaces(text or ""))
    return None if m is None else m[1]


def _last_number_at(t: str) -> tuple[int, str] | None:
    hits = list(_NUM_RE.finditer(t))
    if not hits:
        return None
    m = hits[-1]
    a, b = m.start(1), m.end(1)
    while a > 0 and not t[a - 1].isspace() and t[a - 1] != "$":
        a -= 1
    while b < len(t) and not t[b].isspace() and t[b] != "$":
        b += 1
    word = t[a:b].strip(".,;:!?)(")
    if re.search(r"[\\^{}_]", word):
        return a, word
    return m.start(1), m.group(1)


# ----------------------------------------------------------------------------- repetition
def repetition(text: str, n: int = CorpusConfig.repeat_ngram, count: int = CorpusConfig.repeat_count) -> str | None:
    """A generation loop: the most repeated word n-gram when it occurs at least `count` times, or
    else a non-trivial line (4+ words) repeated `count` times; None when there is neither.
    Linear time (responses that hit the token cap can be long). Defaults: ``CorpusConfig``."""
    text = text or ""
    if n <= 0 or count <= 1:
        return None
    words = text.split()
    if len(words) >= n * count:
        grams = collections.Counter(zip(*(words[i:] for i in range(n))))
        gram, k = grams.most_common(1)[0]
        if k >= count:
            return " ".join(gram)
    lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 4]
    if lines:
        line, k = collections.Counter(lines).most_common(1)[0]
        if k >= count:
            return line
    return None


# ----------------------------------------------------------------------------- judge verdicts
_VERDICT_RE = re.compile(r"[\W_]*verdict[\s*_`]*[:=][\s*_`]*(correct|incorrect)[\W_]*", re.I)


def parse_verdict(text: str | None) -> bool | None:
    """A judge's verdict: True for a last non-empty line ``VERDICT: CORRECT``, False for
    ``VERDICT: INCORRECT`` (markdown bold, case and surrounding punctuation tolerated). Anything
    else, e.g. "The answer is not correct.", is None: "judge unparsable", counted apart."""
    final = final_text(text)
    lines = [ln.strip() for ln in (final or "").splitlines() if ln.strip()]
    if not lines:
        return None
    m = _VERDICT_RE.fullmatch(lines[-1])
    return None if m is None else m.group(1).lower() == "correct"


# ----------------------------------------------------------------------------- timeouts
class GradingTimeout(Exception):
    pass


def _call_with_timeout(fn, timeout: float | None, *args):
    """Run fn(*args) with a wall-clock limit, from any thread.

    math-verify's signal.alarm timeout raises in non-main threads. Instead, the work runs in a
    throwaway daemon thread; if it has not finished in time we inject ``GradingTimeout`` into it
    (``PyThreadState_SetAsyncExc``: delivered at its next bytecode, which stops sympy's pure
    Python loops) and raise ``GradingTimeout`` here. A single long C call (huge integer power)
    cannot be interrupted this way, nor by a signal; the caller still gets its answer on time.
    """
    if timeout is None or timeout <= 0:
        return fn(*args)
    box: dict = {}

    def work():
        try:
            box["value"] = fn(*args)
        except GradingTimeout:
            pass
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=work, daemon=True, name="answers-grade")
    t.start()
    t.join(timeout)
    if t.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(GradingTimeout))
        raise GradingTimeout(f"grading took longer than {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ----------------------------------------------------------------------------- MATH strings
def normalise_math_string(s: str) -> str:
    """A light string normalisation (after Hendrycks' MATH ``strip_string``) used as a fast
    first check and a fallback when math-verify cannot parse either side."""
    s = str(s).strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|textrm)\s*{([^{}]*)}", r"\1", s)
    for a, b in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("\\left", ""), ("\\right", ""),
                 ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\$", ""),
                 ("$", ""), ("\\%", ""), ("%", "")):
        s = s.replace(a, b)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # 'x = 5' -> '5'
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s.lower()


def _mv_parse(s: str):
    from math_verify import parse

    return parse("\\boxed{" + s + "}", parsing_timeout=None)


def _mv_verify(gold_parsed, pred_parsed) -> bool:
    from math_verify import verify

    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _quiet_math_verify() -> None:
    # It warns (once per process) that its own timeout is off: we enforce ours.
    import logging

    for name in ("math_verify.grader", "math_verify.parser"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet_math_verify()


# Longer than this is not an answer but a runaway sentence: math-verify is not asked (its regexes,
# in C and holding the GIL, can outlast any timeout on such text).
MAX_ANSWER_CHARS = 1000


def _math_equal(pred: str, gold: str, timeout: float | None) -> tuple[str, str, str]:
    """(status, method, reason) for a MATH-style answer pair."""
    if normalise_math_string(pred) == normalise_math_string(gold):
        return "correct", "string", ""
    if len(pred) > MAX_ANSWER_CHARS:
        return "invalid", "string", "unparsable"
    try:
        g = _call_with_timeout(_mv_parse, timeout, gold)
        p = _call_with_timeout(_mv_parse, timeout, pred)
        if not p:
            return "invalid", "math-verify", "unparsable"
        if not g:
            return "wrong", "string", "gold unparsable by math-verify"
        ok = _call_with_timeout(_mv_verify, timeout, g, p)
    except GradingTimeout:
        return "invalid", "math-verify", "timeout"
    return ("correct" if ok else "wrong"), "math-verify", ""


# ----------------------------------------------------------------------------- grade
def _math_gold(gold) -> str:
    if isinstance(gold, float) and gold.is_integer():
        return str(int(gold))
    g = str(gold).strip()
    boxed = boxed_content(g)  # a gold in several boxes: the last one, as the reference grader reads it
    return g if boxed is None else boxed


def grade(response: str, gold: str | int | float, kind: str, timeout: float | None = 5.0) -> Verdict:
    """Grade one response against its gold answer.

    `gold`: for ``gsm8k`` the dataset's answer (the text after ``####`` is used when present);
    for ``math`` the gold final answer (if it has a ``\\boxed{}``, its content is used).
    `timeout` bounds each math-verify call (seconds; None = no limit).
    """
    kind = normalise_kind(kind)
    final = final_text(response)
    if kind == "gsm8k":
        g = gsm8k_gold(gold)
        gnum = to_number(g)
        raw = None if final is None else _locate(final, kind, gold_parts(g) if gnum is None else 1)
        if raw is None:
            return Verdict(False, None, "invalid", g, "none", "no answer")
        if gnum is None:  # a non-numeric gold: compare as MATH answers
            status, method, reason = _math_equal(raw, g, timeout)
            return Verdict(status == "correct", raw, status, g, method, reason)
        extracted = _display(raw, kind)
        pnum = _parse_number(extracted)
        if pnum is None:
            return Verdict(False, extracted, "invalid", g, "numeric", "unparsable")
        ok = pnum == gnum
        return Verdict(ok, extracted, "correct" if ok else "wrong", g, "numeric")
    g = _math_gold(gold)
    raw = None if final is None else _locate(final, kind, gold_parts(g))
    if raw is None:
        return Verdict(False, None, "invalid", g, "none", "no answer")
    status, method, reason = _math_equal(raw, g, timeout)
    return Verdict(status == "correct", _display(raw, kind), status, g, method, reason)


# ----------------------------------------------------------------------------- arithmetic
_ARITH_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
_ARITH_RE = re.compile(
    r"(?<![\w.^/\-])(\(?\s*\$?" + _ARITH_NUM + r"\s*\)?(?:\s*[-+*/x×÷·]\s*\(?\s*\$?" + _ARITH_NUM
    + r"\s*\)?)+)\s*=\s*\$?\s*(-?" + _ARITH_NUM + r")(?![\d.]*[\w/^%])(?!\s*[-+*/x×÷^]\s*\(?\d)(?!\s+\d)")
# A step must start a clause: not after a digit, a variable's operator or an opening parenthesis
# ('9 hours * 2/3 = 6', '3(47)+12', '$350 000 x 5/100' are not self-contained steps).
_ARITH_BEFORE = set("0123456789*x×÷/+-–−·(^)=")


def _eval_arith(expr: str) -> Fraction | None:
    """Evaluate + - * / and parentheses over exact fractions (no eval())."""
    toks = re.findall(r"\d*\.\d+|\d+|[-+*/()]", expr.replace(",", "").replace("$", "").replace("×", "*").replace("÷", "/")
                      .replace("·", "*").replace("x", "*"))
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def atom():
        nonlocal pos
        t = peek()
        if t == "(":
            pos += 1
            v = add()
            if peek() != ")":
                raise ValueError
            pos += 1
            return v
        if t == "-":
            pos += 1
            return -atom()
        if t is None or not t[0].isdigit():
            raise ValueError
        pos += 1
        return Fraction(Decimal(t))

    def mul():
        nonlocal pos
        v = atom()
        while peek() in ("*", "/"):
            op = toks[pos]
            pos += 1
            r = atom()
            v = v * r if op == "*" else v / r
        return v

    def add():
        nonlocal pos
        v = mul()
        while peek() in ("+", "-"):
            op = toks[pos]
            pos += 1
            r = mul()
            v = v + r if op == "+" else v - r
        return v

    try:
        v = add()
        return v if pos == len(toks) else None
    except (ValueError, ZeroDivisionError, InvalidOperation):
        return None


def _check_step(lhs: str, rhs: str) -> bool | None:
    """True/False for a step `lhs = rhs`; None when it is not plain arithmetic."""
    if lhs.count("(") != lhs.count(")"):
        lhs = lhs.replace("(", "").replace(")", "")
    value = _eval_arith(lhs)
    if value is None:
        return None
    try:
        r = Fraction(Decimal(rhs.replace(",", "").replace("$", "").strip()))
    except (InvalidOperation, ValueError):
        return None
    decimals = len(rhs.split(".")[1].strip()) if "." in rhs else 0
    # Rounding to the result's own decimals is not an error ('10/3 = 3.33', '10/3 = 3').
    tol = Fraction(1, 2 * 10 ** decimals) if value.denominator != 1 else Fraction(0)
    return abs(value - r) <= tol + Fraction(1, 10 ** 9)


def check_arithmetic(text: str) -> dict:
    """Check every ``a op b (op c ...) = r`` step in a reasoning text.

    A step is wrong when r differs from the exact value by more than rounding to r's own
    decimals allows (so ``10/3 = 3.33`` is right, ``48/2 = 25`` is wrong). GSM8K's calculator
    annotations ``<<48/2=24>>`` are checked as steps and removed from the prose.
    Returns {checked, wrong, errors: [step, ...]}.
    """
    checked, errors = 0, []
    for ann in re.findall(r"<<([^<>=]*)=([^<>=]*)>>", text):
        ok = _check_step(*ann)
        if ok is not None:
            checked += 1
            if not ok:
                errors.append("=".join(ann))
    prose = re.sub(r"<<[^<>]*>>", "", text)
    for m in _ARITH_RE.finditer(prose):
        before = prose[:m.start()].rstrip()
        if before and before[-1] in _ARITH_BEFORE:
            continue
        ok = _check_step(m.group(1), m.group(2))
        if ok is not None:
            checked += 1
            if not ok:
                errors.append(m.group(0).strip())
    return {"checked": checked, "wrong": len(errors), "errors": errors}


def word_count(text: str) -> int:
    return len(text.split())
