"""The outputs of a response-length study: the table (terminal and report.md), the CSVs and the
accuracy-against-words plot, from the per-level aggregate that `study.assemble` computes."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from mlx_distill.config import EvalConfig, StudyConfig
from mlx_distill.io import save_figure


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


def print_table(agg: list[dict], kind: str, console=None, partial: str = "") -> None:
    """The study table within 80 columns: headers whole, the "± std" under its mean (only with several
    seeds), long level values (adapter paths) folded."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    several = any(a.get("seeds", 0) > 1 for a in agg)
    title = f"Response-length study ({kind})" + (", mean ± std over seeds" if several else ", one seed")
    t = Table(title=f"PARTIAL ({partial}): {title}" if partial else title,
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


def report(cfg: StudyConfig, base: EvalConfig, agg: list[dict], plotted: bool, missing: list[dict] = (),
           cells: int = 0) -> str:
    L = ["# Response-length study", ""]
    if missing:
        L += [f"> **PARTIAL**: {len(missing)} of {cells} cells are not finished, so some levels have fewer seeds "
              "(or none, shown as —) than planned: "
              + "; ".join(f"cell {m['index']} ({m['level']}, seed {m['seed']}: {m['state']})" for m in missing)
              + ". Run them (`--cell I`) and assemble again.", ""]
    L += [
         f"- levels induced by **{_value_label(cfg.kind)}** ({cfg.kind}); seeds {list(cfg.seeds)}",
         f"- model `{base.model}`, dataset `{base.dataset}`" + (f" (first {base.limit})" if base.limit else "")
         + f", prompt style `{base.prompt_style}`, temperature {base.temperature}, max tokens {base.max_tokens}",
         "- numbers are mean ± sample standard deviation over seeds; each run's records are under `cells/<i>-<level>-seed<s>/eval/`", ""]
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
