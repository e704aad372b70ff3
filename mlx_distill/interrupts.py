"""One interrupt policy for every long command (train, eval, corpus build, logits, study, pipeline).

SIGINT (Ctrl-C) and SIGTERM (a job scheduler's stop) both mean: finish the unit of work in hand
(an optimizer step, a batch of generations, a corpus request, an example's logits), save, and
exit 130 (SIGINT) or 143 (SIGTERM). A second signal stops at once. This holds whatever
disposition the process inherited: a job started in the background by a shell (`cmd &`, or from a
script under ``setsid ... < /dev/null``) inherits an *ignored* SIGINT, and a command that only
relied on Python's default handler would then run to the end and exit 0 after a ``kill -INT``.

Usage (the command polls between units of work)::

    with Interrupts("finishing this batch, then saving") as stop:
        for unit in work:
            do(unit)
            save(unit)
            stop.check()          # raises Interrupted(code) once a signal has come

or, for an asyncio command, ``stop.on_signal(callback)`` (called once, from the signal handler,
at the first signal; use ``loop.call_soon_threadsafe(task.cancel)`` so the loop wakes up).

`Interrupted` is a KeyboardInterrupt, so code that already unwinds on Ctrl-C keeps doing so; the
CLI turns it into exit code ``128 + signal`` (130 / 143) with one line on stderr.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A command stopped by SIGINT/SIGTERM after saving its work; ``code`` is the exit status."""

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        super().__init__(message)
        self.signum = int(signum)
        self.code = 128 + self.signum
        self.message = message


def exit_code(exc: BaseException) -> int:
    """The exit status for an interrupt: 128 + the signal (130 for a plain KeyboardInterrupt)."""
    return getattr(exc, "code", 128 + signal.SIGINT) if isinstance(exc, KeyboardInterrupt) else 1


class Interrupts:
    """Installs the policy's handlers for SIGINT and SIGTERM on entry and restores the ones it
    found on exit (whatever they were: the default, SIG_IGN, a caller's own). Outside the main
    thread signals cannot be handled: the object then only reports ``requested = False``.

    ``doing`` completes the message printed at the first signal ("interrupted: <doing> (send the
    signal again to stop at once)")."""

    def __init__(self, doing: str = "finishing the work in hand, then saving", quiet: bool = False):
        self.doing, self.quiet = doing, quiet
        self.signum: int | None = None
        self._prev: dict = {}
        self._callbacks: list[Callable[[int], None]] = []
        self._active = False
        self._outer: "Interrupts | None" = None

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._prev[s] = signal.signal(s, self._handle)
            self._active = True
            # nested inside another command's policy (a study cell's eval, a cell's train): a signal
            # this one took is handed back on exit, so the outer loop stops too
            outer = getattr(self._prev.get(signal.SIGINT), "__self__", None)
            self._outer = outer if isinstance(outer, Interrupts) else None
            if self._outer is not None and self._outer.signum is not None:
                self.signum = self._outer.signum  # it came already: this one stops at its first boundary
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers found on entry (idempotent)."""
        if self._active:
            for s, h in self._prev.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            self._active = False
            if self.signum is not None and self._outer is not None and self._outer.signum is None:
                self._outer.signum = self.signum

    # ------------------------------------------------------------------ the policy
    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise Interrupted(signum, "stopped at once (second signal)")
        self.signum = signum
        if not self.quiet:
            name = signal.Signals(signum).name
            print(f"\ninterrupted ({name}): {self.doing} (send it again to stop at once)", file=sys.stderr, flush=True)
        for cb in self._callbacks:
            cb(signum)

    def on_signal(self, callback: Callable[[int], None]) -> None:
        """Call `callback(signum)` at the first signal (from the handler: keep it short)."""
        self._callbacks.append(callback)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def code(self) -> int:
        """The exit status the policy asks for: 130 (SIGINT), 143 (SIGTERM); 0 when no signal came."""
        return 128 + self.signum if self.signum is not None else 0

    def check(self, message: str = "") -> None:
        """Raise `Interrupted` if a signal has come (call at a unit-of-work boundary, after saving)."""
        if self.signum is not None:
            raise Interrupted(self.signum, message)
