"""Answer extraction and equivalence: pure functions, with "invalid" as its own outcome.

Two kinds of gold answer:

* ``gsm8k`` (also AIME/AMC-style integers): numeric equality after normalisation.
  The official GSM8K grader (openai/grade-school-math, ``grade_school_math/dataset.py``)
  extracts ``#### (\\-?[0-9\\.\\,]+)``, deletes commas and compares strings; lm-evaluation-harness
  (``lm_eval/tasks/gsm8k/gsm8k.yaml``) adds a "flexible-extract" filter that takes the last
  number of the response. We do both, but compare *numbers*, not strings (``"18.0" == "18"``),
  and also strip ``$``, units, ``%``, LaTeX wrappers and read simple fractions (``3/4``, ``\\frac34``).
* ``math`` (MATH, MATH-500, competition answers in LaTeX): the last ``\\boxed{}`` is parsed and
  compared with Hugging Face ``math-verify``, gold first (``verify(gold, pred)``: the function is
  not symmetric, see its docstring). Math-Verify's own timeouts use ``signal.alarm``, which only
  works in the main thread, so we call it with ``parsing_timeout=None`` / ``timeout_seconds=None``
  (as its error message recommends for threaded use) and enforce our own timeout that works in
  any thread (``_call_with_timeout``).

A response is ``invalid`` (counted apart from ``wrong``) when no final answer can be found
or the found answer cannot be read as a number / expression.

``<think>…</think>``: responses are graded on the final answer, i.e. the text after the last
``</think>``; a ``<think>`` that is never closed (a truncated reasoning model) has no final answer.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import asdict, dataclass
from fractions import Fraction
from decimal import Decimal, InvalidOperation

KINDS = ("gsm8k", "math")
_KIND_ALIASES = {"gsm8k": "gsm8k", "numeric": "gsm8k", "number": "gsm8k", "int": "gsm8k",
                 "math": "math", "latex": "math", "math500": "math", "aime24": "math", "amc23": "math"}


def normalise_kind(kind: str) -> str:
    try:
        return _KIND_ALIASES[kind]
    except KeyError:
        raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}") from None


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None   # the answer string found in the response (None: no final answer)
    status: str             # "correct" | "wrong" | "invalid"
    gold: str               # the gold answer as compared (after ####-stripping)
    method: str             # "numeric" | "math-verify" | "string" | "none"
    reason: str = ""        # why invalid: "no answer", "unparsable", "timeout"

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- <think>
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def split_think(text: str) -> tuple[str, str | None]:
    """(reasoning inside <think>…</think> or "", final text; None if <think> is never closed)."""
    if _THINK_CLOSE in text:
        head, _, tail = text.rpartition(_THINK_CLOSE)
        return head.replace(_THINK_OPEN, "").strip(), tail
    if _THINK_OPEN in text:
        return text.split(_THINK_OPEN, 1)[1].strip(), None
    return "", text


def final_text(text: str) -> str | None:
    return split_think(text)[1]


# ----------------------------------------------------------------------------- extraction
def last_boxed(text: str) -> tuple[int, str] | None:
    """(position, content) of the last ``\\boxed{…}`` / ``\\fbox{…}`` with balanced braces
    (or ``\\boxed 5``), as in the MATH repository's ``last_boxed_only_string``."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth == 0:
                best = (m.start(), text[i + 1:j].strip())
        elif text[m.start():m.end()].startswith("\\boxed ") or text[m.start():m.end()] == "\\boxed":
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                best = (m.start(), tok.group(0).strip())
    return best


def last_hashes(text: str) -> tuple[int, str] | None:
    """(position, rest of the line) of the last ``#### x`` (GSM8K's final-answer marker)."""
    hits = list(re.finditer(r"####[ \t]*([^\n]*)", text))
    if not hits:
        return None
    m = hits[-1]
    return m.start(), m.group(1).strip()


_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*([^\n]+)", re.I)

# A number: thousands-grouped (1,234,567.5) or plain (-12.5, .5), optionally a simple fraction a/b.
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+"
_NUM_RE = re.compile(r"(?<![\w.])(" + _NUM + r")")


def last_number(text: str) -> str | None:
    """The last number in `text` (lm-eval's "flexible-extract"), e.g. '$1,234.50.' -> '1,234.50'."""
    found = _NUM_RE.findall(text.replace("\\!", "").replace("{,}", ","))
    return found[-1] if found else None


def extract_answer(text: str, kind: str) -> str | None:
    """The final answer string of a response, or None.

    The last final-answer marker wins, whichever it is (``#### x`` or ``\\boxed{x}``); without a
    marker, "the answer is X"; for GSM8K, finally the last number in the text.
    """
    kind = normalise_kind(kind)
    text = final_text(text)
    if text is None:
        return None
    marks = [m for m in (last_boxed(text), last_hashes(text)) if m is not None and m[1]]
    if marks:
        return max(marks, key=lambda m: m[0])[1]
    said = _ANSWER_IS.findall(text)
    if said:
        ans = said[-1].strip().rstrip(".").strip()
        ans = ans[1:-1].strip() if len(ans) > 1 and ans[0] == ans[-1] == "$" else ans
        if ans:
            return ans
    if kind == "gsm8k":
        return last_number(text)
    return None


# ----------------------------------------------------------------------------- GSM8K numbers
def _strip_latex(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|textrm)\s*{([^{}]*)}", r" \1 ", s)
    s = re.sub(r"\\d?frac\s*{([^{}]+)}\s*{([^{}]+)}", r"(\1)/(\2)", s)
    s = re.sub(r"\\d?frac\s*(\d)\s*(\d)", r"\1/\2", s)          # \frac12
    s = re.sub(r"\\d?frac\s*{([^{}]+)}\s*(\d)", r"(\1)/\2", s)   # \frac{1}2
    s = re.sub(r"\\d?frac\s*(\d)\s*{([^{}]+)}", r"\1/(\2)", s)   # \frac1{2}
    for a, b in (("\\!", ""), ("{,}", ","), ("\\,", " "), ("\\$", "$"), ("\\%", "%"), ("^\\circ", ""),
                 ("^{\\circ}", ""), ("\\left", ""), ("\\right", ""), ("\\cdot", "*"), ("\\times", "*")):
        s = s.replace(a, b)
    return s


def to_number(s: str | int | float | None) -> Fraction | None:
    """Read a GSM8K-style answer as an exact number: '1,000' '$18.00' '18 dollars' '20%' '-3'
    '3/4' '\\frac{3}{4}' '1 1/2' 'x = 5' '\\boxed{5}'. None if there is no single number in it."""
    if s is None:
        return None
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return Fraction(Decimal(str(s)))
    s = str(s).strip()
    b = last_boxed(s)
    if b:
        s = b[1]
    s = _strip_latex(s)
    if "=" in s:  # 'x = 5', 'total = $18'
        s = s.rsplit("=", 1)[1]
    s = s.replace("$", " ").replace("(", "").replace(")", "").strip().rstrip(".").strip()
    # mixed number '1 1/2'
    m = re.fullmatch(r"(-?\d+)\s+(\d+)\s*/\s*(\d+)\s*[^\d]*", s)
    if m and int(m.group(3)) != 0:
        whole, num, den = int(m.group(1)), int(m.group(2)), int(m.group(3))
        return whole + (-1 if whole < 0 else 1) * Fraction(num, den)
    s = re.sub(r"(\d)\s*/\s*(\d)", r"\1/\2", s)
    nums = _NUM_RE.findall(s)
    if len(nums) != 1:
        # Several numbers ('18 dollars and 5 cents', '1, 2') are not one answer.
        return None
    tok = nums[0]
    try:
        if "/" in tok:
            a, b2 = tok.split("/")
            den = Fraction(Decimal(b2.replace(",", "")))
            return None if den == 0 else Fraction(Decimal(a.replace(",", ""))) / den
        return Fraction(Decimal(tok.replace(",", "")))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def gsm8k_gold(answer: str | int | float) -> str:
    """The gold final answer of a GSM8K record: the text after ``####`` (or the value itself)."""
    if isinstance(answer, (int, float)):
        return str(answer)
    return answer.split("####")[-1].strip() if "####" in answer else answer.strip()


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


def _math_equal(pred: str, gold: str, timeout: float | None) -> tuple[str, str, str]:
    """(status, method, reason) for a MATH-style answer pair."""
    if normalise_math_string(pred) == normalise_math_string(gold):
        return "correct", "string", ""
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
def grade(response: str, gold: str | int | float, kind: str, timeout: float | None = 5.0) -> Verdict:
    """Grade one response against its gold answer.

    `gold`: for ``gsm8k`` the dataset's answer (the text after ``####`` is used when present);
    for ``math`` the gold final answer (not the full solution; if it has a ``\\boxed{}``, its
    content is used). `timeout` bounds each math-verify call (seconds; None = no limit).
    """
    kind = normalise_kind(kind)
    extracted = extract_answer(response, kind)
    if kind == "gsm8k":
        g = gsm8k_gold(gold)
        gnum = to_number(g)
        if extracted is None:
            return Verdict(False, None, "invalid", g, "none", "no answer")
        pnum = to_number(extracted)
        if gnum is None:  # a non-numeric gold: fall back to MATH-style comparison
            status, method, reason = _math_equal(extracted, g, timeout)
            return Verdict(status == "correct", extracted, status, g, method, reason)
        if pnum is None:
            return Verdict(False, extracted, "invalid", g, "numeric", "unparsable")
        ok = pnum == gnum
        return Verdict(ok, extracted, "correct" if ok else "wrong", g, "numeric")
    g = str(gold).strip()
    if isinstance(gold, float) and gold.is_integer():
        g = str(int(gold))
    b = last_boxed(g)
    if b:
        g = b[1]
    if extracted is None:
        return Verdict(False, None, "invalid", g, "none", "no answer")
    status, method, reason = _math_equal(extracted, g, timeout)
    return Verdict(status == "correct", extracted, status, g, method, reason)


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
