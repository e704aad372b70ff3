"""Output a person can follow: progress lines in a log, 80-column tables, one value for one seed,
axes that stay at or above zero, and safetensors files with the permissions of every other output."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_distill import progress
from mlx_distill.blas import preload_env

REPO = Path(__file__).resolve().parents[1]
FAST = {progress.ENV: "0.05"}  # a progress line every 50 ms instead of 10 s


# ----------------------------------------------------------------------------- progress lines
def _wait_for(buf, ok, limit: float = 60.0) -> None:
    """Wait until the background heartbeat has written what `ok(text)` asks for (never a fixed time:
    a loaded machine may run the thread late)."""
    t0 = time.monotonic()
    while not ok(buf.getvalue()) and time.monotonic() - t0 < limit:
        time.sleep(0.01)


def test_heartbeat_prints_done_total_rate_elapsed_and_fields():
    buf = io.StringIO()
    with progress.Heartbeat("logits", total=10, unit="examples", every=0.03, stream=buf) as hb:
        hb.update(advance=3, shards=1)
        _wait_for(buf, lambda text: len(text.splitlines()) >= 2)
    lines = buf.getvalue().splitlines()
    assert len(lines) >= 2
    assert lines[-1].startswith("logits: 3/10 examples (30.0%) | ") and "/s | elapsed 0:00 | eta " in lines[-1]
    assert lines[-1].endswith("shards 1")
    quiet = io.StringIO()
    with progress.Heartbeat("x", total=1, every=0.01, stream=quiet, enabled=False):
        time.sleep(0.05)
    assert quiet.getvalue() == ""


def test_corpus_progress_is_plain_lines_off_a_terminal():
    from rich.console import Console

    from mlx_distill.corpus import build as B
    from mlx_distill.corpus.build import _progress

    # what run_jobs passes as `spend` (a formatted cost where the builder has format_cost)
    cost = (lambda usd: B.format_cost(usd)) if hasattr(B, "format_cost") else (lambda usd: usd)
    buf = io.StringIO()
    prog = _progress(True, console=Console(file=buf, force_terminal=False))
    prog.hb.every = 0.03
    with prog:  # the calls run_jobs makes
        task = prog.add_task("corpus", total=4, verified=0, rejected=0, failed=0, spend=cost(0.0))
        prog.update(task, advance=1, verified=1, rejected=0, failed=0, spend=cost(0.0012))
        prog.update(task, total=prog.tasks[0].total + 2)
        prog.update(task, advance=1, verified=1, rejected=1, failed=0, spend=cost(0.0024))
        _wait_for(buf, lambda text: "spend $0.0024" in text)
    last = buf.getvalue().splitlines()[-1]
    assert last.startswith("corpus build: 2/6 attempts (33.3%)")
    assert last.endswith("verified 1, rejected 1, failed 0, spend $0.0024")
    # on a terminal it stays the rich bar
    assert type(_progress(True, console=Console(file=io.StringIO(), force_terminal=True))).__name__ == "Progress"


def _piped(args, **env):
    """Run `python -m mlx_distill ARGS` with stdout and stderr piped (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "mlx_distill", *map(str, args)], cwd=REPO,
                          env={**preload_env(), "PYTHONPATH": str(REPO), **FAST, **env}, capture_output=True, text=True)


def test_logits_prints_progress_when_piped(tiny_model, tmp_path):
    rows = [{"id": f"q{i}", "question": f"Ann has {i} coins and buys 2 more. How many now?",
             "reasoning": f"Ann has {i} + 2 = {i + 2} coins. " * 8, "answer": str(i + 2)} for i in range(24)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _piped(["logits", "--teacher", tiny_model, "--data", data, "--out", tmp_path / "o", "--top-m", 4,
                "--batch-size", 1])
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("logits: ")]
    assert lines and all(" examples (" in ln and "/s | elapsed " in ln for ln in lines), r.stderr
    assert "/24 examples" in lines[0]


def test_corpus_build_prints_progress_when_piped(tiny_model, tmp_path):
    probs = tmp_path / "p.jsonl"
    probs.write_text("".join(json.dumps({"question": f"Ann has {i} apples and buys 2 more. How many now?",
                                         "answer": f"#### {i + 2}"}) + "\n" for i in range(3)))
    r = _piped(["corpus", "build", "--teacher", "mlx", "--model", tiny_model, "--source", "jsonl", "--problems",
                probs, "--out", tmp_path / "c", "--max-tokens", 48, "--concurrency", 1, "--leakage", "warn"])
    # a random tiny model verifies nothing: the build says so and exits 1 (an empty corpus is an error)
    assert r.returncode in (0, 1), r.stderr
    if r.returncode == 1:
        assert "is empty: 0 of 3 attempt(s) verified" in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("corpus build: ")]
    assert lines, r.stderr
    assert all("/3 attempts" in ln and "verified " in ln and "rejected " in ln and "failed " in ln for ln in lines)


# ----------------------------------------------------------------------------- tables
def _agg(seeds: int, value="600") -> list[dict]:
    means = {"accuracy": .453, "words_mean": 1234.5, "tokens_mean": 2345.6, "truncation_rate": .123,
             "invalid_rate": .05}
    stds = {"accuracy": .021, "words_mean": 56.7, "tokens_mean": 123.4, "truncation_rate": .012, "invalid_rate": 0.0}
    return [{"level": f"R{i}", "value": value, "seeds": seeds, "n": 1319, **{f"{k}_mean": v for k, v in means.items()},
             **{f"{k}_std": (v if seeds > 1 else 0.0) for k, v in stds.items()}} for i in range(2)]


def _render(fn, *args) -> str:
    from rich.console import Console

    con = Console(width=80, record=True, file=io.StringIO())
    fn(*args, console=con)
    return con.export_text()


@pytest.mark.parametrize("kind,seeds,value", [("prompt", 3, "600"), ("max_tokens", 1, "600"),
                                              ("adapter", 2, "runs/study/adapters/R1-a-long-corpus-name/adapter")])
def test_study_table_fits_80_columns_with_whole_headers(kind, seeds, value):
    from mlx_distill.evaluation import study

    text = _render(study.print_table, _agg(seeds, value), kind)
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    header = next(ln for ln in lines if ln.lstrip().startswith("level"))
    for h in ("accuracy", "words", "tokens", "truncated", "invalid", "n × seeds"):
        assert h in header, (h, header)
    assert "…" not in text
    if seeds == 1:  # one seed: one value, never "± 0.0"
        assert "±" not in text and "45.3%" in text and "one seed" in text
    else:
        assert "± 2.1%" in text


def test_study_report_single_seed_is_one_value():
    from mlx_distill.evaluation import study
    from mlx_distill.config import EvalConfig, StudyConfig

    md = study.report(StudyConfig(seeds=[0]), EvalConfig(), _agg(1), plotted=False)
    assert "±" not in md.split("| level |")[1] and "| 45.3% |" in md
    md = study.report(StudyConfig(seeds=[0, 1]), EvalConfig(), _agg(2), plotted=False)
    assert "45.3% ± 2.1%" in md


def test_corpus_summary_fits_80_columns_and_dashes_missing_means():
    from mlx_distill.corpus.build import print_summary

    man = {"status": "complete", "problems": 7473, "attempts": {"final": 7473, "expected": 7473, "verified": 6000,
                                                                 "rejected": 1000, "failed": 473},
           "problems_with_verified": 6000, "rejected_by": {"wrong_answer": 900, "repetition": 50, "too_long": 50},
           "models_reported": {"deepseek-reasoner": 7473}, "verified_records": 0, "keep": "first",
           "mean_words": None, "levels": {"R1": {"records": 0, "mean_words": None, "dir": "corpora/x/R1"}},
           "splits": {"train": 5400, "valid": 300, "test": 300, "seed": 0}, "cost_usd": 22.3456,
           "leakage": {"matches": [], "checked": ["gsm8k test", "math500", "aime24", "amc23"], "action": "report"}}
    text = _render(lambda m, console: print_summary(Path("corpora/gsm8k-deepseek-r1-a-long-name"), m, console), man)
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert "problems with a verified trace" in text and "…" not in text
    assert "mean words —" in text and "None" not in text


# ----------------------------------------------------------------------------- axes
def _capture_figure(monkeypatch, module):
    got = {}

    def fake_save(fig, path, dpi=100):
        fig.canvas.draw()
        got["fig"] = fig

    monkeypatch.setattr(module, "save_figure", fake_save)
    return got


def test_study_plot_axes_stay_at_or_above_zero(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from mlx_distill.evaluation import study_report as study  # the study's plot lives there

    got = _capture_figure(monkeypatch, study)
    agg = [{"level": "R1", "words_mean_mean": 3.0, "words_mean_std": 10.0, "accuracy_mean": 0.01,
            "accuracy_std": 0.05}, {"level": "R2", "words_mean_mean": 40.0, "words_mean_std": 5.0,
                                    "accuracy_mean": 0.2, "accuracy_std": 0.1}]  # error bars reach below 0
    assert study.plot(agg, tmp_path / "p.png", "prompt")
    ax = got["fig"].axes[0]
    assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0


def test_eval_lengths_plot_axes_stay_at_or_above_zero(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from mlx_distill.evaluation import report

    got = _capture_figure(monkeypatch, report)
    recs = [{"words": w, "status": s} for w, s in ((1, "correct"), (2, "wrong"), (3, "invalid"), (250, "correct"))]
    assert report.plot_lengths(recs, tmp_path / "l.png")
    ax = got["fig"].axes[0]
    assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0


# ----------------------------------------------------------------------------- permissions
def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_safetensors_files_get_the_usual_permissions(tmp_path):
    import mlx.core as mx

    from mlx_distill import adapters

    from mlx_distill.teacher import store
    from mlx_distill.backends.mlx import save_arrays_atomic
    from mlx_distill.io import _UMASK, atomic_write_text

    atomic_write_text(tmp_path / "plain.txt", "x")
    usual = _mode(tmp_path / "plain.txt")
    assert usual == 0o666 & ~_UMASK
    save_arrays_atomic(tmp_path / "a.safetensors", {"w": mx.zeros((2, 2))})
    adapters.save_tensors(tmp_path / "b.safetensors", {"w": np.zeros((2, 2), np.float32)})
    store.write_shard(tmp_path / "c.safetensors", {"ids": np.zeros((2, 2), np.int32)})
    written = ["a", "b", "c"]
    try:
        import torch

        from mlx_distill.backends.torch import _save_tensors

        _save_tensors(tmp_path / "d.safetensors", {"w": torch.zeros(2, 2)}, atomic=False)
        written.append("d")
    except ImportError:
        pass
    for name in written:
        assert _mode(tmp_path / f"{name}.safetensors") == usual, name


def test_eval_prints_progress_when_piped(tiny_model, tmp_path, shared_data):
    r = _piped(["eval", "--model", tiny_model, "--dataset", "gsm8k", "--limit", 3, "--max-tokens", 40,
                "--batch-size", 1, "--out", tmp_path / "e", "--no-plot"])
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "/3 (" in ln and " | elapsed " in ln]
    assert lines and lines[-1].split(": ", 1)[1].startswith("3/3 (100.0%)"), r.stderr
