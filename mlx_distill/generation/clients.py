"""Teacher / model clients: one async ``complete(messages) -> Completion`` for every backend.

Two implementations of the same small interface, used by the corpus builder (solver,
judge, rewriter agents) and by the evaluator:

* ``OpenAIClient``: any OpenAI-compatible server (DeepSeek's hosted API, vLLM,
  ``mlx_lm server``) through the ``openai`` package. It owns the reliability logic:
  at most ``concurrency`` requests in flight, optional requests/min and tokens/min limits
  (sliding 60 s window), and retries with exponential back-off and jitter on 429, 5xx,
  timeouts, connection errors and empty 200 responses (``Retry-After`` is honoured).
  Client errors (400/401/403/404/422) are not retried. The API key is read from the
  environment variable named by ``api_key_env`` and kept only inside the ``openai``
  client: it is never part of ``repr``, ``describe()``, errors or logs. ``check()`` probes
  the server (``GET /models``) before any work: nothing listening, a refused key, or a model
  name that cannot be looked up (no ``--model``) is an ``InputError`` saying what to do.
  Retries are printed as plain lines when stderr is not a terminal (``announce``).
  Several base URLs make a ``pool.PoolClient`` of such clients (see pool.py).
* ``MLXClient``: a local mlx-lm model (optionally with an adapter). Concurrent
  ``complete()`` calls are fed to one ``mlx_lm.generate.BatchGenerator`` running in a
  background thread (continuous batching, ``batch_size`` sequences decoded together).
  ``temperature=0`` is greedy; otherwise each request samples with its own seeded key.

Both split ``<think>...</think>`` that a server leaves inline in the content into
``Completion.reasoning`` and ``Completion.text``; a server's separate reasoning field
(``reasoning_content`` on DeepSeek, ``reasoning`` on vLLM / mlx_lm server) is used as is.

One client belongs to one event loop: create it, use it and ``aclose()`` it inside the same
``asyncio.run`` (its semaphore and HTTP connections are bound to that loop).

Example::

    client = make_client("api", base_url="http://127.0.0.1:8080/v1", model="default_model")
    c = await client.complete([{"role": "user", "content": "2+2?"}], max_tokens=64)
    print(c.model, c.finish_reason, c.reasoning, c.text)
    await client.aclose()

``messages`` may also be a plain string: a raw prompt with no chat template (the
``/completions`` endpoint for API servers), or a list of token ids (a prompt already
tokenised, sent as is to ``/completions``; vLLM's ``prompt_logprobs`` and ``prompt_token_ids``
of the answer are kept in ``Completion.prompt_logprobs`` / ``prompt_token_ids``: the remote
white-box teacher, remote_teacher.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import random
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from mlx_distill.tasks.answers import split_think

log = logging.getLogger(__name__)

Messages = Union[str, list[dict]]

PRESETS = {  # --preset NAME fills base_url / model / api_key_env where the user gave none
    "deepseek": {"base_url": "https://api.deepseek.com", "model": "deepseek-reasoner",
                 "api_key_env": "DEEPSEEK_API_KEY"},
    "mlx-lm": {"base_url": "http://127.0.0.1:8080/v1", "model": "default_model", "api_key_env": "OPENAI_API_KEY"},
    "vllm": {"base_url": "http://127.0.0.1:8000/v1", "model": None, "api_key_env": "OPENAI_API_KEY"},
}


@dataclass
class Completion:
    """One generated answer and its provenance."""
    text: str                   # the answer (content without any <think> block)
    reasoning: Optional[str]    # chain of thought: reasoning_content / reasoning / inline <think>
    finish_reason: str          # "stop", "length", ... as the server said
    model: str                  # the model id the server says answered (not the one requested)
    prompt_tokens: int
    completion_tokens: int
    latency_s: float            # wall time of the successful request (queueing excluded)
    logprobs: Optional[list] = None
    attempts: int = 1           # requests it took (1 + retries)
    usage: Optional[dict] = None  # the server's full usage record (reasoning / cache-hit tokens ...)
    server: Optional[str] = None  # the base URL that answered (public form; several with a pool)
    prompt_logprobs: Optional[list] = None  # /completions on vLLM: per prompt position None | {id: {logprob, rank, ...}}
    prompt_token_ids: Optional[list] = None  # /completions on vLLM with return_token_ids: the prompt as it tokenised

    def to_dict(self) -> dict:
        return asdict(self)


class ClientError(RuntimeError):
    """A request that failed for good: ``kind`` is the last failure, ``attempts`` how many were made."""

    def __init__(self, message: str, kind: str = "error", attempts: int = 1, retryable: bool = False):
        super().__init__(message)
        self.kind, self.attempts, self.retryable = kind, attempts, retryable


class _Retryable(Exception):
    def __init__(self, kind: str, message: str, retry_after: Optional[float] = None, refused: bool = False):
        super().__init__(message)
        self.kind, self.retry_after = kind, retry_after
        self.refused = refused  # no connection could be opened at all (nothing listening, unknown host)


def announce(message: str, always: bool = False) -> None:
    """A client event as one plain line on stderr. Retries (``always=False``) are printed only when
    stderr is not a terminal (a log, CI, a pipe), where no progress bar shows them; on a terminal they
    go to ``logging`` (INFO). Servers marked down or up again (``always=True``) are always printed."""
    if always or not sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)
    else:
        log.info(message)


def base_urls(value) -> list[str]:
    """``--base-url`` as a list: one URL (a string), or several (a list from the command line or YAML)."""
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value if v]


def server_counts() -> dict:
    """The per-server counters every client reports (``server_stats()``), all present, in this order."""
    return {k: 0 for k in ("requests", "ok", "failed", "retries", "requeued", "marked_down")}


def is_token_ids(messages) -> bool:
    """A prompt given as token ids (a non-empty list of ints), not chat messages."""
    return isinstance(messages, list) and bool(messages) and all(isinstance(t, int) for t in messages[:1])


def think_fields(content: Optional[str]) -> tuple[Optional[str], str]:
    """(reasoning, text) record fields of a completion, split by ``answers.split_think``. A
    ``<think>`` never closed (truncated) makes everything reasoning; ``text`` is then what came
    before the tag (usually "")."""
    reasoning, text = split_think(content)
    if text is None:
        text = (content or "").partition("<think>")[0].strip()
    return reasoning, text


# ----------------------------------------------------------------------------- rate limiting
class RateLimiter:
    """Requests/min and tokens/min over a sliding 60 s window.

    Token use is not known until a response arrives, so each request reserves an
    estimate (prompt chars / 4 + max_tokens) that ``settle`` replaces with the real count.
    """

    def __init__(self, rpm: Optional[float] = None, tpm: Optional[float] = None, window: float = 60.0):
        self.rpm, self.tpm, self.window = rpm, tpm, window
        self.events: collections.deque = collections.deque()  # [time, tokens]
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    def _prune(self, now: float) -> None:
        while self.events and now - self.events[0][0] >= self.window:
            self.events.popleft()

    async def acquire(self, est_tokens: int = 0) -> list:
        if not self.rpm and not self.tpm:
            return [time.monotonic(), est_tokens]
        async with self._lock:
            while True:
                now = time.monotonic()
                self._prune(now)
                ok_r = not self.rpm or len(self.events) < self.rpm
                used = sum(e[1] for e in self.events)
                ok_t = not self.tpm or not self.events or used + est_tokens <= self.tpm
                if ok_r and ok_t:
                    ev = [now, est_tokens]
                    self.events.append(ev)
                    return ev
                wait = max(0.01, self.events[0][0] + self.window - now)
                self.waited_s += wait
                await asyncio.sleep(wait)

    @staticmethod
    def settle(ev: list, tokens: int) -> None:
        ev[1] = tokens


def backoff_delay(attempt: int, base: float, cap: float, retry_after: Optional[float] = None) -> float:
    """Exponential back-off with jitter: uniform in [0.5, 1.5] x base * 2**attempt, capped;
    never shorter than the server's Retry-After."""
    d = min(cap, base * (2 ** attempt)) * random.uniform(0.5, 1.5)
    return max(d, retry_after or 0.0)


def _is_local(url: str) -> bool:
    return any(h in url for h in ("://127.0.0.1", "://localhost", "://[::1]", "://0.0.0.0"))


is_local = _is_local  # loopback: a server on this machine (no API prices apply to it by default)


def probe_server(base_url: str, api_key: Optional[str], timeout: float = 10.0) -> dict:
    """``GET {base_url}/models`` once, synchronously (before any event loop): is anything listening,
    and which model does it list first? Returns ``{"error": None | text, "status": HTTP code,
    "model": first listed id | None, "models_error": why no id could be read | None}``.
    Any HTTP answer (even 404) means the server is up; only a refused / failed connection or a
    timeout is an ``error``."""
    import json
    import socket
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    p = urlsplit(base_url)
    url = urlunsplit((p.scheme, p.netloc, p.path.rstrip("/") + "/models", p.query, ""))
    down = {"status": None, "model": None, "models_error": None}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            status, body = r.status, r.read(1 << 20)
    except urllib.error.HTTPError as e:  # it answered: up (404, 401 ...)
        status, body = e.code, e.read(1 << 20) if e.fp else b""
    except (socket.timeout, TimeoutError):
        return {"error": f"no answer within {timeout:g}s", **down}
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        return {"error": redact(f"{type(why).__name__}: {why}", api_key)[:200], **down}
    out = {"error": None, "status": status, "model": None, "models_error": None}
    try:
        out["model"] = str(json.loads(body)["data"][0]["id"])
    except Exception as e:  # not JSON, no "data", an empty list ...
        what = "an empty body" if not body else type(e).__name__
        out["models_error"] = f"GET {public_url_of(url)} answered HTTP {status} with {what}, not a model list"
    return out


def public_url_of(url: str) -> str:
    from mlx_distill.io import public_url

    return public_url(url)


def model_hint() -> str:
    return ("pass --model NAME, the model the server serves (for `mlx_lm server`, --model default_model "
            "means the model it was started with)")


# ----------------------------------------------------------------------------- OpenAI-compatible API
class OpenAIClient:
    """An OpenAI-compatible chat endpoint with concurrency, rate limits and retries (see module doc)."""

    kind = "api"

    def __init__(self, base_url: str, model: Optional[str], api_key_env: str = "DEEPSEEK_API_KEY",
                 concurrency: int = 8, rpm: Optional[float] = None, tpm: Optional[float] = None,
                 max_retries: int = 6, timeout: float = 600.0, backoff_base: float = 1.0,
                 backoff_max: float = 60.0, extra_body: Optional[dict] = None,
                 limiter: Optional[RateLimiter] = None):
        import openai

        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.label = public_url_of(self.base_url)  # the URL as logs and manifests show it (no credentials)
        self.concurrency, self.max_retries, self.timeout = max(1, int(concurrency)), int(max_retries), timeout
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.extra_body = extra_body or {}
        key = os.environ.get(api_key_env) if api_key_env else None
        if not key:
            if not _is_local(self.base_url):
                from mlx_distill.io import InputError

                raise InputError(f"no API key: set the environment variable {api_key_env} "
                                 f"(or name another with --api-key-env) for {self.base_url}")
            key = "not-needed"  # local servers ignore it; the openai package insists on one
        # retries are ours (they know about empty 200s, jitter and our counters), not the SDK's
        self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout)
        self._sem: Optional[asyncio.Semaphore] = None
        # a second model on the same endpoint (judge, rewriter) passes the teacher's limiter: one budget
        self.limiter = limiter if limiter is not None else RateLimiter(rpm, tpm)
        self.stats = collections.Counter()  # requests, retries, and failures by kind
        self._resolved_model: Optional[str] = None
        self.checked = False  # check() found the server listening

    def __repr__(self) -> str:
        return f"OpenAIClient(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def describe(self) -> dict:
        """Provenance for manifests (never the key itself)."""
        return {"kind": "api", "base_url": self.base_url, "model": self.model or self._resolved_model,
                "api_key_env": self.api_key_env, "concurrency": self.concurrency, "rpm": self.limiter.rpm,
                "tpm": self.limiter.tpm, "max_retries": self.max_retries, "timeout": self.timeout,
                "servers": self.server_stats()}

    def server_stats(self) -> dict:
        """{public URL: requests, ok, failed, retries, requeued, marked_down} (one server: never re-queued or
        marked down; ``failed`` counts failed requests, retried or not)."""
        s = self.stats
        return {self.label: {**server_counts(), "requests": s["requests"], "ok": s["ok"],
                             "failed": s["requests"] - s["ok"], "retries": s["retries"]}}

    def check(self, need_model: bool = True) -> dict:
        """Before any work: is the server listening, and (with no --model) which model does it serve?
        Raises ``InputError`` with what to do; returns ``probe_server``'s answer."""
        from mlx_distill.io import InputError

        pr = probe_server(self.base_url, self._client.api_key if self._client.api_key != "not-needed" else None,
                          timeout=min(self.timeout, 10.0))
        if pr["error"]:
            raise InputError(f"cannot reach the server at {self.label} ({pr['error']}). Is it running, and is "
                             "this its address (an OpenAI-compatible base URL usually ends in /v1)?")
        if pr["status"] in (401, 403):
            raise InputError(f"{self.label} refused the API key (HTTP {pr['status']} on /models): check "
                             f"${self.api_key_env} (--api-key-env names the variable)")
        if need_model and not self.model:
            if not pr["model"]:
                raise InputError(f"could not look up the model name at {self.label}: {pr['models_error']}; "
                                 + model_hint())
            self._resolved_model = pr["model"]
        self.checked = True
        return pr

    async def _model_name(self) -> str:
        if self.model:
            return self.model
        if self._resolved_model is None:  # e.g. vLLM serving one model: ask which
            try:
                models = await self._client.models.list()
                self._resolved_model = models.data[0].id
            except Exception as e:  # a server without a model list (mlx_lm server without --model ...)
                raise ClientError(f"could not look up the model name at {self.label} (GET /models: "
                                  f"{type(e).__name__}: {_brief(e, self._client.api_key)[:120]}); " + model_hint(),
                                  kind="model_lookup") from None
        return self._resolved_model

    async def attempt(self, messages: Messages, *, temperature: float = 0.0, max_tokens: int = 1024,
                      seed: Optional[int] = None, top_p: Optional[float] = None, stop: Optional[list] = None,
                      logprobs: bool = False, top_logprobs: Optional[int] = None, **extra) -> Completion:
        """One request, no retry (within this client's rate limit and concurrency): a ``Completion``, or
        ``_Retryable`` (worth another try) / ``ClientError`` (not). ``complete`` and a pool retry around it."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        prompt_chars = (len(messages) if isinstance(messages, str) else 4 * len(messages) if is_token_ids(messages)
                        else sum(len(str(m.get("content", ""))) for m in messages))
        ev = await self.limiter.acquire(prompt_chars // 4 + max_tokens)
        async with self._sem:
            self.stats["requests"] += 1
            t0 = time.perf_counter()
            try:
                c = await self._once(messages, temperature, max_tokens, seed, top_p, stop, logprobs,
                                     top_logprobs, extra)
            except _Retryable as e:
                self.stats[f"retry_{e.kind}"] += 1
                raise
            c.latency_s, c.server = time.perf_counter() - t0, self.label
            self.limiter.settle(ev, c.prompt_tokens + c.completion_tokens)
            self.stats["ok"] += 1
            self.stats["prompt_tokens"] += c.prompt_tokens
            self.stats["completion_tokens"] += c.completion_tokens
            return c

    async def complete(self, messages: Messages, *, max_tokens: int = 1024, **kw) -> Completion:
        last: Optional[_Retryable] = None
        for attempt in range(self.max_retries + 1):
            try:
                c = await self.attempt(messages, max_tokens=max_tokens, **kw)
                c.attempts = attempt + 1
                return c
            except _Retryable as e:
                last = e
            if attempt < self.max_retries:
                self.stats["retries"] += 1
                delay = backoff_delay(attempt, self.backoff_base, self.backoff_max, last.retry_after)
                announce(f"retry {attempt + 1}/{self.max_retries} in {delay:.2f}s ({self.label}, {last.kind}): "
                         f"{str(last)[:160]}")
                await asyncio.sleep(delay)
        self.stats["failed"] += 1
        raise ClientError(f"gave up after {self.max_retries + 1} attempts; last: {last.kind}: {last}",
                          kind=last.kind, attempts=self.max_retries + 1, retryable=True)

    async def _once(self, messages, temperature, max_tokens, seed, top_p, stop, logprobs, top_logprobs, extra):
        import openai

        kw: dict[str, Any] = {"model": await self._model_name(), "temperature": temperature, "max_tokens": max_tokens}
        for k, v in (("seed", seed), ("top_p", top_p), ("stop", stop)):
            if v is not None:
                kw[k] = v
        body = {**self.extra_body, **extra}
        if body:
            kw["extra_body"] = body
        try:
            if isinstance(messages, str) or is_token_ids(messages):
                if logprobs:
                    kw["logprobs"] = top_logprobs or 1
                resp = await self._client.completions.create(prompt=messages, **kw)
            else:
                if logprobs:
                    kw["logprobs"] = True
                    if top_logprobs:
                        kw["top_logprobs"] = top_logprobs
                resp = await self._client.chat.completions.create(messages=messages, **kw)
        except openai.RateLimitError as e:
            raise _Retryable("429", _brief(e, self._client.api_key), _retry_after(e)) from None
        except openai.APITimeoutError as e:
            raise _Retryable("timeout", _brief(e, self._client.api_key)) from None
        except openai.APIConnectionError as e:  # ConnectError (httpx / httpx2): no connection could be opened
            raise _Retryable("connection", _brief(e, self._client.api_key),
                             refused=type(e.__cause__).__name__ == "ConnectError") from None
        except openai.InternalServerError as e:
            raise _Retryable(str(getattr(e, "status_code", "5xx")), _brief(e, self._client.api_key), _retry_after(e)) from None
        except openai.APIStatusError as e:
            code = getattr(e, "status_code", 0) or 0
            if code >= 500 or code in (408, 409, 425):
                raise _Retryable(str(code), _brief(e, self._client.api_key), _retry_after(e)) from None
            self.stats[f"error_{code}"] += 1
            raise ClientError(f"HTTP {code} from {self.base_url}: {_brief(e, self._client.api_key)}", kind=str(code)) from None
        except openai.APIResponseValidationError as e:
            raise _Retryable("bad_response", _brief(e, self._client.api_key)) from None
        except ValueError as e:  # a 200 whose body is not JSON
            raise _Retryable("bad_response", redact(str(e), self._client.api_key)[:200]) from None
        return self._parse(resp, isinstance(messages, str) or is_token_ids(messages), logprobs)

    def _parse(self, resp, raw: bool, want_logprobs: bool) -> Completion:
        choices = getattr(resp, "choices", None) if not isinstance(resp, (str, bytes, dict)) else None
        if not choices:
            raise _Retryable("empty", "200 response with no choices")
        ch = choices[0]
        if raw:
            content, reasoning = ch.text, None
        else:
            msg = ch.message
            if msg is None:
                raise _Retryable("empty", "200 response with no message")
            content = msg.content
            extra = getattr(msg, "model_extra", None) or {}
            reasoning = (getattr(msg, "reasoning_content", None) or extra.get("reasoning_content")
                         or extra.get("reasoning") or None)
        # nothing at all and no proper finish is a fault (proxies, overloaded hosts); whitespace, or an
        # empty answer the model chose to stop on, is an answer (a bad one) and is not asked again
        if not content and not reasoning and ch.finish_reason not in ("stop", "length"):
            raise _Retryable("empty", f"200 response with empty content (finish_reason={ch.finish_reason!r})")
        if reasoning is None:
            reasoning, text = think_fields(content)
        else:
            text = think_fields(content)[1] if "</think>" in (content or "") else (content or "").strip()
            reasoning = reasoning.strip()
        usage = resp.usage.model_dump() if getattr(resp, "usage", None) else None
        lp = None
        if want_logprobs and getattr(ch, "logprobs", None) is not None:
            lp = ch.logprobs.model_dump()
            lp = lp.get("content", lp) if isinstance(lp, dict) else lp
        extra = (getattr(ch, "model_extra", None) or {}) if raw else {}  # vLLM's fields beyond OpenAI's
        return Completion(text=text, reasoning=reasoning, finish_reason=ch.finish_reason or "unknown",
                          model=getattr(resp, "model", None) or self.model or "", logprobs=lp,
                          prompt_tokens=(usage or {}).get("prompt_tokens") or 0,
                          completion_tokens=(usage or {}).get("completion_tokens") or 0,
                          latency_s=0.0, usage=usage, prompt_logprobs=extra.get("prompt_logprobs"),
                          prompt_token_ids=extra.get("prompt_token_ids"))

    async def aclose(self) -> None:
        await self._client.close()


_KEYLIKE = re.compile(r"\b(sk|key|token)-[A-Za-z0-9_\-]{6,}")


def redact(text: str, key: Optional[str] = None) -> str:
    """Error text without the API key or anything shaped like one (servers echo keys in 401s)."""
    if key and len(key) >= 6:
        text = text.replace(key, "***")
    return _KEYLIKE.sub(lambda m: m.group(1) + "-***", text)


def _brief(e: Exception, key: Optional[str] = None) -> str:
    msg = str(getattr(e, "message", None) or e)
    return redact(msg, key)[:300]


def _retry_after(e: Exception) -> Optional[float]:
    resp = getattr(e, "response", None)
    try:
        v = resp.headers.get("retry-after") if resp is not None else None
        return min(float(v), 300.0) if v is not None else None
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- local MLX model
@dataclass
class _Request:
    prompt: list
    max_tokens: int
    sampler: Any
    want_logprobs: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    t_submit: float
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    uid: Optional[int] = None


def seeded_sampler(temperature: float, seed: Optional[int], top_p: Optional[float] = None):
    """A per-sequence sampler with its own PRNG key (so a request's sample does not depend on the others)."""
    import mlx.core as mx

    state = {"key": mx.random.key(seed if seed is not None else random.randrange(2 ** 31))}

    def sample(logprobs):
        if top_p and 0 < top_p < 1:
            from mlx_lm.sample_utils import apply_top_p

            logprobs = apply_top_p(logprobs, top_p)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return sample


class MLXClient:
    """A local mlx-lm model behind the same ``complete()`` as ``OpenAIClient`` (see module doc)."""

    kind = "mlx"

    def __init__(self, model: str, adapter_path: Optional[str] = None, batch_size: int = 8,
                 max_kv_size: Optional[int] = None, model_obj: Optional[tuple] = None,
                 chat_template_kwargs: Optional[dict] = None):
        self.model_path, self.adapter_path = str(model), adapter_path
        self.batch_size = max(1, int(batch_size))
        self.max_kv_size = max_kv_size
        self.chat_template_kwargs = chat_template_kwargs or {}
        if model_obj is not None:
            self.model, self.tokenizer = model_obj
        else:
            from mlx_distill.models import load_mlx, resolve_model

            self.model, self.tokenizer = load_mlx(resolve_model(self.model_path), adapter_path=adapter_path)
        # mlx_lm.load leaves (adapter) weights lazy, tied to this thread's stream; decoding runs
        # in a worker thread, where evaluating them fails ("There is no Stream(cpu, 0) in current thread").
        import mlx.core as mx

        mx.eval(self.model.parameters())
        self.model_id = self.model_path + (f"+{adapter_path}" if adapter_path else "")
        self._queue: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.stats = collections.Counter()

    def __repr__(self) -> str:
        return f"MLXClient(model={self.model_id!r}, batch_size={self.batch_size})"

    def describe(self) -> dict:
        return {"kind": "mlx", "model": self.model_path, "adapter_path": self.adapter_path,
                "batch_size": self.batch_size}

    def encode(self, messages: Messages) -> list[int]:
        if isinstance(messages, str):
            return self.tokenizer.encode(messages)
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       **self.chat_template_kwargs))

    async def complete(self, messages: Messages, *, temperature: float = 0.0, max_tokens: int = 1024,
                       seed: Optional[int] = None, top_p: Optional[float] = None, stop: Optional[list] = None,
                       logprobs: bool = False, top_logprobs: Optional[int] = None, **extra) -> Completion:
        if stop:
            raise ValueError("MLXClient: stop strings are not supported; the model stops at its EOS tokens")
        prompt = self.encode(messages)
        if not prompt:
            raise ValueError("MLXClient: empty prompt")
        loop = asyncio.get_running_loop()
        req = _Request(prompt=prompt, max_tokens=int(max_tokens),
                       sampler=None if not temperature else seeded_sampler(temperature, seed, top_p),
                       want_logprobs=logprobs, future=loop.create_future(), loop=loop, t_submit=time.perf_counter())
        self._ensure_worker()
        self._queue.put(req)
        return await req.future  # cancelling this (Ctrl-C) also removes the sequence from the batch

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._closed.clear()
                self._thread = threading.Thread(target=self._run, name="mlx-batch", daemon=True)
                self._thread.start()

    @staticmethod
    def _resolve(req: _Request, result=None, error: Optional[BaseException] = None) -> None:
        def done():
            if not req.future.done():
                req.future.set_exception(error) if error is not None else req.future.set_result(result)
        try:
            req.loop.call_soon_threadsafe(done)
        except RuntimeError:  # that event loop is gone
            pass

    def _run(self) -> None:
        from mlx_lm.generate import BatchGenerator

        active: dict[int, _Request] = {}
        gen = BatchGenerator(self.model, stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
                             completion_batch_size=self.batch_size,
                             prefill_batch_size=min(self.batch_size, 8), max_kv_size=self.max_kv_size)
        try:
            while not self._closed.is_set():
                new = []
                try:
                    new.append(self._queue.get(timeout=0.05) if not active else self._queue.get_nowait())
                    while True:
                        new.append(self._queue.get_nowait())
                except queue.Empty:
                    pass
                new = [r for r in new if r is not None and not r.future.cancelled()]
                if new:
                    uids = gen.insert([r.prompt for r in new], [r.max_tokens for r in new],
                                      samplers=[r.sampler for r in new])
                    for uid, r in zip(uids, new):
                        r.uid = uid
                        active[uid] = r
                gone = [u for u, r in active.items() if r.future.cancelled()]
                if gone:
                    gen.remove(gone)
                    for u in gone:
                        del active[u]
                if not active:
                    continue
                for resp in gen.next_generated():
                    r = active.get(resp.uid)
                    if r is None:
                        continue
                    if resp.finish_reason != "stop":
                        r.tokens.append(resp.token)
                        if r.want_logprobs:
                            r.logprobs.append(resp.logprobs[resp.token].item())
                    if resp.finish_reason is not None:
                        del active[resp.uid]
                        self._resolve(r, self._completion(r, resp.finish_reason))
        except BaseException as e:  # fail every waiter rather than hang them
            for r in list(active.values()):
                self._resolve(r, error=e)
            while True:
                try:
                    r = self._queue.get_nowait()
                except queue.Empty:
                    break
                if r is not None:
                    self._resolve(r, error=e)
            raise
        finally:
            gen.close()

    def _completion(self, r: _Request, finish_reason: str) -> Completion:
        content = self.tokenizer.decode(r.tokens)
        reasoning, text = think_fields(content)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(r.prompt)
        self.stats["completion_tokens"] += len(r.tokens)
        return Completion(text=text, reasoning=reasoning, finish_reason=finish_reason, model=self.model_id,
                          prompt_tokens=len(r.prompt), completion_tokens=len(r.tokens),
                          latency_s=time.perf_counter() - r.t_submit,
                          logprobs=r.logprobs if r.want_logprobs else None)

    async def aclose(self) -> None:
        self._closed.set()
        self._queue.put(None)
        t = self._thread
        if t is not None and t.is_alive():
            await asyncio.to_thread(t.join, 30)


async def complete_all(client, requests: list[Messages], **kw) -> list[Completion]:
    """Complete many prompts concurrently (in order); the client bounds what is in flight."""
    return list(await asyncio.gather(*(client.complete(m, **kw) for m in requests)))
