"""Teacher server pools (generation/pool.py) and loud failures of `corpus build` (issue 13 item 2).

Loopback fault servers only (tests/fault_server.py); every test is bounded to a few seconds."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from fault_server import FaultServer
from mlx_distill import config as C
from mlx_distill.corpus import build as B
from mlx_distill.generation.clients import ClientError, OpenAIClient
from mlx_distill.generation import make_client
from mlx_distill.generation.pool import PoolClient
from mlx_distill.io import InputError, read_jsonl
from mlx_distill.paths import REPO

MSG = [{"role": "user", "content": "[A] What is 3+4?"}]


def problems_file(path, n):
    """GSM8K-format problems '[Pi] ...' whose gold answer is i + 10."""
    rows = [{"question": f"[P{i}] Ann has {i} apples and buys 10 more. How many now?",
             "answer": f"{i} + 10 = {i + 10}\n#### {i + 10}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_items(n, wrong=()):
    return {f"[P{i}]": {"solve": {"content": f"Ann has {i} + 10 = {i + 10 + (i in wrong)} apples.\n"
                                             f"#### {i + 10 + (i in wrong)}"}} for i in range(n)}


def cfg(urls, probs, out, **kw):
    return C.build(C.CorpusConfig, overrides={
        "source": "gsm8k", "problems": str(probs), "base_url": urls, "model": "asked-model", "api_key_env": "",
        "out": str(out), "leakage": "warn", "backoff": 0.01, "max_retries": 3, "timeout": 5.0, "concurrency": 2,
        "progress": False, **kw})


def dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on (closed again at once)
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_base_url_takes_one_or_several(tmp_path):
    import argparse

    ap = argparse.ArgumentParser()
    C.add_arguments(ap, C.CorpusConfig)
    one = C.resolve(C.CorpusConfig, ap.parse_args(["--base-url", "http://a/v1"]))
    two = C.resolve(C.CorpusConfig, ap.parse_args(["--base-url", "http://a/v1", "http://b/v1"]))
    assert one.base_url == "http://a/v1" and two.base_url == ["http://a/v1", "http://b/v1"]
    (tmp_path / "c.yaml").write_text("base_url: [http://a/v1, http://b/v1]\n")
    (tmp_path / "d.yaml").write_text("base_url: [http://a/v1]\n")
    assert C.resolve(C.CorpusConfig, ap.parse_args(["-c", str(tmp_path / "c.yaml")])).base_url == ["http://a/v1",
                                                                                                   "http://b/v1"]
    assert C.resolve(C.CorpusConfig, ap.parse_args(["-c", str(tmp_path / "d.yaml")])).base_url == "http://a/v1"
    assert C.build(C.EvalConfig, overrides={"base_url": ["http://a/v1", "http://b/v1"]}).base_url == ["http://a/v1",
                                                                                                    "http://b/v1"]
    assert isinstance(make_client("api", base_url=["http://127.0.0.1:1/v1"], model="m", api_key_env=""), OpenAIClient)
    pool = make_client("api", base_url=["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"], model="m",
                       api_key_env="", concurrency=3)
    assert isinstance(pool, PoolClient) and pool.capacity == 6
    with pytest.raises(InputError, match="twice"):
        make_client("api", base_url=["http://127.0.0.1:1/v1", "http://127.0.0.1:1/v1/"], model="m", api_key_env="")
    assert B.public_config(cfg(["http://u:pw@h1/v1", "http://h2/v1"], "p", "o"))["base_url"] == ["http://h1/v1",
                                                                                                 "http://h2/v1"]
    # a judge of another model on the pool: the same servers, each server's rate limit shared with the teacher
    cl = B.make_clients(cfg(["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"], "p", "o", judge_model="j", rpm=60))
    assert isinstance(cl["judge"], PoolClient) and cl["judge"].model == "j"
    assert [m.client.limiter for m in cl["judge"].members] == [m.client.limiter for m in cl["teacher"].members]
    assert cl["teacher"].members[0].client.limiter.rpm == 60 and cl["rewriter"] is None


def test_least_outstanding_spread_and_per_server_concurrency():
    with FaultServer({"delay": 0.1}) as a, FaultServer({"delay": 0.1}) as b:
        async def go():
            pool = PoolClient([a.base_url, b.base_url], "m", api_key_env="", concurrency=2, backoff_base=0.01)
            out = await asyncio.gather(*(pool.complete(MSG, max_tokens=8) for _ in range(8)))
            await pool.aclose()
            return pool, out

        pool, out = asyncio.run(go())
    assert len(out) == 8 and a.max_active == 2 and b.max_active == 2  # each server's own concurrency, used
    assert sum(a.counts.values()) == 4 and sum(b.counts.values()) == 4  # spread evenly
    st = pool.server_stats()
    assert [st[s.base_url]["ok"] for s in (a, b)] == [4, 4] and pool.stats["ok"] == 8
    assert {c.server for c in out} == {a.base_url, b.base_url}


def test_hung_server_marked_down_its_request_moved_and_its_late_answer_ignored(capsys):
    """B answers only after 2 s; the client gives up after 1 s. r1 (t=0) and r3 (t=0.3) go to B; r1's
    timeout marks B down, r3 is cancelled and re-queued on A; B's late answer to r3 (t=2.3) is never seen.
    B then recovers: after its back-off one request probes it, and it is back up."""
    with FaultServer({"delay": 2.0}) as b, FaultServer({"delay": 0.05}) as a:
        async def go():
            pool = PoolClient([b.base_url, a.base_url], "m", api_key_env="", concurrency=4, timeout=1.0,
                              backoff_base=0.01, down_after=1, down_backoff=0.5)
            r1 = asyncio.ensure_future(pool.complete([{"role": "user", "content": "[R1] q"}], max_tokens=8))
            await asyncio.sleep(0.3)
            r2 = asyncio.ensure_future(pool.complete([{"role": "user", "content": "[R2] q"}], max_tokens=8))
            await asyncio.sleep(0.01)
            r3 = asyncio.ensure_future(pool.complete([{"role": "user", "content": "[R3] q"}], max_tokens=8))
            first = await asyncio.gather(r1, r2, r3)
            state = {k: dict(v) for k, v in pool.server_stats().items()}
            await asyncio.sleep(1.4)  # B's late answer arrives (into a closed connection) meanwhile
            b.script["delay"] = 0.0   # B is healthy again
            later = await asyncio.gather(*(pool.complete(MSG, max_tokens=8) for _ in range(4)))
            up = pool.members[0].up
            await pool.aclose()
            return pool, first, state, later, up

        pool, first, state, later, b_up = asyncio.run(go())
        b_log = [e["key"] for e in b.log]
    assert [c.server for c in first] == [a.base_url] * 3  # every answer of the first three came from A
    assert state[b.base_url]["marked_down"] == 1 and state[b.base_url]["requeued"] == 1
    assert state[b.base_url]["failed"] == 1 and state[b.base_url]["ok"] == 0
    assert pool.stats["requeued"] == 1 and first[2].attempts == 2  # r3: B (moved) then A
    assert len(b_log) >= 2  # B did receive r1 and r3 (and answered r3 late, to nobody)
    assert len(later) == 4 and b_up and pool.server_stats()[b.base_url]["ok"] >= 1
    err = capsys.readouterr().err
    assert "marked down" in err and "1 request(s) in flight moved" in err and "is back up" in err


def test_killed_server_mid_build_gives_the_single_server_verified_set(tmp_path):
    n = 24
    items = good_items(n, wrong=(3, 7))
    probs = problems_file(tmp_path / "p.jsonl", n)
    with FaultServer({"delay": 0.05, "items": items}) as ref:
        B.build(cfg(ref.base_url, probs, tmp_path / "single"))
    a, b = FaultServer({"delay": 0.1, "items": items}).start(), FaultServer({"delay": 0.1, "items": items}).start()
    try:
        def killer():
            t_end = time.time() + 10
            while sum(b.counts.values()) < 4 and time.time() < t_end:
                time.sleep(0.005)
            b.kill()  # requests in flight on B are reset; new connections to B are refused

        k = threading.Thread(target=killer)
        k.start()
        man = B.build(cfg([a.base_url, b.base_url], probs, tmp_path / "pool"))
        k.join()
    finally:
        a.stop()
        b.kill()
    assert man["status"] == "complete" and b.dead
    single = (tmp_path / "single" / "verified.jsonl").read_text()
    assert single and (tmp_path / "pool" / "verified.jsonl").read_text() == single  # exactly the same records
    traces = read_jsonl(tmp_path / "pool" / "traces.jsonl")
    assert len(traces) == n and len({t["key"] for t in traces}) == n  # each attempt recorded once
    assert {t["status"] for t in traces} == {"verified", "rejected"}
    sv = man["servers"]
    assert sv[b.base_url]["marked_down"] == 1 and sv[b.base_url]["failed"] >= 1
    assert sv[a.base_url]["ok"] + sv[b.base_url]["ok"] == n  # no answer counted twice
    assert {t["provenance"]["base_url"] for t in traces} == {a.base_url, b.base_url}
    stats = B.stats(str(tmp_path / "pool"), as_json=True)
    assert stats["servers"] == sv


def test_unreachable_server_at_start_is_an_error_before_any_work(tmp_path, capsys):
    probs = problems_file(tmp_path / "p.jsonl", 3)
    t = time.perf_counter()
    with pytest.raises(InputError, match="cannot reach the server at http://127.0.0.1:.*Is it running"):
        B.build(cfg(dead_url(), probs, tmp_path / "none"))
    assert time.perf_counter() - t < 20 and not (tmp_path / "none").exists()  # no retry loop: at once
    with pytest.raises(InputError, match="no server of the pool can be reached"):
        B.build(cfg([dead_url(), dead_url()], probs, tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    # a pool starts when one server is up, and says which is down
    down = dead_url()
    with FaultServer({"items": good_items(3)}) as srv:
        man = B.build(cfg([down, srv.base_url], probs, tmp_path / "half"))
    assert man["status"] == "complete" and man["attempts"]["verified"] == 3
    assert f"server {down} is down at start" in capsys.readouterr().err
    assert man["servers"][down] == {"requests": 0, "ok": 0, "failed": 0, "retries": 0, "requeued": 0,
                                    "marked_down": 1}
    # eval: the same probe before any problem is sent
    from mlx_distill.generation import make_eval_client

    with pytest.raises(InputError, match="cannot reach"):
        make_eval_client(C.EvalConfig(backend="api", base_url=dead_url(), model="m"))


@pytest.mark.parametrize("models", ["empty_body", "404", "empty_list"])
def test_model_list_failure_says_pass_model(tmp_path, models):
    probs = problems_file(tmp_path / "p.jsonl", 2)
    with FaultServer({"models": models, "items": good_items(2)}) as srv:
        with pytest.raises(InputError, match="could not look up the model name.*pass --model"):
            B.build(cfg(srv.base_url, probs, tmp_path / "c", model=""))
        assert not (tmp_path / "c").exists() and sum(srv.counts.values()) == 0
        # the lookup inside a request (no check() first) is guarded too: a clear failure, not a JSONDecodeError
        async def go():
            c = OpenAIClient(srv.base_url, None, api_key_env="", max_retries=0)
            try:
                await c.complete(MSG, max_tokens=8)
            finally:
                await c.aclose()

        with pytest.raises(ClientError, match="pass --model") as e:
            asyncio.run(go())
        assert e.value.kind == "model_lookup"
        man = B.build(cfg(srv.base_url, probs, tmp_path / "ok"))  # with --model it works
        assert man["attempts"]["verified"] == 2


def test_incomplete_status_exit_code_and_model_corrected_under_resume(tmp_path):
    probs = problems_file(tmp_path / "p.jsonl", 3)
    items = good_items(3)
    for i in range(3):  # every request of the first run is refused: 404 (model not found) is not retried
        items[f"[P{i}]"]["faults"] = ["404"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLX_DISTILL_PROGRESS_EVERY": "100"}
    out = tmp_path / "c"
    with FaultServer({"items": items}) as srv:
        common = ["--source", "gsm8k", "--problems", str(probs), "--base-url", srv.base_url, "--api-key-env", "",
                  "--out", str(out), "--leakage", "warn", "--backoff", "0.01", "--no-progress"]
        r = subprocess.run([sys.executable, "-m", "mlx_distill", "corpus", "build", *common, "--model", "wrong"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == B.EXIT_INCOMPLETE == 3, r.stderr
        assert "is incomplete: 3 attempt(s)" in r.stderr and "(404 3)" in r.stderr
        man = json.loads((out / "manifest.json").read_text())
        assert man["status"] == "incomplete" and man["failures"]["by_kind"] == {"404": 3}
        assert man["cost_usd"] is None and "no known price" in r.stdout
        # correcting --model on the same --out: allowed, since no attempt was finished with the old one
        man = B.build(B.config_from_args(_parse(["build", "--resume", "--out", str(out), "--model", "right"])))
        assert man["status"] == "complete" and man["attempts"]["verified"] == 3
        assert man["config"]["model"] == "right" and man["identity"]["model"] == "right"
        # now the folder holds finished attempts: changing the model again is refused
        with pytest.raises(InputError, match="finished attempt"):
            B.build(B.config_from_args(_parse(["build", "--resume", "--out", str(out), "--model", "third"])))


def _parse(argv):
    import argparse

    ap = argparse.ArgumentParser()
    C.add_arguments(ap, C.CorpusConfig)
    return ap.parse_args(argv[1:])


def test_cost_unknown_for_a_local_server_or_an_unpriced_model():
    mk = lambda **kw: C.build(C.CorpusConfig, overrides=kw)  # noqa: E731
    assert B.cost_usd(mk(base_url="http://127.0.0.1:8080/v1", model="deepseek-reasoner"), 10 ** 6, 10 ** 6) is None
    assert B.cost_usd(mk(base_url=["http://localhost:1/v1", "http://gpu:2/v1"], model="deepseek-r"), 1, 1) is None
    assert B.cost_usd(mk(base_url="https://api.example.com/v1", model="qwen-72b"), 10 ** 6, 10 ** 6) is None
    assert B.cost_usd(mk(preset="deepseek"), 10 ** 6, 10 ** 6) == pytest.approx(0.55 + 2.19)
    assert B.cost_usd(mk(base_url="http://127.0.0.1:1/v1", price_input=1.0, price_output=2.0), 10 ** 6, 0) == 1.0
    assert B.cost_usd(mk(teacher="mlx", model="smollm2"), 10 ** 6, 10 ** 6) == 0.0
    assert B.format_cost(None) == "—" and B.format_cost(0.5) == "$0.5000"


def test_retries_are_plain_lines_off_a_terminal(capsys):
    with FaultServer({"items": {"[A]": {"faults": ["500", "429"]}}}) as srv:
        async def go():
            c = OpenAIClient(srv.base_url, "m", api_key_env="", backoff_base=0.01, max_retries=3)
            try:
                return await c.complete(MSG, max_tokens=8)
            finally:
                await c.aclose()

        c = asyncio.run(go())
    err = capsys.readouterr().err.splitlines()
    assert c.attempts == 3 and len(err) == 2
    assert err[0].startswith("retry 1/3 in ") and f"({srv.base_url}, 500)" in err[0] and "(" in err[1]


def test_eval_with_a_pool_records_per_server_counts(tmp_path, shared_data):
    from mlx_distill.evaluation.evaluate import evaluate

    with FaultServer({"delay": 0.05}) as a, FaultServer({"delay": 0.05}) as b:
        s = evaluate(C.EvalConfig(backend="api", base_url=[a.base_url, b.base_url], model="m", dataset="gsm8k",
                                  limit=6, concurrency=2, out=str(tmp_path / "e"), plot=False), quiet=True)
    assert s["n"] == 6
    client = json.loads((tmp_path / "e" / "manifest.json").read_text())["client"]
    assert client["base_url"] == [a.base_url, b.base_url] and client["pool"]["capacity"] == 4
    assert sum(v["ok"] for v in client["servers"].values()) == 6 and all(v["requests"] for v in client["servers"].values())


def test_every_server_dying_ends_incomplete_not_hanging(tmp_path, capsys):
    n = 16
    items = good_items(n)
    probs = problems_file(tmp_path / "p.jsonl", n)
    a, b = FaultServer({"delay": 0.1, "items": items}).start(), FaultServer({"delay": 0.1, "items": items}).start()

    def killer():
        t_end = time.time() + 10
        while sum(a.counts.values()) + sum(b.counts.values()) < 6 and time.time() < t_end:
            time.sleep(0.005)
        a.kill()
        b.kill()

    k = threading.Thread(target=killer)
    k.start()
    t = time.perf_counter()
    man = B.build(cfg([a.base_url, b.base_url], probs, tmp_path / "c"))
    k.join()
    assert time.perf_counter() - t < 30
    traces = read_jsonl(tmp_path / "c" / "traces.jsonl")
    assert len(traces) == n and len({r["key"] for r in traces}) == n
    assert man["status"] == "incomplete" and set(man["failures"]["by_kind"]) == {"connection"}
    assert 0 < man["failures"]["attempts"] < n and man["attempts"]["verified"] == n - man["failures"]["attempts"]
    assert "all 2 servers are down" in (tmp_path / "c" / "traces.jsonl").read_text()
    assert all(v["marked_down"] == 1 for v in man["servers"].values())
