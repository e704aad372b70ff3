"""Equivalence of MATH-style answers: a string check, a plain-text to LaTeX rewrite, math-verify, and
a few sympy rules that generalise; plus the cheap magnitude pre-check that keeps absurd answers away
from sympy.

``judge(pred, gold)`` is what a grading worker runs (``tasks.grading`` calls it in a separate process
with a wall-clock limit and a memory cap; nothing here bounds its own time). Gold first everywhere:
``math_verify.verify(gold, pred)`` is not symmetric.

What a model writes and math-verify does not read as LaTeX is first rewritten, by general rules
(``canonical``), on both sides:

* plain-text functions and constants (``sqrt(3)``, ``sqrt 3``, ``sin(x)``, ``pi``, ``infinity``) get
  their backslash (Math-Verify's own normalisation does the same for a few names);
* the degree sign ``°`` is ``^\\circ``; inside a trigonometric function, ``N^\\circ`` is ``N\\pi/180``;
* a trailing unit after a number (``10 weeks``, ``10 cm^2``, ``10\\text{ cm}^2``) is dropped, as
  Hendrycks' MATH ``strip_string`` drops ``\\text{ units}``;
* a plain-text mixed number ``1 1/2`` is ``1+\\frac{1}{2}`` (LaTeX ``1\\frac12`` math-verify reads);
* ``2=x`` (a variable alone on the right) is ``x=2``.

When math-verify says "not equal", these rules may still say "equal" (each sound: it never accepts a
pair whose values differ):

* the same function under another left-hand name: ``f(x)=2x+3`` against ``y=2x+3`` (one side written
  as a function of the other's variables, the other as ``y`` or a function of the same variables);
  two plain variables must agree (``y=5`` is not ``x=5``);
* the imaginary unit: when the gold looks complex (``a+bi``) or both sides hold ``i`` and no other
  symbol, ``i`` is ``sqrt(-1)`` (``i(2-i)`` equals ``1+2i``);
* an unsimplified identity: sympy's ``simplify`` of the difference is 0 (``\\sin(90^\\circ-x)`` against
  ``\\cos(x)``), bounded by the worker's time limit;
* a gold with many decimals (6 or more) against an exact value: equal when the exact value rounds to
  the gold (``0.3333333333333`` against ``\\frac13``); a near miss in the last digit does not.

Single letters are compared case-sensitively (``E`` is not ``e``; ``x=5`` is not ``y=5``): the string
fallback never changes case and strips a ``v =`` prefix only when both sides name the same variable.
"""

from __future__ import annotations

import ast
import math
import re

from mlx_distill.tasks.exact import _eval_exact

# Longer than this is not an answer but a runaway sentence: math-verify is not asked.
MAX_ANSWER_CHARS = 1000
# The pre-check's limits (``too_large``): no answer anyone writes comes near them.
MAX_EXPONENT = 100_000
MAX_FACTORIAL = 5_000
MAX_DIGITS = 2_000
MAX_NESTING = 40


# ----------------------------------------------------------------------------- strings
def normalise_math_string(s: str) -> str:
    """A light string normalisation (after Hendrycks' MATH ``strip_string``) used as a fast first
    check: text wrappers, spacing commands, ``\\left``/``\\right``, ``dfrac``/``tfrac``, degrees,
    dollars and percent signs removed. Case is kept (``E`` is not ``e``)."""
    s = str(s).strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|textrm)\s*{([^{}]*)}", r"\1", s)
    for a, b in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("\\left", ""), ("\\right", ""),
                 ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("°", ""),
                 ("\\$", ""), ("$", ""), ("\\%", ""), ("%", "")):
        s = s.replace(a, b)
    return re.sub(r"\s+", "", s).rstrip(".")


_VAR_EQ = re.compile(r"^([A-Za-z](?:_\{?\w+\}?)?)=(.+)$")


def strings_equal(pred: str, gold: str) -> bool:
    """Equal after ``normalise_math_string``; a ``v =`` prefix is stripped only when both sides name
    the same variable ``v``."""
    p, g = normalise_math_string(pred), normalise_math_string(gold)
    if p == g:
        return True
    mp, mg = _VAR_EQ.match(p), _VAR_EQ.match(g)
    return bool(mp and mg and mp.group(1) == mg.group(1) and mp.group(2) == mg.group(2))


# ----------------------------------------------------------------------------- magnitude pre-check
def _group_after(s: str, i: int) -> tuple[str, int]:
    """The exponent or argument starting at s[i]: a balanced {…}/(…) group, or a number, or one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i < len(s) and s[i] in "{(":
        open_, close = s[i], "}" if s[i] == "{" else ")"
        depth = 0
        for j in range(i, len(s)):
            depth += (s[j] == open_) - (s[j] == close)
            if depth == 0:
                return s[i + 1:j], j + 1
        return s[i + 1:], len(s)
    m = re.match(r"\d+(?:\.\d+)?|\\[A-Za-z]+|.", s[i:])
    return (m.group(), i + m.end()) if m else ("", i)


def _group_before(s: str, i: int) -> str:
    """The operand ending just before s[i] (for ``n!``): a number or a balanced (…)/{…} group."""
    j = i
    while j > 0 and s[j - 1] == " ":
        j -= 1
    if j > 0 and s[j - 1] in ")}":
        close, open_ = s[j - 1], "(" if s[j - 1] == ")" else "{"
        depth = 0
        for k in range(j - 1, -1, -1):
            depth += (s[k] == close) - (s[k] == open_)
            if depth == 0:
                return s[k + 1:j - 1]
        return s[:j]
    m = re.search(r"\d+$", s[:j])
    return m.group() if m else ""


def _float_value(expr: str) -> float | None:
    """The value of a numeric LaTeX expression as a float (inf when it overflows), None when it is not
    plain arithmetic. Read through ``ast`` over numbers and + - * / ** only (no eval())."""
    t, prev = expr, None
    while t != prev:  # innermost first
        prev = t
        t = re.sub(r"\\[dtc]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", t)
        t = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"((\1)**0.5)", t)
    for a, b in (("^", "**"), ("\\cdot", "*"), ("\\times", "*"), ("\\left", ""), ("\\right", ""),
                 ("{", "("), ("}", ")")):
        t = t.replace(a, b)
    if re.search(r"[^\d.+\-*/() ]", t):
        return None
    try:
        tree = ast.parse(t.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None

    def ev(n) -> float:
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return float(n.value) if abs(n.value) < 1e300 else math.inf
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = ev(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            try:
                if isinstance(n.op, ast.Pow):
                    return math.pow(a, b) if abs(a) > 1 or b > 0 else 0.0
                return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}.get(type(n.op), a / b if b else math.inf)
            except (OverflowError, ValueError, ZeroDivisionError):
                return math.inf
        raise ValueError("not arithmetic")

    try:
        return ev(tree)
    except (ValueError, RecursionError):
        return None


def _small_value(expr: str, limit: int) -> bool:
    """False when `expr` is surely a number of magnitude over `limit` (or a factorial inside an
    exponent or a factorial); True otherwise, symbolic or unknown included: the pre-check refuses only
    what it is sure of, the worker's limits stop the rest."""
    if re.search(r"[A-Za-z]", re.sub(r"\\(?:[dtc]?frac|sqrt|cdot|times|left|right)", "", expr)):
        return True  # symbolic (x, n, \pi): sympy keeps it unevaluated
    if "!" in expr:
        return False
    v = _eval_exact(expr)
    if v is None:
        v = _float_value(expr)
    return v is None or not (abs(v) > limit)


def too_large(s: str) -> bool:
    """A cheap refusal, before sympy sees the text, of magnitudes nobody writes as an answer: towers
    of powers (``2^{2^{2^{49}}}``), exponents over 100,000, factorials of numbers over 5,000 or of
    factorials, runs of over 2,000 digits, and brackets nested over 40 deep."""
    s = str(s)
    if re.search(rf"\d{{{MAX_DIGITS + 1}}}", s):
        return True
    depth = deepest = 0
    for c in s:
        if c in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")}]":
            depth -= 1
    if deepest > MAX_NESTING:
        return True
    t = s.replace("**", "^")
    for m in re.finditer(r"\^", t):
        exp, end = _group_after(t, m.end())
        while t[end:].lstrip().startswith("^"):  # a^b^c is a^(b^c): the exponent is the rest of the chain
            more, end = _group_after(t, t.index("^", end) + 1)
            exp += "^{" + more + "}"
        if not _small_value(exp, MAX_EXPONENT):
            return True
    for m in re.finditer(r"!|\\(?:factorial)\b", t):
        if m.group() == "!":
            arg = _group_before(t, m.start())
        else:
            arg, _ = _group_after(t, m.end())
        if arg and not _small_value(arg, MAX_FACTORIAL):
            return True
    return False


# ----------------------------------------------------------------------------- plain text -> LaTeX
_FUNCS = ("arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "sin", "cos", "tan", "cot", "sec", "csc",
          "log", "ln", "exp")
_CONSTS = {"pi": "\\pi", "infty": "\\infty", "infinity": "\\infty", "theta": "\\theta", "alpha": "\\alpha",
           "beta": "\\beta", "phi": "\\phi"}
_BARE = r"(?<![\\A-Za-z])"
_TRIG = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)(?![A-Za-z])")
_DEG = re.compile(r"(\d+(?:\.\d+)?)\s*\^\s*(?:\{\s*\\circ\s*\}|\\circ)")
_UNIT_TAIL = re.compile(
    r"(?<=[\d}])\s*(?:\\(?:text|mbox|mathrm|textrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}|(?:\s|\\ |~)+[A-Za-z]{2,}"
    r"(?:\s+[A-Za-z]{2,})*)(?:\s*\^\s*\{?[23]\}?)?\s*\.?\s*$")
_MIXED = re.compile(r"^\s*(-?)\s*(\d+)\s+(\d+)\s*/\s*(\d+)\s*$")
_RIGHT_VAR = re.compile(r"^([^=<>]+?)\s*=\s*([A-Za-z])\s*$")


def _sqrt_plain(s: str) -> str:
    """``sqrt(3)`` -> ``\\sqrt{3}``, ``sqrt 3`` / ``sqrt3`` -> ``\\sqrt{3}`` (balanced parentheses)."""
    out, i = [], 0
    for m in re.finditer(_BARE + r"sqrt(?![A-Za-z])", s):
        if m.start() < i:
            continue
        out.append(s[i:m.start()])
        j = m.end()
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] == "(":
            arg, k = _group_after(s, j)
        else:
            a = re.match(r"\d+(?:\.\d+)?|[A-Za-z]|\{[^{}]*\}", s[j:])
            if not a:
                out.append("\\sqrt")
                i = m.end()
                continue
            arg, k = a.group().strip("{}"), j + a.end()
        out.append("\\sqrt{" + arg + "}")
        i = k
    out.append(s[i:])
    return "".join(out)


_LT = r"(<|\\lt|\\leq?|\\leqslant|≤|<=)"
_GT = r"(>|\\gt|\\geq?|\\geqslant|≥|>=)"


def _inequality_to_interval(s: str) -> str:
    """``x > 3`` -> ``(3,\\infty)``, ``x \\leq 3`` -> ``(-\\infty,3]``, ``1 < x \\le 2`` -> ``(1,2]`` (one
    variable, numbers or expressions without another comparison): the same set written as an interval."""
    closed = lambda op: "<=" in op or "le" in op or "ge" in op or op in "≤≥" or ">=" in op  # noqa: E731
    if re.search(r"[A-Za-z].*[<>≤≥\\].*[A-Za-z]", re.sub(r"\\(?:[lg]eq?|[lg]t|[lg]eqslant|infty|pi|sqrt|frac)", "<", s)):
        return s  # a bound with a variable in it (y > 2x): not an interval of numbers
    m = re.fullmatch(rf"\s*([^<>=≤≥\\]+?|\\[A-Za-z]+)\s*{_LT}\s*([A-Za-z])\s*{_LT}\s*([^<>=≤≥]+?)\s*", s)
    if m:
        return f"{'[' if closed(m.group(2)) else '('}{m.group(1)},{m.group(5)}{']' if closed(m.group(4)) else ')'}"
    m = re.fullmatch(rf"\s*([A-Za-z])\s*(?:{_GT}|{_LT})\s*([^<>=≤≥]+?)\s*", s)
    if m:
        if m.group(2):
            return f"{'[' if closed(m.group(2)) else '('}{m.group(4)},\\infty)"
        return f"(-\\infty,{m.group(4)}{']' if closed(m.group(3)) else ')'}"
    return s


def canonical(s: str) -> str:
    """The general plain-text to LaTeX rewrite applied to both sides (see the module docstring)."""
    s = str(s).strip().replace("°", "^\\circ").replace("\\degree", "^\\circ").replace("−", "-")
    s = _sqrt_plain(s)
    s = re.sub(_BARE + r"(" + "|".join(_FUNCS) + r")(?![A-Za-z])", r"\\\1", s)
    for word, tex in _CONSTS.items():
        s = re.sub(_BARE + word + r"(?![A-Za-z])", lambda _m, t=tex: t, s)
    if _TRIG.search(s):  # degrees inside a trigonometric function are radians to sympy
        s = _DEG.sub(lambda m: "\\frac{" + m.group(1) + "\\pi}{180}", s)
    s = _UNIT_TAIL.sub("", s).strip()
    m = _MIXED.match(s)
    if m:
        s = f"{m.group(1)}\\left({m.group(2)}+\\frac{{{m.group(3)}}}{{{m.group(4)}}}\\right)"
    m = _RIGHT_VAR.match(s)
    if m and m.group(2) not in re.sub(r"\\[A-Za-z]+", "", m.group(1)):
        s = f"{m.group(2)}={m.group(1)}"
    return s


# ----------------------------------------------------------------------------- math-verify + rules
def _quiet_math_verify() -> None:
    # It warns (once per process) that its own timeout is off: the grading worker enforces ours.
    import logging

    for name in ("math_verify.grader", "math_verify.parser"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet_math_verify()


def mv_parse(s: str):
    from math_verify import parse

    return parse("\\boxed{" + s + "}", parsing_timeout=None)


def mv_verify(gold_parsed, pred_parsed) -> bool:
    from math_verify import verify

    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


_FUNC_LHS = re.compile(r"^\s*([A-Za-z])\s*(?:\(\s*([A-Za-z](?:\s*,\s*[A-Za-z])*)\s*\))?\s*=\s*(.+)$")
_COMPLEX = re.compile(r"^\s*[-+]?[\d./\\{}a-z]*\s*[-+]\s*[\d./\\{}]*\s*i\s*$|^\s*[-+]?[\d./\\{}]*\s*i\s*$")


def _lhs_names_agree(pred: str, gold: str) -> tuple[str, str] | None:
    """(pred rhs, gold rhs) when both are ``name = rhs`` naming the same function: one side
    ``f(x)``, the other ``y`` or ``g(x)`` (same arguments); None otherwise."""
    mp, mg = _FUNC_LHS.match(pred), _FUNC_LHS.match(gold)
    if not (mp and mg) or "=" in mp.group(3) or "=" in mg.group(3):
        return None
    ap, ag = mp.group(2), mg.group(2)
    if ap is None and ag is None:
        return None  # two plain variables: x = 5 is not y = 5
    if ap is not None and ag is not None and ap.replace(" ", "") != ag.replace(" ", ""):
        return None
    plain = mp if ap is None else mg if ag is None else None
    if plain is not None and plain.group(1) != "y":
        return None  # only y is the conventional name of a function's value
    return mp.group(3), mg.group(3)


def _first(parsed):
    return parsed[0] if parsed else None


def _decimals(gold: str) -> int:
    m = re.fullmatch(r"\s*-?\d*\.(\d+)\s*", gold)
    return len(m.group(1)) if m else 0


def _sympy_rules(pred: str, gold: str, p, g) -> bool:
    """The rules math-verify lacks (see the module docstring), on parsed sympy values."""
    import sympy

    if not (isinstance(p, sympy.Expr) and isinstance(g, sympy.Expr)):
        return False
    d = _decimals(gold)
    if d >= 6 and not p.free_symbols:
        try:
            pv = sympy.N(p, 30)
            if pv.is_real:
                return abs(pv - sympy.Rational(gold.strip())) <= sympy.Rational(1, 2 * 10 ** d)
        except (TypeError, ValueError):
            return False
    syms = p.free_symbols | g.free_symbols
    names = {s.name for s in syms}
    if "i" in names and names == {"i"} and (_COMPLEX.match(gold) or all(
            "i" in {s.name for s in e.free_symbols} for e in (p, g))):
        p, g = (e.subs({s: sympy.I for s in e.free_symbols}) for e in (p, g))  # each side's own symbol i
        if sympy.simplify(sympy.expand(g - p)) == 0:
            return True
    if syms or p.has(sympy.Function) or g.has(sympy.Function):
        diff = g - p
        return sympy.simplify(diff) == 0 or sympy.trigsimp(sympy.expand_trig(diff)) == 0
    return False


_ONE_LETTER_UNIT = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+[A-Za-z](?:\s*\^\s*\{?[23]\}?)?\s*$")


def _is_number(v) -> bool:
    import sympy

    return isinstance(v, sympy.Expr) and not v.free_symbols and bool(v.is_number)


_LETTER = re.compile(r"^\s*(?:\\text\s*\{\s*)?\(?\s*([A-Za-z])\s*\)?\s*\}?\s*$")


def judge(pred: str, gold: str) -> tuple[str, str, str]:
    """(status, method, reason) of a MATH-style answer pair; runs in a grading worker (no own limit)."""
    lp, lg = _LETTER.match(pred), _LETTER.match(gold)
    if lp and lg:  # single letters (choices, constants): case matters
        return ("correct" if lp.group(1) == lg.group(1) else "wrong"), "string", ""
    cp, cg = canonical(pred), canonical(gold)
    interval = re.compile(r"^\s*[(\[].*,.*[)\]]\s*$")
    if interval.match(cg) and not interval.match(cp):  # "x > 3" against "(3,\infty)": the same set
        cp = _inequality_to_interval(cp)
    elif interval.match(cp) and not interval.match(cg):
        cg = _inequality_to_interval(cg)
    m = re.match(r"^\s*([A-Za-z](?:_\{?\w+\}?)?)\s*=\s*(.+)$", cp)
    if m and "=" not in cg and "=" not in m.group(2):  # "x = 10,\!080" against "10,\!080": no name to agree on
        return judge(m.group(2), gold)
    m = _ONE_LETTER_UNIT.match(cp)
    if m and not re.search(r"[A-Za-z]", cg):  # "25 m^2" against a plain number: a one-letter unit
        cp = m.group(1)
    if strings_equal(cp, cg):
        return "correct", "string", ""
    g = mv_parse(cg)
    p = mv_parse(cp)
    if not p:
        return "invalid", "math-verify", "unparsable"
    if not g:
        return "wrong", "string", "gold unparsable by math-verify"
    gv, pv = _first(g), _first(p)
    if _decimals(cg) >= 6 and "." not in cp and _is_number(pv):  # an exact value against a long decimal:
        return ("correct" if _sympy_rules(cp, cg, pv, gv) else "wrong"), "sympy", ""  # it must round to it
    if mv_verify(g, p):
        return "correct", "math-verify", ""
    sides = _lhs_names_agree(cp, cg)
    if sides is not None:
        g2, p2 = mv_parse(sides[1]), mv_parse(sides[0])
        if g2 and p2 and (mv_verify(g2, p2) or _sympy_rules(sides[0], sides[1], _first(p2), _first(g2))):
            return "correct", "sympy", ""
    if _sympy_rules(cp, cg, _first(p), _first(g)):
        return "correct", "sympy", ""
    return "wrong", "math-verify", ""
