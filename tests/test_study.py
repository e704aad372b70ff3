"""`python -m mlx_distill study length`: the three level kinds at tiny size."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from mlx_distill.config import StudyConfig, build
from mlx_distill.io import InputError
from mlx_distill.paths import REPO
from mlx_distill.study import parse_levels, run_study


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_study_prompt_budgets_cli(tmp_path, tiny_model):
    """Word budgets x 2 seeds with sampling, through the CLI and a YAML file."""
    out = tmp_path / "study"
    cfg = {"kind": "prompt", "levels": [60, 15], "seeds": [0, 1], "out": str(out),
           "eval": {"model": str(tiny_model), "dataset": "gsm8k", "limit": 3, "temperature": 1.0, "max_tokens": 12}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "study", "length", "-c", str(tmp_path / "study.yaml")],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Response-length study" in r.stdout and "60 words" in r.stdout
    for f in ("results.json", "results.csv", "runs.csv", "accuracy_vs_words.png", "report.md", "manifest.json"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 4 and [lv["level"] for lv in res["levels"]] == ["60 words", "15 words"]
    lv = res["levels"][0]
    assert lv["seeds"] == 2 and lv["n"] == 3
    words = [r["words_mean"] for r in res["runs"] if r["level"] == "60 words"]
    assert abs(lv["words_mean_mean"] - sum(words) / 2) < 1e-3 and lv["words_mean_std"] >= 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and {"accuracy_mean", "accuracy_std", "words_mean_mean"} <= set(rows[0])
    # each run's prompt carried its budget
    rec = json.loads(open(out / "runs" / "15-words-seed1" / "records.jsonl").readline())
    assert "under 15 words" in rec["prompt"]
    assert "± " in (out / "report.md").read_text()


def test_study_max_tokens_and_adapter_levels(tmp_path, tiny_model, shared_data):
    # (b) token caps: the cap shows up as truncation
    res = run_study(build(StudyConfig, {"kind": "max_tokens", "levels": [8, 3], "seeds": [0], "plot": False,
                                        "out": str(tmp_path / "caps"),
                                        "eval": {"model": str(tiny_model), "dataset": "gsm8k", "limit": 2}}), quiet=True)
    assert [lv["tokens_mean_mean"] for lv in res["levels"]] == [8.0, 3.0]
    assert all(lv["truncation_rate_mean"] == 1.0 for lv in res["levels"])
    # (c) one adapter per corpus level, trained here (2 steps each); a re-run reuses them
    rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "train.jsonl")][:6]
    levels = []
    for name, keep in (("R1", None), ("R2", 1)):
        d = tmp_path / name
        d.mkdir()
        recs = [{"id": f"gsm8k-train-{i:05d}", "question": r["question"],
                 "reasoning": "\n".join(r["answer"].split("####")[0].strip().splitlines()[:keep]),
                 "answer": r["answer"].split("####")[1].strip()} for i, r in enumerate(rows)]
        _write(d / "train.jsonl", recs[:4])
        _write(d / "valid.jsonl", recs[4:])
        levels.append({"name": name, "data": str(d)})
    cfg = build(StudyConfig, {"kind": "adapter", "levels": levels, "seeds": [0], "out": str(tmp_path / "adapters"),
                              "train": {"model": str(tiny_model), "iters": 2, "batch_size": 2, "val_every": 2,
                                        "save_every": 100, "lora_layers": -1},
                              "eval": {"dataset": "gsm8k", "limit": 2, "max_tokens": 6}})
    res = run_study(cfg, quiet=True)
    assert [r["adapter"] for r in res["runs"]] == [str(tmp_path / "adapters" / "adapters" / f"{n}-seed0")
                                                   for n in ("R1", "R2")]
    stamp = (tmp_path / "adapters" / "adapters" / "R1-seed0" / "adapters.safetensors").stat().st_mtime_ns
    run_study(cfg, quiet=True)
    assert (tmp_path / "adapters" / "adapters" / "R1-seed0" / "adapters.safetensors").stat().st_mtime_ns == stamp
    assert (tmp_path / "adapters" / "accuracy_vs_words.png").is_file()
    # (d) a level folder trained with other settings, or on data changed since, is never reused
    import dataclasses

    changed = dataclasses.replace(cfg, train={**cfg.train, "iters": 3})
    with pytest.raises(InputError, match=r"R1-seed0 holds an adapter trained with other settings .*iters: 2 -> 3"):
        run_study(changed, quiet=True)
    r2 = tmp_path / "R2" / "train.jsonl"
    saved = r2.read_text()
    r2.write_text(saved.replace("gsm8k-train-00000", "gsm8k-train-00009"))
    with pytest.raises(InputError, match=r"R2-seed0 .*train data .*changed since it was trained"):
        run_study(cfg, quiet=True)
    r2.write_text(saved)
    # (e) a deleted adapter is trained again, and its old evaluation is redone for the new adapter
    evals = {n: tmp_path / "adapters" / "runs" / f"{n}-seed0" / "summary.json" for n in ("R1", "R2")}
    before = {n: f.stat().st_mtime_ns for n, f in evals.items()}
    shutil.rmtree(tmp_path / "adapters" / "adapters" / "R1-seed0")
    run_study(cfg, quiet=True)
    assert (tmp_path / "adapters" / "adapters" / "R1-seed0" / "adapters.safetensors").stat().st_mtime_ns != stamp
    assert evals["R1"].stat().st_mtime_ns != before["R1"]
    assert json.loads(evals["R1"].read_text())["generated_this_run"] == 2
    assert evals["R2"].stat().st_mtime_ns == before["R2"]  # unchanged level: its evaluation is kept as it was


def test_study_refuses_overlapping_adapter(tmp_path, tiny_model, shared_data):
    """The honesty check applies inside a study: an adapter trained on the evaluation problems is refused."""
    test = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl")][:4]
    d = tmp_path / "leaky"
    d.mkdir()
    recs = [{"question": r["question"], "reasoning": "", "answer": r["answer"].split("####")[1].strip()} for r in test]
    _write(d / "train.jsonl", recs[:3])
    _write(d / "valid.jsonl", recs[3:])
    cfg = build(StudyConfig, {"kind": "adapter", "levels": [str(d)], "out": str(tmp_path / "s"),
                              "train": {"model": str(tiny_model), "iters": 1, "batch_size": 2, "val_every": 1,
                                        "lora_layers": 1},
                              "eval": {"dataset": "gsm8k", "limit": 2, "max_tokens": 2}})
    with pytest.raises(InputError, match="also occur in the training data"):
        run_study(cfg, quiet=True)


def test_parse_levels_errors():
    with pytest.raises(InputError, match="empty"):
        parse_levels(StudyConfig(kind="prompt", levels=[]))
    with pytest.raises(InputError, match="integer"):
        parse_levels(StudyConfig(kind="max_tokens", levels=["lots"]))
    with pytest.raises(InputError, match="needs `data`"):
        parse_levels(StudyConfig(kind="adapter", levels=[{"name": "R1"}]))
    lv = parse_levels(StudyConfig(kind="prompt", levels=["100", 50], level_names=["long", "short"]))
    assert [(x.name, x.value) for x in lv] == [("long", 100), ("short", 50)]
