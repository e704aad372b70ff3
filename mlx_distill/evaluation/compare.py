"""`python -m mlx_distill compare A B`: two evaluations of the same problems, side by side.

    python -m mlx_distill compare runs/demo/eval-base runs/demo/eval --names base adapter --show 3

Reads each eval folder's ``summary.json`` (n, correct, accuracy, accuracy_ci95, invalid) and
``records.jsonl`` (id, response, extracted, gold, status) and prints:

- both accuracies with their 95% intervals (as each eval computed them);
- the paired comparison on the shared problems: how many only A / only B got right, the
  accuracy difference B - A with a 95% interval for paired proportions, and the exact
  McNemar test (two-sided binomial test on the problems where they disagree);
- N problems side by side (question and gold, each response with its verdict), problems
  where the two verdicts differ first.

Both evals must cover the same problem ids (same dataset, split and --limit); otherwise the
command refuses: a paired comparison of different problems means nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from mlx_distill.io import InputError, read_json, read_jsonl

WIDTH = 80  # every table fits an 80-column terminal


def load_eval(folder: str | Path) -> tuple[dict, dict[str, dict]]:
    """(summary, id -> record) of one eval output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not an eval folder (run `python -m mlx_distill eval --out {folder}` first)")
    summary = read_json(folder / "summary.json")
    records: dict[str, dict] = {}
    for i, r in enumerate(read_jsonl(folder / "records.jsonl"), 1):
        if "id" not in r or "status" not in r:
            raise InputError(f"{folder / 'records.jsonl'}:{i}: a record needs `id` and `status`")
        if str(r["id"]) in records:
            raise InputError(f"{folder / 'records.jsonl'}:{i}: duplicate id {r['id']!r}")
        records[str(r["id"])] = r
    if isinstance(summary.get("n"), int) and summary["n"] != len(records):
        raise InputError(f"{folder}: summary.json says n={summary['n']} but records.jsonl holds {len(records)} "
                         "records (an unfinished eval? finish it with the same command)")
    return summary, records


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: under H0 each disagreement favours A or B with p = 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: dict[str, dict], b: dict[str, dict]) -> dict:
    """Win/loss counts and the B - A accuracy difference over the shared ids."""
    ids = sorted(a)
    ok_a = {i: a[i]["status"] == "correct" for i in ids}
    ok_b = {i: b[i]["status"] == "correct" for i in ids}
    n = len(ids)
    only_a = sum(ok_a[i] and not ok_b[i] for i in ids)
    only_b = sum(ok_b[i] and not ok_a[i] for i in ids)
    both = sum(ok_a[i] and ok_b[i] for i in ids)
    diff = (only_b - only_a) / n if n else 0.0
    # Wald interval for a difference of paired proportions (Agresti, Categorical Data Analysis, 10.1)
    se = math.sqrt(max(0.0, (only_a + only_b) / n - diff ** 2) / n) if n else 0.0
    return {"n": n, "both": both, "neither": n - both - only_a - only_b, "only_a": only_a, "only_b": only_b,
            "diff": diff, "diff_ci95": (diff - 1.96 * se, diff + 1.96 * se), "p": mcnemar_p(only_a, only_b)}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(s: dict) -> str:
    ci = s.get("accuracy_ci95")
    return f"{_pct(ci[0])} - {_pct(ci[1])}" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "-"


def _question(r: dict) -> str:
    return str(r.get("question") or r.get("prompt") or "").strip()


def _clip(text: str, n: int = 600) -> str:
    text = (text or "").strip()
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def order_for_show(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    """Problems where the verdicts differ first (B right / A wrong, then the reverse), then the rest;
    file order (the eval's `index`) within each group."""
    def key(i):
        ra, rb = a[i]["status"] == "correct", b[i]["status"] == "correct"
        group = 0 if (rb and not ra) else 1 if (ra and not rb) else 2 if a[i]["status"] != b[i]["status"] else 3
        return group, a[i].get("index", 0), i
    return sorted(a, key=key)


def render(a_dir, b_dir, names=("A", "B"), show: int = 3, console=None) -> dict:
    """Load, check, and print the comparison; return the paired numbers."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    (sa, ra), (sb, rb) = load_eval(a_dir), load_eval(b_dir)
    only_a, only_b = sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra))
    if only_a or only_b:
        ex = (only_a or only_b)[:3]
        raise InputError(f"{a_dir} and {b_dir} are not on the same problems ({len(only_a)} ids only in the first, "
                         f"{len(only_b)} only in the second, e.g. {', '.join(ex)}): evaluate both with the same "
                         "--dataset, --data, --split and --limit")
    if not ra:
        raise InputError(f"{a_dir}: records.jsonl holds no records")
    gold_diff = [i for i in ra if str(ra[i].get("gold")) != str(rb[i].get("gold"))]
    if gold_diff:
        raise InputError(f"{a_dir} and {b_dir} grade problem {gold_diff[0]!r} against different gold answers "
                         f"({ra[gold_diff[0]].get('gold')!r} vs {rb[gold_diff[0]].get('gold')!r}): not the same data")
    pr = paired(ra, rb)
    con = console or Console(width=min(WIDTH, Console().width))

    t = Table(title=f"{names[0]} vs {names[1]}: {pr['n']} problems", box=box.SIMPLE_HEAD)
    t.add_column("")
    t.add_column("accuracy", justify="right")
    t.add_column("95% interval", justify="right")
    t.add_column("correct", justify="right")
    t.add_column("invalid", justify="right")
    for name, s in zip(names, (sa, sb)):
        t.add_row(name, _pct(s.get("accuracy")), _ci(s), f"{s.get('correct', '-')}/{s.get('n', '-')}",
                  str(s.get("invalid", "-")))
    lo, hi = pr["diff_ci95"]
    sign = "+" if pr["diff"] >= 0 else ""
    t.add_row(f"{names[1]} - {names[0]}", f"{sign}{100 * pr['diff']:.1f} pt",
              f"{100 * lo:+.1f} - {100 * hi:+.1f} pt", "", "")
    con.print(t)
    con.print(f"paired: both right {pr['both']}, only {names[0]} {pr['only_a']}, only {names[1]} {pr['only_b']}, "
              f"neither {pr['neither']}; exact McNemar p = {pr['p']:.3g}")

    for i in order_for_show(ra, rb)[:max(0, show)]:
        x, y = ra[i], rb[i]
        st = Table(box=box.SQUARE, show_lines=True, expand=True,
                   title=f"{i} (gold {x.get('gold')})", title_justify="left")
        st.add_column(f"{names[0]}: {x['status']} ({x.get('extracted')})", ratio=1, overflow="fold")
        st.add_column(f"{names[1]}: {y['status']} ({y.get('extracted')})", ratio=1, overflow="fold")
        st.add_row(_clip(x.get("response")), _clip(y.get("response")))
        con.print()
        con.print(_clip(_question(x), 400), highlight=False)
        con.print(st)
    return pr


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="mlx_distill compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="first eval folder (summary.json + records.jsonl), e.g. the base model's")
    ap.add_argument("b", help="second eval folder, e.g. the adapter's")
    ap.add_argument("--show", type=int, default=3, help="problems printed side by side (default: 3)")
    ap.add_argument("--names", nargs=2, metavar=("A", "B"), default=None,
                    help="labels of the two evals (default: the folder names)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    names = args.names or [Path(args.a).name or "A", Path(args.b).name or "B"]
    if names[0] == names[1]:
        names = ["A", "B"]
    render(args.a, args.b, names, args.show)
