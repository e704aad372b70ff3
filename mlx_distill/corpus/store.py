"""The corpus folder: append-only attempt logs, the derived corpus files, and a run lock.

Layout of ``corpora/<name>/``::

    problems.jsonl    the problems of the run ({id, question, answer, source, meta})
    skipped.jsonl     problems that cannot be used (needs a figure, no answer) with the reason
    traces.jsonl      APPEND-ONLY: one line per finished solver attempt (problem id x sample):
                      verified / rejected (with the filter that fired) / failed (with the error)
    rewrites.jsonl    APPEND-ONLY: one line per finished rewrite (problem id x length level)
    verified.jsonl    train-ready records {id, question, reasoning, answer, answer_format, ...}
    train.jsonl valid.jsonl test.jsonl   seeded splits of verified.jsonl (by problem id)
    R1/ R2/ ...       one corpus per rewrite level (verified.jsonl + the same splits)
    manifest.json     config (no secrets), counts per filter, tokens, cost, prompt hashes, versions

Every attempt line is written and flushed to the OS as soon as its verdict is known, so a
SIGKILL (which never loses what the OS already has) loses at most the requests in flight; a
torn last line is cut on the next open. Against a power cut or an OS crash a background
thread fsyncs the logs within 50 ms of a write (group commit: one fsync covers every line
written meanwhile). An fsync takes ~5 ms here; doing it in the event loop, once per line,
was the largest cost of the whole builder at concurrency 32 (scripts/bench_corpus.py).
A re-run reads the logs, skips every key that has a final line (verified or rejected; failed
ones are retried unless told otherwise) and appends only new work, so nothing is paid for
twice and no record is duplicated. Readers take the *last* line of each key.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Iterable

from mlx_distill.io import InputError, JsonlAppender, iter_jsonl

TRACES, REWRITES = "traces.jsonl", "rewrites.jsonl"
FINAL = ("verified", "rejected")


def trace_key(pid: str, sample: int) -> str:
    return f"{pid}#s{sample}"


def rewrite_key(pid: str, level: str) -> str:
    return f"{pid}#{level}"


def latest(path: Path) -> tuple[dict[str, dict], int]:
    """key -> last record of that key in an attempt log, and the number of lines read."""
    out, n = {}, 0
    if path.is_file():
        for _, rec in iter_jsonl(path, tolerate_torn_tail=True):
            n += 1
            if "key" not in rec:
                raise InputError(f"{path}: record without 'key' (line {n}); this is not a corpus attempt log")
            out[rec["key"]] = rec
    return out, n


class RunLock:
    """An exclusive lock on the corpus folder: two builders never append to the same logs."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.f = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            who = self.f.read().strip()
            self.f.close()
            raise InputError(f"{self.path.parent}: another corpus build is running on this folder "
                             f"(pid {who or '?'}); wait for it or use another --out") from None
        self.f.truncate(0)
        self.f.write(str(os.getpid()))
        self.f.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


class GroupFsync:
    """fsync the given files from a background thread at most `interval` s after a write
    (group commit); `close()` syncs a last time. Writers only set a flag: waking the thread per
    line cost more (GIL hand-offs) than the line itself at high concurrency."""

    def __init__(self, files, interval: float = 0.05):
        self.files = list(files)
        self.interval = interval
        self.dirty = False
        self._stop = threading.Event()
        self.syncs = 0
        self._thread = threading.Thread(target=self._run, name="corpus-fsync", daemon=True)
        self._thread.start()

    def _sync(self) -> None:
        self.dirty = False
        for f in self.files:
            if not f.closed:
                os.fsync(f.fileno())
        self.syncs += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.dirty:
                self._sync()

    def request(self) -> None:
        self.dirty = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sync()


class CorpusStore:
    """Append-only attempt logs with the set of finished keys (see the module docstring)."""

    def __init__(self, out: str | Path, retry_failed: bool = True):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.retry_failed = retry_failed
        self.traces, self.trace_lines = latest(self.out / TRACES)
        self.rewrites, self.rewrite_lines = latest(self.out / REWRITES)
        self._t = JsonlAppender(self.out / TRACES, fsync=False)  # flushed per line; fsynced by _sync
        self._r = JsonlAppender(self.out / REWRITES, fsync=False)
        self._sync = GroupFsync([self._t.f, self._r.f])
        self.written = Counter()

    def _done(self, rec: dict | None) -> bool:
        return rec is not None and (rec["status"] in FINAL or not self.retry_failed)

    def trace_done(self, key: str) -> bool:
        return self._done(self.traces.get(key))

    def rewrite_done(self, key: str) -> bool:
        return self._done(self.rewrites.get(key))

    def add_trace(self, rec: dict) -> None:
        if self.trace_done(rec["key"]):  # a bug upstream, never a silent duplicate
            raise RuntimeError(f"trace {rec['key']} is already final")
        self._t.write(rec)
        self._sync.request()
        self.traces[rec["key"]] = rec
        self.written["traces"] += 1

    def add_rewrite(self, rec: dict) -> None:
        if self.rewrite_done(rec["key"]):
            raise RuntimeError(f"rewrite {rec['key']} is already final")
        self._r.write(rec)
        self._sync.request()
        self.rewrites[rec["key"]] = rec
        self.written["rewrites"] += 1

    def close(self) -> None:
        self._sync.close()
        self._t.close()
        self._r.close()


def by_problem(records: Iterable[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["id"], []).append(r)
    return out
