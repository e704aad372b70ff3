"""Training curves: RUN/training.png at each validation (never fatal), the `plot` overlay command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_distill import plots
from mlx_distill.config import TrainConfig, build
from mlx_distill.io import read_jsonl

from helpers import arith_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")  # the `plots` extra; `make setup` installs it (dev extra)


def _run_folder(folder: Path, kd=False, acc=False, best=None, iters=20) -> Path:
    """A run folder with a hand-written metrics.jsonl (and a manifest naming the kept iteration)."""
    folder.mkdir(parents=True)
    rows = []
    for it in range(0, iters + 1, 2):
        r = {"iter": it, "val_loss": 3.0 - 0.05 * it}
        if it:
            r.update(train_loss=2.9 - 0.06 * it, sft_loss=2.9 - 0.06 * it)  # train logs sft_loss for SFT too
            if kd:
                r.update(sft_loss=2.0 - 0.05 * it, kd_loss=0.4 - 0.01 * it)
        if acc:
            r["val_accuracy"] = 0.02 * it
        rows.append(r)
    write_jsonl(folder / "metrics.jsonl", rows)
    if best is not None:
        (folder / "manifest.json").write_text(json.dumps({
            "selection": {"criterion": "accuracy" if acc else "loss", "best_iter": best},
            "result": {"best_iter": best}}))
    return folder


def _legend_texts(ax) -> list[str]:
    out = []
    for child in ax.get_children():
        if type(child).__name__ == "Legend":
            out += [t.get_text() for t in child.get_texts()]
    return out


def test_figure_panels_axes_and_kept_iteration(tmp_path):
    run = plots.read_run(_run_folder(tmp_path / "kd-run", kd=True, acc=True, best=12))
    assert run.best_iter == 12 and run.criterion == "accuracy" and run.name == "kd-run"
    fig = plots.figure([run])
    fig.canvas.draw()
    axes = fig.axes
    assert [a.get_title(loc="left") for a in axes] == [plots.TITLE[p] for p in ("loss", "kd", "accuracy")]
    for ax in axes[:2]:  # losses: the axis starts at 0, never below
        assert ax.get_ylim()[0] == 0 and ax.get_ylabel()
    assert axes[2].get_ylim() == (0, 1.02) and axes[-1].get_xlabel().startswith("iteration")
    # the kept iteration: a vertical line at x=12 in every panel, named in the legend
    for ax in axes:
        assert any(list(ln.get_xdata()) == [12, 12] for ln in ax.get_lines())
        assert any("kept adapter (iter 12, by validation accuracy)" == t for t in _legend_texts(ax))
    # legends sit right of the data, not over it
    for ax in axes:
        leg = ax.get_legend()
        assert leg.get_window_extent().x0 >= ax.get_window_extent().x1


def test_sft_run_has_one_panel_and_plot_skips_missing_keys(tmp_path):
    fig = plots.figure([plots.read_run(_run_folder(tmp_path / "sft", best=4))])
    assert len(fig.axes) == 1
    labels = _legend_texts(fig.axes[0])
    assert "train loss" in labels and "validation loss" in labels and not any("KD" in t for t in labels)
    # overlaid with a KD run: the KD panel holds only the KD run's lines
    kd = plots.read_run(_run_folder(tmp_path / "kd", kd=True, best=4))
    fig = plots.figure([plots.read_run(tmp_path / "sft"), kd])
    kd_ax = next(a for a in fig.axes if a.get_title(loc="left") == plots.TITLE["kd"])
    assert len([ln for ln in kd_ax.get_lines() if len(ln.get_xdata()) > 2]) == 2
    assert kd_ax.get_ylim()[1] < 2.5  # scaled to the KD run's parts, not to the SFT run's loss


def test_overlay_cli_legend_by_run_folder(tmp_path):
    a = _run_folder(tmp_path / "sft-a", best=10)
    b = _run_folder(tmp_path / "kd-b", kd=True, best=14)
    out = tmp_path / "both.png"
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "plot", str(a), str(b), "--out", str(out)],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from matplotlib.image import imread

    img = imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 600
    fig = plots.figure([plots.read_run(a), plots.read_run(b)])
    fig.canvas.draw()
    assert {"sft-a", "kd-b"} <= set(_legend_texts(fig.axes[0]))
    # several runs need --out; a folder that is no run is one error line
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "plot", str(a), str(b)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert r.returncode == 2 and "--out" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "plot", str(tmp_path)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr and r.stderr.count("\n") == 1


def test_refresh_skips_redraws_only_within_its_time_budget(tmp_path, monkeypatch):
    run = _run_folder(tmp_path / "run")
    drawn = []
    monkeypatch.setattr(plots, "write", lambda runs, path, title="": drawn.append(path) or path)
    monkeypatch.setattr(plots, "_last", {})
    assert plots.refresh(run) is not None
    plots._last[str(run.resolve())] = (plots.time.perf_counter(), 5.0)  # a render that took 5 s just ended
    assert plots.refresh(run) is None and len(drawn) == 1  # within 1 / BUDGET renders: skipped
    assert plots.refresh(run, final=True) is not None and len(drawn) == 2  # the end of a run always draws
    plots._last[str(run.resolve())] = (plots.time.perf_counter() - 60, 5.0)  # a minute ago
    assert plots.refresh(run) is not None and len(drawn) == 3


def test_refresh_never_raises(tmp_path, monkeypatch, capsys):
    run = _run_folder(tmp_path / "run")
    plots._said.clear()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "write", boom)
    assert plots.refresh(run) is None and plots.refresh(run) is None
    err = capsys.readouterr().err
    assert err.count("could not write") == 1 and "disk full" in err  # said once
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the plots extra is not installed
    plots._said.clear()
    assert plots.refresh(run) is None and plots.refresh(run) is None
    assert capsys.readouterr().err.count("matplotlib is not installed") == 1
    assert not (run / "training.png").exists()


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "train.jsonl", arith_records(16))
    write_jsonl(d / "valid.jsonl", arith_records(4, seed=1, start=1000))
    return d


def test_train_rewrites_training_png_at_each_validation(tiny_model, corpus, tmp_path, monkeypatch):
    from mlx_distill.training.train import run

    calls = []
    real = plots.refresh

    def spy(folder, best_iter=None, final=False):
        calls.append((best_iter, final))
        return real(folder, best_iter, final)

    monkeypatch.setattr(plots, "refresh", spy)
    out = tmp_path / "run"
    cfg = build(TrainConfig, dict(model=str(tiny_model), data=str(corpus), out=str(out), iters=4, batch_size=4,
                                  val_every=2, report_every=1, save_every=100, max_seq_length=256, lora_layers=-1,
                                  learning_rate=3e-3, warmup=0))
    res = run(cfg, quiet=True)
    vals = [r for r in read_jsonl(out / "metrics.jsonl") if "val_loss" in r and r["iter"] > 0]
    assert len(vals) == 2 and calls == [(c[0], False) for c in calls[:2]] + [(res["best_iter"], True)]
    png = out / "training.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert not [p for p in out.iterdir() if p.name.startswith(".training.png")]  # atomic: no temp left
    assert oct(png.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
