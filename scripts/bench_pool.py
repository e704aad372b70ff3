"""Corpus-builder throughput against a pool of 1, 2 and 4 local servers at a fixed latency.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 MLX_DISTILL_DATA=/path/to/data \\
        python scripts/bench_pool.py --delay 0.2 --concurrency 4 --servers 1 2 4 --per-slot 10

Each server is tests/fault_server.py in its own process (so the servers do not share the
builder's GIL), answering every request after `--delay` seconds. For each pool size N the whole
builder runs (`corpus build --base-url URL1 ... URLN --concurrency C`: solver requests,
programmatic verification, fsynced appends, finalisation) on `--per-slot` x N x C GSM8K train
problems in a fresh folder; problems/s is measured over the request phase (manifest
`this_run.seconds`). The ideal is N x C / delay problems/s, so N servers should give N times
one server's rate while the builder's own CPU per problem stays small against delay / (N x C).
Target: >= 3.5x for 4 servers against 1.

`--client-only` times the pool client alone (`PoolClient.complete` for every problem's prompt,
gathered at once): the spread without the builder's grading and file writes.
"""

import argparse
import contextlib
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlx_distill import config as C  # noqa: E402
from mlx_distill.corpus.build import build  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(delay: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fault_server.py"), "--port", str(port),
                             "--delay", str(delay), "--content", "Ann has 72 apples.\n#### 72"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/models", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"fault server on {url} did not start")


def run_once(urls: list[str], n: int, concurrency: int, out: str) -> tuple[float, int, float, dict]:
    cfg = C.build(C.CorpusConfig, overrides=dict(
        source="gsm8k", limit=n, base_url=urls, model="bench", api_key_env="", concurrency=concurrency,
        out=out, progress=False, backoff=0.05, leakage="warn"))
    cpu = time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        man = build(cfg)
    cpu = time.process_time() - cpu
    done = man["attempts"]["final"]
    return man["this_run"]["seconds"], done, 1000 * cpu / max(1, done), man.get("servers", {})


def run_client_only(urls: list[str], n: int, concurrency: int) -> tuple[float, int, float, dict]:
    import asyncio

    from mlx_distill.generation import make_client

    async def go():
        client = make_client("api", base_url=urls, model="bench", api_key_env="", concurrency=concurrency,
                             backoff_base=0.05)
        t = time.perf_counter()
        out = await asyncio.gather(*(client.complete([{"role": "user", "content": f"[P{i}] q"}], max_tokens=16)
                                     for i in range(n)))
        secs = time.perf_counter() - t
        await client.aclose()
        stats = client.server_stats()
        return secs, len(out), stats

    cpu = time.process_time()
    secs, done, stats = asyncio.run(go())
    return secs, done, 1000 * (time.process_time() - cpu) / done, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delay", type=float, default=0.2, help="server response delay in seconds")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight per server")
    ap.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4], help="pool sizes to measure")
    ap.add_argument("--per-slot", type=int, default=10, help="problems per request slot (N x concurrency slots)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per pool size (the median is reported)")
    ap.add_argument("--client-only", action="store_true", help="time the pool client alone (no builder)")
    a = ap.parse_args()

    load0 = os.getloadavg()
    procs, urls = [], []
    try:
        for _ in range(max(a.servers)):
            p, u = start_server(a.delay)
            procs.append(p)
            urls.append(u)
        rows = []
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
            # warm-up: imports (openai, math-verify) and first connections are not part of any timing
            run_once(urls[:max(a.servers)], 2 * max(a.servers), a.concurrency, os.path.join(tmp, "warm"))
            for n_srv in a.servers:
                n = a.per_slot * n_srv * a.concurrency
                runs = [run_client_only(urls[:n_srv], n, a.concurrency) if a.client_only else
                        run_once(urls[:n_srv], n, a.concurrency, os.path.join(tmp, f"s{n_srv}-{r}"))
                        for r in range(a.repeat)]
                secs = statistics.median(r[0] for r in runs)
                done, cpu_ms, servers = runs[0][1], statistics.median(r[2] for r in runs), runs[-1][3]
                rows.append((n_srv, n, done, secs, done / secs, cpu_ms, servers))
                print(f"{n_srv} server(s): {done}/{n} problems in {secs:.2f}s = {done / secs:.2f} problems/s; "
                      f"requests per server {[s['requests'] for s in servers.values()]}", file=sys.__stdout__,
                      flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    load = os.getloadavg()
    base = rows[0][4]
    print(f"\n{'pool client alone' if a.client_only else 'corpus build'}: server delay {a.delay}s, concurrency {a.concurrency} per server; ideal problems/s = servers x "
          f"concurrency / delay; {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"(before: {load0[0]:.1f})")
    print(f"{'servers':>7} {'problems':>8} {'seconds':>8} {'problems/s':>10} {'ideal/s':>8} {'vs 1':>6} "
          f"{'of ideal':>8} {'CPU ms/problem':>14}")
    for n_srv, n, done, secs, rate, cpu_ms, _ in rows:
        ideal = n_srv * a.concurrency / a.delay
        print(f"{n_srv:>7} {n:>8} {secs:>8.2f} {rate:>10.2f} {ideal:>8.1f} {rate / base:>5.2f}x {rate / ideal:>8.0%} "
              f"{cpu_ms:>14.1f}")
    if rows[0][0] == 1 and rows[-1][0] > 1:
        print(f"ratio {rows[-1][0]} servers vs 1: {rows[-1][4] / base:.2f}x (target >= {0.875 * rows[-1][0]:.1f}x)")


if __name__ == "__main__":
    main()
