"""Metrics: grade one response into record fields, classify failures, and summarise records.

Accuracy is exact-match on the graded final answer (``answers.grade``). Every accuracy is
reported with a 95% Wilson score interval and its standard error (as lm-evaluation-harness
reports ``acc_stderr``). "Invalid" (no final answer / unreadable) is counted apart from
"wrong"; a problem with no prediction at all is invalid with reason "missing prediction",
so the denominator is always the whole evaluated set.
"""

from __future__ import annotations

import collections
import math
import statistics
from typing import Optional

from mlx_distill.tasks import answers
from mlx_distill.config import CorpusConfig, GradeConfig

# one repetition detector, with the corpus filter's defaults (config.py is the home of defaults)
REPEAT = {"n": CorpusConfig.repeat_ngram, "count": CorpusConfig.repeat_count}


def failure_kind(rec: dict) -> Optional[str]:
    if rec["status"] == "correct":
        return None
    if rec.get("finish_reason") == "error":
        return "generation failed"
    if rec.get("reason") == "missing prediction":
        return "missing prediction"
    if answers.repetition(rec.get("response") or "", **REPEAT):  # a loop that ran into the cap is a loop first
        return "repetition loop"
    if rec.get("finish_reason") == "length":
        return "truncated at max tokens"
    if rec["status"] == "invalid":
        return {"no answer": "no final answer", "unparsable": "unparsable final answer",
                "timeout": "grading timed out", "memory": "grading ran out of memory",
                "too large": "answer too large to grade"}.get(rec.get("reason", ""), "invalid")
    if rec.get("arithmetic_wrong"):
        return "arithmetic slip"
    return "wrong answer"


def grade_fields(response: str, gold, kind: str, timeout: float,
                 memory_mb: int = GradeConfig.grade_memory_mb) -> dict:
    """The record fields of one graded response; MATH-style comparisons run in a grading worker
    bounded by `timeout` seconds and `memory_mb` (``tasks.grading``)."""
    v = answers.grade(response, gold, kind, timeout=timeout, memory_mb=memory_mb)
    final = answers.final_text(response) or ""
    arith = answers.check_arithmetic(response)
    return {"extracted": v.extracted, "gold": v.gold, "correct": v.correct, "status": v.status,
            "reason": v.reason, "method": v.method, "words": answers.word_count(response),
            "words_final": answers.word_count(final), "arithmetic_checked": arith["checked"],
            "arithmetic_wrong": arith["wrong"], "arithmetic_errors": arith["errors"][:5]}



def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials (good at small n and near 0/1)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _stats(xs: list) -> dict:
    xs = [x for x in xs if isinstance(x, (int, float))]
    if not xs:
        return {"mean": None, "median": None}
    return {"mean": round(statistics.fmean(xs), 2), "median": statistics.median(xs)}


def _breakdown(records: list[dict], key: str) -> dict:
    groups = collections.defaultdict(list)
    for r in records:
        if r.get(key) is not None:
            groups[r[key]].append(r)
    out = {}
    for k in sorted(groups, key=str):
        rs = groups[k]
        c = sum(r["correct"] for r in rs)
        out[str(k)] = {"n": len(rs), "correct": c, "accuracy": round(c / len(rs), 4)}
    return out


def summarise(records: list[dict], **extra) -> dict:
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    invalid = sum(r["status"] == "invalid" for r in records)
    acc = correct / n if n else 0.0
    lo, hi = wilson(correct, n)
    truncated = sum(bool(r.get("truncated")) for r in records)
    steps = sum(r.get("arithmetic_checked") or 0 for r in records)
    bad = sum(r.get("arithmetic_wrong") or 0 for r in records)
    s = {
        "n": n, "correct": correct, "wrong": n - correct - invalid, "invalid": invalid,
        "accuracy": round(acc, 4), "accuracy_ci95": [round(lo, 4), round(hi, 4)],
        "accuracy_stderr": round(math.sqrt(acc * (1 - acc) / (n - 1)), 4) if n > 1 else None,
        "invalid_rate": round(invalid / n, 4) if n else 0.0,
        "invalid_reasons": dict(collections.Counter(r.get("reason") or "?" for r in records if r["status"] == "invalid")),
        # answers the grader stopped (worker killed at --grade-timeout / --grade-memory-mb, or refused
        # by the magnitude pre-check): invalid, and counted apart from unreadable answers
        "grading_limits": {k: sum(r["status"] == "invalid" and r.get("reason") == k for r in records)
                           for k in answers.LIMIT_REASONS},
        "truncated": truncated, "truncation_rate": round(truncated / n, 4) if n else 0.0,
        "words": _stats([r.get("words") for r in records]),
        "words_without_think": _stats([r.get("words_final") for r in records]),
        "tokens": _stats([r.get("tokens") for r in records]),
        "arithmetic": {"steps_checked": steps, "steps_wrong": bad,
                       "error_rate": round(bad / steps, 4) if steps else None,
                       "responses_with_error": sum(bool(r.get("arithmetic_wrong")) for r in records)},
        "failure_kinds": dict(collections.Counter(r["failure_kind"] for r in records if r.get("failure_kind"))
                              .most_common()),
    }
    if any(r.get("subject") is not None for r in records):
        s["by_subject"] = _breakdown(records, "subject")
    if any(r.get("level") is not None for r in records):
        s["by_level"] = _breakdown(records, "level")
    judged = [r for r in records if r.get("judge") in (True, False)]
    if any("judge" in r for r in records):
        s["judge"] = {"judged": len(judged), "undecided": sum("judge" in r for r in records) - len(judged),
                      "accuracy": round(sum(r["judge"] for r in judged) / len(judged), 4) if judged else None,
                      "agreement": round(sum(r["judge"] == r["correct"] for r in judged) / len(judged), 4)
                      if judged else None}
    if any(r.get("seen_in_training") for r in records):
        s["seen_in_training"] = sum(bool(r.get("seen_in_training")) for r in records)
    s.update(extra)
    return s


