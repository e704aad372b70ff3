"""Grading rate: the in-process comparison (what grading did before the worker pool, without limits)
against the bounded worker pool (``tasks.grading``), side by side in one run.

    MLX_DISTILL_DATA=../shared/data python scripts/bench_grading.py
    MLX_DISTILL_DATA=../shared/data python scripts/bench_grading.py --threads 4

Cases: the 1319 GSM8K test golds and the 500 MATH-500 golds, each graded against itself (``#### g``,
``\\boxed{g}``), against a rewritten equivalent that needs math-verify (``x = g`` for MATH) and against a
perturbed answer (``g + 1``, or ``g+1`` appended for a non-numeric gold). Each row is graded twice with
``answers.grade``: once with MATH comparisons in this process (``memory_mb=0``: ``equivalence.judge``
called directly, no limits: the old path), once through the worker pool (5 s, 2048 MB). GSM8K numbers never reach sympy,
so its two columns measure the same code. The pool is started (``warm``) before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rows(data: Path) -> dict[str, list[tuple[str, str, str]]]:
    from mlx_distill.tasks.answers import gsm8k_gold, to_number

    gsm = [gsm8k_gold(json.loads(line)["answer"]) for line in open(data / "gsm8k" / "test.jsonl")]
    math = [json.loads(line)["answer"] for line in open(data / "math500" / "test.jsonl")]

    def bump(g: str) -> str:
        v = to_number(g)
        return str(v + 1) if v is not None and v.denominator == 1 else g + "+1"

    return {
        "gsm8k self": [(f"#### {g}", g, "gsm8k") for g in gsm],
        "gsm8k perturbed": [(f"#### {bump(g)}", g, "gsm8k") for g in gsm],
        "math500 self": [(f"So the answer is $\\boxed{{{g}}}$.", g, "math") for g in math],
        "math500 x = g": [(f"So the answer is $\\boxed{{x = {g}}}$.", g, "math") for g in math if "=" not in g],
        "math500 perturbed": [(f"So the answer is $\\boxed{{{bump(g)}}}$.", g, "math") for g in math],
    }


def run(cases, threads: int, memory_mb: int) -> tuple[float, int, int]:
    from mlx_distill.tasks.answers import grade

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        vs = list(ex.map(lambda c: grade(*c, timeout=5.0, memory_mb=memory_mb), cases))
    return time.perf_counter() - t, sum(v.correct for v in vs), sum(v.status == "invalid" for v in vs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2,
                    help="callers grading at once (the pool has min(4, CPUs) workers)")
    args = ap.parse_args(argv)
    data = os.environ.get("MLX_DISTILL_DATA")
    if not data:
        print("error: set MLX_DISTILL_DATA to the folder with gsm8k/ and math500/", file=sys.stderr)
        return 2
    from mlx_distill.tasks import grading

    grading.get_pool().warm()
    print(f"{'set':<20}{'cases':>6}{'in-process/s':>14}{'pool/s':>9}{'pool/in-proc':>14}   correct (in-proc | pool)")
    for name, cases in rows(Path(data)).items():
        t_old, ok_old, bad_old = run(cases, args.threads, memory_mb=0)   # in this process: the old path
        t_new, ok_new, bad_new = run(cases, args.threads, memory_mb=2048)
        n = len(cases)
        print(f"{name:<20}{n:>6}{n / t_old:>14.0f}{n / t_new:>9.0f}{t_old / t_new:>14.2f}   "
              f"{ok_old}/{n} (invalid {bad_old}) | {ok_new}/{n} (invalid {bad_new})")
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; pool workers {grading.get_pool().size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
