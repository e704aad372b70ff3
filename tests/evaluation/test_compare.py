"""`compare`: two eval folders side by side; the paired numbers are right, the tables fit 80
columns, differing problems are shown first, and evals of different problems are refused."""

import io
import json

import pytest
from rich.console import Console

from mlx_distill.evaluation import compare
from mlx_distill.io import InputError

# (id, gold, A's status, B's status): A right on p0 only, B right on p1..p4, both on p5
ITEMS = [("p0", "3", "correct", "wrong"), ("p1", "8", "wrong", "correct"), ("p2", "12", "invalid", "correct"),
         ("p3", "5", "wrong", "correct"), ("p4", "40", "wrong", "correct"), ("p5", "7", "correct", "correct"),
         ("p6", "9", "wrong", "wrong")]


def eval_dir(path, which, items=ITEMS, n=None):
    path.mkdir()
    recs = []
    for k, (pid, gold, *st) in enumerate(items):
        status = st[which]
        ans = gold if status == "correct" else (None if status == "invalid" else str(int(gold) + 1))
        long = " ".join(["step"] * 60)  # long responses must wrap inside 80 columns
        recs.append({"id": pid, "index": k, "prompt": f"Question {pid}: how many?", "gold": gold,
                     "status": status, "correct": status == "correct", "extracted": ans,
                     "response": f"{long} #### {ans}" if ans else long})
    path.joinpath("records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    correct = sum(r["correct"] for r in recs)
    path.joinpath("summary.json").write_text(json.dumps({
        "n": len(recs) if n is None else n, "correct": correct, "accuracy": round(correct / len(recs), 4),
        "accuracy_ci95": [0.1, 0.6], "invalid": sum(r["status"] == "invalid" for r in recs)}))
    return path


@pytest.fixture
def pair(tmp_path):
    return eval_dir(tmp_path / "base", 0), eval_dir(tmp_path / "adapter", 1)


def test_mcnemar_exact_values():
    assert compare.mcnemar_p(0, 0) == 1.0
    assert compare.mcnemar_p(0, 5) == pytest.approx(2 / 32)
    assert compare.mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert compare.mcnemar_p(4, 4) == 1.0


def test_paired_counts_and_difference(pair):
    _, a = compare.load_eval(pair[0])
    _, b = compare.load_eval(pair[1])
    p = compare.paired(a, b)
    assert (p["n"], p["both"], p["only_a"], p["only_b"], p["neither"]) == (7, 1, 1, 4, 1)
    assert p["diff"] == pytest.approx(3 / 7)
    lo, hi = p["diff_ci95"]
    assert lo < 3 / 7 < hi
    assert p["p"] == pytest.approx(compare.mcnemar_p(1, 4))


def test_render_fits_80_columns_and_shows_differences_first(pair):
    buf = io.StringIO()
    con = Console(file=buf, width=80, force_terminal=False, color_system=None)
    compare.render(*pair, names=("base", "adapter"), show=3, console=con)
    out = buf.getvalue()
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "28.6%" in out and "71.4%" in out  # 2/7 and 5/7
    assert "+42.9 pt" in out
    assert "only base 1, only adapter 4" in out
    shown = [pid for pid, *_ in ITEMS if f"{pid} (gold" in out]
    assert shown == ["p1", "p2", "p3"]  # adapter-only wins first, in file order


def test_cli_prints_the_comparison(pair, capsys):
    compare.main([str(pair[0]), str(pair[1]), "--show", "1", "--names", "base", "adapter"])
    out = capsys.readouterr().out
    assert "base vs adapter: 7 problems" in out and "p1 (gold 8)" in out


def test_refuses_evals_of_different_problems(tmp_path):
    a = eval_dir(tmp_path / "a", 0)
    b = eval_dir(tmp_path / "b", 1, items=ITEMS[:5] + [("q9", "1", "wrong", "correct")])
    with pytest.raises(InputError, match="not on the same problems") as e:
        compare.render(a, b, console=Console(file=io.StringIO()))
    assert "\n" not in str(e.value)


def test_refuses_other_gold_and_unfinished_evals(tmp_path):
    a = eval_dir(tmp_path / "a", 0)
    b = eval_dir(tmp_path / "b", 1, items=[(i, "0" if i == "p3" else g, *s) for i, g, *s in ITEMS])
    with pytest.raises(InputError, match="different gold"):
        compare.render(a, b, console=Console(file=io.StringIO()))
    c = eval_dir(tmp_path / "c", 1, n=9)
    with pytest.raises(InputError, match="n=9 but records.jsonl holds 7"):
        compare.render(a, c, console=Console(file=io.StringIO()))
    with pytest.raises(InputError, match="not an eval folder"):
        compare.render(a, tmp_path / "missing", console=Console(file=io.StringIO()))
