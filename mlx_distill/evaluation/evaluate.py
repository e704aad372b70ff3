"""`python -m mlx_distill eval` (generate + grade) and `python -m mlx_distill grade` (re-grade saved predictions).

    python -m mlx_distill eval --model smollm2 --adapter runs/demo --dataset corpus --data corpora/demo \\
        --max-tokens 128 --out runs/demo/eval --show 2
    python -m mlx_distill eval --backend api --base-url http://127.0.0.1:8080/v1 --model default_model \\
        --dataset math500 --out runs/teacher-math500
    python -m mlx_distill grade --dataset gsm8k --data gsm8k/test.jsonl --predictions preds.jsonl --out summary.json

Flow: a task from the registry (``tasks``) -> its problems (``problems.load_problems``: --data,
then $MLX_DISTILL_DATA, then the Hugging Face Hub) -> honesty check against the adapter's
training questions (``overlap``) -> chat messages from the task's prompt template (the one the
adapter was trained with, when it names one) -> generation (``generation``: a local MLX model
with continuous batching, transformers, or any OpenAI-compatible server) -> grading
(``metrics``/``answers``) -> per-item records, appended as they finish -> summary and report.

Output folder (``--out``)::

    records.jsonl    one line per problem: prompt, response, extracted answer, gold, verdict,
                     tokens, words (with and without <think>), finish reason, latency, ...
                     Appended and fsynced as each problem finishes; re-running the same command
                     (or --resume) skips the finished ones. Rewritten in problem order at the end.
    summary.json     accuracy with a 95% Wilson interval and its standard error, invalid and
                     truncation rates, words/tokens mean and median, arithmetic error rate,
                     MATH subject/level breakdown, throughput, peak memory, parameter count,
                     failure kinds, LLM-judge agreement (when --judge is set)
    report.md        the summary, the most frequent failure kinds, sampled problems with the
                     teacher's trace (--compare) beside the student's
    lengths.png      response words of correct / wrong / invalid answers
    manifest.json    config, versions, data source and hash, prompt hash, few-shot ids, overlap check

An --out folder that holds another evaluation is refused unless --overwrite is given.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from mlx_distill.tasks import answers

from mlx_distill import config, tasks

from mlx_distill.training import trackers
from mlx_distill.tasks.answers import FORMAT_INSTRUCTIONS
from mlx_distill.config import EvalConfig, GradeConfig
from mlx_distill.interrupts import Interrupts
from mlx_distill.generation import full_response, generate, make_eval_client, make_judge_client, parameter_counts, \
    problem_seed, _gather
from mlx_distill.io import InputError, JsonlAppender, atomic_write_json, iter_jsonl, read_json, read_jsonl, scrub, \
    sha256_file, sha256_text, writable_dir, write_jsonl, write_manifest
from mlx_distill.evaluation.metrics import failure_kind, grade_fields, summarise
from mlx_distill.tasks.overlap import adapter_train_config, check_overlap
from mlx_distill.paths import prompt_path
from mlx_distill.tasks.problems import load_problems
from mlx_distill.evaluation.report import plot_lengths, print_summary, show_samples, write_report

OUTPUTS = ("records.jsonl", "summary.json", "report.md", "lengths.png", "manifest.json")
# settings that decide the records: an --out folder evaluated with other values is refused
IDENTITY = ("model", "adapter", "backend", "base_url", "dataset", "data", "split", "answer_kind", "prompt_style",
            "prompt_file", "fewshot", "system_prompt", "word_budget", "max_tokens", "temperature", "top_p", "seed",
            "grade_timeout", "judge", "judge_model", "overlap", "train_data")


# ============================================================================= problems
def load_eval_problems(dataset: str, data: str = "", split: str = "test", limit: int = 0,
                       provenance: Optional[dict] = None, skipped: Optional[list] = None) -> list[dict]:
    """Problems ``{id, question, answer, source, meta}`` of an evaluation set: a registry task
    (``tasks.NAMES``; ``corpus`` = a corpus folder's test split), or a Hugging Face dataset name.
    `skipped`: if a list, the problems that cannot be graded from text (no answer, a figure) are
    appended there with their ``reason``."""
    probs = load_problems(dataset, path=data or None, split=split, provenance=provenance, skipped=skipped)
    if not probs:
        raise InputError(f"--dataset {dataset}: no problems loaded from {data or dataset}"
                         + (f" ({len(skipped)} skipped: {skipped[0].get('reason')} ...)" if skipped else ""))
    return probs[:limit] if limit and limit > 0 else probs


def answer_kind_for(dataset: str, problems: list[dict], wanted: str = "auto") -> str:
    """gsm8k (numeric) or math (math-verify). auto: the task's kind; for a corpus or a user set,
    the records' answer format or source."""
    if wanted != "auto":
        return wanted
    task = tasks.find(dataset)
    if task is not None and not task.needs_data:
        return task.answer_kind
    meta = (problems[0].get("meta") or {}) if problems else {}
    fmt = meta.get("answer_format")
    if fmt in ("####", "boxed"):
        return "gsm8k" if fmt == "####" else "math"
    default = task.answer_kind if task is not None else "math"
    return tasks.answer_kind(str(meta["source"]), default) if meta.get("source") else default


def problem_index(p: dict, position: int) -> int:
    """0-based line of the problem in its data file (for predictions that carry `index`)."""
    meta = p.get("meta") or {}
    if isinstance(meta.get("index"), int):
        return meta["index"]
    m = re.search(r":(\d+)$", str(meta.get("where", "")))
    if m:  # file:line (1-based); a CSV's first line is its header
        return int(m.group(1)) - (2 if str(meta.get("file", "")).lower().endswith(".csv") else 1)
    return position


# ============================================================================= prompts
def answer_format(cfg: EvalConfig, kind: str) -> str:
    """The final-answer format the prompt asks for: "####" or "boxed"."""
    if cfg.prompt_style == "cot_hash":
        return "####"
    if cfg.prompt_style == "cot_boxed":
        return "boxed"
    task = tasks.find(cfg.dataset)
    if task is not None and not task.needs_data:
        return task.answer_format
    return "####" if kind == "gsm8k" else "boxed"


def template_for(cfg: EvalConfig, train_cfg: Optional[dict] = None) -> tuple[str, str]:
    """(path, text) of the user-turn template: --prompt-file; else the template the adapter was
    trained with; else the task's (``tasks.Task.prompt``)."""
    train_cfg = train_cfg or {}
    if cfg.prompt_file:
        p = prompt_path(cfg.prompt_file)
    elif train_cfg.get("prompt_template"):
        p = prompt_path(train_cfg["prompt_template"])
    else:
        task = tasks.find(cfg.dataset)
        p = prompt_path(task.prompt if task else tasks.TASKS["jsonl"].prompt)
    if not Path(p).is_file():
        raise InputError(f"{p}: prompt template not found")
    text = Path(p).read_text()
    if "{question}" not in text:
        raise InputError(f"{p}: a prompt template must contain {{question}}")
    return str(p), text


def render_user(template: str, question: str, fmt: str = "####", budget: str = "") -> str:
    # str.replace, not str.format: templates contain LaTeX braces such as \boxed{}.
    text = (template.replace("{question}", question.strip())
            .replace("{format_instruction}", FORMAT_INSTRUCTIONS[fmt]).rstrip("\n"))
    return f"{text}\n{budget}" if budget else text


def build_messages(question: str, template: str, fmt: str = "####", shots: list[dict] = (), system: str = "",
                   budget: str = "") -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for s in shots:
        msgs += [{"role": "user", "content": render_user(template, s["question"], fmt, budget)},
                 {"role": "assistant", "content": s["solution"]}]
    return msgs + [{"role": "user", "content": render_user(template, question, fmt, budget)}]


def _shot_solution(rec: dict, fmt: str) -> Optional[str]:
    """A worked solution in the format the prompt asks for, from a benchmark train record."""
    sol = str((rec.get("meta") or {}).get("solution") or "").strip()
    if not sol:
        return None
    if "####" in sol:  # GSM8K: drop the calculator annotations <<a*b=c>>
        body = re.sub(r"<<[^<>]*>>", "", sol.rsplit("####", 1)[0]).strip()
    else:
        body = sol
    ans = rec["answer"]
    if fmt == "####":
        return f"{body}\n#### {ans}" if "\\boxed" not in body else None
    return body if "\\boxed" in body else f"{body}\n\nThe final answer is $\\boxed{{{ans}}}$."


def fewshot_examples(dataset: str, n: int, fmt: str, seed: int, exclude: set, data_hint: str = "") -> list[dict]:
    """`n` worked examples drawn (seeded) from the task's few-shot source (``tasks.Task.fewshot``:
    a train split), never one of the evaluated problems. Each is ``{id, question, solution}``."""
    if n <= 0:
        return []
    task = tasks.find(dataset)
    if task is None or task.fewshot is None:
        raise InputError(f"--fewshot {n}: dataset {dataset!r} has no train split to draw examples from; "
                         "use --fewshot 0, or put worked examples in your own --prompt-file")
    src, split = task.fewshot
    pool = [r for r in load_problems(src, split=split) if r["id"] not in exclude and r["question"] not in exclude]
    rng = random.Random(f"fewshot:{seed}:{dataset}")
    rng.shuffle(pool)
    shots = []
    for r in pool:
        sol = _shot_solution(r, fmt)
        if sol:
            shots.append({"id": r["id"], "question": r["question"], "solution": sol})
        if len(shots) == n:
            return shots
    raise InputError(f"--fewshot {n}: only {len(shots)} usable worked examples in {src} ({split})")


def budget_text(words: int) -> str:
    if words <= 0:
        return ""
    return prompt_path("eval_budget.txt").read_text().strip().replace("{words}", str(int(words)))


# ============================================================================= records
def make_record(p: dict, index: int, prompt: str, result, seed: Optional[int], kind: str, timeout: float,
                memory_mb: int = GradeConfig.grade_memory_mb) -> dict:
    meta = p.get("meta") or {}
    rec = {"id": p["id"], "index": index, "source": p.get("source"), "subject": meta.get("subject"),
           "level": meta.get("level"), "prompt": prompt, "seed": seed}
    if isinstance(result, BaseException):
        rec.update(response="", reasoning=None, final="", tokens=0, prompt_tokens=None, finish_reason="error",
                   latency_s=None, model=None, error=f"{type(result).__name__}: {result}"[:500])
    else:
        rec.update(response=full_response(result), reasoning=result.reasoning, final=result.text,
                   tokens=result.completion_tokens, prompt_tokens=result.prompt_tokens,
                   finish_reason=result.finish_reason, latency_s=round(result.latency_s, 4), model=result.model)
    rec.update(grade_fields(rec["response"], p["answer"], kind, timeout, memory_mb))
    if rec["finish_reason"] == "error":
        rec.update(status="invalid", correct=False, reason="generation failed")
    rec["truncated"] = rec["finish_reason"] == "length"
    rec["failure_kind"] = failure_kind(rec)
    return rec


# ============================================================================= judge
def run_judge(judge_client, problems: list[dict], records: list[dict], quiet: bool = False) -> None:
    """Ask a second model whether each response is right; store `judge` (True/False/None) per
    record. None: the judge gave no explicit final verdict line (``answers.parse_verdict``)."""
    template = prompt_path("eval_judge.txt").read_text()
    msgs = []
    for p, r in zip(problems, records):
        resp = r.get("final") or r.get("response") or ""
        text = (template.replace("{question}", p["question"]).replace("{gold}", str(r["gold"]))
                .replace("{response}", resp[-3000:]))
        msgs.append([{"role": "user", "content": text}])

    async def go():
        return await _gather([judge_client.complete(m, temperature=0.0, max_tokens=512) for m in msgs],
                             "judging", quiet)

    for r, res in zip(records, asyncio.run(go())):
        if isinstance(res, BaseException):
            r["judge"], r["judge_raw"] = None, f"error: {res}"[:300]
        else:
            raw = full_response(res)
            r["judge"], r["judge_raw"] = answers.parse_verdict(raw), raw[-300:]


# ============================================================================= the output folder
def identity(cfg: EvalConfig) -> dict:
    ident = {k: getattr(cfg, k) for k in IDENTITY}
    ident["base_url"] = scrub(ident["base_url"])  # one URL or a pool's list, without credentials
    for k in ("adapter", "data", "train_data", "prompt_file"):
        if ident[k] and Path(ident[k]).exists():
            ident[k] = str(Path(ident[k]).resolve())
    return ident


def prepare_out(cfg: EvalConfig, out: Path, log) -> dict[str, dict]:
    """Check --out and return the records already finished there (id -> record).

    A folder holding an evaluation made with other settings is refused (naming them) unless
    --overwrite; the same settings continue where the last run stopped.
    """
    man_path = out / "manifest.json"
    ours = [out / f for f in OUTPUTS if (out / f).exists()]
    if cfg.overwrite:
        for f in ours:
            f.unlink()
        return {}
    if not ours:
        if cfg.resume:
            raise InputError(f"{out}: --resume given but there is no evaluation to resume there")
        return {}
    if not man_path.is_file():
        raise InputError(f"{out}: holds {', '.join(f.name for f in ours)} but no manifest.json; "
                         "pass --overwrite to replace them or choose another --out")
    man = read_json(man_path)
    if man.get("stage") != "eval":
        raise InputError(f"{out}: holds the output of `{man.get('stage')}`, not an evaluation; choose another --out")
    old = man.get("identity") or {}
    now = identity(cfg)
    changed = [k for k in IDENTITY if k in old and old[k] != now[k]]
    if changed:
        what = ", ".join(f"{k}: {old[k]!r} -> {now[k]!r}" for k in changed)
        raise InputError(f"{out}: already holds an evaluation with other settings ({what}); pass --overwrite to "
                         "replace it, or choose another --out")
    done = {}
    if (out / "records.jsonl").is_file():
        for r in read_jsonl(out / "records.jsonl", tolerate_torn_tail=True):
            if r.get("finish_reason") != "error":  # failed requests are asked again
                done[str(r["id"])] = r
    return done


# ============================================================================= the eval stage
class Stopped(Exception):
    """A request not started because a SIGINT/SIGTERM came (it is asked on the re-run)."""


class _Gated:
    """`client.complete` with at most `n` requests in flight (the client's batch or concurrency):
    after a signal, the requests in hand finish and are saved, the ones not started end as
    `Stopped`. (A continuous-batching client takes the next request as one finishes, as before.)"""

    def __init__(self, client, stop: Interrupts):
        self.client, self.stop = client, stop
        n = getattr(client, "capacity", None) or getattr(client, "batch_size", None) or getattr(client, "concurrency", 1)
        self.sem = asyncio.Semaphore(max(1, int(n)))

    async def complete(self, messages, **kw):
        async with self.sem:
            if self.stop.requested:
                raise Stopped
            return await self.client.complete(messages, **kw)


def close_client(client) -> None:
    """Close a client after its requests ran in an event loop that is gone now (each `generate` is
    an ``asyncio.run``): the connections a keep-alive server (vLLM, any HTTP/1.1 server) left open
    belonged to that loop, and closing them from a new one raises "Event loop is closed" after
    every record was saved. They are dead already; that one error is not the run's."""
    try:
        asyncio.run(client.aclose())
    except RuntimeError as e:
        if "Event loop is closed" not in str(e):
            raise


def evaluate(cfg: EvalConfig, client=None, quiet: bool = False, write: bool = True) -> dict:
    """Generate, grade and write records/summary/report to ``cfg.out``; return the summary.

    `client`: an already-built client (the length study reuses one model across levels);
    otherwise one is made from the config and closed at the end. With `write`, finished
    records are appended to ``records.jsonl`` as they land and an interrupted run continues.
    SIGINT/SIGTERM (whatever disposition was inherited): the requests in flight finish and are
    saved, then `Interrupted` (exit 130/143); the same command continues.
    """
    with Interrupts("finishing the requests in flight, then saving") as stop:
        summary = _evaluate(cfg, client, quiet, write, stop)
    stop.check()  # a signal after the last request: everything is saved, and the exit status says it came
    return summary


def _evaluate(cfg: EvalConfig, client, quiet: bool, write: bool, stop: Interrupts) -> dict:
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    out = Path(cfg.out)
    trackers.require(cfg.report_to if write else [])  # --report-to names an installed tracker, before any work
    source: dict = {}
    skipped: list[dict] = []
    problems = load_eval_problems(cfg.dataset, cfg.data, cfg.split, cfg.limit, provenance=source, skipped=skipped)
    skipped = [{"id": str(s.get("id")), "reason": s.get("reason")} for s in skipped]
    if skipped:  # said, and recorded in the manifest: a skipped problem is never silently out of the denominator
        reasons = Counter(s["reason"].split(" (")[0] for s in skipped)
        log(f"skipped {len(skipped)} problem(s) that cannot be graded from text ("
            + ", ".join(f"{k}: {v}" for k, v in reasons.items()) + "): "
            + ", ".join(s["id"] for s in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
            + "; their ids are in manifest.json 'skipped'")
    kind = answer_kind_for(cfg.dataset, problems, cfg.answer_kind)
    problems, overlap = check_overlap(cfg.overlap, problems, cfg.adapter, cfg.train_data, log)
    seen = set(overlap["ids"]) if overlap.get("flagged") else set()
    if not problems:
        raise InputError("no problems left to evaluate")
    train_cfg = adapter_train_config(cfg.adapter)
    tpl_path, template = template_for(cfg, train_cfg)
    fmt = answer_format(cfg, kind)
    shots = fewshot_examples(cfg.dataset, cfg.fewshot, fmt, cfg.seed,
                             {p["id"] for p in problems} | {p["question"] for p in problems})
    system = cfg.system_prompt
    if not system and train_cfg.get("system_prompt"):
        system = train_cfg["system_prompt"]
        log(f"using the adapter's training system prompt: {system!r}")
    budget = budget_text(cfg.word_budget)
    messages = [build_messages(p["question"], template, fmt, shots, system, budget) for p in problems]
    prompts = [m[-1]["content"] for m in messages]
    seeds = [problem_seed(cfg.seed, p["id"]) for p in problems] if cfg.temperature > 0 else [None] * len(problems)
    indices = [problem_index(p, i) for i, p in enumerate(problems)]
    ident = identity(cfg)
    man_extra = dict(identity=ident, data=_data_provenance(source),
                     prompt_template={"path": tpl_path, "sha256": sha256_text(template), "answer_format": fmt},
                     fewshot_ids=[s["id"] for s in shots], overlap=overlap, answer_kind=kind, skipped=skipped)

    done: dict[str, dict] = {}
    if write:
        done = prepare_out(cfg, out, log)
        if done and all(p["id"] in done for p in problems) and (out / "summary.json").is_file():
            return _already_complete(out, problems, done, quiet)
        writable_dir(out)  # a --out that cannot be made or written: one error line, before the model loads
        if done:
            log(f"resuming {out}: {sum(p['id'] in done for p in problems)} of {len(problems)} problems already done")
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out / "manifest.json", "eval", config.to_dict(cfg), status="running", **man_extra)
    todo = [i for i, p in enumerate(problems) if p["id"] not in done]

    own = client is None
    if own and todo:
        log(f"loading {cfg.model}" + (f" + adapter {cfg.adapter}" if cfg.adapter else "") + f" ({cfg.backend})")
        client = make_eval_client(cfg)
    mx = None
    if getattr(client, "kind", "") == "mlx":
        import mlx.core as mx

        mx.reset_peak_memory()
    appender = JsonlAppender(out / "records.jsonl") if write else None
    new: dict[int, dict] = {}

    def on_done(j: int, result) -> None:
        if isinstance(result, Stopped):
            return
        i = todo[j]
        rec = make_record(problems[i], indices[i], prompts[i], result, seeds[i], kind, cfg.grade_timeout,
                          cfg.grade_memory_mb)
        new[i] = rec
        if appender is not None:
            appender.write(rec)

    wall = 0.0
    try:
        if todo:
            _, wall = generate(_Gated(client, stop), [messages[i] for i in todo], [seeds[i] for i in todo], cfg, quiet,
                               on_done)
        if len(new) < len(todo):  # stopped by a signal: the finished records are appended; the rest on a re-run
            stop.check(f"{len(new)} of {len(todo)} problems generated")
    finally:
        if appender is not None:
            appender.close()
        if own and client is not None:
            close_client(client)
    peak = round(mx.get_peak_memory() / 1e9, 3) if mx is not None else None
    records = [new[i] if i in new else done[p["id"]] for i, p in enumerate(problems)]
    for r in records:
        if r["id"] in seen:
            r["seen_in_training"] = True
    failed = [r for r in records if r["finish_reason"] == "error"]
    if failed:
        log(f"warning: {len(failed)} request(s) failed (first: {failed[0]['error']}); counted as invalid")
    if cfg.judge:
        jc = make_judge_client(cfg)
        try:
            run_judge(jc, problems, records, quiet)
        finally:
            asyncio.run(jc.aclose())
    gen_tokens = sum(new[i]["tokens"] or 0 for i in new)
    desc = client.describe() if client is not None and hasattr(client, "describe") else {}
    summary = summarise(
        records, dataset=cfg.dataset, answer_kind=kind, model=desc.get("model", cfg.model),
        adapter=cfg.adapter or None, backend=cfg.backend, prompt=Path(tpl_path).name, answer_format=fmt,
        fewshot=cfg.fewshot, word_budget=cfg.word_budget, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
        seed=cfg.seed, generated_this_run=len(new), resumed=len(problems) - len(new),
        generated_tokens=gen_tokens, generation_s=round(wall, 3),
        throughput_tokens_per_s=round(gen_tokens / wall, 2) if wall > 0 else None,
        problems_per_s=round(len(new) / wall, 4) if wall > 0 else None,
        peak_memory_gb=peak, parameters=parameter_counts(client) if client is not None else None, overlap=overlap,
        served_models=sorted({r["model"] for r in records if r.get("model")}))
    if write:
        written = [out / "records.jsonl", out / "summary.json", out / "report.md"]
        write_jsonl(out / "records.jsonl", records)
        atomic_write_json(out / "summary.json", summary)
        write_report(out / "report.md", summary, records, problems, cfg.compare, cfg.report_samples, cfg.seed)
        plotted = plot_lengths(records, out / "lengths.png") if cfg.plot else False
        if plotted:
            written.append(out / "lengths.png")
        write_manifest(out / "manifest.json", "eval", config.to_dict(cfg), status="complete", client=desc,
                       **man_extra, plot=plotted, counts={"n": summary["n"], "correct": summary["correct"]})
        written.append(out / "manifest.json")
        trackers.report_summary(cfg, out, summary, "eval")  # --report-to: the summary to W&B / TensorBoard
    if not quiet:
        if cfg.show:
            show_samples(records, cfg.show)
        print_summary(summary)
        if write:
            print("wrote " + ", ".join(str(f) for f in written))
    return summary


def _already_complete(out: Path, problems: list[dict], done: dict[str, dict], quiet: bool) -> dict:
    """The summary of exactly the problems asked for, from the finished records in `out`: the
    folder's own summary when they are all of it; when they are fewer (``--limit 10`` onto a
    finished 20-problem evaluation), a summary of those alone, said as such (summary.json keeps
    the whole evaluation; nothing is rewritten)."""
    summary = read_json(out / "summary.json")
    if summary.get("n") != len(problems):
        keep = ("dataset", "answer_kind", "model", "adapter", "backend", "prompt", "answer_format", "fewshot",
                "word_budget", "max_tokens", "temperature", "seed")
        whole = summary.get("n")
        summary = summarise([done[p["id"]] for p in problems], **{k: summary[k] for k in keep if k in summary},
                            subset_of=whole)
        msg = (f"{out}: this evaluation is already complete ({whole} problems); the {len(problems)} asked for are "
               f"among them, so nothing to do. The summary below is of those {len(problems)} problems "
               f"(n={len(problems)}); {out}/summary.json keeps all {whole}")
    else:
        msg = f"{out}: this evaluation is already complete ({len(problems)} problems); nothing to do"
    if not quiet:
        print(msg + " (--overwrite redoes it)")
        print_summary(summary)
    return summary


def _data_provenance(source: dict) -> dict:
    """Where the problems came from: a file (with its sha256) or a Hub dataset."""
    info = dict(source)
    if info.get("kind") == "file" and info.get("path") and Path(info["path"]).is_file():
        info["sha256"] = sha256_file(info["path"])
    return info


def main(argv=None) -> None:
    evaluate(config.from_cli(EvalConfig, argv, "python -m mlx_distill eval", __doc__))


# ============================================================================= the grade stage
def grade_predictions(cfg: GradeConfig) -> dict:
    """Re-grade saved predictions against a dataset, without a model.

    Every problem of the dataset (its first --limit, if given) is in the denominator: a problem
    with no prediction counts as invalid ("missing prediction"). The summary gives both
    `accuracy` (over all) and `accuracy_of_predicted`.
    """
    if not cfg.predictions or not cfg.out:
        raise InputError("grade needs --predictions PREDS.jsonl and --out SUMMARY.json")
    problems = load_eval_problems(cfg.dataset, cfg.data, cfg.split, cfg.limit)
    kind = answer_kind_for(cfg.dataset, problems, cfg.answer_kind)
    by_id = {p["id"]: p for p in problems}
    by_index = {problem_index(p, i): p for i, p in enumerate(problems)}
    graded: dict[str, dict] = {}
    for line, pred in iter_jsonl(cfg.predictions):
        where = f"{cfg.predictions}:{line}"
        if "response" not in pred or not isinstance(pred["response"], str):
            raise InputError(f"{where}: each prediction needs a string `response`")
        if pred.get("id") is not None:
            p = by_id.get(str(pred["id"]))
            if p is None:
                raise InputError(f"{where}: id {pred['id']!r} is not in {cfg.data or cfg.dataset}"
                                 + (f" (its first {cfg.limit})" if cfg.limit else "")
                                 + f" (ids look like {problems[0]['id']!r}); or give `index` (0-based data line)")
        elif pred.get("index") is not None:
            if not isinstance(pred["index"], int) or pred["index"] not in by_index:
                raise InputError(f"{where}: index {pred['index']!r} is out of range 0..{len(problems) - 1}")
            p = by_index[pred["index"]]
        else:
            raise InputError(f"{where}: a prediction needs `id` or `index` (0-based line of the data file)")
        if p["id"] in graded:
            raise InputError(f"{where}: a second prediction for {p['id']}; give one per problem")
        meta = p.get("meta") or {}
        rec = {"id": p["id"], "index": pred.get("index"), "subject": meta.get("subject"), "level": meta.get("level"),
               "response": pred["response"], "tokens": pred.get("tokens"),
               "finish_reason": pred.get("finish_reason"), "latency_s": pred.get("latency_s")}
        rec.update(grade_fields(pred["response"], p["answer"], kind, cfg.grade_timeout, cfg.grade_memory_mb))
        rec["truncated"] = rec["finish_reason"] == "length"
        rec["failure_kind"] = failure_kind(rec)
        graded[p["id"]] = rec
    if not graded:
        raise InputError(f"{cfg.predictions}: no predictions")
    records = []
    for i, p in enumerate(problems):
        rec = graded.get(p["id"])
        if rec is None:
            meta = p.get("meta") or {}
            rec = {"id": p["id"], "index": problem_index(p, i), "subject": meta.get("subject"),
                   "level": meta.get("level"), "response": "", "tokens": None, "finish_reason": None,
                   "latency_s": None, "extracted": None, "gold": answers.grade("", p["answer"], kind).gold,
                   "correct": False, "status": "invalid", "reason": "missing prediction", "missing": True}
            rec["failure_kind"] = failure_kind(rec)
        records.append(rec)
    predicted = len(graded)
    correct_predicted = sum(bool(r["correct"]) for r in graded.values())
    summary = summarise(records, dataset=cfg.dataset, answer_kind=kind, predictions=str(cfg.predictions),
                        problems_in_dataset=len(problems), predicted=predicted, missing=len(problems) - predicted,
                        accuracy_of_predicted=round(correct_predicted / predicted, 4))
    out = Path(cfg.out)
    atomic_write_json(out, summary)
    write_jsonl(out.with_name(out.stem + ".records.jsonl"), records)
    return summary


def grade_main(argv=None) -> None:
    cfg = config.from_cli(GradeConfig, argv, "python -m mlx_distill grade", grade_predictions.__doc__)
    s = grade_predictions(cfg)
    print_summary(s)
    out = Path(cfg.out)
    print(f"wrote {out}, {out.with_name(out.stem + '.records.jsonl')}")
