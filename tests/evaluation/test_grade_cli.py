"""`python -m mlx_distill grade`: re-grade saved predictions without a model."""

import json
import os
import subprocess
import sys

import pytest

from mlx_distill.config import GradeConfig
from mlx_distill.evaluation.evaluate import grade_predictions
from mlx_distill.io import InputError
from mlx_distill.paths import REPO


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_grade_cli_gsm8k_gold_by_index(tmp_path, shared_data):
    """The exact CLI of the issue, on every GSM8K test gold answer (predictions keyed by index)."""
    data = shared_data / "gsm8k" / "test.jsonl"
    preds = _write(tmp_path / "preds.jsonl", [{"index": i, "response": r["answer"]} for i, r in enumerate(_rows(data))])
    out = tmp_path / "summary.json"
    subprocess.run([sys.executable, "-m", "mlx_distill", "grade", "--dataset", "gsm8k", "--data", str(data),
                    "--predictions", str(preds), "--out", str(out)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    s = json.loads(out.read_text())
    assert (s["n"], s["correct"], s["invalid"], s["accuracy"]) == (1319, 1319, 0, 1.0)
    assert (tmp_path / "summary.records.jsonl").is_file()


def test_grade_math500_reference_solutions_by_id(tmp_path, shared_data):
    from mlx_distill.tasks.problems import load_problems

    probs = load_problems("math500", split="test")
    preds = _write(tmp_path / "p.jsonl", [{"id": p["id"], "response": p["meta"]["solution"]} for p in probs])
    s = grade_predictions(GradeConfig(dataset="math500", predictions=str(preds), out=str(tmp_path / "s.json")))
    assert s["n"] == 500 and s["correct"] >= 499
    assert set(s["by_subject"]) >= {"Algebra", "Precalculus"} and set(s["by_level"]) == {"1", "2", "3", "4", "5"}


def test_grade_counts_invalid_apart_and_altered_wrong(tmp_path, shared_data):
    data = shared_data / "gsm8k" / "test.jsonl"
    rows = _rows(data)[:6]
    gold = [r["answer"].split("####")[1].strip().replace(",", "") for r in rows]
    preds = [
        {"index": 0, "response": f"#### {gold[0]}"},                      # correct
        {"index": 1, "response": f"#### {int(gold[1]) + 1}"},             # altered: wrong
        {"index": 2, "response": "I do not know."},                       # no answer: invalid
        {"index": 3, "response": "#### lots", "finish_reason": "stop"},   # unparsable: invalid
        {"index": 4, "response": f"<think>maybe {gold[4]}</think> #### {int(gold[4]) + 2}"},  # graded after think
        {"index": 5, "response": "Let me think step by step 1 2 3", "finish_reason": "length"},
    ]
    s = grade_predictions(GradeConfig(dataset="gsm8k", data=str(data), predictions=str(_write(tmp_path / "p.jsonl", preds)),
                                      out=str(tmp_path / "s.json")))
    # every problem of the dataset is in the denominator: the 1313 without a prediction are invalid
    assert (s["n"], s["correct"], s["wrong"], s["invalid"]) == (1319, 1, 3, 2 + 1313)
    assert s["invalid_reasons"] == {"no answer": 1, "unparsable": 1, "missing prediction": 1313}
    assert (s["predicted"], s["missing"], s["accuracy_of_predicted"]) == (6, 1313, round(1 / 6, 4))
    assert s["truncated"] == 1 and s["failure_kinds"]["truncated at max tokens"] == 1
    assert s["failure_kinds"]["missing prediction"] == 1313
    # --limit: the first N problems are the dataset
    s = grade_predictions(GradeConfig(dataset="gsm8k", data=str(data), limit=6,
                                      predictions=str(tmp_path / "p.jsonl"), out=str(tmp_path / "s6.json")))
    assert (s["n"], s["correct"], s["wrong"], s["invalid"], s["missing"]) == (6, 1, 3, 2, 0)
    lo, hi = s["accuracy_ci95"]
    assert lo < s["accuracy"] < hi


def test_grade_prints_both_denominators(tmp_path, shared_data):
    data = shared_data / "gsm8k" / "test.jsonl"
    gold = _rows(data)[0]["answer"]
    preds = _write(tmp_path / "p.jsonl", [{"index": 0, "response": gold}])
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "grade", "--dataset", "gsm8k", "--data", str(data),
                        "--limit", "4", "--predictions", str(preds), "--out", str(tmp_path / "s.json")],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "accuracy 25.0%" in r.stdout and "n=4" in r.stdout
    assert "3 of 4 problems have no prediction" in r.stdout and "accuracy 100.0%" in r.stdout
    rec = _rows(tmp_path / "s.records.jsonl")
    assert [x["status"] for x in rec] == ["correct", "invalid", "invalid", "invalid"] and rec[1]["missing"]


@pytest.mark.parametrize("pred,needle", [
    ({"response": "#### 1"}, "needs `id` or `index`"),
    ({"id": "nope", "response": "#### 1"}, "id 'nope' is not in"),
    ({"index": 99999, "response": "#### 1"}, "out of range"),
    ({"index": 0}, "string `response`"),
])
def test_grade_bad_predictions_name_file_and_line(tmp_path, shared_data, pred, needle):
    p = _write(tmp_path / "p.jsonl", [{"index": 1, "response": "#### 3"}, pred])
    with pytest.raises(InputError, match=needle) as e:
        grade_predictions(GradeConfig(dataset="gsm8k", predictions=str(p), out=str(tmp_path / "s.json")))
    assert f"{p}:2" in str(e.value)


def test_grade_duplicate_and_malformed(tmp_path, shared_data):
    p = _write(tmp_path / "p.jsonl", [{"index": 1, "response": "#### 3"}, {"id": "gsm8k-test-00001", "response": "x"}])
    with pytest.raises(InputError, match="second prediction"):
        grade_predictions(GradeConfig(dataset="gsm8k", predictions=str(p), out=str(tmp_path / "s.json")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0, "response": "#### 18"}\n{not json\n')
    with pytest.raises(InputError, match=f"{bad}:2"):
        grade_predictions(GradeConfig(dataset="gsm8k", predictions=str(bad), out=str(tmp_path / "s.json")))


def test_grade_user_jsonl_and_competitions(tmp_path, shared_data):
    data = _write(tmp_path / "mine.jsonl", [{"problem": "What is 1/2 + 1/4?", "answer": "\\frac34"},
                                            {"problem": "Name the parity of 7.", "answer": "\\text{odd}"}])
    preds = _write(tmp_path / "p.jsonl", [{"index": 0, "response": "so \\boxed{0.75}"},
                                          {"index": 1, "response": "\\boxed{even}"}])
    s = grade_predictions(GradeConfig(dataset="jsonl", data=str(data), predictions=str(preds), out=str(tmp_path / "s.json")))
    assert (s["correct"], s["wrong"]) == (1, 1)
    # AMC answers are JSON numbers (27.0): graded as numbers
    amc = _rows(shared_data / "amc23" / "test.jsonl")
    preds = _write(tmp_path / "a.jsonl", [{"index": i, "response": f"\\boxed{{{int(r['answer'])}}}"} for i, r in enumerate(amc)])
    s = grade_predictions(GradeConfig(dataset="amc23", predictions=str(preds), out=str(tmp_path / "a.json")))
    assert s["correct"] == 40
