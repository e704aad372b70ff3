"""A pool of OpenAI-compatible teacher servers behind one ``complete()`` (``--base-url URL1 URL2 ...``).

Several ``mlx_lm server`` Macs or vLLM replicas serving the same model become one client:

* **Spread.** Each request goes to the server with the fewest requests outstanding (in flight,
  relative to its concurrency; ties to the one that has had fewest). Every server keeps its
  own ``concurrency`` and its own requests/min and tokens/min limits: each member is an
  ``OpenAIClient`` with those settings, and the pool only decides where the next request goes.
* **Retries across servers.** The pool owns the retry loop (``max_retries`` per request, as a
  single client). A retryable failure (429, 5xx, empty answer, timeout, lost connection) is
  tried again, on another server when one has a free slot; connection failures and timeouts
  go elsewhere at once, other failures after the usual jittered back-off.
* **Down and back.** A server that refuses a connection, or fails ``down_after`` requests in
  a row with connection errors or timeouts, is *marked down*: its requests still in flight are
  cancelled and re-queued on the other servers (a re-queue is not a retry: it costs the
  request nothing). After a back-off (``down_backoff`` seconds, doubling up to
  ``down_backoff_max`` while it stays down) one request is let through to it (half-open): an
  answer brings it back, a failure doubles the back-off. While every server is down a
  request waits one back-off step per retry and then fails like a single server's would.
* **Exactly once.** Each ``complete()`` call returns one ``Completion`` or raises once. A copy
  that was re-queued is cancelled first, so its late answer (if the server ever sends one) is
  never seen. The server may have done that work; the caller never sees it twice.

``check()`` probes every server before any work (``GET /models``): the pool starts when at
least one answers and says which are down; none up is an ``InputError``.

``server_stats()`` gives per-server counts (requests, ok, failed, retries, requeued,
marked_down) for manifests; ``stats`` holds the pool's totals in the caller's view.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Optional

from mlx_distill.generation.clients import (ClientError, Completion, Messages, OpenAIClient, RateLimiter, _Retryable, announce,
                      backoff_delay, base_urls, model_hint, server_counts)


class _Member:
    """One server of the pool and its health."""

    def __init__(self, client: OpenAIClient, index: int):
        self.client, self.index, self.url = client, index, client.label
        self.in_flight = 0
        self.tasks: set = set()          # attempts in flight (cancelled when the server is marked down)
        self.up = True
        self.probing = False             # the one half-open request of a down server is in flight
        self.fails = 0                   # connection errors / timeouts in a row
        self.down_until = 0.0            # time.monotonic() after which a down server gets its probe
        self.backoff = 0.0
        self.counts = collections.Counter(server_counts())

    @property
    def load(self) -> float:
        return self.in_flight / self.client.concurrency


class PoolClient:
    """Several OpenAI-compatible servers of one model as one client (see the module doc)."""

    kind = "api"

    def __init__(self, base_url, model: Optional[str], api_key_env: str = "DEEPSEEK_API_KEY",
                 concurrency: int = 8, rpm: Optional[float] = None, tpm: Optional[float] = None,
                 max_retries: int = 6, timeout: float = 600.0, backoff_base: float = 1.0,
                 backoff_max: float = 60.0, extra_body: Optional[dict] = None, down_after: int = 3,
                 down_backoff: float = 5.0, down_backoff_max: float = 120.0,
                 limiters: Optional[list[RateLimiter]] = None):
        urls = base_urls(base_url)
        if len(set(u.rstrip("/") for u in urls)) != len(urls):
            from mlx_distill.io import InputError

            raise InputError(f"--base-url lists the same server twice: {urls}")
        self.members = [_Member(OpenAIClient(u, model, api_key_env, concurrency, rpm, tpm, 0, timeout, backoff_base,
                                             backoff_max, extra_body, limiter=limiters[i] if limiters else None), i)
                        for i, u in enumerate(urls)]
        self.model, self.api_key_env, self.concurrency = model, api_key_env, max(1, int(concurrency))
        self.max_retries, self.timeout = int(max_retries), timeout
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.down_after, self.down_backoff, self.down_backoff_max = max(1, int(down_after)), down_backoff, down_backoff_max
        self._settings = dict(api_key_env=api_key_env, concurrency=concurrency, max_retries=max_retries,
                              timeout=timeout, backoff_base=backoff_base, backoff_max=backoff_max,
                              extra_body=extra_body, down_after=down_after, down_backoff=down_backoff,
                              down_backoff_max=down_backoff_max)
        self.stats = collections.Counter()  # the caller's view: requests, ok, failed, retries, requeued, tokens
        self._waiters: collections.deque = collections.deque()

    # -- what the rest of the package reads
    @property
    def base_urls(self) -> list[str]:
        return [m.client.base_url for m in self.members]

    @property
    def base_url(self) -> str:  # the first server: for messages that name one
        return self.members[0].client.base_url

    @property
    def capacity(self) -> int:
        """Requests the pool can have in flight (the sum of the servers' concurrency)."""
        return sum(m.client.concurrency for m in self.members)

    def __repr__(self) -> str:
        return f"PoolClient(base_urls={[m.url for m in self.members]!r}, model={self.model!r})"

    def describe(self) -> dict:
        c0 = self.members[0].client
        models = sorted({m.client.model or m.client._resolved_model or "" for m in self.members} - {""})
        return {"kind": "api", "base_url": self.base_urls, "model": self.model or (models[0] if len(models) == 1 else models or None),
                "api_key_env": self.api_key_env, "concurrency": self.concurrency, "rpm": c0.limiter.rpm,
                "tpm": c0.limiter.tpm, "max_retries": self.max_retries, "timeout": self.timeout,
                "pool": {"servers": len(self.members), "capacity": self.capacity, "down_after": self.down_after,
                         "down_backoff": self.down_backoff},
                "servers": self.server_stats()}

    def server_stats(self) -> dict:
        return {m.url: dict(m.counts) for m in self.members}

    def with_model(self, model: str, api_key_env: Optional[str] = None) -> "PoolClient":
        """The same servers asked for another model (a judge, a rewriter): own health, shared rate limits."""
        settings = {**self._settings, **({"api_key_env": api_key_env} if api_key_env else {})}
        return PoolClient(self.base_urls, model, limiters=[m.client.limiter for m in self.members], **settings)

    # -- start
    def check(self, need_model: bool = True) -> list[dict]:
        """Probe every server (concurrently, before any event loop). Servers that do not answer start
        marked down (retried after the back-off); none answering is an ``InputError``."""
        from concurrent.futures import ThreadPoolExecutor

        from mlx_distill.io import InputError

        def one(m: _Member):
            try:
                m.client.check(need_model=need_model)
                return None
            except InputError as e:
                return e

        with ThreadPoolExecutor(max_workers=min(16, len(self.members))) as ex:
            errors = list(ex.map(one, self.members))
        fatal = [e for e in errors if e is not None and "cannot reach" not in str(e)]
        if fatal:  # a wrong key or an unknown model name: no use starting on the others
            raise fatal[0]
        down = [(m, e) for m, e in zip(self.members, errors) if e is not None]
        if len(down) == len(self.members):
            raise InputError("no server of the pool can be reached: " + "; ".join(str(e).split(". Is it")[0]
                                                                                for _, e in down))
        now = time.monotonic()
        for m, e in down:
            m.up, m.backoff = False, self.down_backoff
            m.down_until = now + m.backoff
            m.counts["marked_down"] += 1
            announce(f"server {m.url} is down at start ({str(e).split('(', 1)[-1].split(')')[0]}); starting on "
                     f"{len(self.members) - len(down)} of {len(self.members)} servers, trying it again in "
                     f"{m.backoff:g}s", always=True)
        if need_model and not self.model:
            models = {m.client._resolved_model for m in self.members if m.up}
            if len(models) > 1:
                raise InputError(f"the servers of the pool serve different models {sorted(models)}; " + model_hint())
        return errors

    # -- scheduling
    def _pick(self, avoid: Optional[_Member] = None, shun: bool = False) -> Optional[_Member]:
        """The least busy server with a free slot; not `avoid` (where this request just failed) when another
        has one, and with `shun` (it failed there by connection or timeout) not at all while another is up."""
        now = time.monotonic()
        for m in self.members:  # a down server whose back-off is over gets one request (half-open)
            if not m.up and not m.probing and now >= m.down_until:
                m.probing = True
                return m
        free = [m for m in self.members if m.up and m.in_flight < m.client.concurrency]
        if avoid is not None and shun and any(m.up and m is not avoid for m in self.members):
            free = [m for m in free if m is not avoid]
        elif avoid is not None and len(free) > 1:
            free = [m for m in free if m is not avoid] or free
        if not free:
            return None
        return min(free, key=lambda m: (m.load, m.counts["requests"], m.index))

    def _wake(self, everyone: bool = False) -> None:
        while self._waiters:
            f = self._waiters.popleft()
            if not f.done():
                f.set_result(None)
                if not everyone:
                    return

    async def _acquire(self, all_down_wait: float, avoid: Optional[_Member] = None,
                       shun: bool = False) -> Optional[_Member]:
        """A server with a free slot (its in-flight count raised), or None once every server has been
        down for `all_down_wait` seconds."""
        loop = asyncio.get_running_loop()
        t_end = None
        while True:
            m = self._pick(avoid, shun)
            if m is not None:
                m.in_flight += 1
                return m
            now = time.monotonic()
            due = [x.down_until for x in self.members if not x.up and not x.probing]
            timeout = max(0.0, min(due) - now) + 0.001 if due else None
            if not any(x.up for x in self.members):
                t_end = t_end if t_end is not None else now + all_down_wait
                if now >= t_end:
                    return None
                timeout = min(timeout, t_end - now) if timeout is not None else t_end - now
            f = loop.create_future()
            self._waiters.append(f)
            try:
                await asyncio.wait_for(f, timeout)
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:
                if f.done() and not f.cancelled():
                    self._wake()  # pass on the slot this waiter was woken for
                raise

    def _release(self, m: _Member) -> None:
        m.in_flight -= 1
        self._wake()

    def _mark_down(self, m: _Member, why: _Retryable) -> None:
        if m.up:
            m.counts["marked_down"] += 1
            m.backoff = self.down_backoff
        else:  # its half-open request failed too
            m.backoff = min(self.down_backoff_max, max(m.backoff, self.down_backoff) * 2)
        was_up = m.up
        m.up, m.probing, m.fails = False, False, 0
        m.down_until = time.monotonic() + m.backoff
        moved = [t for t in m.tasks if not t.done()]
        up = sum(x.up for x in self.members)
        if was_up:
            announce(f"server {m.url} marked down ({why.kind}: {str(why)[:100]}); {len(moved)} request(s) in "
                     f"flight moved to the {up} other server(s) up; trying it again in {m.backoff:g}s", always=True)
        else:
            announce(f"server {m.url} still down ({why.kind}: {str(why)[:100]}); trying it again in "
                     f"{m.backoff:g}s", always=True)
        for t in moved:
            t.cancel()
        self._wake(everyone=True)

    def _mark_up(self, m: _Member) -> None:
        m.probing, m.fails = False, 0
        if not m.up:
            m.up = True
            announce(f"server {m.url} is back up", always=True)
            self._wake(everyone=True)

    # -- requests
    async def complete(self, messages: Messages, *, max_tokens: int = 1024, **kw) -> Completion:
        self.stats["requests"] += 1
        tries = requeues = 0
        retry = False
        last: Optional[_Retryable] = None
        avoid: Optional[_Member] = None
        while True:
            m = await self._acquire(backoff_delay(tries, self.backoff_base, self.backoff_max), avoid,
                                    shun=last is not None and last.kind in ("connection", "timeout"))
            if m is None:  # every server down all that while: one failed try, like a refused connection
                last = _Retryable("connection", f"all {len(self.members)} servers are down")
            else:
                probe = m.probing
                m.counts["requests"] += 1
                if retry:
                    m.counts["retries"] += 1
                task = asyncio.ensure_future(m.client.attempt(messages, max_tokens=max_tokens, **kw))
                m.tasks.add(task)
                try:
                    await asyncio.wait({task})
                except asyncio.CancelledError:  # the caller gave up (Ctrl-C): so does the request
                    task.cancel()
                    if probe:
                        m.probing = False
                    raise
                finally:
                    m.tasks.discard(task)
                    self._release(m)
                if task.cancelled():  # its server was marked down while it was in flight: elsewhere, free
                    m.counts["requeued"] += 1
                    self.stats["requeued"] += 1
                    requeues += 1
                    if requeues <= 4 * len(self.members) + self.max_retries:
                        continue
                    last = _Retryable("connection", "re-queued too often (servers going down one after another)")
                    m = None
                elif task.exception() is None:
                    c = task.result()
                    m.counts["ok"] += 1
                    if probe or m.up:  # a down server comes back through its probe, not a late answer
                        self._mark_up(m)
                    c.attempts = tries + requeues + 1
                    self.stats["ok"] += 1
                    self.stats["prompt_tokens"] += c.prompt_tokens
                    self.stats["completion_tokens"] += c.completion_tokens
                    return c
                else:
                    e = task.exception()
                    m.counts["failed"] += 1
                    if not isinstance(e, _Retryable):  # a client error (4xx, no model name): not worth a retry
                        if isinstance(e, ClientError) and (probe or m.up):
                            self._mark_up(m)  # it answered
                        elif probe:
                            m.probing = False
                        self.stats["failed"] += 1
                        raise e
                    last = e
                    if e.kind in ("connection", "timeout"):
                        m.fails += 1
                        if probe or (m.up and (e.refused or m.fails >= self.down_after)):
                            self._mark_down(m, e)
                    elif probe or m.up:  # the server answered (429, 5xx, an empty 200): it is up
                        self._mark_up(m)
            tries += 1
            if tries > self.max_retries:
                self.stats["failed"] += 1
                raise ClientError(f"gave up after {tries} attempts on {len(self.members)} servers; last: "
                                  f"{last.kind}: {last}", kind=last.kind, attempts=tries + requeues, retryable=True)
            retry = True
            self.stats["retries"] += 1
            avoid = m
            where = m.url if m is not None else "pool"
            if m is not None and last.kind in ("connection", "timeout") and any(x.up and x is not m for x in self.members):
                announce(f"retry {tries}/{self.max_retries} on another server ({where}, {last.kind}): {str(last)[:160]}")
                continue
            if m is None:
                announce(f"retry {tries}/{self.max_retries} ({where}: {last})")
                continue  # the wait for a server was the back-off
            delay = backoff_delay(tries - 1, self.backoff_base, self.backoff_max, last.retry_after)
            announce(f"retry {tries}/{self.max_retries} in {delay:.2f}s ({where}, {last.kind}): {str(last)[:160]}")
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        for m in self.members:
            for t in list(m.tasks):
                t.cancel()
            try:
                await m.client.aclose()
            except Exception:
                pass
