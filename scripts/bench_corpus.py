"""Corpus-builder throughput against a local server with a fixed response delay.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python scripts/bench_corpus.py
    python scripts/bench_corpus.py --delay 0.5 --concurrency 1 8 32 128 --per-slot 4

The server (tests/fault_server.py, run as its own process so it does not share this one's
GIL) answers every request after `--delay` seconds. For each concurrency c the whole builder
runs (solver requests, programmatic verification, fsynced appends, finalisation) on
max(--min-problems, c x --per-slot) GSM8K train problems in a fresh folder; problems/s is
measured over the request phase (manifest `this_run.seconds`). With a fixed delay the ideal
is c / delay problems/s, so the speed-up over c = 1 should be close to c while the client's
per-request CPU cost stays small against delay / c. Target: >= 80% of linear up to 32.
"""

import argparse
import contextlib
import io
import os
import socket
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delay", type=float, default=0.5, help="server response delay in seconds")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--per-slot", type=int, default=4, help="problems per concurrency slot")
    ap.add_argument("--min-problems", type=int, default=8)
    a = ap.parse_args()

    load0 = os.getloadavg()
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "fault_server.py"), "--port", str(port),
                               "--delay", str(a.delay), "--content", "Ann has 72 apples.\n#### 72"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/models", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            # warm-up: imports (openai, math-verify) and the first connection are not part of any timing
            with contextlib.redirect_stdout(io.StringIO()):
                build(C.build(C.CorpusConfig, overrides=dict(source="gsm8k", limit=2, base_url=url, model="bench",
                                                             api_key_env="", out=os.path.join(tmp, "warm"),
                                                             progress=False)))
            for c in a.concurrency:
                n = max(a.min_problems, c * a.per_slot)
                cfg = C.build(C.CorpusConfig, overrides=dict(
                    source="gsm8k", limit=n, base_url=url, model="bench", api_key_env="", concurrency=c,
                    out=os.path.join(tmp, f"c{c}"), progress=False, backoff=0.05))
                t, cpu = time.perf_counter(), time.process_time()
                with contextlib.redirect_stdout(io.StringIO()):
                    man = build(cfg)
                wall, cpu = time.perf_counter() - t, time.process_time() - cpu
                done = man["attempts"]["final"]
                secs = man["this_run"]["seconds"]
                rows.append((c, n, done, secs, wall, done / secs, 1000 * cpu / done))
                print(f"concurrency {c:>4}: {done}/{n} problems in {secs:.2f}s (wall {wall:.2f}s) "
                      f"= {done / secs:.2f} problems/s, builder CPU {1000 * cpu / done:.1f} ms/problem", flush=True)
    finally:
        server.terminate()
        server.wait(10)
    base = rows[0][5]
    load = os.getloadavg()
    print(f"\nserver delay {a.delay}s; ideal problems/s = concurrency / delay; speed-up vs concurrency {rows[0][0]}; "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (before: {load0[0]:.1f})")
    print(f"{'concurrency':>11} {'problems':>8} {'seconds':>8} {'problems/s':>10} {'ideal/s':>8} {'speed-up':>8} "
          f"{'of linear':>9} {'CPU ms/problem':>14}")
    for c, n, done, secs, wall, rate, cpu_ms in rows:
        sp = rate / base
        print(f"{c:>11} {n:>8} {secs:>8.2f} {rate:>10.2f} {c / a.delay:>8.1f} {sp:>7.1f}x {sp / (c / rows[0][0]):>8.0%} "
              f"{cpu_ms:>14.1f}")
    # the builder's own CPU per problem bounds it: one free core gives at most 1000 / cpu_ms problems/s
    print(f"CPU-bound ceiling of the builder on one free core: ~{1000 / rows[-1][6]:.0f} problems/s "
          "(other processes on the machine lower the measured speed-ups)")


if __name__ == "__main__":
    main()
