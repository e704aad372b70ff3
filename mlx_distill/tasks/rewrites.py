"""Metamorphic cases for the grader: equivalent rewrites and near misses of a gold answer.

For a gold answer, ``equivalents`` yields responses that state the same answer in another form (each
tagged with its kind: ``dfrac``, ``decimal-fraction``, ``left-right``, ``spacing``, ``degree``,
``unit``, ``reorder``, ``var-prefix``, ``thousands``, ``dollar-math``, ``final-answer``), and
``near_misses`` yields responses whose value differs (``plus-one``, ``minus-one``, ``sign``,
``reciprocal``, ``digit``, ``units-x10``). A near miss is produced only when the gold's value is known
exactly (``exact``) and the near miss's value provably differs from it (the reciprocal of 1, the sign
flip of 0 are never produced). Used by tests/test_grading_metamorphic.py and
scripts/grading_conformance.py; the golds come from the user's data (``MLX_DISTILL_DATA``).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Iterator

from mlx_distill.tasks.exact import _eval_exact

EQUIVALENT_KINDS = ("dfrac", "decimal-fraction", "left-right", "spacing", "degree", "unit", "reorder",
                    "var-prefix", "thousands", "dollar-math", "final-answer")
NEAR_MISS_KINDS = ("plus-one", "minus-one", "sign", "reciprocal", "digit", "units-x10")


def exact(gold: str) -> Fraction | None:
    """The gold's exact value when it is a plain number (``12``, ``-0.5``, ``\\frac{3}{4}``), else None."""
    g = gold.strip().replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if not re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\\frac\{\d+\}\{\d+\}|\d+/\d+)", g):
        return None
    return _eval_exact(g)


def _fmt(v: Fraction) -> str:
    """A number as a gold-like string: an integer, a terminating decimal, or ``\\frac{p}{q}``."""
    if v.denominator == 1:
        return str(v.numerator)
    d = v.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:
        s = f"{float(v):.12f}".rstrip("0")
        if Fraction(s) == v:
            return s
    sign = "-" if v < 0 else ""
    return f"{sign}\\frac{{{abs(v.numerator)}}}{{{v.denominator}}}"


def _box(kind: str, s: str) -> str:
    return f"#### {s}" if kind == "gsm8k" else f"So the answer is $\\boxed{{{s}}}$."


def _top_level_split(s: str) -> list[str] | None:
    depth, parts, cur = 0, [], ""
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    return parts if len(parts) > 1 else None


def equivalents(gold: str, kind: str) -> Iterator[tuple[str, str]]:
    """(kind of rewrite, response) pairs that state `gold` in another form."""
    g = gold.strip()
    v = exact(g)
    if "\\frac" in g:
        yield "dfrac", _box(kind, g.replace("\\frac", "\\dfrac"))
        yield "dfrac", _box(kind, g.replace("\\frac", "\\tfrac"))
    if v is not None and v.denominator != 1:
        other = _fmt(v)
        if "." in g or "." not in other:
            other = f"\\frac{{{abs(v.numerator)}}}{{{v.denominator}}}"
            other = ("-" if v < 0 else "") + other
        if other != g:
            yield "decimal-fraction", _box(kind, other)
    if "(" in g and "\\left" not in g and g.count("(") == g.count(")"):
        yield "left-right", _box(kind, g.replace("(", "\\left(").replace(")", "\\right)"))
    spaced = re.sub(r"\s*([+=,]|(?<![\^{(\s])-)\s*", r" \1 ", g).strip()
    spaced = re.sub(r"\s+", " ", spaced)
    if spaced != g:
        yield "spacing", _box(kind, spaced)
    elif kind == "math":
        yield "spacing", f"So the answer is $\\boxed{{ {g} }}$."
    if "^\\circ" in g:
        yield "degree", _box(kind, g.replace("^\\circ", "°"))
    elif "°" in g:
        yield "degree", _box(kind, g.replace("°", "^\\circ"))
    m = re.fullmatch(r"(.+?)\s*\\(?:text|mbox)\{\s*([A-Za-z ]+)\}(\^\{?[23]\}?)?", g)
    if m and re.search(r"\d", m.group(1)):
        yield "unit", _box(kind, f"{m.group(1)} {m.group(2).strip()}" + (m.group(3) or ""))
    elif v is not None:
        yield "unit", _box(kind, f"{g} \\text{{ units}}" if kind == "math" else f"{g} dollars")
    inner = g[2:-2] if g.startswith("\\{") and g.endswith("\\}") else g
    parts = None if re.search(r"[(\[].*,.*[)\]]$", inner) and inner[0] in "([" and inner[-1] in ")]" else \
        _top_level_split(inner)
    if parts and any(re.match(r"\s*(?:\\!)?\s*\d{3}(?!\d)", p) for p in parts[1:]):
        parts = None  # thousands separators (10,\!080), not a list
    if parts and kind == "math":
        rev = ",".join(reversed([p.strip() for p in parts]))
        yield "reorder", _box(kind, ("\\{" + rev + "\\}") if inner is not g else rev)
    else:
        terms = re.fullmatch(r"([^+\-=,(){}]+)\+([^+\-=,(){}]+)", g)
        if terms and kind == "math":
            yield "reorder", _box(kind, f"{terms.group(2)}+{terms.group(1)}")
    if "=" not in g and not re.search(r"\\text|,", g) and kind == "math":
        yield "var-prefix", _box(kind, f"x = {g}")
    elif "=" not in g and kind == "gsm8k":
        yield "var-prefix", _box(kind, f"x = {g}")
    if v is not None and v.denominator == 1 and abs(v) >= 1000 and "," not in g:
        yield "thousands", _box(kind, f"{int(v):,}")
    yield "dollar-math", f"Putting it together, the result is ${g}$."
    yield "final-answer", f"Final Answer: The final answer is ${g}$. I hope it is correct."


def near_misses(gold: str, kind: str) -> Iterator[tuple[str, str]]:
    """(kind of near miss, response) pairs whose value provably differs from a plain-number `gold`."""
    v = exact(gold)
    if v is None:
        return
    cands = [("plus-one", v + 1), ("minus-one", v - 1), ("sign", -v)]
    if v != 0:
        cands.append(("reciprocal", 1 / v))
    digits = [i for i, c in enumerate(gold) if c.isdigit()]
    if digits:
        i = digits[-1]
        changed = gold[:i] + str((int(gold[i]) + 1) % 10) + gold[i + 1:]
        cv = exact(changed)
        if cv is not None:
            cands.append(("digit", cv))
    for name, w in cands:
        if w != v:
            yield name, _box(kind, _fmt(w))
    if v != 0:
        yield "units-x10", _box(kind, f"{_fmt(v * 10)} dollars" if kind == "gsm8k" else f"{_fmt(v * 10)} \\text{{ cm}}")
