"""The request loop of `corpus build`: solve, verify, filter and rewrite every attempt not yet final.

One job per problem x sample (and per rewrite level once all samples of a problem are final),
``--concurrency`` of them in flight per server; each finished attempt is appended to the store
(traces.jsonl / rewrites.jsonl, fsynced) as it lands. Stopping (Ctrl-C, SIGTERM: the build cancels
the loop) drops the requests in flight; a re-run asks exactly those again. Also here: how a stored
attempt is classified (the same function live and at the end), the clients, and the cost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from typing import Optional

from mlx_distill import config as C
from mlx_distill.corpus import filters
from mlx_distill.corpus.agents import Rewriter, Solver, Verifier
from mlx_distill.corpus.store import CorpusStore, rewrite_key, trace_key
from mlx_distill.generation import make_client
from mlx_distill.generation.clients import PRESETS, ClientError, MLXClient, base_urls, is_local
from mlx_distill.io import InputError, public_url
from mlx_distill.tasks.answers import word_count
from mlx_distill.tasks.problems import answer_kind

# ----------------------------------------------------------------------------- classification
def classify(rec: dict, cfg: C.CorpusConfig) -> list[str]:
    """The filters that fire on a stored attempt under `cfg` (the same function live and at the end)."""
    prov = rec.get("provenance") or {}
    thinking = rec.get("thinking") if cfg.thinking == "keep" else None
    fired = filters.check(rec.get("response") or "", prov.get("finish_reason", ""), prov.get("completion_tokens", 0),
                          thinking=thinking, max_words=cfg.max_words if rec.get("level") is None else 0,
                          max_tokens=cfg.max_solution_tokens if rec.get("level") is None else 0,
                          repeat_ngram=cfg.repeat_ngram, repeat_count=cfg.repeat_count,
                          banned_phrases=cfg.banned_phrases)
    v = rec.get("verdict") or {}
    if v.get("status") == "wrong":
        fired.append("wrong_answer")
    elif v.get("status") == "invalid" and "no_marker" not in fired:
        fired.append("unparsable")
    score = (rec.get("critic") or {}).get("score")
    if cfg.min_critic and rec.get("critic") is not None and (score or 0) < cfg.min_critic:
        fired.append("critic_low")
    return sorted(set(fired), key=filters.ORDER.index)


def status_of(rec: dict, cfg: C.CorpusConfig) -> tuple[str, Optional[str], list[str]]:
    if rec["status"] == "failed":
        return "failed", rec.get("reason"), []
    fired = classify(rec, cfg)
    return ("rejected" if fired else "verified"), filters.primary(fired), fired


# ----------------------------------------------------------------------------- the async run
class Tally:
    """Live counters for the progress bar."""

    def __init__(self, cfg: C.CorpusConfig):
        self.cfg = cfg
        self.c = Counter()
        self.prompt_tokens = self.completion_tokens = 0

    def add_usage(self, *usages: dict) -> None:
        for u in usages:
            if u:
                self.prompt_tokens += u.get("prompt_tokens", 0)
                self.completion_tokens += u.get("completion_tokens", 0)

    @property
    def cost(self) -> Optional[float]:
        return cost_usd(self.cfg, self.prompt_tokens, self.completion_tokens)


def teacher_urls(cfg: C.CorpusConfig) -> list[str]:
    """The teacher's base URL(s), a preset's when none is given."""
    return base_urls(cfg.base_url) or base_urls(PRESETS.get(cfg.preset or "", {}).get("base_url"))


def prices_known(cfg: C.CorpusConfig) -> bool:
    """Whether --price-input/--price-output price this teacher. Prices set to anything but their defaults
    (DeepSeek's list prices) always apply; the defaults only to a DeepSeek model on a server that is not
    on this machine. A local server (loopback), or a model whose price is not known, has an unknown cost."""
    f = {x.name: x.default for x in dataclasses.fields(C.CorpusConfig)}
    if (cfg.price_input, cfg.price_output) != (f["price_input"], f["price_output"]):
        return True
    model = cfg.model or PRESETS.get(cfg.preset or "", {}).get("model") or ""
    urls = teacher_urls(cfg)
    return bool(urls) and model.lower().startswith("deepseek") and not any(is_local(u) for u in urls)


def cost_usd(cfg: C.CorpusConfig, prompt_tokens: int, completion_tokens: int) -> Optional[float]:
    """The API prices x tokens; None when the price is unknown (`prices_known`); a local MLX teacher
    costs nothing here."""
    if cfg.teacher == "mlx":
        return 0.0
    if not prices_known(cfg):
        return None
    return (prompt_tokens * cfg.price_input + completion_tokens * cfg.price_output) / 1e6


def format_cost(usd: Optional[float]) -> str:
    return "—" if usd is None else f"${usd:.4f}"


def record_usages(rec: dict) -> list[dict]:
    """Token usage of every request behind one attempt (solver/rewriter, judge, critic)."""
    out = []
    p = rec.get("provenance") or {}
    if p.get("prompt_tokens") is not None:
        out.append({"role": p.get("role", "solver"), "prompt_tokens": p.get("prompt_tokens", 0),
                    "completion_tokens": p.get("completion_tokens", 0)})
    if (rec.get("verdict") or {}).get("judge"):
        out.append(rec["verdict"]["judge"])
    if rec.get("critic"):
        out.append(rec["critic"])
    return out


def make_clients(cfg: C.CorpusConfig) -> dict:
    """teacher, judge (or None), rewriter (or None): made before anything is written, so a missing
    API key or model fails at once. The judge / rewriter reuse the teacher unless another model is named."""
    model = cfg.model or None
    if cfg.teacher == "mlx" and model:
        from mlx_distill.models import resolve_model  # 'smollm2' = the embedded SmolLM2-135M-Instruct

        model = resolve_model(model)
    teacher = make_client(cfg.teacher, preset=cfg.preset or None, base_url=cfg.base_url or None,
                          model=model, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                          rpm=cfg.rpm or None, tpm=cfg.tpm or None, max_retries=cfg.max_retries,
                          timeout=cfg.timeout, backoff_base=cfg.backoff, adapter_path=cfg.adapter or None,
                          batch_size=cfg.concurrency)

    def second(model: str, base_url: str = "", key_env: str = ""):
        if not model or (model == cfg.model and not base_url):
            return teacher
        if isinstance(teacher, MLXClient):
            return MLXClient(model, batch_size=cfg.concurrency)
        if hasattr(teacher, "with_model") and not base_url:
            return teacher.with_model(model, key_env or None)  # a pool: the same servers, their rate limits shared
        same_host = not base_url or base_url.rstrip("/") == teacher.base_url
        return make_client("api", base_url=base_url or teacher.base_url, model=model,  # (a pool: its first server)
                           api_key_env=key_env or teacher.api_key_env, concurrency=cfg.concurrency,
                           rpm=cfg.rpm or None, tpm=cfg.tpm or None, max_retries=cfg.max_retries,
                           timeout=cfg.timeout, backoff_base=cfg.backoff,
                           limiter=getattr(teacher, "limiter", None) if same_host else None)

    judge = second(cfg.judge_model, cfg.judge_base_url, cfg.judge_api_key_env) if cfg.judge_model else None
    rewriter = second(cfg.rewrite_model) if cfg.rewrite_levels else None
    return {"teacher": teacher, "judge": judge, "rewriter": rewriter}


def check_clients(clients: dict) -> None:
    """Before any work: every server the run will talk to answers (a pool: at least one of its servers),
    and a model name left to the server can be looked up; otherwise an InputError saying what to do."""
    seen = set()
    for role, c in clients.items():
        if c is None or id(c) in seen or not hasattr(c, "check"):
            continue
        seen.add(id(c))
        c.check()


def client_stats(clients: dict) -> dict:
    """This run's counts: per client role, and per server (summed over the roles that used it)."""
    teacher, judge = clients["teacher"], clients["judge"]
    out = {"teacher": dict(teacher.stats), **({"judge": dict(judge.stats)} if judge not in (None, teacher) else {})}
    servers: dict = {}
    for c in {id(c): c for c in clients.values() if c is not None}.values():
        for url, counts in (c.server_stats() if hasattr(c, "server_stats") else {}).items():
            row = servers.setdefault(url, {})
            for k, v in counts.items():
                row[k] = row.get(k, 0) + v
    if servers:
        out["servers"] = servers
    return out


def solver_record(base: dict, p: dict, c, verdict: dict, critic: Optional[dict], prov: dict,
                  cfg: C.CorpusConfig) -> dict:
    """The trace record of a solver completion `c` (its status decided by `status_of`)."""
    rec = {**base, "status": "", "reason": None, "filters": [], "response": c.text, "thinking": c.reasoning,
           "answer_format": filters.final_marker(c.text), "extracted": verdict.get("extracted"),
           "gold": p["answer"], "words": word_count(c.text), "verdict": verdict, "critic": critic,
           "provenance": {"role": "solver", "model": c.model, "requested_model": prov["model"],
                          "teacher": prov["teacher"], "base_url": prov["base_url"],
                          "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                          "completion_tokens": c.completion_tokens, "latency_s": round(c.latency_s, 4),
                          "attempts": c.attempts, "seed": prov["seed"], "temperature": prov["temperature"],
                          "max_tokens": prov["max_tokens"], "prompt_sha256": prov["prompt_sha256"],
                          "time": prov["time"]}}
    rec["status"], rec["reason"], rec["filters"] = status_of(rec, cfg)
    return rec


def rewrite_record(base: dict, p: dict, c, verdict: dict, src: dict, lvl: str, seed, prompt_sha256: str,
                   t0: float, cfg: C.CorpusConfig) -> dict:
    """The rewrite record of a rewriter completion `c` of `src` at level `lvl`."""
    rec = {**base, "status": "", "reason": None, "filters": [], "response": c.text,
           "answer_format": filters.final_marker(c.text), "extracted": verdict.get("extracted"),
           "gold": p["answer"], "words": word_count(c.text), "source_words": src.get("words"), "verdict": verdict,
           "provenance": {"role": f"rewriter:{lvl}", "model": c.model, "finish_reason": c.finish_reason,
                          "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                          "latency_s": round(c.latency_s, 4), "attempts": c.attempts, "seed": seed,
                          "max_tokens": int(cfg.rewrite_max_tokens.get(lvl, cfg.max_tokens)),
                          "prompt_sha256": prompt_sha256, "time": t0}}
    rec["status"], rec["reason"], rec["filters"] = status_of(rec, cfg)
    return rec


async def run_jobs(cfg: C.CorpusConfig, problems: list[dict], store: CorpusStore, prompts: dict,
                   tally: Tally, progress=None, clients: Optional[dict] = None) -> dict:
    """Solve, verify and rewrite everything not yet final in `store`; closes the clients. Returns their stats."""
    clients = clients or make_clients(cfg)
    teacher, judge, rewriter_client = clients["teacher"], clients["judge"], clients["rewriter"]
    system = prompts.get("system")
    solvers = {k[len("solver_"):]: Solver(teacher, p, system, cfg.temperature, cfg.max_tokens, cfg.seed)
               for k, p in prompts.items() if k.startswith("solver_")}
    verifier = Verifier(judge, prompts.get("judge"), prompts.get("critic"), cfg.grade_timeout, cfg.max_tokens,
                        grade_memory_mb=cfg.grade_memory_mb)
    rewriter = Rewriter(rewriter_client, {lvl: prompts[f"rewrite_{lvl}"] for lvl in cfg.rewrite_levels},
                        cfg.rewrite_max_tokens, cfg.rewrite_ratios, cfg.max_tokens, cfg.temperature,
                        cfg.seed) if cfg.rewrite_levels else None
    teacher_desc = teacher.describe()
    teacher_url = teacher_desc.get("base_url", "")
    teacher_url = teacher_url if isinstance(teacher_url, str) else ""  # a pool: each record names its server

    queue: asyncio.Queue = asyncio.Queue()
    left: dict[str, int] = {}
    by_id = {p["id"]: p for p in problems}
    for p in problems:
        keys = [trace_key(p["id"], s) for s in range(cfg.samples)]
        todo = [s for s, k in enumerate(keys) if not store.trace_done(k)]
        left[p["id"]] = len(todo)
        for s in todo:
            queue.put_nowait(("solve", p, s))
    total = queue.qsize()

    def rewrite_source(pid: str) -> Optional[dict]:
        cands = [store.traces.get(trace_key(pid, s)) for s in range(cfg.samples)]
        ok = [r for r in cands if r is not None and status_of(r, cfg)[0] == "verified"]
        if not ok:
            return None
        return min(ok, key=lambda r: word_count(r["response"])) if cfg.keep == "shortest" else ok[0]

    def schedule_rewrites(pid: str) -> int:
        n = 0
        src = rewrite_source(pid) if rewriter else None
        if src is None:
            return 0
        for lvl in cfg.rewrite_levels:
            if not store.rewrite_done(rewrite_key(pid, lvl)):
                queue.put_nowait(("rewrite", by_id[pid], (lvl, src)))
                n += 1
        return n

    for pid, n in left.items():
        if n == 0:
            total += schedule_rewrites(pid)
    task = (progress.add_task("corpus", total=total, verified=0, rejected=0, failed=0, spend=format_cost(tally.cost))
            if progress else None)

    def tick(rec: dict, status: str) -> None:
        tally.c[status] += 1
        tally.c["done"] += 1
        tally.add_usage(*record_usages(rec))
        if progress:
            progress.update(task, advance=1, verified=tally.c["verified"], rejected=tally.c["rejected"],
                            failed=tally.c["failed"], spend=format_cost(tally.cost))

    async def verify_and_filter(p: dict, text: str, thinking: Optional[str], finish: str, ntok: int,
                                is_rewrite: bool) -> tuple[dict, Optional[dict]]:
        cheap = filters.check(text, finish, ntok, thinking=thinking if cfg.thinking == "keep" else None,
                              max_words=0 if is_rewrite else cfg.max_words,
                              max_tokens=0 if is_rewrite else cfg.max_solution_tokens,
                              repeat_ngram=cfg.repeat_ngram, repeat_count=cfg.repeat_count,
                              banned_phrases=cfg.banned_phrases)
        verdict = await verifier.verify(p, text, answer_kind(p["source"]), allow_judge=not cheap)
        critic = None
        if cfg.critic and judge is not None and not cheap and verdict["status"] == "correct" and not is_rewrite:
            critic = await verifier.critic(p, text)
        return verdict, critic

    async def solve(p: dict, s: int) -> None:
        key = trace_key(p["id"], s)
        kind = answer_kind(p["source"])
        base = {"key": key, "id": p["id"], "sample": s, "source": p["source"], "kind": kind}
        t0 = time.time()
        try:
            c, seed = await solvers[kind].solve(p, s)
        except (ClientError, InputError, ValueError, RuntimeError, OSError) as e:
            rec = {**base, "status": "failed", "reason": f"request failed: {getattr(e, 'kind', type(e).__name__)}",
                   "error": str(e)[:500], "attempts": getattr(e, "attempts", 1), "time": t0}
            store.add_trace(rec)
            return tick(rec, "failed")
        verdict, critic = await verify_and_filter(p, c.text, c.reasoning, c.finish_reason, c.completion_tokens, False)
        rec = solver_record(base, p, c, verdict, critic, {"model": teacher_desc.get("model"), "teacher": teacher_desc.get(
            "kind"), "base_url": public_url(c.server or teacher_url), "seed": seed, "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens, "prompt_sha256": solvers[kind].template.sha256, "time": t0}, cfg)
        store.add_trace(rec)
        tick(rec, rec["status"])

    async def rewrite(p: dict, lvl: str, src: dict) -> None:
        key = rewrite_key(p["id"], lvl)
        base = {"key": key, "id": p["id"], "level": lvl, "source_key": src["key"], "source": p["source"]}
        t0 = time.time()
        try:
            c, seed = await rewriter.rewrite(p, src["response"], src.get("answer_format") or "####", lvl)
        except (ClientError, InputError, ValueError, RuntimeError, OSError) as e:
            rec = {**base, "status": "failed", "reason": f"request failed: {getattr(e, 'kind', type(e).__name__)}",
                   "error": str(e)[:500], "time": t0}
            store.add_rewrite(rec)
            return tick(rec, "failed")
        verdict, _ = await verify_and_filter(p, c.text, None, c.finish_reason, c.completion_tokens, True)
        rec = rewrite_record(base, p, c, verdict, src, lvl, seed, prompts[f"rewrite_{lvl}"].sha256, t0, cfg)
        store.add_rewrite(rec)
        tick(rec, rec["status"])

    async def worker() -> None:
        while True:
            job, p, arg = await queue.get()
            try:
                if job == "solve":
                    await solve(p, arg)
                    left[p["id"]] -= 1
                    if left[p["id"]] == 0:
                        added = schedule_rewrites(p["id"])
                        if added and progress:
                            progress.update(task, total=progress.tasks[0].total + added)
                else:
                    await rewrite(p, *arg)
            finally:
                queue.task_done()

    # one worker per request the teacher can have in flight (a pool: --concurrency per server)
    await drain(queue, worker, max(1, getattr(teacher, "capacity", cfg.concurrency)), clients)
    return client_stats(clients)


async def drain(queue: asyncio.Queue, worker, n: int, clients: dict) -> None:
    """Run `n` workers until `queue` is done, then close the clients. Cancelled (the build's
    interrupt policy cancels the run at SIGINT/SIGTERM): the workers are cancelled, and the
    requests they had in flight dropped (a re-run asks them again)."""
    workers = [asyncio.create_task(worker()) for _ in range(n)]
    try:
        joined = asyncio.create_task(queue.join())
        # a worker that dies on a bug must not leave join() waiting forever
        done, _ = await asyncio.wait([joined, *workers], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not joined and t.exception():
                raise t.exception()
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for c in {id(c): c for c in clients.values() if c is not None}.values():
            try:
                await c.aclose()
            except Exception:  # closing must never hide the real error
                pass
