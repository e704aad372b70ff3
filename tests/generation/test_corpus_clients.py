"""Clients: retries on 429/5xx/empty 200/timeouts/dropped connections, reasoning fields, limits, MLX batching."""

import asyncio
import time

import pytest

from fault_server import FaultServer
from mlx_distill.generation.clients import (ClientError, MLXClient, OpenAIClient, RateLimiter, backoff_delay,
                                        complete_all, think_fields)
from mlx_distill.generation import make_client
from mlx_distill.io import InputError

MSG = [{"role": "user", "content": "[A] What is 3+4?"}]


def api(server, **kw):
    kw = {"concurrency": 4, "max_retries": 6, "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 5, **kw}
    return OpenAIClient(server.base_url, "asked-model", api_key_env="NO_SUCH_KEY_ENV", **kw)


def run(coro):
    return asyncio.run(coro)


def test_think_fields():
    """The record fields (answers.split_think, with "" as the text of a truncated reasoning)."""
    assert think_fields("<think>r1</think>answer") == ("r1", "answer")
    assert think_fields("r1</think>answer") == ("r1", "answer")       # opening tag was in the prompt
    assert think_fields("<think>cut off") == ("cut off", "")          # truncated inside the reasoning
    assert think_fields("plain") == (None, "plain")


@pytest.mark.parametrize("faults", [["429", "500", "503"], ["empty", "empty_body", "empty_content"], ["drop"], ["slow"]])
def test_retries_then_succeeds(faults):
    script = {"slow_s": 1.5, "items": {"[A]": {"solve": {"content": "#### 7", "reasoning_content": "3+4=7"},
                                               "faults": faults}}}
    with FaultServer(script) as srv:
        async def go():
            c = api(srv, timeout=0.5 if faults == ["slow"] else 5)
            r = await c.complete(MSG, max_tokens=50)
            await c.aclose()
            return r, c.stats
        r, stats = run(go())
    assert (r.text, r.reasoning, r.finish_reason) == ("#### 7", "3+4=7", "stop")
    assert r.model == "fault-model-v1"  # what the server says answered, not what was asked for
    assert r.attempts == len(faults) + 1 and stats["retries"] == len(faults)
    assert r.prompt_tokens > 0 and r.completion_tokens > 0 and r.latency_s >= 0


def test_gives_up_with_reason_and_no_retry_on_client_error():
    script = {"items": {"[A]": {"faults": ["500"] * 10}}}
    with FaultServer(script) as srv:
        async def go():
            c = api(srv, max_retries=2)
            with pytest.raises(ClientError) as e:
                await c.complete(MSG)
            await c.aclose()
            return e.value
        err = run(go())
        assert err.kind == "500" and err.attempts == 3 and srv.counts["500"] == 3


def test_inline_think_and_reasoning_absent():
    script = {"items": {"[A]": {"solve": {"content": "#### 7", "reasoning_content": "think", "echo_think": True}},
                        "[B]": {"solve": {"content": "just #### 7"}},
                        "[C]": {"solve": {"content": "", "finish_reason": "stop"}}}}
    with FaultServer(script) as srv:
        async def go():
            c = api(srv)
            a = await c.complete(MSG)
            b = await c.complete([{"role": "user", "content": "[B]"}])
            e = await c.complete([{"role": "user", "content": "[C]"}])  # the model chose to say nothing
            await c.aclose()
            return a, b, e
        a, b, e = run(go())
    assert (a.reasoning, a.text) == ("think", "#### 7")
    assert (b.reasoning, b.text) == (None, "just #### 7")
    assert (e.text, e.finish_reason, e.attempts) == ("", "stop", 1)


def test_concurrency_bound_and_key_never_exposed(monkeypatch):
    monkeypatch.setenv("MY_SECRET_ENV", "sk-very-secret-123")
    with FaultServer({"delay": 0.2}) as srv:
        async def go():
            c = OpenAIClient(srv.base_url, "m", api_key_env="MY_SECRET_ENV", concurrency=4)
            t = time.perf_counter()
            await complete_all(c, [MSG] * 8)
            dt = time.perf_counter() - t
            await c.aclose()
            return c, dt
        c, dt = run(go())
    assert 0.35 < dt < 1.5  # 8 requests of 0.2 s, 4 at a time: two waves
    assert "sk-very" not in repr(c) and "sk-very" not in str(c.describe())
    with pytest.raises(InputError, match="NOT_SET_ENV"):
        OpenAIClient("https://api.example.com", "m", api_key_env="NOT_SET_ENV")


def test_rate_limiter_window():
    async def go():
        lim = RateLimiter(rpm=3, window=0.3)
        t = time.perf_counter()
        for _ in range(6):
            await lim.acquire()
        return time.perf_counter() - t
    assert 0.25 < run(go()) < 1.0
    async def go_t():
        lim = RateLimiter(tpm=100, window=0.3)
        t = time.perf_counter()
        ev = await lim.acquire(80)
        lim.settle(ev, 90)
        await lim.acquire(50)  # 90 + 50 > 100: waits for the window
        return time.perf_counter() - t
    assert run(go_t()) > 0.25
    ds = [backoff_delay(3, 1.0, 60.0) for _ in range(200)]
    assert 4.0 <= min(ds) and max(ds) <= 12.0 and len(set(ds)) > 100  # jittered around 8 s
    assert backoff_delay(0, 0.01, 1.0, retry_after=2.0) == 2.0


def test_mlx_client_batches_and_seeds(tiny_model):
    c = make_client("mlx", model=str(tiny_model), batch_size=4, concurrency=99)  # concurrency: api-only, dropped
    assert isinstance(c, MLXClient)
    msgs = [[{"role": "user", "content": f"Ann has {i} apples."}] for i in range(6)]

    async def go():
        greedy = await complete_all(c, msgs, max_tokens=12)
        single = await c.complete(msgs[2], max_tokens=12)
        s1 = await complete_all(c, msgs[:3], max_tokens=12, temperature=1.0, seed=7)
        s2 = await complete_all(c, msgs[:3], max_tokens=12, temperature=1.0, seed=7)
        lp = await c.complete(msgs[0], max_tokens=4, logprobs=True)
        await c.aclose()
        return greedy, single, s1, s2, lp
    greedy, single, s1, s2, lp = run(go())
    assert all(g.finish_reason in ("stop", "length") and g.completion_tokens <= 12 for g in greedy)
    assert greedy[2].text == single.text  # batched greedy == alone
    assert [a.text for a in s1] == [b.text for b in s2]  # seeded sampling is reproducible
    assert len(lp.logprobs) == lp.completion_tokens and all(x <= 0 for x in lp.logprobs)
    assert greedy[0].model == str(tiny_model)
