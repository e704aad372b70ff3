"""`python -m mlx_distill corpus build|stats`: problems -> verified chain-of-thought corpus.

    # DeepSeek-R1 over its hosted API (key in $DEEPSEEK_API_KEY), 200 GSM8K problems, 2 samples each
    python -m mlx_distill corpus build --preset deepseek --source gsm8k --limit 200 --samples 2 --name gsm8k-r1
    # any OpenAI-compatible server (mlx_lm server, vLLM), with length levels R1-R4 written as corpora
    python -m mlx_distill corpus build --base-url http://127.0.0.1:8080/v1 --model default_model \\
        --source math --limit 100 --rewrite-levels R1 R2 R3 R4 --out corpora/math-local
    # a local MLX teacher (batched generation)
    python -m mlx_distill corpus build --teacher mlx --model mlx-community/Qwen2.5-7B-Instruct-4bit --source gsm8k
    # killed, or Ctrl-C? the same command (or --resume --out DIR) continues; nothing is asked twice
    python -m mlx_distill corpus stats corpora/gsm8k-r1
    # a pool of servers of one model (least-outstanding spread; a server that dies is set aside)
    python -m mlx_distill corpus build --base-url http://mac1:8080/v1 http://mac2:8080/v1 --model default_model \
        --concurrency 4 --source gsm8k --out corpora/gsm8k-pool

Every server is probed before any work: one that cannot be reached is an error (a pool starts
when at least one answers). A build where attempts failed for good (after their retries) ends
with status "incomplete", a summary of the failures by kind and exit code 3 (EXIT_INCOMPLETE);
re-running the same command retries them.

Data flow (one job per problem x sample, `--concurrency` of them in flight)::

    problem -> Solver (teacher) -> filters (truncated, marker, loops, banned, length)
            -> Verifier (answers.grade; LLM judge only for unreadable answers; critic score)
            -> traces.jsonl (append + fsync)          ... all samples of a problem final?
            -> Rewriter per level -> re-verify -> rewrites.jsonl (append + fsync)
    end (or Ctrl-C): finalize() derives verified.jsonl, the splits, R*/ level corpora and
    manifest.json from the logs alone, so an interrupted + resumed run ends with the same
    files as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from mlx_distill import config as C
from mlx_distill.interrupts import Interrupted, Interrupts
from mlx_distill.tasks.answers import word_count
from mlx_distill.io import InputError, atomic_write_json, iter_jsonl, public_url, read_json, scrub, sha256_file, versions, \
    write_jsonl
from mlx_distill.tasks.problems import answer_kind, leakage_index, load_problems, normalize_text
from mlx_distill.corpus import filters
from mlx_distill.corpus.agents import load_prompt, text_or_file
from mlx_distill.corpus.store import CorpusStore, RunLock, latest, rewrite_key, trace_key

EXIT_INCOMPLETE = 3  # exit code of a build that ended with attempts failed for good (status "incomplete")
EXIT_EMPTY = 1  # exit code of a finished build that verified nothing (0 of N): an error, not a retry
EXIT_STATUS = ("exit status: 0 a corpus was written; 3 incomplete (requests failed for good: run the same command "
               "again to retry only those); 1 nothing verified (0 of N attempts: the last line names the top three "
               "rejection reasons); 2 bad input; 130/143 interrupted (SIGINT/SIGTERM; the same command continues)")

# settings that change what is asked of the teacher: a folder built with other values is refused
# (unless it holds no finished attempt: see check_identity)
IDENTITY = ("source", "problems", "split", "teacher", "model", "adapter", "temperature", "max_tokens", "seed",
            "system_prompt", "judge_model", "critic", "rewrite_model")


# ----------------------------------------------------------------------------- settings
def out_dir(cfg: C.CorpusConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    name = cfg.name or re.sub(r"[^\w.-]+", "_", cfg.source)
    return Path("corpora") / name


def public_config(cfg: C.CorpusConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["base_url"] = public_url(cfg.base_url) if isinstance(cfg.base_url, str) else [public_url(u) for u in cfg.base_url]
    d["judge_base_url"] = public_url(cfg.judge_base_url)
    return d


def load_prompts(cfg: C.CorpusConfig, kind_names: set[str]) -> dict:
    """name -> Prompt for every template the run uses (hashed into the manifest)."""
    ps = {}
    for kind in sorted(kind_names):
        name = f"solver_{kind}" if cfg.solver_prompt == "auto" else cfg.solver_prompt
        ps[f"solver_{kind}"] = load_prompt(name)
    sys_p = text_or_file(cfg.system_prompt)
    if sys_p:
        ps["system"] = sys_p
    if cfg.judge_model:
        ps["judge"] = load_prompt("judge_correct", ("question", "gold", "response"))
        if cfg.critic:
            ps["critic"] = load_prompt("judge_critic", ("question", "response"))
    for lvl in cfg.rewrite_levels:
        ps[f"rewrite_{lvl}"] = load_prompt(f"rewrite_{lvl.lower()}", ("solution",))
    return ps


def identity(cfg: C.CorpusConfig, prompts: dict) -> dict:
    """What decides the requests: a folder built with other values is refused. Rewrite levels
    are compared level by level, so adding (or leaving out) a level later is allowed."""
    ident = {k: getattr(cfg, k) for k in IDENTITY}
    if cfg.problems:
        ident["problems"] = str(Path(cfg.problems).resolve())
    ident["prompts"] = {k: p.sha256 for k, p in prompts.items() if not k.startswith("rewrite_")}
    ident["rewrite"] = {lvl: {"ratio": cfg.rewrite_ratios.get(lvl),
                              "max_tokens": int(cfg.rewrite_max_tokens.get(lvl, cfg.max_tokens)),
                              "prompt": prompts[f"rewrite_{lvl}"].sha256} for lvl in cfg.rewrite_levels}
    return ident


def finished_attempts(out: Path) -> int:
    """Attempts (solver or rewrite) in the folder's logs whose last line is final (not failed)."""
    return sum(r.get("status") != "failed" for log in ("traces.jsonl", "rewrites.jsonl")
               for r in latest(out / log)[0].values())


def check_identity(out: Path, ident: dict) -> list[str]:
    """Refuse a folder built with other settings. A folder whose every attempt failed (a wrong --model, a
    server that was down) holds nothing made with the old settings: there the change is allowed (with or
    without --resume), and the names of the changed settings are returned (their failed attempts are
    then asked again with the new ones)."""
    man_path = out / "manifest.json"
    if not man_path.is_file():
        return []
    old = read_json(man_path).get("identity") or {}
    diff = {k: (old.get(k), v) for k, v in ident.items() if k in old and old.get(k) != v and k != "rewrite"}
    for lvl, v in ident["rewrite"].items():
        was = (old.get("rewrite") or {}).get(lvl)
        if was is not None and was != v:
            diff[f"rewrite level {lvl}"] = (was, v)
    if diff:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        n = finished_attempts(out)
        if n:
            raise InputError(f"{out}: this corpus was built with other settings ({lines}) and holds {n} finished "
                             "attempt(s) made with them. Use another --out, or the same settings to continue it "
                             "(settings may change only while a folder holds no finished attempt).")
        print(f"note: {out}: settings changed ({lines}); the folder holds only failed attempts, which are asked "
              "again with the new settings", file=sys.stderr)
        return list(diff)
    return []


# the request loop, the classification of an attempt, the clients and the cost: corpus/jobs.py
from mlx_distill.corpus.jobs import Tally, check_clients, cost_usd, format_cost, make_clients, record_usages, \
    run_jobs, status_of


# ----------------------------------------------------------------------------- finalize
def split_of(pid: str, seed: int, valid: float, test: float) -> tuple[str, float]:
    """A stable split for a problem id: growing the corpus never moves a problem between splits."""
    u = int(hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()[:12], 16) / float(16 ** 12)
    return ("valid" if u < valid else "test" if u < valid + test else "train"), u


def assign_splits(pids: list[str], cfg: C.CorpusConfig) -> dict[str, str]:
    out, us = {}, {}
    for pid in pids:
        out[pid], us[pid] = split_of(pid, cfg.seed, cfg.valid_fraction, cfg.test_fraction)
    # tiny corpora: the trainer needs a validation example (and the evaluator a test one)
    for need, frac, least in (("valid", cfg.valid_fraction, 2), ("test", cfg.test_fraction, 3)):
        if frac > 0 and len(pids) >= least and need not in out.values():
            train = sorted((us[p], p) for p in pids if out[p] == "train")
            if len(train) > 1:
                out[train[0][1]] = need
    return out


def corpus_record(p: dict, rec: dict, cfg: C.CorpusConfig, rid: str) -> dict:
    r = {"id": rid, "problem_id": p["id"], "question": p["question"], "reasoning": rec["response"].strip(),
         "answer": p["answer"], "answer_format": rec.get("answer_format") or "####", "source": p["source"],
         "words": rec.get("words"), "model": (rec.get("provenance") or {}).get("model"),
         "tokens": (rec.get("provenance") or {}).get("completion_tokens"), "attempt": rec["key"],
         "verdict_by": (rec.get("verdict") or {}).get("decided_by")}
    if rec.get("level"):
        r["level"] = rec["level"]
    if (rec.get("critic") or {}).get("score") is not None:
        r["critic"] = rec["critic"]["score"]
    if cfg.thinking == "keep" and rec.get("thinking"):
        r["thinking"] = rec["thinking"]
    meta = p.get("meta") or {}
    for k in ("subject", "level", "year"):
        if meta.get(k) is not None:
            r[f"meta_{k}"] = meta[k]
    return r


def kept_traces(problems: list[dict], traces: dict, cfg: C.CorpusConfig) -> list[tuple[dict, dict]]:
    out = []
    for p in problems:
        recs = [traces[k] for s in range(cfg.samples) if (k := trace_key(p["id"], s)) in traces]
        ok = [r for r in recs if status_of(r, cfg)[0] == "verified"]
        if not ok:
            continue
        if cfg.keep == "first":
            ok = ok[:1]
        elif cfg.keep == "shortest":
            ok = [min(ok, key=lambda r: (word_count(r["response"]), r["sample"]))]
        out += [(p, r) for r in ok]
    return out


def write_corpus(folder: Path, records: list[dict], splits: dict[str, str], leaked: set[str], cfg) -> dict:
    """verified.jsonl + train/valid/test.jsonl in `folder`; returns the split sizes."""
    write_jsonl(folder / "verified.jsonl", records)
    parts = {"train": [], "valid": [], "test": []}
    for r in records:
        if cfg.leakage == "drop" and r["problem_id"] in leaked:
            continue
        parts[splits[r["problem_id"]]].append(r)
    for name, rows in parts.items():
        write_jsonl(folder / f"{name}.jsonl", rows)
    return {k: len(v) for k, v in parts.items()}


def summarize(out: Path, cfg: C.CorpusConfig, problems: list[dict]) -> dict:
    """Counts, tokens and cost from the attempt logs alone."""
    traces, trace_lines = latest(out / "traces.jsonl")
    rewrites, rewrite_lines = latest(out / "rewrites.jsonl")
    pids = {p["id"] for p in problems}
    status, reasons, fired_counts, decided, models, finish = Counter(), Counter(), Counter(), Counter(), Counter(), Counter()
    fail_reasons = Counter()
    for k, r in traces.items():
        if r["id"] not in pids:
            continue
        st, why, fired = status_of(r, cfg)
        status[st] += 1
        if st == "rejected":
            reasons[why] += 1
        if st == "failed":
            fail_reasons[why] += 1
        fired_counts.update(fired)
        if r.get("verdict"):
            decided["judge" if r["verdict"]["decided_by"].startswith("judge") else "programmatic"] += 1
            if r["verdict"].get("reason") == "judge unparsable":  # no explicit verdict line: counted apart
                decided["judge unparsable"] += 1
        if r.get("provenance"):
            models[r["provenance"].get("model")] += 1
            finish[r["provenance"].get("finish_reason")] += 1
    tokens = {}
    for path in (out / "traces.jsonl", out / "rewrites.jsonl"):  # every paid request, superseded lines too
        if path.is_file():
            for _, r in iter_jsonl(path, tolerate_torn_tail=True):
                for u in record_usages(r):
                    role = u.get("role", "solver").split(":")[0]
                    t = tokens.setdefault(role, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
                    t["requests"] += 1
                    t["prompt_tokens"] += u.get("prompt_tokens", 0)
                    t["completion_tokens"] += u.get("completion_tokens", 0)
    p_in = sum(t["prompt_tokens"] for t in tokens.values())
    p_out = sum(t["completion_tokens"] for t in tokens.values())
    per_problem = Counter()
    for r in traces.values():
        if r["id"] in pids and status_of(r, cfg)[0] == "verified":
            per_problem[r["id"]] += 1
    return {
        "problems": len(problems), "samples_per_problem": cfg.samples,
        "attempts": {"expected": len(problems) * cfg.samples, "final": sum(status.values()),
                     "log_lines": trace_lines, **{k: status.get(k, 0) for k in ("verified", "rejected", "failed")}},
        "problems_with_verified": len(per_problem),
        "rejected_by": dict(reasons), "failed_by": dict(fail_reasons),
        "filters": {name: fired_counts.get(name, 0) for name in filters.ORDER},
        "verdicts_by": dict(decided), "models_reported": dict(models), "finish_reasons": dict(finish),
        "rewrites": {"log_lines": rewrite_lines, **Counter(status_of(r, cfg)[0] for r in rewrites.values())},
        "tokens": tokens, "prices_usd_per_million": {"input": cfg.price_input, "output": cfg.price_output},
        "cost_usd": None if (usd := cost_usd(cfg, p_in, p_out)) is None else round(usd, 6),
    }


def load_leakage(cfg: C.CorpusConfig, log=None) -> tuple[dict, list, dict]:
    """The leakage index over every evaluation set of the registry. A set that cannot be loaded
    stops the build (before any request is paid for), or with ``--leakage warn`` is a loud warning."""
    index, loaded, missing = leakage_index()
    if missing:
        why = "; ".join(f"{k}: {v}" for k, v in missing.items())
        if cfg.leakage != "warn":
            raise InputError(f"the leakage check cannot load {', '.join(missing)} ({why}). Make them reachable "
                             "(--data folder via MLX_DISTILL_DATA, or the Hugging Face Hub), or pass --leakage warn "
                             "to build without comparing against them")
        (log or (lambda m: print(m, file=sys.stderr)))(
            f"WARNING: leakage check WITHOUT {', '.join(missing)} (not loadable); checked only: "
            f"{', '.join(loaded) or 'nothing'}")
    return index, loaded, missing


def finalize(out: Path, cfg: C.CorpusConfig, problems: list[dict], prompts: dict, extra: dict,
             leakage: Optional[tuple] = None) -> dict:
    traces, _ = latest(out / "traces.jsonl")
    rewrites, _ = latest(out / "rewrites.jsonl")
    kept = kept_traces(problems, traces, cfg)
    many = cfg.keep == "all"
    records = [corpus_record(p, r, cfg, f"{p['id']}#s{r['sample']}" if many else p["id"]) for p, r in kept]
    pids = sorted({r["problem_id"] for r in records})
    splits = assign_splits(pids, cfg)
    # leakage: any verified problem whose normalised text is an evaluation problem
    index, loaded, missing = leakage if leakage is not None else load_leakage(cfg)
    qtext = {p["id"]: p["question"] for p in problems}
    leaks = [{"id": pid, "eval_id": index[n]} for pid in pids if (n := normalize_text(qtext[pid])) in index]
    leaked = {x["id"] for x in leaks}
    sizes = write_corpus(out, records, splits, leaked, cfg)
    levels = {}
    kept_keys = {r["key"]: p for p, r in kept}
    for lvl in cfg.rewrite_levels:
        recs = []
        for key, p in kept_keys.items():
            rw = rewrites.get(rewrite_key(p["id"], lvl))
            if rw is not None and rw["source_key"] == key and status_of(rw, cfg)[0] == "verified":
                recs.append(corpus_record(p, rw, cfg, p["id"]))
        lsizes = write_corpus(out / lvl, recs, splits, leaked, cfg)
        words = [r["words"] for r in recs]
        levels[lvl] = {"dir": str(out / lvl), "records": len(recs), **lsizes,
                       "mean_words": round(sum(words) / len(words), 2) if words else None,
                       "prompt_sha256": prompts[f"rewrite_{lvl}"].sha256 if f"rewrite_{lvl}" in prompts else None,
                       "max_tokens": int(cfg.rewrite_max_tokens.get(lvl, cfg.max_tokens))}
        atomic_write_json(out / lvl / "manifest.json", {
            "stage": "corpus-level", "level": lvl, "parent": str(out), "records": len(recs), "splits": lsizes,
            "mean_words": levels[lvl]["mean_words"], "config": public_config(cfg)})
    words = [r["words"] for r in records]
    summary = summarize(out, cfg, problems)
    # attempts that failed for good (their retries spent): the build is incomplete, and says why
    pids = {p["id"] for p in problems}
    by_kind = Counter((r.get("reason") or "failed").removeprefix("request failed: ")
                      for d in (traces, rewrites) for r in d.values() if r["id"] in pids and r["status"] == "failed")
    extra = dict(extra)
    if extra.get("status") == "complete" and by_kind:
        extra["status"] = "incomplete"
    extra["failures"] = {"attempts": summary["attempts"].get("failed", 0),
                         "rewrites": summary["rewrites"].get("failed", 0), "by_kind": dict(by_kind.most_common())}
    man = {"stage": "corpus", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
           "config": public_config(cfg), "identity": identity(cfg, prompts),
           "prompts": {k: p.describe() for k, p in prompts.items()},
           **summary, "keep": cfg.keep, "verified_records": len(records),
           "mean_words": round(sum(words) / len(words), 2) if words else None,
           "splits": {**sizes, "seed": cfg.seed, "valid_fraction": cfg.valid_fraction,
                      "test_fraction": cfg.test_fraction},
           "leakage": {"checked": loaded, "not_checked": missing, "eval_problems": len(index),
                       "matches": leaks, "action": cfg.leakage},
           "levels": levels, "versions": versions(),
           "files": {f.name: sha256_file(f) for f in sorted(out.glob("*.jsonl"))}}
    man = scrub(man)
    atomic_write_json(out / "manifest.json", man)
    if leaks and cfg.leakage == "error":
        raise InputError(f"{out}: {len(leaks)} verified problem(s) are evaluation problems "
                         f"(e.g. {leaks[0]['id']} = {leaks[0]['eval_id']}); see manifest.json 'leakage'")
    return man


# ----------------------------------------------------------------------------- main
def _progress(enabled: bool, console=None):
    """done/total, verified / rejected / failed and spend so far: a live bar on a terminal, a plain
    line at least every ~10 s otherwise (`mlx_distill.progress.PlainProgress`), so a log shows it too."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or Console(stderr=True)
    if enabled and not console.is_terminal:
        from mlx_distill.progress import PlainProgress

        return PlainProgress("corpus build", unit="attempts", stream=console.file)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("[green]verified {task.fields[verified]}[/] [yellow]rejected {task.fields[rejected]}[/] "
                               "[red]failed {task.fields[failed]}[/] {task.fields[spend]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    disable=not (enabled and console.is_terminal))


def merge_problems(out: Path, current: list[dict]) -> list[dict]:
    """problems.jsonl keeps every problem a run ever used (a smaller --limit later loses nothing)."""
    path = out / "problems.jsonl"
    old = [r for _, r in iter_jsonl(path)] if path.is_file() else []
    seen = {r["id"] for r in old}
    return old + [p for p in current if p["id"] not in seen]


def build(cfg: C.CorpusConfig) -> dict:
    out = out_dir(cfg)
    skipped: list = []
    problems = load_problems(cfg.source, cfg.problems or None, cfg.limit or None, cfg.split or None, skipped=skipped)
    if not problems:
        raise InputError(f"no usable problems from {cfg.problems or cfg.source} ({len(skipped)} skipped)")
    if cfg.samples < 1 or cfg.concurrency < 1:
        raise InputError("--samples and --concurrency must be at least 1")
    unknown = [lvl for lvl in cfg.rewrite_levels if lvl not in cfg.rewrite_ratios]
    if unknown:
        raise InputError(f"rewrite level(s) {unknown} have no target in --rewrite-ratios {cfg.rewrite_ratios}")
    prompts = load_prompts(cfg, {answer_kind(p["source"]) for p in problems})
    ident = identity(cfg, prompts)
    leakage = load_leakage(cfg)
    clients = make_clients(cfg)
    check_clients(clients)  # a server that cannot be reached (or asked its model) stops here, before any work
    stop = Interrupts("saving what has come back (the requests in flight are asked again on a re-run)")
    with RunLock(out), stop:  # SIGINT/SIGTERM cancel the requests (below); the logs so far are finalized
        changed = check_identity(out, ident)
        all_problems = merge_problems(out, problems)
        write_jsonl(out / "problems.jsonl", all_problems)
        if skipped:
            write_jsonl(out / "skipped.jsonl", skipped)
        src = {"source": cfg.source, "path": cfg.problems or None, "loaded": len(problems), "skipped": len(skipped),
               "skipped_by": dict(Counter(s["reason"].split(" (")[0] for s in skipped))}
        if cfg.problems and Path(cfg.problems).is_file():
            src["sha256"] = sha256_file(cfg.problems)
        man_path = out / "manifest.json"
        if not man_path.is_file():  # so that a killed first run can be resumed with --resume
            atomic_write_json(man_path, {"stage": "corpus", "status": "running", "config": public_config(cfg),
                                         "identity": ident})
        store = CorpusStore(out, retry_failed=cfg.retry_failed or bool(changed))
        tally = Tally(cfg)
        status, stats, t0 = "complete", {}, time.perf_counter()
        progress = _progress(cfg.progress)
        try:
            with progress:
                stop.check()
                stats = asyncio.run(_stoppable(run_jobs(cfg, problems, store, prompts, tally, progress, clients),
                                               stop))
        except (KeyboardInterrupt, asyncio.CancelledError):
            status = "interrupted"
        finally:
            store.close()
        elapsed = time.perf_counter() - t0
        man = finalize(out, cfg, all_problems, prompts, {
            "status": status, "problem_source": src, **({"servers": stats["servers"]} if stats.get("servers") else {}),
            "this_run": {"seconds": round(elapsed, 3), "new_traces": store.written["traces"],
                         "new_rewrites": store.written["rewrites"], "client_stats": stats,
                         "problems_per_s": round(tally.c["done"] / elapsed, 3) if elapsed > 0 else None}},
                       leakage)
    print_summary(out, man)
    if status == "interrupted" or stop.requested:
        raise Interrupted(stop.signum or signal.SIGINT)  # exit 130 (SIGINT) / 143 (SIGTERM)
    return man


async def _stoppable(coro, stop: Interrupts):
    """Await `coro`, cancelled at the first SIGINT/SIGTERM (the interrupt policy: the records already
    appended stay; the requests in flight are dropped and asked again on a re-run)."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    stop.on_signal(lambda signum: loop.call_soon_threadsafe(task.cancel))
    if stop.requested:  # the signal came before the callback was in place
        coro.close()
        raise asyncio.CancelledError
    return await coro


def incomplete_message(out: Path, man: dict) -> str:
    f = man.get("failures") or {}
    kinds = ", ".join(f"{k} {v}" for k, v in (f.get("by_kind") or {}).items())
    return (f"corpus {out} is incomplete: {f.get('attempts', 0)} attempt(s) and {f.get('rewrites', 0)} rewrite(s) "
            f"failed for good ({kinds}). Fix the cause (see 'failed by' above and the 'error' field in "
            f"traces.jsonl), then run the same command again (or --resume --out {out}): only those are asked again")


def _or_dash(v) -> str:
    return "—" if v is None else str(v)


def print_summary(out: Path, man: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    a = man.get("attempts", {})
    t = Table(title=f"corpus {out} ({man.get('status', '?')})", show_header=False)
    t.add_row("problems", f"{man.get('problems')} ({man.get('problem_source', {}).get('skipped', 0)} skipped)")
    t.add_row("attempts", f"{a.get('final', 0)}/{a.get('expected', 0)} final: verified {a.get('verified', 0)}, "
              f"rejected {a.get('rejected', 0)}, failed {a.get('failed', 0)}")
    t.add_row("problems with a verified trace", str(man.get("problems_with_verified")))
    t.add_row("rejected by", ", ".join(f"{k} {v}" for k, v in (man.get("rejected_by") or {}).items()) or "-")
    if man.get("failed_by"):
        t.add_row("failed by", ", ".join(f"{k} {v}" for k, v in man["failed_by"].items()))
    t.add_row("verdicts by", ", ".join(f"{k} {v}" for k, v in (man.get("verdicts_by") or {}).items()) or "-")
    t.add_row("models (server-reported)", ", ".join(f"{k} {v}" for k, v in (man.get("models_reported") or {}).items()) or "-")
    t.add_row("verified records", f"{man.get('verified_records')} (keep={man.get('keep')}, mean words {_or_dash(man.get('mean_words'))})")
    s = man.get("splits", {})
    t.add_row("splits", f"train {s.get('train')}, valid {s.get('valid')}, test {s.get('test')} (seed {s.get('seed')})")
    for lvl, d in (man.get("levels") or {}).items():
        t.add_row(f"level {lvl}", f"{d['records']} records, mean words {_or_dash(d['mean_words'])} -> {d['dir']}")
    tok = man.get("tokens", {})
    t.add_row("tokens", ", ".join(f"{k}: {v['prompt_tokens']} in / {v['completion_tokens']} out" for k, v in tok.items()) or "-")
    t.add_row("cost estimate", format_cost(man.get("cost_usd")) + ("" if man.get("cost_usd") is not None else
                                                                    " (no known price)"))
    if (man.get("failures") or {}).get("by_kind"):
        t.add_row("failures by kind", ", ".join(f"{k} {v}" for k, v in man["failures"]["by_kind"].items()))
    for i, (url, n) in enumerate((man.get("servers") or {}).items()):
        t.add_row(f"server {i + 1} (last run)" if i or len(man["servers"]) > 1 else "server (last run)",
                  f"{url}: {n.get('requests', 0)} requests, {n.get('ok', 0)} ok, {n.get('failed', 0)} failed, "
                  f"{n.get('retries', 0)} retries, {n.get('requeued', 0)} re-queued, "
                  f"down {n.get('marked_down', 0)}x")
    lk = man.get("leakage", {})
    t.add_row("leakage", f"{len(lk.get('matches', []))} matches with {', '.join(lk.get('checked', []))} ({lk.get('action')})")
    console.print(t)


def stats(path: str, as_json: bool = False) -> dict:
    out = Path(path)
    man_path = out / "manifest.json"
    if not man_path.is_file():
        raise InputError(f"{out}: no manifest.json; is this a corpus folder (python -m mlx_distill corpus build --out {out})?")
    man = read_json(man_path)
    if man.get("stage") != "corpus":  # e.g. a training run folder: its config is not a corpus's options
        what = f"`{man['stage']}`" if man.get("stage") else "another command (no `stage` in its manifest.json)"
        raise InputError(f"{out}: not a corpus folder: its manifest.json was written by {what}, not `corpus build`; "
                         "give the --out folder of a `corpus build`")
    if "attempts" not in man:  # a run killed before it finished once: count from the logs
        cfg = C.build(C.CorpusConfig, man.get("config") or {}, source=str(man_path))
        problems = [r for _, r in iter_jsonl(out / "problems.jsonl")] if (out / "problems.jsonl").is_file() else []
        man = {**man, **summarize(out, cfg, problems)}
    if as_json:
        print(json.dumps({k: v for k, v in man.items() if k not in ("config", "versions", "identity")}, indent=2))
    else:
        print_summary(out, man)
    return man


def config_from_args(args: argparse.Namespace) -> C.CorpusConfig:
    cfg = C.resolve(C.CorpusConfig, args)
    if not cfg.resume:
        return cfg
    man_path = out_dir(cfg) / "manifest.json"
    if not man_path.is_file():
        raise InputError(f"--resume: nothing to resume in {out_dir(cfg)} (no manifest.json); give --out of an earlier run")
    stored = {k: v for k, v in (read_json(man_path).get("config") or {}).items() if k != "resume"}
    ns = {k: v for k, v in vars(args).items() if k != "config"}
    yaml_values = C.load_yaml(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(C.CorpusConfig)}
    # stored run settings < YAML < flags typed now
    return C.build(C.CorpusConfig, {**stored, **yaml_values}, {k: v for k, v in ns.items() if k in names},
                   source=str(man_path))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("build", "stats", "synth"):
        print("usage: python -m mlx_distill corpus {build,stats,synth} [options]\n\n"
              "  build   solve, verify, filter and rewrite problems into a corpus folder (build -h)\n"
              "  stats   print the summary of an existing corpus folder (stats PATH)\n"
              "  synth   write the generated arithmetic demo corpus (synth -h)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(2)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "synth":
        from mlx_distill.corpus.synth import main as synth_main

        synth_main(rest)
        return
    if cmd == "stats":
        ap = argparse.ArgumentParser(prog="mlx_distill corpus stats", description="Summary of a corpus folder.")
        ap.add_argument("path", help="corpus folder (with manifest.json)")
        ap.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
        a = ap.parse_args(rest)
        stats(a.path, a.json)
        return
    ap = argparse.ArgumentParser(prog="mlx_distill corpus build", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_STATUS)
    C.add_arguments(ap, C.CorpusConfig)
    cfg = config_from_args(ap.parse_args(rest))
    man = build(cfg)
    if man.get("status") == "incomplete":
        print(f"error: {incomplete_message(out_dir(cfg), man)}", file=sys.stderr)
        raise SystemExit(EXIT_INCOMPLETE)
    if not man.get("verified_records"):
        print(f"error: {empty_message(out_dir(cfg), man)}", file=sys.stderr)
        raise SystemExit(EXIT_EMPTY)


def empty_message(out: Path, man: dict) -> str:
    """The last line of a build that verified nothing: how many attempts, and the top three reasons."""
    a = man.get("attempts") or {}
    top = Counter(man.get("rejected_by") or {}).most_common(3)
    why = "; ".join(f"{k} ({v})" for k, v in top) or "no attempt was rejected either"
    return (f"corpus {out} is empty: 0 of {a.get('final', 0)} attempt(s) verified. Top rejection reasons: {why}. "
            "Check the teacher (--model), its prompt and --max-tokens against a few lines of traces.jsonl")


if __name__ == "__main__":
    main()
