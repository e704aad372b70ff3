"""Conformance of ``mlx_distill.tasks.answers.grade`` with the reference grader's own test cases.

    MLX_DISTILL_DATA=../shared/data python scripts/grading_conformance.py
    python scripts/grading_conformance.py --cases ../shared/grading/math_verify_cases.jsonl --target 0.98

The cases file (default ``$MLX_DISTILL_DATA/../grading/math_verify_cases.jsonl``) holds, one JSON
object a line, a gold answer, a model response and the verdict the reference grader's tests expect
(Math-Verify's tests; see the README beside the file). Each ``response`` is graded against its
``gold`` with ``answers.grade(response, gold, kind=case["kind"])`` and the verdict compared with
``adjudicated_expected``. Agreement is reported on the ``counted`` cases, overall and by
kind x scope; every counted disagreement is listed (gold, response, expected, got, extracted).
Cases not counted (a non-default option of the reference grader, a decimal comma, a gold with
several boxes, or a debatable verdict) are reported apart, for information only.

Exits 1 when the agreement on counted cases is below ``--target``, 2 when the file cannot be read.
The cases are data of another project: they are read from where the user has them, never copied
into this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FIELDS = ("kind", "gold", "response", "adjudicated_expected", "counted", "scope")


def default_cases() -> Path | None:
    data = os.environ.get("MLX_DISTILL_DATA")
    return Path(data) / ".." / "grading" / "math_verify_cases.jsonl" if data else None


def load_cases(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such cases file (pass --cases PATH)")
    cases = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{i}: not JSON ({e.msg})") from None
        missing = [f for f in FIELDS if f not in case]
        if missing:
            raise SystemExit(f"error: {path}:{i}: missing field(s) {missing}")
        case.setdefault("id", f"line-{i}")
        cases.append(case)
    return cases


def short(text, n: int) -> str:
    """One line, at most n characters; long texts keep their end, where the answer is."""
    s = " ".join(str(text).split())
    return s if len(s) <= n else "…" + s[-(n - 1):]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=Path, default=None,
                    help="JSONL cases file (default: $MLX_DISTILL_DATA/../grading/math_verify_cases.jsonl)")
    ap.add_argument("--target", type=float, default=0.98, help="minimum agreement on counted cases (default 0.98)")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per math-verify call (answers.grade)")
    ap.add_argument("--show-uncounted", action="store_true", help="also list disagreements on uncounted cases")
    ap.add_argument("--width", type=int, default=160, help="characters shown of each gold / response")
    args = ap.parse_args(argv)

    path = args.cases or default_cases()
    if path is None:
        print("error: no cases file: pass --cases PATH or set MLX_DISTILL_DATA (the file is read from "
              "$MLX_DISTILL_DATA/../grading/math_verify_cases.jsonl)", file=sys.stderr)
        return 2
    try:
        cases = load_cases(path.resolve())
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2

    from mlx_distill.tasks import answers

    t0 = time.perf_counter()
    agree, total = Counter(), Counter()
    disagreements = []
    for case in cases:
        v = answers.grade(case["response"], case["gold"], kind=case["kind"], timeout=args.timeout)
        ok = v.correct == bool(case["adjudicated_expected"])
        group = ("counted" if case["counted"] else "uncounted", case["kind"], case["scope"])
        total[group] += 1
        agree[group] += ok
        if not ok:
            disagreements.append((case, v))
    elapsed = time.perf_counter() - t0

    def ratio(keys) -> tuple[int, int]:
        return sum(agree[k] for k in keys), sum(total[k] for k in keys)

    counted = [k for k in total if k[0] == "counted"]
    a, n = ratio(counted)
    rate = a / n if n else 0.0
    print(f"cases: {path} ({len(cases)} cases, {n} counted), graded in {elapsed:.1f} s")
    print(f"{'group':<34}{'agree':>7}{'of':>6}{'rate':>9}")
    for k in sorted(total):
        ka, kn = ratio([k])
        print(f"{' x '.join(k):<34}{ka:>7}{kn:>6}{ka / kn:>9.1%}")
    print(f"{'counted, all':<34}{a:>7}{n:>6}{rate:>9.1%}")

    shown = [(c, v) for c, v in disagreements if c["counted"] or args.show_uncounted]
    if shown:
        print(f"\ndisagreements ({len(shown)}):")
    for c, v in shown:
        tag = "" if c["counted"] else " (uncounted)"
        print(f"- {c['id']}{tag} [{c['kind']} x {c['scope']}] expected {bool(c['adjudicated_expected'])}, "
              f"got {v.status}" + (f" ({v.reason})" if v.reason else ""))
        print(f"    gold:      {short(c['gold'], args.width)}")
        print(f"    response:  {short(c['response'], args.width)}")
        print(f"    extracted: {v.extracted!r}")
    print(f"\nagreement on counted cases: {a}/{n} = {rate:.1%} (target {args.target:.0%}): "
          f"{'PASS' if rate >= args.target else 'FAIL'}")
    return 0 if rate >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
