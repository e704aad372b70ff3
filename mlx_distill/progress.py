"""Progress a person can follow in a log: a plain line at least every ~10 s when output is not a terminal.

On a terminal the long commands draw a rich progress bar; piped into a file or a CI log the bar
is disabled, and a command used to print nothing between its first and last lines for minutes.
`Heartbeat` prints, from a background thread so that a long blocking step (a teacher forward, a
slow request) cannot silence it::

    corpus build: 120/500 (24.0%) | 2.1/s | elapsed 0:57 | eta 3:01 | verified 100, rejected 15, failed 5

The interval is ``MLX_DISTILL_PROGRESS_EVERY`` seconds (default 10; the tests shorten it).
"""

import os
import sys
import threading
import time

ENV = "MLX_DISTILL_PROGRESS_EVERY"


def interval() -> float:
    try:
        return max(float(os.environ.get(ENV, "10")), 0.05)
    except ValueError:
        return 10.0


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Heartbeat:
    """``with Heartbeat("logits", total=n, unit="examples") as hb: ... hb.update(done, verified=3)``.

    Prints a line every `every` seconds while inside the block (and only when something is to be
    said: it never prints before the first interval has passed). ``fields`` are shown as
    ``name value`` after the rate and times; a float field is printed with 4 decimals."""

    def __init__(self, label: str, total: int | None = None, unit: str = "", every: float | None = None,
                 stream=None, enabled: bool = True):
        self.label, self.total, self.unit = label, total, unit
        self.every = interval() if every is None else every
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.fields: dict = {}
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()

    def update(self, done: int | None = None, advance: int = 0, total: int | None = None, **fields) -> None:
        with self._lock:
            if done is not None:
                self.done = done
            self.done += advance
            if total is not None:
                self.total = total
            self.fields.update(fields)

    def line(self) -> str:
        with self._lock:
            done, total, fields = self.done, self.total, dict(self.fields)
        el = time.perf_counter() - self.t0
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"{self.label}: {done}/{total}{unit} ({100 * done / total:.1f}%)" if total else
                 f"{self.label}: {done}{unit}"]
        rate = done / el if el > 0 else 0.0
        parts.append(f"{rate:.2f}/s" if rate < 10 else f"{rate:.0f}/s")
        parts.append(f"elapsed {clock(el)}")
        if total and done and done < total:
            parts.append(f"eta {clock((total - done) / rate)}")
        if fields:
            parts.append(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()))
        return " | ".join(parts)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name=f"progress-{self.label}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class PlainProgress:
    """The part of ``rich.progress.Progress`` that `corpus build` drives (add_task / update / tasks),
    printed as `Heartbeat` lines: the progress display when stderr is not a terminal."""

    class _Task:
        def __init__(self, total):
            self.total = total
            self.completed = 0

    def __init__(self, label: str, unit: str = "", fields_format=None, stream=None):
        self.hb = Heartbeat(label, unit=unit, stream=stream)
        self.tasks: list = []
        self.fields_format = fields_format or (lambda f: f)

    def add_task(self, description: str, total=None, **fields) -> int:
        self.tasks.append(self._Task(total))
        self.hb.update(done=0, total=total, **self.fields_format(fields))
        return len(self.tasks) - 1

    def update(self, task: int, advance: int = 0, total=None, completed=None, **fields) -> None:
        t = self.tasks[task]
        if total is not None:
            t.total = total
        t.completed = completed if completed is not None else t.completed + advance
        self.hb.update(done=t.completed, total=t.total, **self.fields_format(fields))

    def __enter__(self):
        self.hb.__enter__()
        return self

    def __exit__(self, *exc):
        self.hb.__exit__(*exc)
