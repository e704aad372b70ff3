"""Metamorphic grading at scale, on real data (MLX_DISTILL_DATA): every MATH-500 gold and every GSM8K
test gold, rewritten in equivalent forms (11 kinds) and turned into near misses (6 kinds).

At least 99.5% of the equivalents must be accepted and no near miss may be. The counts per kind are
printed (``pytest -s``) and recorded in docs/BENCHMARKS.md. No sampling: all 1819 golds are used."""

import collections
import json
from concurrent.futures import ThreadPoolExecutor

from mlx_distill.tasks.answers import grade, gsm8k_gold
from mlx_distill.tasks.rewrites import EQUIVALENT_KINDS, NEAR_MISS_KINDS, equivalents, near_misses


def _cases(shared_data):
    golds = [(json.loads(line)["answer"], "math") for line in open(shared_data / "math500" / "test.jsonl")]
    golds += [(gsm8k_gold(json.loads(line)["answer"]), "gsm8k") for line in open(shared_data / "gsm8k" / "test.jsonl")]
    assert len(golds) == 500 + 1319
    eq = [(k, r, g, kind) for g, kind in golds for k, r in equivalents(g, kind)]
    near = [(k, r, g, kind) for g, kind in golds for k, r in near_misses(g, kind)]
    return eq, near


def _grade_all(cases):
    with ThreadPoolExecutor(4) as ex:  # MATH pairs go to the grading workers; threads keep them busy
        return list(ex.map(lambda c: grade(c[1], c[2], c[3]), cases))


def test_metamorphic_equivalents_accepted_near_misses_rejected(shared_data):
    eq, near = _cases(shared_data)
    eq_v, near_v = _grade_all(eq), _grade_all(near)
    table = collections.defaultdict(lambda: [0, 0])
    for (k, _, _, kind), v in zip(eq, eq_v):
        table[("equivalent", k, kind)][0] += v.correct
        table[("equivalent", k, kind)][1] += 1
    for (k, _, _, kind), v in zip(near, near_v):
        table[("near miss", k, kind)][0] += v.correct
        table[("near miss", k, kind)][1] += 1
    print("\n| case | kind | set | accepted | of |")
    for key in sorted(table):
        print(f"| {key[0]} | {key[1]} | {key[2]} | {table[key][0]} | {table[key][1]} |")
    kinds_seen = {k for k, *_ in eq}
    assert len(kinds_seen) >= 10 and kinds_seen <= set(EQUIVALENT_KINDS), kinds_seen
    assert {k for k, *_ in near} <= set(NEAR_MISS_KINDS) and len({k for k, *_ in near}) == len(NEAR_MISS_KINDS)
    missed = [(c[0], c[1], c[2], v.status, v.reason) for c, v in zip(eq, eq_v) if not v.correct]
    accepted = [(c[0], c[1], c[2]) for c, v in zip(near, near_v) if v.correct]
    print(f"equivalents accepted {len(eq) - len(missed)}/{len(eq)}; near misses accepted {len(accepted)}/{len(near)}")
    for m in missed[:40]:
        print("missed:", m)
    assert (len(eq) - len(missed)) / len(eq) >= 0.995, missed[:20]
    assert not accepted, accepted[:20]
