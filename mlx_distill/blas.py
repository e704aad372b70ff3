"""Fast BLAS for MLX on Linux.

The Linux ``mlx[cpu]`` wheel links a reference BLAS: a 1024^3 float32 matmul ran at
~7 GFLOP/s as installed and ~200 GFLOP/s with Debian's OpenBLAS preloaded on a 2-core
machine (scripts/bench_blas.py). The dynamic linker only honours LD_PRELOAD at process
start, so the CLI re-executes itself once with OpenBLAS preloaded when one is installed,
and otherwise says exactly what to install. Nothing happens on macOS (MLX uses Accelerate/Metal).
"""

import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
INSTALL_HINT = ("MLX on Linux is using its slow reference BLAS (about 30x slower matmuls). "
                "Install OpenBLAS: `sudo apt-get install -y libopenblas0-pthread` "
                "(or set MLX_DISTILL_OPENBLAS=/path/to/libblas.so.3).")
_ENV_DONE = "MLX_DISTILL_BLAS_CHECKED"


def find_openblas() -> str | None:
    explicit = os.environ.get("MLX_DISTILL_OPENBLAS")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((p for p in CANDIDATES if Path(p).is_file()), None)


def preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "") or "blas" in os.environ.get("LD_PRELOAD", "")


def status() -> dict:
    """For manifests and benchmark docs."""
    return {"platform": sys.platform, "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "openblas_found": find_openblas(), "preloaded": preloaded()}


def preload_env(env: dict | None = None) -> dict:
    """A copy of `env` with OpenBLAS preloaded (for subprocesses such as `mlx_lm server`)."""
    env = dict(os.environ if env is None else env)
    lib = find_openblas()
    if sys.platform.startswith("linux") and lib and lib not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    return env


def ensure_fast_blas(reexec_args: list[str]) -> None:
    """Re-exec the current Python with OpenBLAS preloaded, once, on Linux."""
    if not sys.platform.startswith("linux") or preloaded() or os.environ.get(_ENV_DONE):
        return
    if "mlx" in sys.modules or "mlx.core" in sys.modules:
        return  # too late to swap the BLAS of this process
    lib = find_openblas()
    os.environ[_ENV_DONE] = "1"
    if lib is None:
        print(f"warning: {INSTALL_HINT}", file=sys.stderr)
        return
    env = preload_env()
    env[_ENV_DONE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *reexec_args], env)
