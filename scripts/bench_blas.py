"""MLX float32 matmul speed with and without OpenBLAS preloaded, measured side by side.

    python scripts/bench_blas.py                 # 1024^3, best of >= 5 runs / 2 s per side
    python scripts/bench_blas.py --n 2048 --seconds 4

The Linux ``mlx[cpu]`` wheel links a reference BLAS; ``mlx_distill.blas`` re-executes the CLI
with OpenBLAS in LD_PRELOAD (the dynamic linker reads it only at process start). This script
runs itself twice as a child process -- once with ``blas.preload_env()``, once with every BLAS
entry stripped from LD_PRELOAD -- and prints GFLOP/s of both and their ratio. Each child also
reports whether an OpenBLAS library is actually mapped into it (/proc/self/maps), so a preload
that the linker silently ignored cannot pass for a slow machine.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(n: int, seconds: float) -> dict:
    import mlx.core as mx

    mx.random.seed(0)
    a = mx.random.normal((n, n), dtype=mx.float32)
    b = mx.random.normal((n, n), dtype=mx.float32)
    mx.eval(a, b)
    mx.eval(a @ b)  # warm-up
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 and sum(times) > 4 * seconds:  # a very slow BLAS: enough evidence
            break
    flops = 2.0 * n ** 3
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    return {"n": n, "runs": len(times), "best_s": min(times), "median_s": sorted(times)[len(times) // 2],
            "gflops": flops / min(times) / 1e9, "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "openblas_mapped": "openblas" in maps, "mlx": mx.__version__}


def strip_blas(env: dict) -> dict:
    env = dict(env)
    keep = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "blas" not in p]
    if keep:
        env["LD_PRELOAD"] = ":".join(keep)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def run_child(env: dict, n: int, seconds: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--seconds", str(seconds)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"benchmark child failed ({r.returncode}):\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="MLX matmul GFLOP/s with and without OpenBLAS preloaded")
    p.add_argument("--n", type=int, default=1024, help="square matrix size")
    p.add_argument("--seconds", type=float, default=2.0, help="timing budget per side (at least 5 runs)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.n, a.seconds)))
        return

    from mlx_distill import blas

    lib = blas.find_openblas()
    if lib is None:
        raise SystemExit(f"no OpenBLAS found: {blas.INSTALL_HINT}")
    base = strip_blas(os.environ)
    fast = run_child(blas.preload_env(base), a.n, a.seconds)
    slow = run_child(base, a.n, a.seconds)
    print(f"MLX {fast['mlx']} float32 matmul {a.n}x{a.n} @ {a.n}x{a.n}, {os.cpu_count()} CPUs "
          f"(best of {fast['runs']} / {slow['runs']} runs)")
    for name, r in (("OpenBLAS preloaded", fast), ("as installed", slow)):
        print(f"  {name:<20} {r['gflops']:8.1f} GFLOP/s   best {r['best_s'] * 1e3:8.1f} ms   "
              f"openblas mapped: {r['openblas_mapped']}")
    print(f"  ratio                {fast['gflops'] / slow['gflops']:8.1f}x   (LD_PRELOAD={lib})")
    if not fast["openblas_mapped"]:
        print("warning: the preloaded child did not map OpenBLAS; the linker ignored LD_PRELOAD", file=sys.stderr)


if __name__ == "__main__":
    main()
