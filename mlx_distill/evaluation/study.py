"""`python -m mlx_distill study length -c study.yaml`: accuracy against response length.

Response-length levels are induced one of three ways (``kind``):

* ``prompt``: a word budget asked for in the prompt at evaluation time (``levels: [200, 100, 50, 25]``);
* ``max_tokens``: a generation cap (``levels: [512, 256, 128, 64]``); a cut response is counted
  as truncated, and usually has no final answer;
* ``adapter``: one adapter per corpus length level, e.g. the rewriter's R1…R6 variants
  (``levels: [{name: R1, data: corpora/x-R1}, ...]``; each is trained here with ``train``
  options and the seed, unless ``{adapter: RUN_FOLDER}`` names a trained one).

Every level runs once per seed (sampling seed; for ``adapter`` also the training seed), and
is reported as mean ± sample std over seeds. Example ``study.yaml``::

    kind: prompt
    levels: [200, 100, 50, 25]
    seeds: [0, 1, 2]
    eval: {model: smollm2, dataset: gsm8k, limit: 100, temperature: 0.7, max_tokens: 512}
    out: runs/length-study

The grid is a list of cells, one per level x seed (seed-major: cell I is level I mod L of
seed I div L), each with its own folder ``cells/<I>-<level>-seed<s>/`` holding ``eval.yaml``
(and ``train.yaml``), ``eval/`` (and ``adapter/``), and when finished ``result.json`` + ``done``:

* ``--plan`` writes ``study.yaml`` (the study, resolved), ``plan.json``, ``plan.txt`` and
  ``cells.sh`` (each cell's ``python -m mlx_distill train|eval -c <cell>/....yaml`` commands)
  and runs nothing;
* ``--cell I`` runs cell I (trains its adapter if needed, evaluates, writes result.json); any
  scheduler can run the cells: a shell loop, ``xargs -P``, a SLURM array. A second worker on
  the same cell refuses (``<cell>/lock`` names the holder); a lock whose process is gone (same
  host) is taken over. A finished cell is skipped; one holding other settings is refused;
* ``study length`` again (after ``--plan``) assembles the finished cells and lists the missing
  ones; with any missing it writes the outputs marked PARTIAL and exits 3;
* ``--run-all``, and ``study length`` without a plan (or after an earlier whole study, which it
  continues): plan, run every unfinished cell here one after another, assemble.

Output folder: ``results.json`` (every run, the per-level aggregate, ``complete``, ``missing``),
``results.csv`` (one row per level), ``runs.csv`` (one row per run), ``accuracy_vs_words.png``,
``report.md``, and the cells.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from mlx_distill import config
from mlx_distill.config import EvalConfig, StudyConfig, TrainConfig
from mlx_distill.interrupts import Interrupts
from mlx_distill.io import InputError, atomic_write_json, atomic_write_text, write_manifest
# the table, CSVs, plot and report.md: evaluation/study_report.py
from mlx_distill.evaluation.study_report import _csv, plot, print_table, report

METRICS = ("accuracy", "words_mean", "words_median", "tokens_mean", "truncation_rate", "invalid_rate")


@dataclasses.dataclass
class Level:
    name: str
    value: Any               # word budget, token cap, or the corpus / adapter path
    data: str = ""           # adapter kind: corpus to train on
    adapter: str = ""        # adapter kind: an already trained run folder


def parse_levels(cfg: StudyConfig) -> list[Level]:
    if not cfg.levels:
        raise InputError("study: `levels` is empty; e.g. levels: [200, 100, 50] (word budgets)")
    names = [str(n) for n in cfg.level_names]
    if names and len(names) != len(cfg.levels):
        raise InputError(f"study: {len(names)} level_names for {len(cfg.levels)} levels")
    out = []
    for i, v in enumerate(cfg.levels):
        default = names[i] if names else None
        if cfg.kind in ("prompt", "max_tokens"):
            try:
                n = int(v)
            except (TypeError, ValueError):
                raise InputError(f"study: kind {cfg.kind} needs integer levels, got {v!r}") from None
            if n <= 0:
                raise InputError(f"study: level {v!r} must be positive")
            out.append(Level(default or (f"{n} words" if cfg.kind == "prompt" else f"{n} tokens"), n))
            continue
        if isinstance(v, dict):
            unknown = set(v) - {"name", "data", "adapter"}
            if unknown or not (v.get("data") or v.get("adapter")):
                raise InputError(f"study: adapter level {v!r} needs `data` (a corpus to train on) or `adapter` "
                                 "(a trained run folder), and optionally `name`")
            out.append(Level(default or str(v.get("name") or f"R{i + 1}"), v.get("adapter") or v.get("data"),
                             data=str(v.get("data") or ""), adapter=str(v.get("adapter") or "")))
        else:
            p = Path(str(v))
            trained = (p / "adapters.safetensors").is_file()
            out.append(Level(default or f"R{i + 1}", str(v), data="" if trained else str(v),
                             adapter=str(v) if trained else ""))
    if len({lv.name for lv in out}) != len(out):
        raise InputError(f"study: level names must be unique: {[lv.name for lv in out]}")
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "level"


# TrainConfig fields that say where/how a run is written, not what it trains
_NOT_SETTINGS = ("out", "resume", "extend")


def settings_diff(run: Path, tcfg: TrainConfig) -> list[str]:
    """How the run in `run` differs from the training settings `tcfg`: every TrainConfig field of
    its config.yaml (a field the file predates counts as its default) and the sha256 of the
    data files its manifest.json recorded. Empty when the run is what `tcfg` would train."""
    from mlx_distill.io import read_json, sha256_file

    saved = config.load_yaml(run / "config.yaml")
    defaults = config.to_dict(TrainConfig())
    diff = [f"{k}: {saved.get(k, defaults[k])!r} -> {v!r}" for k, v in config.to_dict(tcfg).items()
            if k not in _NOT_SETTINGS and saved.get(k, defaults[k]) != v]
    man = read_json(run / "manifest.json") if (run / "manifest.json").is_file() else {}
    for split, f in (man.get("data_files") or {}).items():
        p = Path(f.get("path") or "")
        if f.get("sha256") and (not p.is_file() or sha256_file(p) != f["sha256"]):
            diff.append(f"{split} data {p}: changed since it was trained (sha256)")
    return diff


def _finished(run: Path) -> bool:
    from mlx_distill.io import read_json

    if not ((run / "adapters.safetensors").is_file() and (run / "manifest.json").is_file()):
        return False
    man = read_json(run / "manifest.json")
    return man.get("status", "finished") == "finished" and "result" in man  # written at start, "running" until done


def train_cell(cell: "Cell", quiet: bool) -> bool:
    """Train (or reuse, or resume) the adapter of one cell; return whether it was trained (or finished) now.

    A folder that already holds a run is reused (or resumed) only when its config.yaml equals the
    study's training settings and its data files are unchanged; otherwise the study refuses,
    naming the differences: it never reports a run that other settings produced, and never deletes
    a trained adapter on its own."""
    from mlx_distill.training import train

    tcfg = cell.train
    run = Path(tcfg.out)
    if (run / "config.yaml").is_file():
        diff = settings_diff(run, tcfg)
        if diff:
            raise InputError(f"study: {run} holds an adapter trained with other settings than the study's `train` "
                             f"({'; '.join(diff)}); delete {cell.dir} to run {cell.label} again, or give the "
                             "study another `out`")
        if _finished(run):
            return False  # finished earlier with these settings (the cell stopped after training): reuse it
    resume = (run / "checkpoints" / "last").is_dir() or (run / "checkpoints" / "last.old").is_dir()
    if not quiet:
        print(f"training {cell.level.name} (seed {cell.seed}) on {cell.level.data} -> {run}", file=sys.stderr)
    train.run(dataclasses.replace(tcfg, resume=resume), quiet=True)
    return True


def _mean_std(xs: list) -> tuple[Optional[float], Optional[float]]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(rows: list[dict], levels: list[Level]) -> list[dict]:
    agg = []
    for lv in levels:
        rs = [r for r in rows if r["level"] == lv.name]
        a: dict[str, Any] = {"level": lv.name, "value": lv.value if not isinstance(lv.value, Path) else str(lv.value),
                             "seeds": len(rs), "n": rs[0]["n"] if rs else 0}
        for m in METRICS:
            mean, std = _mean_std([r[m] for r in rs])
            a[f"{m}_mean"] = None if mean is None else round(mean, 4)
            a[f"{m}_std"] = None if std is None else round(std, 4)
        agg.append(a)
    return agg


# ----------------------------------------------------------------------------- the grid: cells
_MODES = ("plan", "cell", "run_all")  # StudyConfig fields that say how the grid is run, not what it measures
_EVAL_NOT_SETTINGS = ("out", "resume", "overwrite", "show", "plot")
PLAN_VERSION = 1


@dataclasses.dataclass
class Cell:
    """One level x seed of the grid: its folder, and the evaluation (and training) it runs."""
    index: int
    kind: str
    level: Level
    seed: int
    dir: Path
    eval: EvalConfig
    train: Optional[TrainConfig] = None  # kind adapter, a level trained here (into dir/adapter)

    @property
    def label(self) -> str:
        return f"cell {self.index} ({self.level.name}, seed {self.seed})"

    def settings(self) -> dict:
        """What the cell measures; its result.json keeps them, so a changed study is detected."""
        ev = {k: v for k, v in config.to_dict(self.eval).items() if k not in _EVAL_NOT_SETTINGS}
        if self.train is not None:
            ev.pop("adapter")  # the cell's own adapter, described by `train`
        tr = None if self.train is None else {k: v for k, v in config.to_dict(self.train).items()
                                               if k not in _NOT_SETTINGS}
        return {"kind": self.kind, "level": self.level.name, "value": self.level.value, "seed": self.seed,
                "train": tr, "eval": ev}

    def commands(self) -> dict:
        """The `python -m mlx_distill` commands the cell runs (argv), each from a YAML in its folder."""
        c = {}
        if self.train is not None:
            c["train"] = ["python", "-m", "mlx_distill", "train", "-c", str(self.dir / "train.yaml")]
        c["eval"] = ["python", "-m", "mlx_distill", "eval", "-c", str(self.dir / "eval.yaml")]
        return c


def make_cells(cfg: StudyConfig) -> tuple[list[Level], list[int], EvalConfig, list[Cell]]:
    """The grid: levels, seeds, the evaluation every cell shares, and the cells, seed-major (a seed
    added later appends cells and keeps every other cell's number and folder)."""
    levels = parse_levels(cfg)
    seeds = [int(s) for s in cfg.seeds] or [0]
    if len(set(seeds)) != len(seeds):
        raise InputError(f"study: seeds must be unique: {seeds}")
    out = Path(cfg.out)
    ev, tr = dict(cfg.eval), dict(cfg.train)
    if cfg.kind == "adapter" and "model" not in ev and tr.get("model"):
        ev["model"] = tr["model"]  # evaluate the model the adapters were trained on
    if cfg.kind == "adapter" and "model" in ev and "model" not in tr:
        tr["model"] = ev["model"]
    base = config.build(EvalConfig, ev, {"show": 0, "plot": False}, source="study.eval")
    cells = []
    for seed in seeds:
        for lv in levels:
            d = out / "cells" / f"{len(cells)}-{_slug(lv.name)}-seed{seed}"
            changes: dict[str, Any] = {"seed": seed, "out": str(d / "eval")}
            tcfg = None
            if cfg.kind == "prompt":
                changes["word_budget"] = lv.value
            elif cfg.kind == "max_tokens":
                changes["max_tokens"] = lv.value
            elif lv.adapter:
                changes["adapter"] = lv.adapter
            else:
                tcfg = config.build(TrainConfig, tr, {"data": lv.data, "out": str(d / "adapter"), "seed": seed,
                                                      "resume": False}, source="study.train")
                changes["adapter"] = tcfg.out
            cells.append(Cell(len(cells), cfg.kind, lv, seed, d, dataclasses.replace(base, **changes), tcfg))
    return levels, seeds, base, cells


def _settings_diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every setting of `new` that `old` (a result.json or plan.json) holds
    otherwise; a train/eval option the old file predates counts as its default."""
    diff = []
    for k, v in new.items():
        o = old.get(k)
        if k in ("train", "eval") and isinstance(v, dict) and isinstance(o, dict):
            defaults = config.to_dict(TrainConfig() if k == "train" else EvalConfig())
            diff += [f"{k}.{kk}: {o.get(kk, defaults.get(kk))!r} -> {vv!r}" for kk, vv in v.items()
                     if o.get(kk, defaults.get(kk)) != vv]
        elif o != v:
            diff.append(f"{k}: {o!r} -> {v!r}")
    return diff


# ----------------------------------------------------------------------------- locks
def _lock_holder(path: Path) -> Optional[dict]:
    """The lock file's holder ({host, pid, started}); {} when it is unreadable; None when there is no lock."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except json.JSONDecodeError:
        return {}  # being written this instant, or damaged


def _alive(holder: dict) -> Optional[bool]:
    """Whether the lock's holder still runs: None when that cannot be told from here (another host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _who(holder: dict) -> str:
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('started', '?')}"


def acquire_lock(cell: Cell) -> dict:
    """Take `<cell>/lock` (created exclusively, whole: naming this host, pid and start time). A lock
    whose holder is gone (its pid no longer runs on this host) is taken over with a message; any
    other lock refuses the cell."""
    path = cell.dir / "lock"
    cell.dir.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for attempt in (0, 1):
        try:
            _create_whole(path, json.dumps(me))
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None:
                continue  # released meanwhile
            alive = _alive(holder)
            if alive is False and attempt == 0:
                _take_over(path, holder, cell)
                continue
            if alive is None and holder.get("host") not in (None, me["host"]):
                why = "on another host, which this one cannot check"
            elif holder:
                why = "and still running"
            else:
                why = "(the lock file is unreadable)"
            raise InputError(f"study: {cell.label} is being run by {_who(holder)} {why} (lock file {path}); "
                             f"run another cell, or delete {path} if that worker is gone")
        return me
    raise InputError(f"study: could not take the lock {path} (other workers keep taking it); run the cell again")


def _create_whole(path: Path, text: str) -> None:
    """Create `path` holding `text`, or raise FileExistsError: written aside, then hard-linked into
    place, so no reader ever sees it empty (O_EXCL where the file system has no hard links)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, holder: dict, cell: Cell) -> None:
    """Remove a stale lock; one worker at a time (lock.takeover), and only if it still names the dead holder."""
    guard = path.with_name("lock.takeover")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise InputError(f"study: another worker is taking over the stale lock {path} of {cell.label}; "
                         f"run another cell (delete {guard} if no worker is)") from None
    try:
        if _lock_holder(path) == holder:
            print(f"note: {cell.label}: taking over the stale lock {path}: its holder {_who(holder)} is gone "
                  "(it stopped without finishing the cell)", file=sys.stderr)
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_deferred():
    """SIGTERM and SIGINT wait until the block is over (where the platform can block signals)."""
    sigs = {signal.SIGTERM, signal.SIGINT}
    can = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs) if can else None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def release_lock(cell: Cell, me: dict) -> None:
    path = cell.dir / "lock"
    if _lock_holder(path) == me:  # never remove a lock another worker took over
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- one cell
def _finished_state(cell: Cell) -> tuple[Optional[str], str]:
    """("done", "") for a cell finished with the study's settings, ("stale", why) for one holding
    another study's results (or an adapter trained otherwise, or on data changed since), else (None, "")."""
    from mlx_distill.io import read_json

    if cell.train is not None and (Path(cell.train.out) / "config.yaml").is_file():
        diff = settings_diff(Path(cell.train.out), cell.train)
        if diff:
            return "stale", f"{cell.train.out} holds an adapter trained with other settings ({'; '.join(diff)})"
    res, done = cell.dir / "result.json", cell.dir / "done"
    if not (res.is_file() and done.is_file()):
        return None, ""
    try:
        saved = read_json(res).get("settings") or {}
    except InputError as e:
        return "stale", str(e)
    diff = _settings_diff(saved, json.loads(json.dumps(cell.settings())))
    if diff:
        return "stale", f"{cell.dir} holds a result of other settings than the study's ({'; '.join(diff)})"
    return "done", ""


def cell_state(cell: Cell) -> tuple[str, str]:
    """(state, detail): done, stale (other settings), running (its lock's holder runs, or runs on
    another host), interrupted (started, not finished), or missing (never started)."""
    state, detail = _finished_state(cell)
    if state:
        return state, detail
    holder = _lock_holder(cell.dir / "lock")
    if holder is not None:
        alive = _alive(holder)
        if alive is False:
            return "interrupted", f"its worker {_who(holder)} is gone (stale lock)"
        return "running", f"by {_who(holder)}" + (" (another host)" if alive is None and holder else "")
    if (cell.dir / "eval").exists() or (cell.dir / "adapter").exists():
        return "interrupted", "started, not finished (running it again continues)"
    return "missing", "not run yet"


def _row(cell: Cell, ecfg: EvalConfig, s: dict) -> dict:
    return {"level": cell.level.name, "value": cell.level.value, "seed": cell.seed, "n": s["n"],
            "accuracy": s["accuracy"], "words_mean": s["words"]["mean"], "words_median": s["words"]["median"],
            "tokens_mean": s["tokens"]["mean"], "truncation_rate": s["truncation_rate"],
            "invalid_rate": s["invalid_rate"], "adapter": ecfg.adapter or None, "run": ecfg.out}


def write_cell_files(cell: Cell) -> None:
    """The YAMLs of the cell's commands (`python -m mlx_distill eval -c <cell>/eval.yaml`, ...)."""
    cell.dir.mkdir(parents=True, exist_ok=True)
    config.dump_yaml(cell.eval, cell.dir / "eval.yaml")
    if cell.train is not None:
        config.dump_yaml(cell.train, cell.dir / "train.yaml")


def run_cell(cell: Cell, client=None, quiet: bool = False) -> dict:
    """Run one cell under its lock: train its adapter if it has one (reused when already trained
    with the same settings), evaluate (continuing an interrupted evaluation), then write
    `<cell>/result.json` atomically and the `done` marker. A finished cell is not run again;
    one holding another study's results is refused. Returns the cell's row."""
    from mlx_distill.evaluation.evaluate import evaluate
    from mlx_distill.io import read_json

    def finished() -> Optional[dict]:
        state, detail = _finished_state(cell)
        if state == "stale":
            raise InputError(f"study: {detail}; delete {cell.dir} to run {cell.label} again, or give the study "
                             "another `out`")
        if state == "done":
            if not quiet:
                print(f"{cell.label}: already done ({cell.dir / 'result.json'}); nothing to do", file=sys.stderr)
            return read_json(cell.dir / "result.json")["row"]
        return None

    row = finished()
    if row is not None:
        return row
    me = None
    try:
        with _signals_deferred():  # a SIGTERM now would leave the lock taken and not released
            me = acquire_lock(cell)
        row = finished()  # again under the lock: another worker may have finished it meanwhile
        if row is not None:
            return row
        t0 = time.time()
        write_cell_files(cell)
        ecfg = cell.eval
        if cell.train is not None and train_cell(cell, quiet):
            ecfg = dataclasses.replace(ecfg, overwrite=True)  # an evaluation left there was of an older adapter
        s = evaluate(ecfg, client=client, quiet=True)
        row = _row(cell, ecfg, s)
        from mlx_distill.io import versions

        atomic_write_json(cell.dir / "result.json", {
            "index": cell.index, "settings": cell.settings(), "row": row, "host": me["host"], "pid": me["pid"],
            "started": me["started"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - t0, 1), "commands": cell.commands(), "versions": versions()})
        atomic_write_text(cell.dir / "done", time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
        if not quiet:
            print(f"{cell.level.name} seed {cell.seed}: accuracy {s['accuracy']:.1%}, {s['words']['mean']} words "
                  f"(n={s['n']})", file=sys.stderr)
        return row
    finally:
        if me is not None:
            release_lock(cell, me)


# ----------------------------------------------------------------------------- the plan
def _study_cmd(out: Path, *extra: str) -> list[str]:
    return ["python", "-m", "mlx_distill", "study", "length", "-c", str(out / "study.yaml"), *extra]


def plan_dict(cfg: StudyConfig, levels: list[Level], seeds: list[int], cells: list[Cell], by: str = "plan") -> dict:
    out = Path(cfg.out)
    return {"version": PLAN_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "written_by": by,
            "cwd": os.getcwd(),
            "study": str(out / "study.yaml"), "kind": cfg.kind, "levels": [lv.name for lv in levels], "seeds": seeds,
            "cells": [{"index": c.index, "level": c.level.name, "value": c.level.value, "seed": c.seed,
                       "dir": str(c.dir), "commands": c.commands(), "run": _study_cmd(out, "--cell", str(c.index)),
                       "settings": c.settings()} for c in cells],
            "assemble": _study_cmd(out)}


def plan_diff(plan: dict, cells: list[Cell]) -> list[str]:
    """How the cells of the study as configured now differ from a written plan."""
    old = {c.get("index"): c for c in plan.get("cells") or []}
    diff = [f"{len(old)} cells -> {len(cells)}"] if len(old) != len(cells) else []
    for c in cells:
        o = old.get(c.index)
        if o is None:
            continue
        if o.get("dir") != str(c.dir):
            diff.append(f"cell {c.index}: folder {o.get('dir')} -> {c.dir}")
        else:
            diff += [f"cell {c.index}: {d}" for d in _settings_diff(o.get("settings") or {},
                                                                     json.loads(json.dumps(c.settings())))]
    return diff


def _plan_text(plan: dict, cells: list[Cell], states: list[tuple[str, str]]) -> str:
    q = shlex.join
    n = len(cells)
    L = [f"Study plan: {n} cells = {len(plan['levels'])} levels x {len(plan['seeds'])} seeds (kind {plan['kind']})",
         f"Run the commands from {plan['cwd']} (every path here is relative to it).", "",
         f"One cell (I = 0..{n - 1}; any order, any machine that shares this folder):",
         "  " + q(plan["assemble"] + ["--cell", "I"]),
         f"All of them here, one after another:  bash {shlex.quote(str(Path(plan['study']).parent / 'cells.sh'))}",
         "Assemble the finished cells (lists the missing ones):  " + q(plan["assemble"]), ""]
    for c, (state, _) in zip(cells, states):
        L.append(f"{c.index:>4}  {c.level.name}  seed {c.seed}  [{state}]  {c.dir}")
        for what, argv in c.commands().items():
            L.append(f"      {what + ':':<6} {q(argv)}")
    return "\n".join(L) + "\n"


def _cells_sh(plan: dict, cells: list[Cell]) -> str:
    study = shlex.quote(plan["study"])
    L = ["#!/usr/bin/env bash",
         "# The cells of a length study (written by `python -m mlx_distill study length --plan`).",
         "#   bash cells.sh        runs every cell here, one after another, then assembles the results",
         "#   bash cells.sh 3 5    runs cells 3 and 5",
         "# A finished cell is skipped; a cell another worker holds (its lock file) is refused.",
         "set -euo pipefail", f"cd {shlex.quote(plan['cwd'])}",
         f'cell() {{ python -m mlx_distill study length -c {study} --cell "$1"; }}',
         'if [ $# -gt 0 ]; then for i in "$@"; do cell "$i"; done; exit 0; fi']
    L += [f"cell {c.index}  # {c.level.name}, seed {c.seed}" for c in cells]
    L.append(f"python -m mlx_distill study length -c {study}  # assemble")
    return "\n".join(L) + "\n"


def write_plan(cfg: StudyConfig, levels: list[Level], seeds: list[int], cells: list[Cell], quiet: bool,
               by: str = "plan") -> dict:
    """Write `<out>/study.yaml` (the study, resolved), `plan.json`, `plan.txt`, `cells.sh` and every
    cell's YAMLs; say which cell folders hold other settings' results. `by`: "plan" (--plan: a plain
    `study length` then assembles) or "run-all" (a plain `study length` then continues the whole study)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    study = {k: v for k, v in config.to_dict(cfg).items() if k not in _MODES}
    atomic_write_text(out / "study.yaml", yaml.safe_dump(study, sort_keys=False))
    plan = plan_dict(cfg, levels, seeds, cells, by)
    states = [cell_state(c) for c in cells]
    for c in cells:
        write_cell_files(c)
    atomic_write_json(out / "plan.json", plan)
    text = _plan_text(plan, cells, states)
    atomic_write_text(out / "plan.txt", text)
    atomic_write_text(out / "cells.sh", _cells_sh(plan, cells))
    os.chmod(out / "cells.sh", 0o755)
    if not quiet:
        print(text, end="")
        print(f"wrote {out}/plan.json, plan.txt, cells.sh, study.yaml and {len(cells)} cell folders under "
              f"{out}/cells/")
    for c, (state, detail) in zip(cells, states):
        if state == "stale":
            print(f"note: {c.label}: {detail}; delete {c.dir} to run it again", file=sys.stderr)
    known = {c.dir.name for c in cells}
    others = sorted(p.name for p in (out / "cells").iterdir() if p.is_dir() and p.name not in known)
    if others:
        print(f"note: {out}/cells also holds {len(others)} folder(s) of no cell of this plan "
              f"({', '.join(others[:4])}{', ...' if len(others) > 4 else ''}); they are not used", file=sys.stderr)
    if (out / "adapters").is_dir() or (out / "runs").is_dir():
        print(f"note: {out}/adapters and {out}/runs are an older layout of the study; cells now train and "
              f"evaluate under {out}/cells/ and do not reuse them", file=sys.stderr)
    return plan


def _read_plan(cfg: StudyConfig, cells: list[Cell]) -> dict:
    """The plan in `<out>/plan.json`, refused when the study as configured now would run other cells."""
    from mlx_distill.io import read_json

    path = Path(cfg.out) / "plan.json"
    if not path.is_file():
        raise InputError(f"study: no plan in {cfg.out} (plan.json); write it first with "
                         f"`python -m mlx_distill study length -c STUDY.yaml --plan` (from the folder the paths "
                         "are relative to)")
    plan = read_json(path)
    diff = plan_diff(plan, cells)
    if diff:
        raise InputError(f"study: the study's settings differ from the plan in {path} "
                         f"({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}); run --plan again "
                         "(cells holding other settings must then be deleted to run again), or give it another `out`")
    return plan


# ----------------------------------------------------------------------------- modes
def plan_study(cfg: StudyConfig, quiet: bool = False) -> dict:
    """`--plan`: write the grid's cells; run nothing."""
    levels, seeds, _, cells = make_cells(cfg)
    return write_plan(cfg, levels, seeds, cells, quiet)


def run_one_cell(cfg: StudyConfig, index: int, quiet: bool = False) -> dict:
    """`--cell I`: run cell I of the written plan."""
    _, _, _, cells = make_cells(cfg)
    _read_plan(cfg, cells)
    if not 0 <= index < len(cells):
        raise InputError(f"study: --cell {index} is not in the plan of {cfg.out} (cells 0..{len(cells) - 1})")
    return run_cell(cells[index], quiet=quiet)


def assemble_study(cfg: StudyConfig, quiet: bool = False) -> dict:
    """`study length` with a plan: assemble the finished cells; `complete` says whether any is missing."""
    levels, seeds, base, cells = make_cells(cfg)
    _read_plan(cfg, cells)
    return assemble(cfg, levels, seeds, base, cells, quiet)


def run_study(cfg: StudyConfig, quiet: bool = False) -> dict:
    """The whole study in this process (`--run-all`, and a study without a plan): plan, run every
    unfinished cell one after another (one model for every cell of kinds prompt and max_tokens),
    assemble."""
    levels, seeds, base, cells = make_cells(cfg)
    stale = [(c, d) for c in cells for s, d in [_finished_state(c)] if s == "stale"]
    if stale:  # refused before anything runs
        c, d = stale[0]
        more = f" ({len(stale)} cells like this)" if len(stale) > 1 else ""
        raise InputError(f"study: {d}; delete {c.dir} to run {c.label} again{more}, or give the study another `out`")
    write_plan(cfg, levels, seeds, cells, quiet=True, by="run-all")
    if base.temperature == 0 and len(seeds) > 1 and cfg.kind != "adapter" and not quiet:
        print("note: greedy decoding (eval.temperature 0): every seed gives the same run; "
              "set eval.temperature > 0 to measure seed variance", file=sys.stderr)
    todo = [c for c in cells if _finished_state(c)[0] != "done"]
    shared = None
    try:
        if todo and cfg.kind != "adapter":
            from mlx_distill.generation import make_eval_client

            shared = make_eval_client(base)  # one model for every level and seed
        # SIGINT/SIGTERM: the cell in hand saves what it has (its eval's requests in flight finish, its
        # lock is released), no other cell starts; exit 130/143, and the same command continues
        with Interrupts("finishing this cell's requests in flight, then saving") as stop:
            for c in todo:
                stop.check()
                run_cell(c, client=shared, quiet=quiet)
        stop.check()
    finally:
        if shared is not None:
            from mlx_distill.evaluation.evaluate import close_client

            close_client(shared)
    return assemble(cfg, levels, seeds, base, cells, quiet)


def assemble(cfg: StudyConfig, levels: list[Level], seeds: list[int], base: EvalConfig, cells: list[Cell],
             quiet: bool = False) -> dict:
    """The table, results.json/csv, runs.csv, plot and report.md from the finished cells. Missing
    cells are listed (stderr, results.json `missing`, report.md) and the outputs marked partial."""
    from mlx_distill.io import read_json

    rows, missing = [], []
    for c in sorted(cells, key=lambda c: (levels.index(c.level), c.seed)):
        state, detail = cell_state(c)
        if state == "done":
            rows.append(read_json(c.dir / "result.json")["row"])
        else:
            missing.append({"index": c.index, "level": c.level.name, "seed": c.seed, "state": state,
                            "detail": detail, "dir": str(c.dir), "run": _study_cmd(Path(cfg.out), "--cell", str(c.index))})
    missing.sort(key=lambda m: m["index"])
    out = Path(cfg.out)
    agg = aggregate(rows, levels)
    result = {"kind": cfg.kind, "seeds": seeds, "eval": config.to_dict(base), "levels": agg, "runs": rows,
              "cells": len(cells), "complete": not missing, "missing": missing}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.csv", _csv(agg))
    atomic_write_text(out / "runs.csv", _csv(rows))
    plotted = plot(agg, out / "accuracy_vs_words.png", cfg.kind) if cfg.plot and rows else False
    atomic_write_text(out / "report.md", report(cfg, base, agg, plotted, missing=missing, cells=len(cells)))
    study = {k: v for k, v in config.to_dict(cfg).items() if k not in _MODES}
    write_manifest(out / "manifest.json", "study length", {**study, **{k: getattr(StudyConfig(), k) for k in _MODES}},
                   plot=plotted, runs=len(rows), cells=len(cells), status="partial" if missing else "complete",
                   missing=[m["index"] for m in missing])
    if not quiet:
        print_table(agg, cfg.kind, partial=f"{len(cells) - len(missing)} of {len(cells)} cells" if missing else "")
        print(f"wrote {out}/results.json, results.csv, report.md" + (", accuracy_vs_words.png" if plotted else ""))
    if missing:
        print(f"study: PARTIAL: {len(missing)} of {len(cells)} cells not finished; the outputs say so:",
              file=sys.stderr)
        for m in missing:
            print(f"  cell {m['index']} ({m['level']}, seed {m['seed']}): {m['state']}, {m['detail']}: "
                  f"{shlex.join(m['run'])}", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------- CLI
def _written_by(path: Path) -> Optional[str]:
    """Who wrote the plan in `path`: "plan" (--plan), "run-all", or None (no plan)."""
    from mlx_distill.io import read_json

    return read_json(path).get("written_by", "plan") if path.is_file() else None


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mlx_distill study length -c study.yaml [options]\n\n" + (__doc__ or ""))
        return
    if argv[0] != "length":
        raise InputError(f"unknown study {argv[0]!r}; available: length")
    cfg = config.from_cli(StudyConfig, argv[1:], "python -m mlx_distill study length", __doc__)
    if sum((cfg.plan, cfg.cell != -1, cfg.run_all)) > 1:
        raise InputError("study: give one of --plan, --cell I, --run-all")
    if cfg.plan:
        plan_study(cfg)
    elif cfg.cell != -1:
        if cfg.cell < 0:
            raise InputError(f"study: --cell {cfg.cell}: a cell number is 0 or more (see plan.txt)")
        # a scheduler's SIGTERM (time limit, scancel), or Ctrl-C: the cell's eval saves the requests in
        # flight, the lock is released, exit 143/130; running the cell again continues it
        with Interrupts("finishing this cell's requests in flight, then saving") as stop:
            run_one_cell(cfg, cfg.cell)
        stop.check()
    elif cfg.run_all or _written_by(Path(cfg.out) / "plan.json") != "plan":
        run_study(cfg)  # no plan, or the plan of an earlier whole study: run (continue) the whole study
    elif not assemble_study(cfg)["complete"]:
        raise SystemExit(3)  # a partial assembly: outputs written, marked partial
