"""Grading: the verdict of one response against its gold answer, with "invalid" as its own outcome.

The public face of answer grading (``grade``, ``Verdict``, ``extract_answer``, ``split_think``,
``to_number`` ...); the work is split by what it needs:

* ``tasks.extract``: where the final answer is and the number a GSM8K answer states (pure text
  functions; see its docstring for the marker order and the word rules: "not 5", "minus 5",
  "5 million" are never read as 5);
* ``tasks.exact``: exact, bounded evaluation of LaTeX/plain numbers (``10^3``, ``\\frac34``);
* ``tasks.equivalence``: MATH equivalence (a plain-text to LaTeX rewrite, math-verify, sympy rules);
* ``tasks.grading``: the worker pool that runs equivalence under a wall-clock limit and a memory cap.

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
  ``18 dollars and 5 cents``) is ``invalid`` ("unparsable"), never read as its last digit. No
  sympy is involved, so nothing here can hang.
* ``math`` (MATH, MATH-500, competition answers in LaTeX): ``tasks.grading.math_equal``: a string
  check, then Hugging Face ``math-verify`` (gold first: ``verify(gold, pred)`` is not symmetric)
  and sympy rules, in a worker process bounded by ``timeout`` (seconds) and ``memory_mb``. An
  answer stopped by a limit is ``invalid`` with reason ``timeout``, ``memory`` or ``too large``
  (the magnitude pre-check).

A response is ``invalid`` (counted apart from ``wrong``) when no final answer can be found, the
found answer cannot be read as a number / expression ("unparsable"), or grading hit a limit.
"""

from __future__ import annotations

import collections
import re
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from mlx_distill.config import CorpusConfig, GradeConfig
from mlx_distill.tasks.equivalence import MAX_ANSWER_CHARS, normalise_math_string  # noqa: F401 (re-exported)
from mlx_distill.tasks.extract import (  # noqa: F401 (the public helpers, re-exported)
    KINDS, _display, _locate, _parse_number, all_boxed, boxed_content, extract_answer, final_text, gold_parts,
    gsm8k_gold, last_boxed, last_hashes, last_number, normalise_kind, numeric_text, split_think, to_number)
from mlx_distill.tasks.grading import LIMIT_REASONS, math_equal  # noqa: F401 (LIMIT_REASONS re-exported)

__all__ = ["KINDS", "FORMAT_INSTRUCTIONS", "LIMIT_REASONS", "MAX_ANSWER_CHARS", "Verdict", "all_boxed",
           "boxed_content", "check_arithmetic", "extract_answer", "final_text", "gold_parts", "grade",
           "gsm8k_gold", "last_boxed", "last_hashes", "last_number", "normalise_kind", "normalise_math_string",
           "numeric_text", "parse_verdict", "repetition", "split_think", "to_number", "word_count"]

# The answer-format instruction every prompt asks with ({format_instruction} in prompts/*.txt):
# training (data.record_to_messages), evaluation (evaluate.render_user) and the corpus solver.
FORMAT_INSTRUCTIONS = {
    "####": "Solve the problem step by step. Write the final answer on the last line as '#### <answer>'.",
    "boxed": "Solve the problem step by step. Put the final answer within \\boxed{}.",
}


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None   # the final answer found in the response (None: no final answer)
    status: str             # "correct" | "wrong" | "invalid"
    gold: str               # the gold answer as compared (after ####-stripping / unboxing)
    method: str             # "numeric" | "math-verify" | "sympy" | "string" | "precheck" | "none"
    reason: str = ""        # why invalid: "no answer", "unparsable", "timeout", "memory", "too large"

    def to_dict(self) -> dict:
        return asdict(self)


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


# ----------------------------------------------------------------------------- grade
def _math_gold(gold) -> str:
    if isinstance(gold, float) and gold.is_integer():
        return str(int(gold))
    g = str(gold).strip()
    boxed = boxed_content(g)  # a gold in several boxes: the last one, as the reference grader reads it
    return g if boxed is None else boxed


def grade(response: str, gold: str | int | float, kind: str, timeout: float | None = GradeConfig.grade_timeout,
          memory_mb: int = GradeConfig.grade_memory_mb) -> Verdict:
    """Grade one response against its gold answer.

    `gold`: for ``gsm8k`` the dataset's answer (the text after ``####`` is used when present);
    for ``math`` the gold final answer (if it has a ``\\boxed{}``, its content is used).
    `timeout` (seconds; None = no limit) and `memory_mb` bound the grading worker that compares a
    MATH-style pair (``tasks.grading``; ``memory_mb=0``: in this process, unbounded); thread-safe.
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
            status, method, reason = math_equal(raw, g, timeout, memory_mb)
            return Verdict(status == "correct", raw, status, g, method, reason)
        number = numeric_text(raw)  # "" when the words beside the number make it invalid ("not 5")
        extracted = number or raw
        pnum = _parse_number(number) if number else None
        if pnum is None:
            return Verdict(False, extracted, "invalid", g, "numeric", "unparsable")
        ok = pnum == gnum
        return Verdict(ok, extracted, "correct" if ok else "wrong", g, "numeric")
    g = _math_gold(gold)
    raw = None if final is None else _locate(final, kind, gold_parts(g))
    if raw is None:
        return Verdict(False, None, "invalid", g, "none", "no answer")
    status, method, reason = math_equal(raw, g, timeout, memory_mb)
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
