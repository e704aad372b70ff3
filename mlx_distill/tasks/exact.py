"""Exact numbers from answer text: + - * / ^, parentheses, ``\\frac``, ``\\sqrt`` over fractions (no eval()).

Bounded by construction: a power whose result would exceed 100,000 bits, a root of a number over 4,000
bits, or an exponent over 10,000 is "not exact" (``None``), never computed; so a GSM8K answer such as
``9^{99999}`` cannot hang the grader. MATH-style answers go to math-verify in a worker process
(``tasks.grading``) instead.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_THIN = "\u2009\u202f\u00a0"            # thin, narrow no-break and no-break spaces


def _ungroup(s: str) -> str:
    """Remove thousands separators: 1,234,567 / 1 234 567 / 1\u2009234 -> 1234567 (groups of three only)."""
    return re.sub(rf"(?<![\d.,])(\d{{1,3}})((?:[,{_THIN} ]\d{{3}})+)(?!\d)",
                  lambda m: m.group(1) + re.sub(rf"[,{_THIN} ]", "", m.group(2)), s)


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
