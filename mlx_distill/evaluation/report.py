"""Eval reports: report.md (summary, failure kinds, breakdowns, sampled problems, teacher
beside student), lengths.png, and the terminal summary / sample panels."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from mlx_distill.io import atomic_write_text, iter_jsonl, save_figure


def _v(x) -> str:
    """A value for people: None is shown as a dash, never as 'None'."""
    return "\u2014" if x is None else str(x)


def _html(s: str) -> str:
    return (s or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def load_traces(path: str) -> dict[str, dict]:
    """id -> {response, correct?} from another eval's records.jsonl or a corpus (verified/traces JSONL)."""
    p = Path(path)
    if p.is_dir():
        for name in ("records.jsonl", "verified.jsonl", "traces.jsonl", "train.jsonl"):
            if (p / name).is_file():
                p = p / name
                break
    out = {}
    for _, r in iter_jsonl(p):
        pid = r.get("id") or r.get("problem_id")
        if pid is None:
            continue
        text = r.get("response")
        if text is None:
            parts = [f"<think>\n{r['thinking']}\n</think>" if r.get("thinking") else "", r.get("reasoning") or "",
                     r.get("text") or r.get("content") or ""]
            text = "\n\n".join(x for x in parts if x)
            if r.get("answer") is not None and "####" not in text and "\\boxed" not in text:
                text += f"\n#### {r['answer']}"
        out.setdefault(str(pid), {"response": text, "correct": r.get("correct")})
    return out


def write_report(path: Path, summary: dict, records: list[dict], problems: list[dict], compare: str = "",
                 samples: int = 5, seed: int = 0, title: str = "Evaluation") -> None:
    teacher = load_traces(compare) if compare else {}
    L = [f"# {title}", ""]
    L.append(f"- model: `{summary.get('model')}`" + (f", adapter: `{summary['adapter']}`" if summary.get("adapter") else ""))
    L.append(f"- dataset: `{summary.get('dataset')}` ({summary['n']} problems), prompt `{summary.get('prompt')}`")
    lo, hi = summary["accuracy_ci95"]
    L.append(f"- accuracy **{summary['accuracy']:.1%}** (95% CI {lo:.1%} to {hi:.1%}); "
             f"correct {summary['correct']}, wrong {summary['wrong']}, invalid {summary['invalid']}")
    L.append(f"- words mean {_v(summary['words']['mean'])} / median {_v(summary['words']['median'])}; "
             f"tokens mean {_v(summary['tokens']['mean'])}; truncated {summary['truncation_rate']:.1%}")
    a = summary["arithmetic"]
    if a["steps_checked"]:
        L.append(f"- arithmetic steps checked {a['steps_checked']}, wrong {a['steps_wrong']} "
                 f"({a['error_rate']:.1%})")
    if summary.get("judge"):
        j = summary["judge"]
        L.append(f"- LLM judge: accuracy {j['accuracy']}, agreement with the grader {j['agreement']} "
                 f"({j['judged']} judged, {j['undecided']} undecided)")
    ov = summary.get("overlap") or {}
    if ov.get("overlapping"):
        L.append(f"- **overlap with the training corpus: {ov['overlapping']} problems** (policy `{ov['policy']}`)")
    L += ["", "## Most frequent failure kinds", ""]
    if summary["failure_kinds"]:
        L += ["| kind | count | share of failures |", "|---|---:|---:|"]
        nf = sum(summary["failure_kinds"].values())
        L += [f"| {k} | {v} | {v / nf:.0%} |" for k, v in summary["failure_kinds"].items()]
    else:
        L.append("none")
    for key, name in (("by_subject", "subject"), ("by_level", "level")):
        if summary.get(key):
            L += ["", f"## Accuracy by {name}", "", f"| {name} | n | accuracy |", "|---|---:|---:|"]
            L += [f"| {k} | {v['n']} | {v['accuracy']:.1%} |" for k, v in summary[key].items()]
    rng = random.Random(seed)
    idx = sorted(rng.sample(range(len(records)), min(samples, len(records))))
    qs = {p["id"]: p["question"] for p in problems}
    L += ["", "## Sampled problems" + (" (teacher beside student)" if teacher else ""), ""]
    for i in idx:
        r = records[i]
        L += [f"### {r['id']}: {r['status']}" + (f" ({r['failure_kind']})" if r.get("failure_kind") else ""), "",
              f"> {qs.get(r['id'], '').strip()[:1500]}".replace("\n", "\n> "), "",
              f"gold `{r['gold']}`, extracted `{r['extracted']}`, {r['words']} words, finish `{r['finish_reason']}`", ""]
        t = teacher.get(r["id"])
        if teacher:
            tr = t["response"] if t else "(no teacher trace for this id)"
            L += ["<table><tr><th>teacher</th><th>student</th></tr><tr>",
                  f"<td valign=\"top\"><pre>{_html(tr[:4000])}</pre></td>",
                  f"<td valign=\"top\"><pre>{_html(r['response'][:4000])}</pre></td>", "</tr></table>", ""]
        else:
            L += ["```", r["response"][:4000], "```", ""]
    atomic_write_text(path, "\n".join(L) + "\n")


def plot_lengths(records: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed (pip install 'mlx_distill[plots]'); no plot written", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    groups = [(s, [r["words"] for r in records if r["status"] == s]) for s in ("correct", "wrong", "invalid")]
    groups = [(s, w) for s, w in groups if w]
    if groups:
        ax.hist([w for _, w in groups], bins=20, label=[f"{s} ({len(w)})" for s, w in groups], stacked=True)
    ax.set_xlim(left=0)  # words and counts are never negative
    ax.set_ylim(bottom=0)
    ax.set_xlabel("response words")
    ax.set_ylabel("problems")
    ax.legend()
    ax.set_title("Response length by outcome")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def show_samples(records: list[dict], n: int) -> None:
    from rich.console import Console
    from rich.panel import Panel

    con = Console(stderr=False)
    mark = {"correct": "[green]correct[/]", "wrong": "[red]wrong[/]", "invalid": "[yellow]invalid[/]"}
    for r in records[:n]:
        head = (f"{r['id']}  {mark[r['status']]}  extracted={r['extracted']!r} gold={r['gold']!r}  "
                f"{r['words']} words, {r['tokens']} tokens, finish={r['finish_reason']}")
        con.print(Panel(r["response"].strip()[:2000] or "(empty)", title=head, title_align="left"))


def print_summary(s: dict) -> None:
    lo, hi = s["accuracy_ci95"]
    line = (f"accuracy {s['accuracy']:.1%} [{lo:.1%}, {hi:.1%}]  n={s['n']} correct={s['correct']} "
            f"wrong={s['wrong']} invalid={s['invalid']}  words mean={_v(s['words']['mean'])} "
            f"median={_v(s['words']['median'])}  truncated={s['truncation_rate']:.1%}")
    if s.get("throughput_tokens_per_s") is not None:
        line += f"  {s['throughput_tokens_per_s']} tok/s"
    print(line)
    if s.get("grading_limits") is not None:  # invalid answers the grader stopped, apart from unreadable ones
        print("  grading limits (invalid): " + "  ".join(f"{k}={v}" for k, v in s["grading_limits"].items()))
    if s.get("missing"):
        print(f"  {s['missing']} of {s['n']} problems have no prediction and count as invalid; over the "
              f"{s['predicted']} predicted: accuracy {s['accuracy_of_predicted']:.1%}")
