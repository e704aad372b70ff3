"""Generation: every client that turns chat messages into text, and the eval's use of them.

Clients (one interface: ``await client.complete(messages, temperature=, max_tokens=, seed=)``
returning a ``Completion``; ``describe()`` for manifests; ``aclose()``):

- ``api``: any OpenAI-compatible server (DeepSeek, vLLM, ``mlx_lm server``), with
  concurrency, rate limits and retries (``clients.OpenAIClient``);
- ``mlx``: a local MLX model (+ adapter) with continuous batching (``clients.MLXClient``);
- ``torch``: transformers (+ PEFT) (``torch.TorchClient``).

The corpus builder's solver, verifier and rewriter agents, the evaluator and the length
study all take their clients from here.

``make_eval_client`` picks one from an ``EvalConfig``; ``generate`` runs a list of requests
with a progress display and hands each finished completion to a callback as it lands, so
the caller can write it to disk at once (resumable evaluation).

The wing may import tasks, backends (model loading), models and the shared ground (config, io,
paths, progress); corpus, teacher (the remote teacher's client), training (selection by
accuracy) and evaluation import it. ``make_client`` lives here, above ``clients`` and ``pool``,
so that neither of those imports the other's factory.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from mlx_distill.config import EvalConfig
from mlx_distill.io import InputError


def problem_seed(seed: int, pid: str) -> int:
    """A per-problem sampling seed: independent of batch size and order."""
    return int(hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()[:8], 16)


def mlx_client(model: str, adapter: str = "", batch_size: int = 8):
    from mlx_distill.models import resolve_model

    if adapter and not (Path(adapter) / "adapters.safetensors").is_file():
        raise InputError(f"{adapter}: no adapters.safetensors (is it a finished `mlx_distill train` run folder?)")
    return make_client("mlx", model=resolve_model(model), adapter_path=adapter or None, batch_size=batch_size)


def make_eval_client(cfg: EvalConfig):
    if cfg.backend == "mlx":
        return mlx_client(cfg.model, cfg.adapter, cfg.batch_size)
    if cfg.backend == "torch":  # transformers (+ peft); an mlx-lm or PEFT adapter folder
        from mlx_distill.generation.torch import TorchClient

        if cfg.adapter and not any((Path(cfg.adapter) / f).is_file()
                                   for f in ("adapters.safetensors", "adapter_model.safetensors")):
            raise InputError(f"{cfg.adapter}: no adapters.safetensors (mlx-lm) or adapter_model.safetensors (PEFT)")
        return TorchClient(cfg.model, adapter_path=cfg.adapter or None, batch_size=cfg.batch_size)
    if cfg.adapter:
        raise InputError("--adapter applies to --backend mlx or torch; a server applies its own adapters")
    # several --base-url: a pool (generation/pool.py), --concurrency per server; every server is probed
    # now, so one that cannot be reached (or asked its model) is an error before any problem is sent
    client = make_client("api", base_url=cfg.base_url, model=cfg.model or None, api_key_env=cfg.api_key_env,
                         concurrency=cfg.concurrency)
    client.check()
    return client


def _progress(total: int, label: str, quiet: bool):
    """(advance(), close()) for a rich progress bar on a terminal, periodic lines otherwise."""
    if quiet:
        return (lambda: None), (lambda: None)
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
        prog.start()
        task = prog.add_task(label, total=total)
        return (lambda: prog.advance(task)), prog.stop
    from mlx_distill.progress import Heartbeat

    # a line at least every ~10 s (from a thread: a batch of long generations finishes nothing for
    # minutes), and the final count
    beat = Heartbeat(label, total=total).__enter__()

    def close():
        beat.__exit__()
        print(beat.line(), file=sys.stderr, flush=True)

    return (lambda: beat.update(advance=1)), close


async def _gather(coros: list, label: str, quiet: bool, on_done: Optional[Callable] = None) -> list:
    """Await every coroutine (a failure becomes its exception, not fatal to the run); call
    ``on_done(i, result)`` as each one finishes, in completion order."""
    advance, close = _progress(len(coros), label, quiet)

    async def one(i, c):
        try:
            res = await c
        except Exception as e:  # a failed request is recorded, not fatal to the run
            res = e
        if on_done is not None:
            on_done(i, res)
        advance()
        return res

    try:
        return await asyncio.gather(*(one(i, c) for i, c in enumerate(coros)))
    finally:
        close()


def generate(client, messages: list[list[dict]], seeds: list, cfg: EvalConfig, quiet: bool = False,
             on_done: Optional[Callable] = None) -> tuple[list, float]:
    """Completions (or the exception of a failed request) in order, and the wall seconds.
    `on_done(i, result)` is called as each request finishes (in the event loop's thread)."""
    kw = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
    if cfg.temperature > 0 and cfg.top_p < 1:
        kw["top_p"] = cfg.top_p

    async def run():
        return await _gather([client.complete(m, seed=s, **kw) for m, s in zip(messages, seeds)],
                             "generating", quiet, on_done)

    t0 = time.perf_counter()
    out = asyncio.run(run())
    return out, time.perf_counter() - t0


def full_response(c) -> str:
    """The generated text as graded: a separate reasoning field goes back inside <think>."""
    if c.reasoning:
        if c.finish_reason == "length" and not c.text:
            return f"<think>\n{c.reasoning}"  # cut off inside its thinking: no final answer
        return f"<think>\n{c.reasoning}\n</think>\n\n{c.text}"
    return c.text



def parameter_counts(client) -> Optional[dict]:
    if hasattr(client, "parameter_counts"):  # TorchClient
        return client.parameter_counts()
    model = getattr(client, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    from mlx.utils import tree_flatten

    total = adapter = 0
    for name, v in tree_flatten(model.parameters()):
        total += v.size
        if "lora" in name:
            adapter += v.size
    return {"total": int(total), "adapter": int(adapter)}



def make_judge_client(cfg: EvalConfig):
    if cfg.judge == "api":
        return make_client("api", base_url=cfg.judge_base_url, model=cfg.judge_model or None,
                           api_key_env=cfg.judge_api_key_env, concurrency=cfg.concurrency)
    if not cfg.judge_model:
        raise InputError("--judge mlx needs --judge-model (an MLX model folder or Hugging Face id)")
    return mlx_client(cfg.judge_model, "", cfg.batch_size)


def make_client(kind: str, **kw):
    """``make_client("api", base_url=..., model=..., preset=...)`` or ``make_client("mlx", model=PATH, ...)``.

    ``base_url`` may list several servers of one model: the client is then a ``pool.PoolClient``
    (least-outstanding spread, per-server limits, servers marked down and back; see pool.py).
    Call ``client.check()`` (API clients) before any work to fail at once on a server that
    cannot be reached or a model name that cannot be looked up.

    Unknown keyword arguments for the chosen kind are dropped, so one settings dict can
    serve both (e.g. ``concurrency`` means nothing to a local model; ``batch_size`` nothing
    to a server)."""
    import inspect

    from mlx_distill.generation.clients import PRESETS, MLXClient, OpenAIClient, base_urls

    if kind == "api":
        preset = PRESETS.get(kw.pop("preset", None) or "", {})
        for k, v in preset.items():
            if kw.get(k) in (None, ""):
                kw[k] = v
        if not kw.get("base_url"):
            from mlx_distill.io import InputError

            raise InputError("--teacher api needs --base-url (or --preset deepseek / mlx-lm / vllm)")
        cls = OpenAIClient
        if len(base_urls(kw["base_url"])) > 1:  # several servers of one model: a pool (generation/pool.py)
            from mlx_distill.generation.pool import PoolClient

            cls = PoolClient
        else:
            kw["base_url"] = base_urls(kw["base_url"])[0]
    elif kind == "mlx":
        if not kw.get("model"):
            from mlx_distill.io import InputError

            raise InputError("--teacher mlx needs --model (a local mlx-lm model folder or Hugging Face id)")
        cls = MLXClient
    else:
        raise ValueError(f"unknown client kind {kind!r}: use 'api' or 'mlx'")
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kw.items() if k in params})
