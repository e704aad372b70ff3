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

Output folder: ``results.json`` (every run and the per-level aggregate), ``results.csv``
(one row per level), ``runs.csv`` (one row per run), ``accuracy_vs_words.png``, ``report.md``,
and ``runs/<level>-seed<s>/`` with each evaluation's records and summary.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from . import config
from .config import EvalConfig, StudyConfig, TrainConfig
from .io import InputError, atomic_write_json, atomic_write_text, save_figure, write_manifest

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
    from .io import read_json, sha256_file

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
    from .io import read_json

    if not ((run / "adapters.safetensors").is_file() and (run / "manifest.json").is_file()):
        return False
    man = read_json(run / "manifest.json")
    return man.get("status", "finished") == "finished" and "result" in man  # written at start, "running" until done


def train_level(cfg: StudyConfig, level: Level, seed: int, out: Path, quiet: bool) -> tuple[str, bool]:
    """Train (or reuse, or resume) the adapter of one corpus level and seed; return its folder and
    whether it was trained (or finished) now.

    A folder that already holds a run is reused (or resumed) only when its config.yaml equals the
    study's training settings and its data files are unchanged; otherwise the study refuses,
    naming the differences: it never reports a run that other settings produced, and never deletes
    a trained adapter on its own."""
    from . import train

    run = out / "adapters" / f"{_slug(level.name)}-seed{seed}"
    overrides = {"data": level.data, "out": str(run), "seed": seed}
    tcfg = config.build(TrainConfig, cfg.train, {**overrides, "resume": False}, source="study.train")
    if (run / "config.yaml").is_file():
        diff = settings_diff(run, tcfg)
        if diff:
            raise InputError(f"study: {run} holds an adapter trained with other settings than the study's `train` "
                             f"({'; '.join(diff)}); delete {run} and its evaluation "
                             f"{out / 'runs' / run.name} to train it again, or give the study another `out`")
        if _finished(run):
            return str(run), False  # finished earlier with these settings: a re-run of the study reuses it
    resume = (run / "checkpoints" / "last").is_dir() or (run / "checkpoints" / "last.old").is_dir()
    tcfg = dataclasses.replace(tcfg, resume=resume)
    if not quiet:
        print(f"training {level.name} (seed {seed}) on {level.data} -> {run}", file=sys.stderr)
    train.run(tcfg, quiet=True)
    return str(run), True


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


def run_study(cfg: StudyConfig, quiet: bool = False) -> dict:
    levels = parse_levels(cfg)
    seeds = [int(s) for s in cfg.seeds] or [0]
    out = Path(cfg.out)
    ev = dict(cfg.eval)
    if cfg.kind == "adapter" and "model" not in ev and cfg.train.get("model"):
        ev["model"] = cfg.train["model"]  # evaluate the model the adapters were trained on
    if cfg.kind == "adapter" and "model" in ev and "model" not in cfg.train:
        cfg.train = {**cfg.train, "model": ev["model"]}
    base = config.build(EvalConfig, ev, {"show": 0, "plot": False}, source="study.eval")
    if base.temperature == 0 and len(seeds) > 1 and cfg.kind != "adapter" and not quiet:
        print("note: greedy decoding (eval.temperature 0): every seed gives the same run; "
              "set eval.temperature > 0 to measure seed variance", file=sys.stderr)
    shared = None
    from .evaluate import evaluate
    from .generation import make_eval_client

    rows = []
    try:
        if cfg.kind != "adapter":
            shared = make_eval_client(base)  # one model for every level and seed
        for lv in levels:
            for seed in seeds:
                changes: dict[str, Any] = {"seed": seed, "out": str(out / "runs" / f"{_slug(lv.name)}-seed{seed}")}
                if cfg.kind == "prompt":
                    changes["word_budget"] = lv.value
                elif cfg.kind == "max_tokens":
                    changes["max_tokens"] = lv.value
                elif lv.adapter:
                    changes["adapter"] = lv.adapter
                else:
                    changes["adapter"], trained = train_level(cfg, lv, seed, out, quiet)
                    if trained:  # an evaluation left in runs/ belongs to an adapter that no longer exists
                        changes["overwrite"] = True
                ecfg = dataclasses.replace(base, **changes)
                s = evaluate(ecfg, client=shared, quiet=True)
                row = {"level": lv.name, "value": lv.value, "seed": seed, "n": s["n"], "accuracy": s["accuracy"],
                       "words_mean": s["words"]["mean"], "words_median": s["words"]["median"],
                       "tokens_mean": s["tokens"]["mean"], "truncation_rate": s["truncation_rate"],
                       "invalid_rate": s["invalid_rate"], "adapter": ecfg.adapter or None, "run": ecfg.out}
                rows.append(row)
                if not quiet:
                    print(f"{lv.name} seed {seed}: accuracy {s['accuracy']:.1%}, {s['words']['mean']} words "
                          f"(n={s['n']})", file=sys.stderr)
    finally:
        if shared is not None:
            import asyncio

            asyncio.run(shared.aclose())
    agg = aggregate(rows, levels)
    result = {"kind": cfg.kind, "seeds": seeds, "eval": config.to_dict(base), "levels": agg, "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.csv", _csv(agg))
    atomic_write_text(out / "runs.csv", _csv(rows))
    plotted = plot(agg, out / "accuracy_vs_words.png", cfg.kind) if cfg.plot else False
    atomic_write_text(out / "report.md", report(cfg, base, agg, plotted))
    write_manifest(out / "manifest.json", "study length", config.to_dict(cfg), plot=plotted, runs=len(rows))
    if not quiet:
        print_table(agg, cfg.kind)
        print(f"wrote {out}/results.json, results.csv, report.md" + (", accuracy_vs_words.png" if plotted else ""))
    return result


# ----------------------------------------------------------------------------- outputs
def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def _pm(mean, std, pct=False) -> str:
    """"mean ± std"; the mean alone when there is no spread to show (std None: a single seed)."""
    if mean is None:
        return "—"
    fmt = "{:.1%}" if pct else "{:.1f}"
    return fmt.format(mean) if std is None else f"{fmt.format(mean)} ± {fmt.format(std)}"


def _one_value_if_one_seed(a: dict) -> dict:
    """A level measured with one seed has no standard deviation: its stds become None (shown as the mean only)."""
    return {k: (None if k.endswith("_std") else v) for k, v in a.items()} if a.get("seeds", 0) <= 1 else a


def _value_label(kind: str) -> str:
    return {"prompt": "word budget", "max_tokens": "max tokens", "adapter": "corpus / adapter"}[kind]


def print_table(agg: list[dict], kind: str, console=None) -> None:
    """The study table within 80 columns: headers whole, the "± std" under its mean (only with several
    seeds), long level values (adapter paths) folded."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    several = any(a.get("seeds", 0) > 1 for a in agg)
    t = Table(title=f"Response-length study ({kind})" + (", mean ± std over seeds" if several else ", one seed"),
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("level", _value_label(kind), "accuracy", "words", "tokens", "truncated", "invalid", "n × seeds"):
        left = col in ("level", _value_label(kind))
        t.add_column(col, justify="left" if left else "right", overflow="fold", no_wrap=col != _value_label(kind),
                     min_width=max(len(w) for w in col.split()))  # headers wrap at spaces, never inside a word
    for a in map(_one_value_if_one_seed, agg):
        cells = [_pm(a["accuracy_mean"], a["accuracy_std"], True), _pm(a["words_mean_mean"], a["words_mean_std"]),
                 _pm(a["tokens_mean_mean"], a["tokens_mean_std"]),
                 _pm(a["truncation_rate_mean"], a["truncation_rate_std"], True),
                 _pm(a["invalid_rate_mean"], a["invalid_rate_std"], True)]
        t.add_row(a["level"], str(a["value"]), *(c.replace(" ± ", "\n± ") for c in cells), f"{a['n']} × {a['seeds']}")
    (console or Console()).print(t)


def plot(agg: list[dict], path: Path, kind: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed (pip install 'mlx_distill[plots]'); no plot written", file=sys.stderr)
        return False
    pts = [a for a in agg if a["words_mean_mean"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([a["words_mean_mean"] for a in pts], [100 * a["accuracy_mean"] for a in pts],
                xerr=[a["words_mean_std"] for a in pts], yerr=[100 * a["accuracy_std"] for a in pts],
                fmt="o-", capsize=3)
    for a in pts:
        ax.annotate(a["level"], (a["words_mean_mean"], 100 * a["accuracy_mean"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlim(left=0)  # words and accuracy are never negative (an error bar must not pull the axis below 0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("mean response words")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy vs response length ({_value_label(kind)})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def report(cfg: StudyConfig, base: EvalConfig, agg: list[dict], plotted: bool) -> str:
    L = ["# Response-length study", "",
         f"- levels induced by **{_value_label(cfg.kind)}** ({cfg.kind}); seeds {list(cfg.seeds)}",
         f"- model `{base.model}`, dataset `{base.dataset}`" + (f" (first {base.limit})" if base.limit else "")
         + f", prompt style `{base.prompt_style}`, temperature {base.temperature}, max tokens {base.max_tokens}",
         "- numbers are mean ± sample standard deviation over seeds; each run's records are under `runs/`", ""]
    if base.temperature == 0 and len(cfg.seeds) > 1 and cfg.kind != "adapter":
        L += ["> Greedy decoding: the seeds do not change the runs, so the std is 0 by construction.", ""]
    L += [f"| level | {_value_label(cfg.kind)} | accuracy | mean words | mean tokens | truncated | invalid | n × seeds |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for a in map(_one_value_if_one_seed, agg):
        L.append(f"| {a['level']} | {a['value']} | {_pm(a['accuracy_mean'], a['accuracy_std'], True)} | "
                 f"{_pm(a['words_mean_mean'], a['words_mean_std'])} | {_pm(a['tokens_mean_mean'], a['tokens_mean_std'])} | "
                 f"{_pm(a['truncation_rate_mean'], a['truncation_rate_std'], True)} | "
                 f"{_pm(a['invalid_rate_mean'], a['invalid_rate_std'], True)} | {a['n']} × {a['seeds']} |")
    if plotted:
        L += ["", "![accuracy against mean words](accuracy_vs_words.png)"]
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mlx_distill study length -c study.yaml [options]\n\n" + (__doc__ or ""))
        return
    if argv[0] != "length":
        raise InputError(f"unknown study {argv[0]!r}; available: length")
    cfg = config.from_cli(StudyConfig, argv[1:], "python -m mlx_distill study length", __doc__)
    run_study(cfg)
