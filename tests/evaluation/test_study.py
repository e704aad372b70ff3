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
from mlx_distill.evaluation.study import parse_levels, run_study


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
    rec = json.loads(open(out / "cells" / "3-15-words-seed1" / "eval" / "records.jsonl").readline())
    assert "under 15 words" in rec["prompt"]
    assert "± " in (out / "report.md").read_text()
    # the same command again continues the whole study (its plan was not written by --plan): a cell
    # whose result was lost is finished again (its evaluation is complete: nothing generated), the rest kept
    from mlx_distill.evaluation.study import main

    assert json.loads((out / "plan.json").read_text())["written_by"] == "run-all"
    (out / "cells" / "3-15-words-seed1" / "done").unlink()
    kept = (out / "cells" / "0-60-words-seed0" / "result.json").stat().st_mtime_ns
    main(["length", "-c", str(tmp_path / "study.yaml")])
    assert (out / "cells" / "3-15-words-seed1" / "done").is_file()
    assert (out / "cells" / "0-60-words-seed0" / "result.json").stat().st_mtime_ns == kept
    assert json.loads((out / "results.json").read_text())["runs"] == res["runs"]


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
    cells = tmp_path / "adapters" / "cells"
    assert [r["adapter"] for r in res["runs"]] == [str(cells / f"{i}-{n}-seed0" / "adapter")
                                                   for i, n in enumerate(("R1", "R2"))]
    stamp = (cells / "0-R1-seed0" / "adapter" / "adapters.safetensors").stat().st_mtime_ns
    run_study(cfg, quiet=True)
    assert (cells / "0-R1-seed0" / "adapter" / "adapters.safetensors").stat().st_mtime_ns == stamp
    assert (tmp_path / "adapters" / "accuracy_vs_words.png").is_file()
    # (d) a level folder trained with other settings, or on data changed since, is never reused
    import dataclasses

    changed = dataclasses.replace(cfg, train={**cfg.train, "iters": 3})
    with pytest.raises(InputError, match=r"0-R1-seed0/adapter holds an adapter trained with other settings .*iters: 2 -> 3"):
        run_study(changed, quiet=True)
    r2 = tmp_path / "R2" / "train.jsonl"
    saved = r2.read_text()
    r2.write_text(saved.replace("gsm8k-train-00000", "gsm8k-train-00009"))
    with pytest.raises(InputError, match=r"1-R2-seed0/adapter .*train data .*changed since it was trained"):
        run_study(cfg, quiet=True)
    r2.write_text(saved)
    # (e) a deleted cell is trained and evaluated again; the other cell is kept as it was
    evals = {n: cells / f"{i}-{n}-seed0" / "eval" / "summary.json" for i, n in enumerate(("R1", "R2"))}
    before = {n: f.stat().st_mtime_ns for n, f in evals.items()}
    shutil.rmtree(cells / "0-R1-seed0")
    run_study(cfg, quiet=True)
    assert (cells / "0-R1-seed0" / "adapter" / "adapters.safetensors").stat().st_mtime_ns != stamp
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


# ----------------------------------------------------------------------------- grids any scheduler can run
CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160"}
PROBLEMS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?", "answer": str(a + b)}
            for a, b in ((3, 4), (10, 5), (7, 8), (2, 9))]


def _study(cli=(), cwd=REPO):
    return subprocess.run([sys.executable, "-m", "mlx_distill", "study", "length", *cli], cwd=cwd, env=CLI_ENV,
                          capture_output=True, text=True)


def _prompt_cfg(tmp_path, tiny_model, out, **eval_opts):
    data = tmp_path / "problems.jsonl"
    if not data.is_file():
        _write(data, PROBLEMS)
    return {"kind": "prompt", "levels": [40, 10], "seeds": [0, 1], "out": str(out),
            "eval": {"model": str(tiny_model), "dataset": "jsonl", "data": str(data), "answer_kind": "gsm8k",
                     "temperature": 1.0, "max_tokens": 8, **eval_opts}}


def _measured(res):
    """The numbers of a study's results, without the paths they were written to."""
    return ([{k: v for k, v in r.items() if k not in ("run", "adapter")} for r in res["runs"]], res["levels"])


def test_plan_cells_assemble_equals_serial(tmp_path, tiny_model):
    """--plan writes the cells; cells run one by one assemble to the serial study's results; missing
    cells are listed and the outputs marked partial; a changed study is detected."""
    from mlx_distill.evaluation.study import assemble_study, plan_study, run_one_cell

    serial = run_study(build(StudyConfig, _prompt_cfg(tmp_path, tiny_model, tmp_path / "serial")), quiet=True)
    cfg = build(StudyConfig, _prompt_cfg(tmp_path, tiny_model, tmp_path / "grid"))
    plan = plan_study(cfg, quiet=True)
    grid = tmp_path / "grid"
    assert [(c["index"], c["level"], c["seed"]) for c in plan["cells"]] == \
        [(0, "40 words", 0), (1, "10 words", 0), (2, "40 words", 1), (3, "10 words", 1)]
    c1 = plan["cells"][1]
    assert c1["dir"] == str(grid / "cells" / "1-10-words-seed0") and "train" not in c1["commands"]
    assert c1["commands"]["eval"] == ["python", "-m", "mlx_distill", "eval", "-c", str(grid / "cells" / "1-10-words-seed0" / "eval.yaml")]
    assert c1["run"][-2:] == ["--cell", "1"] and c1["run"][-3] == str(grid / "study.yaml")
    ev = yaml.safe_load(open(grid / "cells" / "1-10-words-seed0" / "eval.yaml"))
    assert (ev["word_budget"], ev["seed"], ev["out"]) == (10, 0, str(grid / "cells" / "1-10-words-seed0" / "eval"))
    assert "\ncell 3  # 10 words, seed 1\n" in (grid / "cells.sh").read_text() and "[missing]" in (grid / "plan.txt").read_text()
    assert not (grid / "cells" / "0-40-words-seed0" / "eval").exists()  # the plan ran nothing
    # nothing finished: every cell is missing
    res = assemble_study(cfg, quiet=True)
    assert not res["complete"] and [m["index"] for m in res["missing"]] == [0, 1, 2, 3]
    # two cells finished: a partial table, the other two listed, and said so in report.md
    for i in (0, 3):
        run_one_cell(cfg, i, quiet=True)
        r = json.loads((grid / "cells" / plan["cells"][i]["dir"].split("/")[-1] / "result.json").read_text())
        assert r["index"] == i and r["settings"]["seed"] == plan["cells"][i]["seed"] and r["host"]
    assert (grid / "cells" / "0-40-words-seed0" / "done").is_file()
    res = assemble_study(cfg, quiet=True)
    assert [(m["index"], m["state"]) for m in res["missing"]] == [(1, "missing"), (2, "missing")]
    assert [lv["seeds"] for lv in res["levels"]] == [1, 1]
    assert "PARTIAL" in (grid / "report.md").read_text() and "cell 2 (40 words, seed 1: missing)" in (grid / "report.md").read_text()
    assert json.loads((grid / "manifest.json").read_text())["status"] == "partial"
    # a finished cell is not run again
    stamp = (grid / "cells" / "0-40-words-seed0" / "result.json").stat().st_mtime_ns
    run_one_cell(cfg, 0, quiet=True)
    assert (grid / "cells" / "0-40-words-seed0" / "result.json").stat().st_mtime_ns == stamp
    for i in (1, 2):
        run_one_cell(cfg, i, quiet=True)
    res = assemble_study(cfg, quiet=True)
    assert res["complete"] and res["missing"] == []
    assert _measured(res) == _measured(serial)
    assert json.loads((grid / "manifest.json").read_text())["status"] == "complete"
    assert "PARTIAL" not in (grid / "report.md").read_text()
    # a changed study: refused against the plan; after re-planning, the cells holding the old results are refused
    changed = build(StudyConfig, _prompt_cfg(tmp_path, tiny_model, grid, max_tokens=6))
    with pytest.raises(InputError, match=r"differ from the plan .*cell 0: eval.max_tokens: 8 -> 6"):
        run_one_cell(changed, 0, quiet=True)
    with pytest.raises(InputError, match=r"differ from the plan"):
        assemble_study(changed, quiet=True)
    plan_study(changed, quiet=True)
    with pytest.raises(InputError, match=r"0-40-words-seed0 holds a result of other settings .*eval.max_tokens: 8 -> 6.*"
                                         r"delete .*0-40-words-seed0 to run cell 0"):
        run_one_cell(changed, 0, quiet=True)
    assert [m["state"] for m in assemble_study(changed, quiet=True)["missing"]] == ["stale"] * 4
    with pytest.raises(InputError, match=r"--cell 4 is not in the plan .*cells 0\.\.3"):
        run_one_cell(changed, 4, quiet=True)
    with pytest.raises(InputError, match="no plan in .*--plan"):
        run_one_cell(build(StudyConfig, _prompt_cfg(tmp_path, tiny_model, tmp_path / "unplanned")), 0, quiet=True)


def test_cell_lock_refusal_and_stale_takeover(tmp_path, tiny_model, capsys):
    import socket

    from mlx_distill.evaluation.study import make_cells, plan_study, run_one_cell

    cfg = build(StudyConfig, {**_prompt_cfg(tmp_path, tiny_model, tmp_path / "s"), "seeds": [0], "levels": [20]})
    plan_study(cfg, quiet=True)
    cell = make_cells(cfg)[3][0]
    lock = cell.dir / "lock"
    # a live worker (a sleeping process on this host) holds the cell: refused, naming it
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "2026-01-01T00:00:00"}))
        with pytest.raises(InputError, match=rf"cell 0 \(20 words, seed 0\) is being run by {socket.gethostname()} "
                                             rf"pid {holder.pid} since 2026-01-01T00:00:00 and still running \(lock file {lock}\)"):
            run_one_cell(cfg, 0, quiet=True)
        r = _study(["-c", str(tmp_path / "s" / "study.yaml")])  # the assembly reports it as running
        assert r.returncode == 3 and "cell 0 (20 words, seed 0): running" in r.stderr, r.stderr
    finally:
        holder.kill()
        holder.wait()
    # a worker on another host: cannot be checked from here, so refused too
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00"}))
    with pytest.raises(InputError, match="elsewhere pid 1 .*on another host"):
        run_one_cell(cfg, 0, quiet=True)
    # its process is gone (the pid of a finished process on this host): the lock is taken over
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "2026-01-01T00:00:00"}))
    capsys.readouterr()
    run_one_cell(cfg, 0, quiet=True)
    assert f"taking over the stale lock {lock}" in capsys.readouterr().err
    assert (cell.dir / "done").is_file() and not lock.exists()  # released at the end


def test_cell_sigterm_releases_lock(tmp_path, tiny_model):
    """A scheduler's SIGTERM (time limit, scancel) stops a cell without finishing it and releases its lock
    (one request in flight at a time: the policy finishes the one in hand, and the other three are left)."""
    import signal
    import time

    cfg = {**_prompt_cfg(tmp_path, tiny_model, tmp_path / "s", max_tokens=400, batch_size=1), "seeds": [0],
           "levels": [20]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    assert _study(["-c", str(tmp_path / "study.yaml"), "--plan"]).returncode == 0
    cell = tmp_path / "s" / "cells" / "0-20-words-seed0"
    p = subprocess.Popen([sys.executable, "-m", "mlx_distill", "study", "length", "-c", str(tmp_path / "study.yaml"),
                          "--cell", "0"], cwd=REPO, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (cell / "lock").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert (cell / "lock").exists(), p.communicate()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert not (cell / "lock").exists() and not (cell / "done").exists()


@pytest.mark.slow
def test_cells_with_xargs_and_cli_assembly(tmp_path, tiny_model):
    """The commands a user runs: --plan, `xargs -P 2` over the cells, the assembly (a partial one: the lock test)."""
    cfg = {**_prompt_cfg(tmp_path, tiny_model, tmp_path / "grid"), "seeds": [3]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    r = _study(["-c", str(tmp_path / "study.yaml"), "--plan"])
    assert r.returncode == 0, r.stderr
    assert "Study plan: 2 cells = 2 levels x 1 seeds" in r.stdout and "--cell I" in r.stdout
    x = subprocess.run(f"seq 0 1 | xargs -P 2 -I{{}} {sys.executable} -m mlx_distill study length "
                       f"-c {tmp_path / 'grid' / 'study.yaml'} --cell {{}}", shell=True, cwd=REPO, env=CLI_ENV,
                       capture_output=True, text=True)
    assert x.returncode == 0, x.stderr
    r = _study(["-c", str(tmp_path / "study.yaml")])
    assert r.returncode == 0, r.stderr
    assert "Response-length study" in r.stdout and "PARTIAL" not in r.stderr
    grid = json.loads((tmp_path / "grid" / "results.json").read_text())
    serial = run_study(build(StudyConfig, {**cfg, "out": str(tmp_path / "serial")}), quiet=True)
    assert grid["complete"] and _measured(grid) == _measured(serial)


def test_adapter_cells_equal_serial_study(tmp_path, tiny_model, shared_data):
    """Kind adapter: 1-iteration trainings per cell, one cell at a time, assemble to the serial study's numbers."""
    from mlx_distill.evaluation.study import assemble_study, plan_study, run_one_cell

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

    def cfg(out):
        return build(StudyConfig, {"kind": "adapter", "levels": levels, "seeds": [0], "out": str(out), "plot": False,
                                   "train": {"model": str(tiny_model), "iters": 1, "batch_size": 2, "val_every": 1,
                                             "save_every": 100, "lora_layers": 1},
                                   "eval": {"dataset": "jsonl", "data": str(_write(tmp_path / "p.jsonl", PROBLEMS)),
                                            "answer_kind": "gsm8k", "max_tokens": 6}})

    serial = run_study(cfg(tmp_path / "serial"), quiet=True)
    grid = cfg(tmp_path / "grid")
    plan = plan_study(grid, quiet=True)
    c0 = plan["cells"][0]
    assert c0["commands"]["train"] == ["python", "-m", "mlx_distill", "train", "-c", c0["dir"] + "/train.yaml"]
    tr = yaml.safe_load(open(c0["dir"] + "/train.yaml"))
    assert (tr["data"], tr["out"], tr["iters"], tr["seed"]) == (str(tmp_path / "R1"), c0["dir"] + "/adapter", 1, 0)
    assert yaml.safe_load(open(c0["dir"] + "/eval.yaml"))["adapter"] == c0["dir"] + "/adapter"
    run_one_cell(grid, 1, quiet=True)
    res = assemble_study(grid, quiet=True)
    assert [m["index"] for m in res["missing"]] == [0] and res["levels"][0]["accuracy_mean"] is None
    run_one_cell(grid, 0, quiet=True)
    res = assemble_study(grid, quiet=True)
    assert res["complete"] and _measured(res) == _measured(serial)
    assert json.loads((tmp_path / "grid" / "cells" / "0-R1-seed0" / "result.json").read_text())["settings"]["train"]["iters"] == 1
