"""Training curves: one home for the plots of a run folder.

    python -m mlx_distill plot runs/sft                      # -> runs/sft/training.png
    python -m mlx_distill plot runs/sft runs/kd --out sft_vs_kd.png

``train`` rewrites ``<run>/training.png`` atomically at each validation (`refresh`; a toy run that
validates several times a second skips some redraws, see `BUDGET`, and is drawn at its end): the train
and validation loss, the two parts of a KD objective (``sft_loss``, ``kd_loss``) in a panel of
their own, and the validation accuracy (``--select-by accuracy``) in a third, all read from
``metrics.jsonl``. The kept iteration (the adapter in ``adapters.safetensors``) is marked in
every panel. Several runs are overlaid with one colour per run folder.

matplotlib is an optional extra (``pip install 'mlx_distill[plots]'``): without it `refresh`
says so once and training goes on; the ``plot`` command stops with that message.
"""

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mlx_distill.io import InputError, read_json, read_jsonl, save_figure

PNG = "training.png"
# panel -> (metrics.jsonl key, legend label, line style, marker); a panel is drawn when one of its keys is present
PANELS = {
    "loss": [("train_loss", "train loss", "-", None), ("val_loss", "validation loss", "--", "o")],
    "kd": [("sft_loss", "SFT part (cross-entropy)", "-", None), ("kd_loss", "KD part (divergence)", "-.", None)],
    "accuracy": [("val_accuracy", "validation accuracy", "-", "o")],
}
YLABEL = {"loss": "loss (nats / token)", "kd": "loss part (nats / token)", "accuracy": "accuracy"}
TITLE = {"loss": "Loss", "kd": "KD objective: its two parts", "accuracy": "Validation accuracy (greedy generations)"}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
SINGLE = {"train_loss": "#1f77b4", "val_loss": "#d62728", "sft_loss": "#2ca02c", "kd_loss": "#9467bd",
          "val_accuracy": "#ff7f0e"}


@dataclass
class RunCurves:
    name: str  # the run folder's name: the legend label
    rows: list
    best_iter: int | None = None  # the kept adapter's iteration
    criterion: str = ""  # "loss" | "accuracy": what chose it


def kept_iteration(folder: Path) -> tuple[int | None, str]:
    """(best iteration, criterion) from the run's manifest.json (`selection`, else `result`)."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None, ""
    man = read_json(path)
    sel, res = man.get("selection") or {}, man.get("result") or {}
    best = sel.get("best_iter", res.get("best_iter"))
    crit = sel.get("criterion") or res.get("select_by") or (man.get("config") or {}).get("select_by", "")
    return (best if isinstance(best, int) and best >= 0 else None), crit


def read_run(folder: str | Path, best_iter: int | None = None) -> RunCurves:
    folder = Path(folder)
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{folder}: no metrics.jsonl; pass a `python -m mlx_distill train` run folder")
    rows = read_jsonl(path, tolerate_torn_tail=True)  # a run being written may have a torn last line
    kept, crit = kept_iteration(folder)
    if best_iter is not None and best_iter >= 0:
        kept = best_iter
    if not crit:  # a running run: its config says what selects
        cfg = folder / "config.yaml"
        if cfg.is_file():
            import yaml

            crit = (yaml.safe_load(cfg.read_text()) or {}).get("select_by", "")
    return RunCurves(folder.resolve().name or str(folder), rows, kept, crit or "loss")


def series(rows: list, key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "iter" in r:
            xs.append(r["iter"])
            ys.append(float(v))
    return xs, ys


def _shown(run: RunCurves, panel: str, key: str) -> bool:
    """Whether `run` draws `key` in `panel`: an SFT run logs sft_loss too (= its train loss), so the
    KD panel shows only runs that have a KD part."""
    if panel == "kd" and not series(run.rows, "kd_loss")[0]:
        return False
    return bool(series(run.rows, key)[0])


def _value_at(rows: list, key: str, it: int):
    for r in rows:
        if r.get("iter") == it and isinstance(r.get(key), (int, float)):
            return float(r[key])
    return None


def figure(runs: list[RunCurves], title: str = ""):
    """The training-curves figure: one panel per group of metrics present, runs overlaid."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = [p for p, keys in PANELS.items() if any(_shown(r, p, k) for r in runs for k, *_ in keys)]
    if not panels:
        raise InputError(f"{', '.join(r.name for r in runs)}: metrics.jsonl has no loss or accuracy rows yet")
    single = len(runs) == 1
    # fixed margins in inches (the legends sit right of the panels) instead of a layout engine:
    # this is redrawn at every validation of a run, and constrained layout doubles the cost
    height = 2.7 * len(panels) + 1.1
    fig = Figure(figsize=(11, height))
    fig.subplots_adjust(left=0.07, right=0.66, top=1 - 0.65 / height, bottom=0.5 / height, hspace=0.32)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    max_iter = max((r.get("iter", 0) for run in runs for r in run.rows), default=0)
    for ax, panel in zip(axes, panels):
        for i, run in enumerate(runs):
            color = COLORS[i % len(COLORS)]
            for key, label, style, marker in PANELS[panel]:
                xs, ys = series(run.rows, key)
                if not xs or not _shown(run, panel, key):
                    continue
                c = SINGLE[key] if single else color
                ax.plot(xs, ys, linestyle=style, marker=marker, markersize=3.5, color=c, linewidth=1.6,
                        label=label if single else None)
            if run.best_iter is not None and any(_shown(run, panel, k) for k, *_ in PANELS[panel]):
                ax.axvline(run.best_iter, color="0.35" if single else color, linestyle=":", linewidth=1.3)
                key = "val_accuracy" if panel == "accuracy" else "val_loss" if panel == "loss" else None
                y = _value_at(run.rows, key, run.best_iter) if key else None
                if y is not None:
                    ax.plot([run.best_iter], [y], marker="*", markersize=13, color="0.35" if single else color,
                            markeredgecolor="black", linestyle="none", zorder=5)
        if single:
            handles = ax.get_legend_handles_labels()[0]
        else:  # the line styles say which metric; the figure legend says which run
            handles = [Line2D([], [], color="0.25", linestyle=style, marker=marker, markersize=3.5, label=label)
                       for key, label, style, marker in PANELS[panel] if any(_shown(r, panel, key) for r in runs)]
        run = runs[0]
        if any(r.best_iter is not None for r in runs):
            what = f"kept adapter (iter {run.best_iter}, by validation {run.criterion})" if single else \
                "kept adapter (per run)"
            handles = list(handles) + [Line2D([], [], color="0.35", linestyle=":", marker="*", markersize=10,
                                              markeredgecolor="black", label=what)]
        metric_legend = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                                  fontsize=9)
        if not single and ax is axes[0]:  # the run legend: one colour per run folder
            ax.add_artist(metric_legend)  # (a second ax.legend replaces the first otherwise)
            ax.legend(handles=[Line2D([], [], color=COLORS[i % len(COLORS)], linewidth=3, label=r.name)
                               for i, r in enumerate(runs)], loc="lower left", bbox_to_anchor=(1.01, 0.0),
                      title="run folder", alignment="left", frameon=False, fontsize=9, title_fontsize=9)
        ax.set_title(TITLE[panel], fontsize=10, loc="left")
        ax.set_ylabel(YLABEL[panel])
        ax.grid(True, alpha=0.3)
        if panel == "accuracy":
            ax.set_ylim(0, 1.02)
        else:
            ax.set_ylim(bottom=0)  # losses are never negative: an axis below 0 only wastes room
            top = max((y for r in runs for k, *_ in PANELS[panel] if _shown(r, panel, k) for y in series(r.rows, k)[1]),
                      default=1.0)
            ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)
    axes[-1].set_xlabel("iteration (optimizer steps)")
    axes[-1].set_xlim(left=0, right=max(max_iter, 1) * 1.02)
    fig.suptitle(title or (f"Training curves: {runs[0].name}" if single else "Training curves"), fontsize=12,
                 x=0.07, ha="left")
    return fig


def write(runs: list[RunCurves], path: str | Path, title: str = "") -> Path:
    """Draw `runs` into `path` atomically (io.save_figure)."""
    path = Path(path)
    save_figure(figure(runs, title), path, dpi=110)
    return path


_said: set = set()


def _once(key: str, msg: str) -> None:
    if key not in _said:
        _said.add(key)
        print(msg, file=sys.stderr, flush=True)


# share of a run's wall time that redrawing training.png may take: a real run validates every
# several seconds and is redrawn at every validation; a toy run validating several times a second
# (the tests) skips redraws that would come within 1 / BUDGET render times of the last one, and
# the run's final call (final=True) always draws.
BUDGET = 0.1
_last: dict = {}  # run folder -> (when its last render finished, seconds it took)


def refresh(folder: str | Path, best_iter: int | None = None, final: bool = False) -> Path | None:
    """Rewrite ``<folder>/training.png`` from its metrics.jsonl (train calls it at each validation
    and once at the end with final=True).

    Never raises: a plot must not end a training run. Without matplotlib it says so once."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _once("matplotlib", "note: matplotlib is not installed (pip install 'mlx_distill[plots]'): "
                            f"no {PNG} for this run")
        return None
    key = str(Path(folder).resolve())
    if not final and key in _last and time.perf_counter() - _last[key][0] < _last[key][1] / BUDGET:
        return None
    try:
        tic = time.perf_counter()
        path = write([read_run(folder, best_iter)], Path(folder) / PNG)
        _last[key] = (time.perf_counter(), time.perf_counter() - tic)
        return path
    except Exception as e:  # noqa: BLE001 - any plotting failure is reported, never fatal
        _once(f"fail:{folder}", f"warning: could not write {Path(folder) / PNG} ({type(e).__name__}: {e}); "
                                "training goes on")
        return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m mlx_distill plot",
        description="Plot training curves (train / validation loss, KD parts, validation accuracy, the kept "
                    "iteration) of one or more run folders. One run without --out rewrites RUN/training.png; "
                    "several runs are overlaid, one colour per run folder.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="`python -m mlx_distill train` run folder(s)")
    p.add_argument("--out", default="", help="PNG to write (default: RUN/training.png for one run; required for "
                                             "several)")
    p.add_argument("--title", default="", help="Figure title (default: the run folder name).")
    args = p.parse_args(argv)
    if not args.out and len(args.runs) > 1:
        raise InputError("plot: several runs need --out F.png (the overlay is no single run's training.png)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("plot needs matplotlib: pip install 'mlx_distill[plots]'") from None
    runs = [read_run(r) for r in args.runs]
    out = Path(args.out) if args.out else Path(args.runs[0]) / PNG
    write(runs, out, args.title)
    print(f"wrote {out}")
