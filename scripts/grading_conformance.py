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

Then (unless ``--no-plain``) it reports where ``answers.grade`` and plain ``math_verify.verify`` (parse
both, default options) disagree, and which side the expectation backs: on the suite's counted cases,
and on a seeded sample of the metamorphic set (``tasks.rewrites`` over the MATH-500 and GSM8K test golds
from ``MLX_DISTILL_DATA``: equivalents expected correct, near misses expected not).

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
    ap.add_argument("--no-plain", action="store_true",
                    help="skip the comparison with plain math_verify.verify (suite and metamorphic set)")
    ap.add_argument("--metamorphic-sample", type=int, default=2000,
                    help="metamorphic cases compared with plain math-verify (seeded sample; 0 = all)")
    ap.add_argument("--show-plain", type=int, default=10, help="disagreements with plain math-verify listed")
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
    if not args.no_plain:
        plain_disagreements("Math-Verify suite (counted cases)",
                            [(c["id"], c["response"], c["gold"], c["kind"], bool(c["adjudicated_expected"]))
                             for c in cases if c["counted"]], args)
        data = os.environ.get("MLX_DISTILL_DATA")
        if data:
            plain_disagreements(f"metamorphic set (a seeded sample of {args.metamorphic_sample})",
                                metamorphic_cases(Path(data), args.metamorphic_sample), args)
    return 0 if rate >= args.target else 1


def metamorphic_cases(data: Path, sample: int) -> list[tuple]:
    """(kind of rewrite, response, gold, answer kind, expected) from tasks.rewrites over the MATH-500 and
    GSM8K test golds; a seeded sample (plain math-verify is slow on thousands of cases)."""
    import random

    from mlx_distill.tasks.answers import gsm8k_gold
    from mlx_distill.tasks.rewrites import equivalents, near_misses

    golds = [(json.loads(line)["answer"], "math") for line in open(data / "math500" / "test.jsonl")]
    golds += [(gsm8k_gold(json.loads(line)["answer"]), "gsm8k") for line in open(data / "gsm8k" / "test.jsonl")]
    out = [(k, r, g, kind, True) for g, kind in golds for k, r in equivalents(g, kind)]
    out += [(k, r, g, kind, False) for g, kind in golds for k, r in near_misses(g, kind)]
    random.Random(0).shuffle(out)
    return out[:sample] if sample else out


def plain_verify(response: str, gold: str) -> bool:
    """Hugging Face math-verify as its README shows it: parse both, verify(gold, answer), default options."""
    from math_verify import parse, verify

    try:
        return bool(verify(parse("\\boxed{" + str(gold) + "}"), parse(response)))
    except Exception:  # noqa: BLE001 (its own timeout raises; counted as "not equal")
        return False


def plain_disagreements(title: str, cases: list[tuple], args) -> None:
    """Where answers.grade and plain math_verify.verify disagree, and which of them the expectation backs."""
    from mlx_distill.tasks import answers

    t0 = time.perf_counter()
    tally, shown = Counter(), []
    for tag, response, gold, kind, expected in cases:
        ours = answers.grade(response, gold, kind=kind, timeout=args.timeout).correct
        plain = plain_verify(response, gold)
        if ours == plain:
            tally["agree"] += 1
            continue
        who = "grade right" if ours == expected else "math-verify right" if plain == expected else "both wrong"
        tally[who] += 1
        tally[f"{who} / {tag}"] += 1
        if len(shown) < args.show_plain:
            shown.append((tag, who, short(gold, 60), short(response, 90)))
    print(f"\ngrade vs plain math_verify.verify on the {title}: {len(cases)} cases in "
          f"{time.perf_counter() - t0:.0f} s")
    for k, v in sorted(tally.items(), key=lambda kv: (" / " in kv[0], kv[0])):
        print(f"  {k:<44}{v:>6}")
    for tag, who, g, r in shown:
        print(f"  - [{tag}] {who}: gold {g!r}  response {r!r}")


if __name__ == "__main__":
    sys.exit(main())
