"""Where the final answer of a response is, and the number a GSM8K answer states.

Pure functions on text, no sympy: think splitting, boxed and gold extraction, final-answer location
and the GSM8K number reading. Equivalence of MATH answers is ``tasks.equivalence`` (run in worker
processes by ``tasks.grading``); the verdict is assembled by ``tasks.answers.grade``.

Where the final answer is (``_locate``), on the text after ``</think>``:

1. The *last* of these markers in the text wins: ``#### x``; ``\\boxed{x}`` / ``\\fbox{x}``;
   a "Final Answer:" or "the final answer is" sentence (the Minerva format "Final Answer: The
   final answer is 7.78. I hope it is correct." reads 7.78). So an intermediate box loses to a
   later "the final answer is $10,455$", and a final-answer sentence that itself holds a box is
   read through that box (the box comes after the marker).
2. Without any of them, "the answer is X" / "Answer: X" (unless X is a whole sentence).
3. Otherwise, for ``gsm8k``, the last number of the text (lm-eval's flexible extract), with the
   words right beside it ("not 5", "minus 5", "5 million" are read as such, see below); a number
   that is part of a LaTeX expression (``$10^3$``, ``\\frac{3}{4}``) brings the whole expression.
   For ``math``, the last math span (``$…$``, ``\\(…\\)``, ``\\[…\\]``) or number, whichever
   comes later (Math-Verify reads unmarked prose the same way).

A marker's answer is the rest of its sentence, math spans kept whole; a sentence that names
its answer ("The largest $n$ is 34.") gives what follows its last "is"/"are"/"equals", or the
one number / math span in it.

When the gold has several parts (``-2, 1``; ``(1,2),(2,1)``; ``k = 45, n = 2``) and the answer
is a run of adjacent boxes (``\\boxed{-2} and \\boxed{1}``), the run is graded as one answer
(math-verify compares the parts as a set); a single-part gold uses the last box.

GSM8K numbers (``numeric_text``): no number is read from words thrown away. The official grader
(openai/grade-school-math) extracts ``#### (\\-?[0-9\\.\\,]+)``; lm-evaluation-harness's
flexible extract takes the last number. We read the words beside the number instead of deleting
them: a negation ("not", "isn't", "never", "no") makes the answer invalid; sign words ("minus",
"negative", "below zero") and scale words ("hundred", "thousand", "million", "billion", "dozen")
give the value they say; fraction words ("half", "third", ...) and ranges or alternatives
("5 or 7", "5-7", "5 to 7") are invalid; after a marker, the answer ends at the first clause
break ("12 cookies, because 3 boxes hold 4 each" reads 12). Other words are units and dropped.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

from mlx_distill.tasks.exact import _THIN, _parse_number

KINDS = ("gsm8k", "math")


def normalise_kind(kind: str) -> str:
    """``kind`` itself when it is one of ``KINDS``. Benchmark names (math500, aime24, ...) are mapped
    to their kind by the task registry, not here."""
    if kind in KINDS:
        return kind
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS} "
                     "(a benchmark's answer kind comes from its task definition)")

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
    head = _unwrap(_CLAUSE_RE.split(ans, 1)[0])
    if head != ans and re.match(r"[-$\\\d.]", head) and not _is_prose(head):
        return head  # "30 minutes, since each lap takes 10": the number right after the marker
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
        return _last_number_with_words(text)
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
_UNIT_SYMBOLS = "€£¥¢₹°²³%"


def _signs_and_spaces(s: str) -> str:
    """Unicode minus and sign dashes -> '-', LaTeX thousands separators -> their characters."""
    for c in _MINUS:
        s = s.replace(c, "-")
    s = re.sub(rf"(?<![\w.])[{_DASHES}](?=\$?\d|\\\$)", "-", s)
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "\u2009").replace("~", " ")
    return s


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
        s = _read_words(s)
        if s is None:
            return ""
        s = re.sub(r"(?<![\\A-Za-z])[A-Za-z]+(?:'[a-z]+)?\.?", " ", s)  # unit words, not \commands
    s = re.sub(r"\s+", " ", s).strip().strip(",;:!?").strip()
    return s.rstrip(".").strip()


# The words beside a number that change what it says (see the module docstring).
_CLAUSE_RE = re.compile(r"[,;]\s+(?=[A-Za-z])|\s+(?:because|since|as|so|which|given|when|where|if|while|after)\b"
                        r"|\s+\(", re.I)
_NEGATION_RE = re.compile(r"\b(?:not|no|never|none|neither|nor|cannot)\b|n't\b|\bnt\b", re.I)
_FRACTION_WORD_RE = re.compile(r"\b(?:half|halves|thirds?|quarters?|fourths?|fifths?|sixths?|eighths?|tenths?"
                               r"|hundredths?|thousandths?|millionths?)\b", re.I)
_RANGE_RE = re.compile(r"\d\s*\(?\s*(?:\b(?:or|to|through|and)\b|[-~])\s*-?\$?\d", re.I)
# a scale letter written on the number: 5k, $2.5M, 3bn (a lone lowercase m stays metres)
_SUFFIX_SCALE_RE = re.compile(r"(\d(?:[\d.]*\d)?)(k|K|M|mn|B|bn)\b")
_SUFFIX_SCALES = {"k": 1000, "K": 1000, "M": 10 ** 6, "mn": 10 ** 6, "B": 10 ** 9, "bn": 10 ** 9}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10 ** 6, "billion": 10 ** 9, "trillion": 10 ** 12, "dozen": 12}
_SCALE_RE = re.compile(r"(\d(?:[\d.]*\d)?)\s*(" + "|".join(_SCALES) + r")s?\b", re.I)
_SIGN_WORD_RE = re.compile(r"\b(?:minus|negative)\s+(?=\.?\d)", re.I)
_BELOW_ZERO_RE = re.compile(r"(-?)(\d(?:[\d.]*\d)?)\s*(?:(?:degrees?|units?)\s+)?below\s+zero\b", re.I)


def _read_words(s: str) -> str | None:
    """Apply the words around the number (None: the answer is invalid, whatever its digits say):
    the answer ends at a clause break; a negation, a fraction word or a range/alternative makes it
    invalid; "minus"/"negative" before and "below zero" after give the sign; "hundred", "thousand",
    "million", "billion", "trillion" and "dozen" after a number multiply it."""
    if _RANGE_RE.search(s):  # "5 or 7", "5-7", "5 (or 6)": alternatives anywhere in the answer
        return None
    s = _CLAUSE_RE.split(s, 1)[0]
    if _NEGATION_RE.search(s) or _FRACTION_WORD_RE.search(s):
        return None
    s = _SUFFIX_SCALE_RE.sub(lambda m: f"{m.group(1)}*{_SUFFIX_SCALES[m.group(2)]}", s)
    s = _SIGN_WORD_RE.sub("-", s)

    def below(m):
        return "" if m.group(1) else "-" + m.group(2)

    s = _BELOW_ZERO_RE.sub(below, s)
    if re.search(r"\b(?:minus|negative|below)\b", s, re.I) or re.search(r"--|-\s*-", s):
        return None  # a sign word not before a number, or two signs: not a reading we guess at
    prev = None
    while prev != s:
        prev = s
        s = _SCALE_RE.sub(lambda m: f"{m.group(1)}*{_SCALES[m.group(2).lower()]}", s, count=1)
    if re.search(r"\b(?:" + "|".join(_SCALES) + r")s?\b", s, re.I):
        return None  # "a million", "dozens": no number to scale
    return s


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


_BESIDE_RE = re.compile(r"\b(?:not|no|never|none|minus|negative|below|or|to|through|half|" + "|".join(_SCALES)
                        + r")s?\b|n't\b|[-~]", re.I)


def _last_number_with_words(text: str) -> str | None:
    """lm-eval's flexible extract (the last number), with the words right beside it when they change
    what it says ("not 5", "minus 5", "5 below zero", "5 million", "3 or 5"), for ``numeric_text``."""
    t = _signs_and_spaces(text or "")
    m = _last_number_at(t)
    if m is None:
        return None
    start, num = m
    end = start + len(num)
    before = re.findall(r"\S+", t[max(0, start - 40):start])[-2:]
    after = re.findall(r"\S+", t[end:end + 40])[:3]
    if before and re.search(r"[.!?:]$", before[-1]):
        before = []  # the sentence before ended: its words are not this number's
    window = " ".join(before) + " " + num + " " + " ".join(after)
    if not _BESIDE_RE.search(" ".join(before) + " " + " ".join(after)):
        return num
    return window.strip()


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
