"""Experiment trackers for `train`: ``--report-to wandb,tensorboard``.

    python -m mlx_distill train --model smollm2 --data corpora/demo --out runs/demo --report-to wandb,tensorboard

Every row `train` writes to ``metrics.jsonl`` goes to each tracker too, at its ``iter`` step,
with the same field names (numbers as scalars; a nested dict is flattened to ``a/b``; a
string or list as text), and the resolved TrainConfig is logged once as the run's config.
``metrics.jsonl`` stays the record: a tracker that fails mid-run is reported once and
dropped, the training goes on.

- ``wandb``: the `wandb` package (``pip install 'mlx_distill[wandb]'``). Its own settings
  apply: ``WANDB_PROJECT`` (default ``mlx_distill``), ``WANDB_MODE=offline`` (no account, no
  network; ``wandb sync`` uploads later), ``WANDB_DIR`` (default: the run folder, so the
  W&B files sit beside the run's). The run's name is the run folder's name; its id is kept in
  ``RUN/trackers.json`` so ``--resume`` continues the same W&B run.
- ``tensorboard``: a `tensorboardX` SummaryWriter into ``RUN/tensorboard/``
  (``pip install 'mlx_distill[tensorboard]'``; view with ``tensorboard --logdir RUN``).

``eval --report-to ...`` sends its summary (accuracy, interval, invalid share, ...) the same way
(`report_summary`). Only rank 0 reports (`mlx_distill.backends.distributed.Group.is_main`). A tracker
named but not installed is one error line before the model is loaded (`require`).
"""

import json
import math
import os
import re
import sys
from pathlib import Path

from mlx_distill.io import InputError, atomic_write_json, read_json

# tracker name -> (module to import, pip extra that installs it)
TRACKERS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboardX", "tensorboard")}


def parse(value) -> list[str]:
    """``--report-to`` as typed: ``"wandb,tensorboard"``, ``["wandb", "tensorboard"]``,
    ``["wandb,tensorboard"]`` or a YAML list -> ``["wandb", "tensorboard"]`` (in order,
    without repeats). ``none`` or empty = no tracker. Unknown names are an error."""
    items = value if isinstance(value, (list, tuple)) else [value]
    names: list[str] = []
    for item in items:
        for name in str(item or "").replace(",", " ").split():
            name = name.strip().lower()
            if name == "none":
                continue
            if name not in TRACKERS:
                raise InputError(f"--report-to {name!r}: unknown tracker; choose from {', '.join(TRACKERS)} "
                                 "(comma- or space-separated)")
            if name not in names:
                names.append(name)
    return names


def require(value) -> list[str]:
    """`parse`, then check that each named tracker's package imports: one clear error line
    naming the extra to install, before any model is loaded."""
    import importlib.util

    names = parse(value)
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise InputError(f"--report-to {name}: the {module!r} package is not installed; "
                             f"pip install 'mlx_distill[{extra}]' (or drop {name} from --report-to)")
    return names


def flatten(row: dict, prefix: str = "") -> dict:
    """One level of keys: ``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; None values dropped."""
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif v is not None:
            out[key] = v
    return out


def tb_tag(key: str) -> str:
    """A TensorBoard tag for a field name: characters outside ``[-/\\w.]`` become ``_`` (as the
    writer would do itself, said here so the names are predictable)."""
    return re.sub(r"[^-/\w.]", "_", key).lstrip("/")


def is_scalar(v) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


# ----------------------------------------------------------------------------- the trackers
class TensorBoard:
    """A tensorboardX SummaryWriter into ``<out>/tensorboard``."""

    name = "tensorboard"

    def __init__(self, out: Path, cfg: dict, resume: bool):
        from tensorboardX import SummaryWriter

        self.folder = out / "tensorboard"
        self.writer = SummaryWriter(logdir=str(self.folder))
        if not resume:
            import yaml

            # text summaries are rendered as markdown: indent four spaces for a code block
            text = "\n".join("    " + line for line in yaml.safe_dump(cfg, sort_keys=False).splitlines())
            self.writer.add_text("config", text, 0)

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            if is_scalar(v):
                self.writer.add_scalar(tb_tag(k), float(v), step)
            else:
                self.writer.add_text(tb_tag(k), v if isinstance(v, str) else json.dumps(v), step)
        self.writer.flush()

    def summary(self, values: dict) -> None:
        self.log(values, 0)

    def close(self) -> None:
        self.writer.close()

    def describe(self) -> dict:
        return {"dir": str(self.folder)}


class WandB:
    """A W&B run (online, or offline under WANDB_MODE=offline)."""

    name = "wandb"

    def __init__(self, out: Path, cfg: dict, resume: bool, run_id: str | None, job: str = "train"):
        import wandb

        self.dir = Path(os.environ.get("WANDB_DIR") or out)
        self.dir.mkdir(parents=True, exist_ok=True)
        kw = {"id": run_id, "resume": "allow"} if resume and run_id else {}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mlx_distill"), name=out.resolve().name,
                              dir=str(self.dir), config=cfg, job_type=job, **kw)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()

    def describe(self) -> dict:
        return {"id": self.run.id, "project": self.run.project, "dir": str(self.dir),
                "offline": bool(getattr(self.run.settings, "_offline", False))}


def open_trackers(names: list[str], out: Path, cfg: dict, resume: bool = False, job: str = "train") -> list:
    """The named trackers, opened, and ``<out>/trackers.json`` saying where each one writes."""
    out = Path(out)
    saved = read_json(out / "trackers.json") if (out / "trackers.json").is_file() else {}
    opened = []
    try:
        for name in names:
            if name == "wandb":
                opened.append(WandB(out, cfg, resume, saved.get("wandb", {}).get("id"), job))
            else:
                opened.append(TensorBoard(out, cfg, resume))
    except Exception as e:  # noqa: BLE001 - wandb.init raises its own errors (login, network): one line
        for t in opened:
            t.close()
        raise InputError(f"--report-to {name}: could not start the tracker ({type(e).__name__}: {e}); fix it or "
                         "drop it from --report-to (WANDB_MODE=offline needs no account)") from e
    atomic_write_json(out / "trackers.json", {t.name: t.describe() for t in opened})
    return opened


class ReportingAppender:
    """A metrics appender (`mlx_distill.io.JsonlAppender`) that also sends each row to the
    trackers, at the row's ``iter``. The row is in metrics.jsonl first; a tracker that raises
    is reported once on stderr and dropped."""

    def __init__(self, appender, trackers: list):
        self.appender, self.trackers = appender, list(trackers)

    def write(self, row: dict) -> None:
        self.appender.write(row)
        values = flatten({k: v for k, v in row.items() if k != "iter"})
        for t in list(self.trackers):
            try:
                t.log(values, int(row["iter"]))
            except Exception as e:  # noqa: BLE001 - the run outlives its tracker
                print(f"warning: --report-to {t.name} failed ({type(e).__name__}: {e}); metrics.jsonl keeps "
                      "every row, this tracker gets no more", file=sys.stderr, flush=True)
                self.trackers.remove(t)

    def close(self) -> None:
        self.appender.close()
        for t in self.trackers:
            try:
                t.close()
            except Exception as e:  # noqa: BLE001
                print(f"warning: closing --report-to {t.name}: {type(e).__name__}: {e}", file=sys.stderr)
        self.trackers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def attach(appender, cfg, out: str | Path, dist=None):
    """`appender` wrapped so each metrics row also reaches ``cfg.report_to``'s trackers, or
    `appender` itself when none is named or this is not rank 0."""
    from mlx_distill.config import to_dict

    names = parse(getattr(cfg, "report_to", []))
    if not names or (dist is not None and not dist.is_main):
        return appender
    return ReportingAppender(appender, open_trackers(names, Path(out), to_dict(cfg), resume=bool(cfg.resume)))


def report_summary(cfg, out: str | Path, summary: dict, job: str = "eval") -> None:
    """A finished stage's summary (eval: accuracy, its interval, invalid share, lengths, ...) to
    ``cfg.report_to``'s trackers: a W&B run of job type `job` whose summary holds every field
    (and whose config is the stage's), TensorBoard scalars at step 0 in ``<out>/tensorboard``."""
    from mlx_distill.config import to_dict

    names = parse(getattr(cfg, "report_to", []))
    if not names:
        return
    values = flatten(summary)
    for t in open_trackers(names, Path(out), to_dict(cfg), job=job):
        try:
            t.summary(values)
        finally:
            t.close()
