"""Grading that cannot be taken down: math-verify and sympy run in a pool of worker processes.

A thread cannot stop work inside sympy's C code (a response ``\\boxed{2^{2^{2^{49}}}}`` once ran
for more than 10 minutes and grew to 11 GB in-process). So every MATH-style comparison that reaches
sympy (``grade``, ``eval``, the corpus verifier, ``--select-by accuracy``) is sent to a worker
process that has

* a wall-clock limit (``--grade-timeout``): a worker that overruns is killed and replaced, and the
  case is ``invalid`` with reason ``timeout``;
* a memory cap (``--grade-memory-mb``, ``RLIMIT_AS`` in the worker): a worker that runs out of
  memory (a ``MemoryError``, or killed by the system) is replaced, and the case is ``invalid`` with
  reason ``memory``.

Before any of that, a cheap pre-check (``equivalence.too_large``) refuses absurd magnitudes, reason
``too large``. Summaries count the three reasons apart (``grading_limits``).

The workers form one pool per memory cap, reused across cases (one round trip through a pipe per
case, so the cost stays near the in-process path's; see scripts/bench_grading.py), started lazily,
at most ``min(4, CPUs)``. They come from a ``forkserver`` (``spawn`` where there is none) that has
already imported and warmed math-verify and sympy (``grading_preload``), so a replacement starts in
milliseconds, beside the caller, and never inherits the parent's threads (MLX, asyncio). ``call`` is safe from any thread; from asyncio, run
``grade`` with ``asyncio.to_thread``. Workers ignore SIGINT/SIGTERM (the parent's interrupt
policy decides), exit when the parent's pipe closes, and are stopped at interpreter exit (atexit).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.util  # noqa: F401 (its exit hook must be registered before ours)
import os
import signal
import sys
import threading
import types

from mlx_distill.config import GradeConfig
from mlx_distill.tasks import equivalence
from mlx_distill.tasks.equivalence import MAX_ANSWER_CHARS, strings_equal, too_large

DEFAULT_TIMEOUT = GradeConfig.grade_timeout
DEFAULT_MEMORY_MB = GradeConfig.grade_memory_mb
LIMIT_REASONS = ("timeout", "memory", "too large")
_READY_S = 120.0   # a fresh worker's start (the forkserver's first start imports sympy): not the case's time


class GradingLimit(Exception):
    """A case stopped by a limit: ``reason`` is "timeout" or "memory"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class GradingError(Exception):
    """The grading function raised in the worker (its message is the worker's)."""


def _set_limits(memory_mb: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    try:
        import resource

        cap = int(memory_mb) * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (ImportError, ValueError, OSError):  # macOS does not enforce RLIMIT_AS: the timeout still holds
        pass
    if sys.platform.startswith("linux"):  # die with the forkserver (which dies with the parent)
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _worker_main(conn, memory_mb: int) -> None:
    _set_limits(memory_mb)
    if "mlx_distill.tasks.grading_preload" not in sys.modules:  # spawned, not forked from a warm server
        try:  # the parser's first use builds its tables: before "ready", so no case's time pays for it
            equivalence.judge("x+1", "1+x")
        except Exception:  # noqa: BLE001 (a broken install shows on the first real case)
            pass
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, args = msg
        try:
            out = ("ok", fn(*args))
        except MemoryError:
            out = ("memory", None)
        except RecursionError:
            out = ("error", "recursion too deep")
        except Exception as e:  # noqa: BLE001 (any failure of sympy is the case's, not the worker's)
            out = ("error", f"{type(e).__name__}: {e}"[:300])
        try:
            conn.send(out)
        except (OSError, ValueError):
            return
        if out[0] == "memory":
            return  # a process that ran out of memory is not trusted with the next case


def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["mlx_distill.tasks.grading_preload"])
        return ctx
    return mp.get_context("spawn")


# A worker needs nothing of the caller's main module: without this, multiprocessing would re-run a
# script that grades without the `if __name__ == "__main__":` guard in every worker it starts.
_NEUTRAL_MAIN = types.ModuleType("__main__")
_START_LOCK = threading.Lock()


class _Worker:
    def __init__(self, memory_mb: int):
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, memory_mb), daemon=True,
                                name="mlx-distill-grader")
        with _START_LOCK:
            main = sys.modules.get("__main__")
            sys.modules["__main__"] = _NEUTRAL_MAIN
            try:
                self.proc.start()
            finally:
                sys.modules["__main__"] = main
        child.close()
        if not self.conn.poll(_READY_S):
            self.kill()
            raise RuntimeError(f"a grading worker did not start within {_READY_S:.0f} s")
        self.conn.recv()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(5)
        except (OSError, ValueError, AssertionError):
            pass
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.join(1)
        except (OSError, ValueError, AssertionError):
            pass
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


class WorkerPool:
    """Worker processes with a memory cap, reused across calls; ``call`` is thread-safe."""

    def __init__(self, memory_mb: int = DEFAULT_MEMORY_MB, size: int | None = None):
        self.memory_mb = int(memory_mb)
        self.size = size or max(1, min(4, os.cpu_count() or 1))
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._count = 0
        self._cv = threading.Condition()
        self._closed = False
        self.replaced = 0   # workers killed for a limit (a test and the benchmark read it)

    def _acquire(self) -> _Worker:
        with self._cv:
            while True:
                if self._closed:
                    raise RuntimeError("the grading pool is shut down")
                if self._idle:
                    w = self._idle.pop()
                    self._busy.add(w)
                    return w
                if self._count < self.size:
                    self._count += 1
                    break
                self._cv.wait()
        try:
            w = _Worker(self.memory_mb)
        except BaseException:
            with self._cv:
                self._count -= 1
                self._cv.notify()
            raise
        with self._cv:
            self._busy.add(w)
        return w

    def _release(self, w: _Worker, reuse: bool) -> None:
        with self._cv:
            self._busy.discard(w)
            if reuse and not self._closed:
                self._idle.append(w)
            else:
                self._count -= 1
            self._cv.notify()
        if not reuse:
            try:
                w.proc.kill()  # SIGKILL now; reaping it and starting the replacement happen beside the caller
            except (OSError, ValueError, AttributeError):
                pass
            threading.Thread(target=self._replace, args=(w,), daemon=True, name="mlx-distill-grader-start").start()

    def _replace(self, dead: _Worker) -> None:
        dead.kill()
        with self._cv:
            if self._closed or self._count >= self.size:
                return
            self._count += 1
        try:
            w = _Worker(self.memory_mb)
        except BaseException:  # noqa: BLE001 (the next call starts one itself)
            with self._cv:
                self._count -= 1
                self._cv.notify()
            return
        with self._cv:
            if self._closed:
                self._count -= 1
            else:
                self._idle.append(w)
                self._cv.notify()
                return
        w.kill()

    def warm(self) -> None:
        """Start the workers now (a command about to grade many answers; a benchmark)."""
        ws = [self._acquire() for _ in range(self.size)]
        for w in ws:
            self._release(w, True)

    def call(self, fn, *args, timeout: float | None = DEFAULT_TIMEOUT, _retry: bool = True):
        """fn(*args) in a worker (fn importable by name); GradingLimit on timeout / out of memory,
        GradingError when fn raised. `timeout` None or <= 0: no wall-clock limit."""
        w = self._acquire()
        reuse = False
        try:
            try:
                w.conn.send((fn, args))
                if not w.conn.poll(timeout if timeout and timeout > 0 else None):
                    self.replaced += 1
                    raise GradingLimit("timeout")
                status, value = w.conn.recv()
            except (EOFError, OSError):
                self.replaced += 1
                w.proc.join(1)
                if w.proc.exitcode == -signal.SIGKILL or not _retry:  # the system's out-of-memory killer
                    raise GradingLimit("memory") from None
                died = True  # stopped by someone else (a SIGTERM to the process group): once more on a fresh one
            else:
                died = False
            if died:
                return self._retry(fn, args, timeout)
            if status == "memory":
                self.replaced += 1
                raise GradingLimit("memory")
            reuse = True
            if status == "error":
                raise GradingError(value)
            return value
        finally:  # an interrupt while waiting also lands here: that worker is not reused
            self._release(w, reuse)

    def _retry(self, fn, args, timeout):
        return self.call(fn, *args, timeout=timeout, _retry=False)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            idle, busy = self._idle, list(self._busy)
            self._idle = []
        for w in idle:
            w.stop()
        for w in busy:
            w.kill()

    def pids(self) -> list[int]:
        with self._cv:
            return [w.proc.pid for w in [*self._idle, *self._busy]]


_POOLS: dict[int, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(memory_mb: int = DEFAULT_MEMORY_MB) -> WorkerPool:
    """The process-wide pool for this memory cap (created on first use)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(int(memory_mb))
        if pool is None or pool._closed:
            pool = _POOLS[int(memory_mb)] = WorkerPool(memory_mb)
        return pool


def shutdown() -> None:
    """Stop every worker (registered with atexit; also safe to call early)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for p in pools:
        p.close()


def _forget_pools() -> None:  # a forked child does not own its parent's workers
    _POOLS.clear()


atexit.register(shutdown)  # after multiprocessing's own exit hook (imported above), so it runs first
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def math_equal(pred: str, gold: str, timeout: float | None = DEFAULT_TIMEOUT,
               memory_mb: int = DEFAULT_MEMORY_MB) -> tuple[str, str, str]:
    """(status, method, reason) of a MATH-style answer pair: the string check here, the rest in a
    worker (``equivalence.judge``) under the time and memory limits. ``memory_mb=0``: compare in this
    process without any limit (the path before the pool: for debugging and scripts/bench_grading.py)."""
    if strings_equal(pred, gold):
        return "correct", "string", ""
    if len(pred) > MAX_ANSWER_CHARS:
        return "invalid", "string", "unparsable"
    if not memory_mb:
        return equivalence.judge(pred, gold)
    if too_large(pred):
        return "invalid", "precheck", "too large"
    try:
        return tuple(get_pool(memory_mb).call(equivalence.judge, pred, gold, timeout=timeout))
    except GradingLimit as e:
        return "invalid", "math-verify", e.reason
    except GradingError:
        return "invalid", "math-verify", "unparsable"
