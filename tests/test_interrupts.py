"""One interrupt policy (issue 22, `mlx_distill.interrupts`): SIGINT and SIGTERM finish the unit of
work in hand, save, and exit 130 / 143, whatever disposition the process inherited; a second signal
stops at once; the same command then completes the work with nothing lost or duplicated.

Each command is started the way a script or scheduler starts it: in the background, SIGINT
inherited as ignored (``preexec_fn``), no standard input. The signal is sent once the command has
made visible progress (its output files are polled: no fixed sleep decides anything), against a
stand-in server whose delay leaves most of the work undone. Tests that set a disposition in this
process put back the one they found and assert against that, not against the default.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fault_server import FaultServer
from mlx_distill.blas import preload_env
from mlx_distill.interrupts import Interrupted, Interrupts, exit_code
from mlx_distill.io import read_jsonl
from mlx_distill.paths import REPO

N = 10
ENV = preload_env({**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "COLUMNS": "160"})


# ----------------------------------------------------------------------------- helpers
def problems_file(path: Path, n: int = N) -> Path:
    """GSM8K-format problems '[Pi] ...' (gold i + 10)."""
    rows = [{"question": f"[P{i}] Ann has {i} apples and buys 10 more. How many now?",
             "answer": f"{i} + 10 = {i + 10}\n#### {i + 10}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def server_script(n: int = N) -> dict:
    """Every third answer wrong; the rest right (as solver and as eval replies)."""
    return {"delay": 0.02, "items": {f"[P{i}]": {"solve": {"content": f"{i} + 10 = {i + 10}\n#### "
                                                                      f"{i + 10 if i % 3 else 0}"},
                                                  "rewrite": {"content": f"#### {i + 10}"}} for i in range(n)}}


def _as_a_background_job():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` in a script, or setsid ... < /dev/null, leaves


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "mlx_distill", *argv], cwd=REPO, env=ENV, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_as_a_background_job)


def run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_distill", *argv], cwd=REPO, env=ENV, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def lines(path: Path) -> int:
    return len(read_jsonl(path, tolerate_torn_tail=True)) if path.is_file() else 0


def stop_after_progress(p: subprocess.Popen, path: Path, at_least: int, sig: int, log: Path) -> str:
    """Wait until `path` holds `at_least` records (the command's visible progress), send `sig`,
    wait for the exit; returns the command's output."""
    deadline = time.time() + 300  # a safeguard only: the loop ends on progress
    while lines(path) < at_least:
        assert p.poll() is None, f"exited {p.returncode} before any progress:\n{log.read_text()}"
        assert time.time() < deadline, f"no progress in {path}:\n{log.read_text()}"
        time.sleep(0.02)
    p.send_signal(sig)
    p.wait(timeout=300)
    return log.read_text()


def by_id(path: Path, drop=("latency_s",)) -> dict:
    rows = read_jsonl(path)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"duplicated ids in {path}"
    return {r["id"]: {k: v for k, v in r.items() if k not in drop} for r in rows}


# ----------------------------------------------------------------------------- the helper itself
def test_policy_restores_what_it_found_and_second_signal_stops_at_once():
    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for inherited in (signal.SIG_IGN, signal.SIG_DFL):  # a background job's SIGINT, and the default
            signal.signal(signal.SIGINT, inherited)
            before = {s: signal.getsignal(s) for s in found}
            with Interrupts(quiet=True) as stop:
                os.kill(os.getpid(), signal.SIGINT)  # handled (not ignored) although SIG_IGN was inherited
                for _ in range(100):  # the handler runs at the next bytecode boundary
                    if stop.requested:
                        break
                assert stop.requested and stop.code == 130
                with pytest.raises(Interrupted) as e:  # the second signal: at once
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(100):
                        pass
                assert e.value.code == 143 and exit_code(e.value) == 143
                with pytest.raises(Interrupted) as e:
                    stop.check()
                assert e.value.code == 130
            assert {s: signal.getsignal(s) for s in found} == before
    finally:
        for s, h in found.items():
            signal.signal(s, h)
    assert {s: signal.getsignal(s) for s in found} == found


def test_nested_policy_hands_its_signal_to_the_outer_one():
    """A study's cell runs an eval with its own policy: a signal the eval took stops the study too,
    and one that came before the eval started makes the eval stop at its first boundary."""
    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Interrupts(quiet=True) as outer:
            with Interrupts(quiet=True) as inner:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):
                    if inner.requested:
                        break
            assert inner.signum == outer.signum == signal.SIGTERM
        with Interrupts(quiet=True) as outer:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                if outer.requested:
                    break
            with Interrupts(quiet=True) as inner:
                assert inner.requested and inner.code == 130
    finally:
        for s, h in found.items():
            signal.signal(s, h)
    assert {s: signal.getsignal(s) for s in found} == found


# ----------------------------------------------------------------------------- eval
def test_eval_in_the_background_stops_on_sigint_and_the_same_command_completes(tmp_path):
    """The reported bug: `eval` started from a script ignored `kill -INT` and ran to the end (exit 0)."""
    probs = problems_file(tmp_path / "p.jsonl")
    with FaultServer(server_script()) as srv:
        def cmd(out):
            return ["eval", "--backend", "api", "--base-url", srv.base_url, "--model", "m", "--dataset", "gsm8k",
                    "--data", str(probs), "--concurrency", "2", "--no-plot", "--out", str(out)]

        full = run(cmd(tmp_path / "full"))
        assert full.returncode == 0, full.stderr
        srv.script["delay"] = 0.4  # >= 8 unfinished requests, 2 at a time: >= 1.6 s left to stop in
        asked = len(srv.log)
        part = tmp_path / "part"
        p = spawn(cmd(part), tmp_path / "log")
        text = stop_after_progress(p, part / "records.jsonl", 2, signal.SIGINT, tmp_path / "log")
        assert p.returncode == 130, text
        assert "interrupted (SIGINT)" in text and "Traceback" not in text, text
        cut = lines(part / "records.jsonl")
        assert 2 <= cut < N and not (part / "summary.json").exists(), text
        srv.script["delay"] = 0.02
        again = run(cmd(part))
        assert again.returncode == 0, again.stderr
        assert f"{cut} of {N} problems already done" in again.stderr
        # every problem asked once over the two runs: the requests in flight were finished, not dropped
        keys = [e["key"] for e in srv.log[asked:]]
        assert sorted(keys) == sorted(f"[P{i}]" for i in range(N)), keys
    assert by_id(part / "records.jsonl") == by_id(tmp_path / "full" / "records.jsonl")


# ----------------------------------------------------------------------------- corpus build
def test_corpus_build_sigterm_keeps_the_records_and_the_same_command_completes(tmp_path):
    probs = problems_file(tmp_path / "p.jsonl")
    with FaultServer(server_script()) as srv:
        def cmd(out):
            return ["corpus", "build", "--source", "gsm8k", "--problems", str(probs), "--base-url", srv.base_url,
                    "--model", "m", "--concurrency", "2", "--backoff", "0.01", "--leakage", "warn", "--out", str(out)]

        full = run(cmd(tmp_path / "full"))
        assert full.returncode == 0, full.stdout + full.stderr
        srv.script["delay"] = 0.4
        part = tmp_path / "part"
        p = spawn(cmd(part), tmp_path / "log")
        text = stop_after_progress(p, part / "traces.jsonl", 2, signal.SIGTERM, tmp_path / "log")
        assert p.returncode == 143, text
        assert "Traceback" not in text and "interrupted (SIGTERM)" in text, text
        cut = lines(part / "traces.jsonl")
        assert 2 <= cut < N, text
        assert json.loads((part / "manifest.json").read_text())["status"] == "interrupted"
        srv.script["delay"] = 0.02
        again = run(cmd(part))
        assert again.returncode == 0, again.stdout + again.stderr
    keep = ("key", "status", "reason", "filters", "response", "extracted", "words", "verdict")
    # each attempt logged once: the ones in flight at the signal were dropped, then asked again
    traces = read_jsonl(part / "traces.jsonl")
    assert len(traces) == N and len({t["key"] for t in traces}) == N
    assert ({t["key"]: {k: t.get(k) for k in keep} for t in traces}
            == {t["key"]: {k: t.get(k) for k in keep} for t in read_jsonl(tmp_path / "full" / "traces.jsonl")})
    assert (part / "verified.jsonl").read_text() == (tmp_path / "full" / "verified.jsonl").read_text()


# ----------------------------------------------------------------------------- study
def test_study_sigterm_stops_the_cell_in_hand_releases_its_lock_and_continues(tmp_path):
    probs = problems_file(tmp_path / "p.jsonl", 6)
    with FaultServer(server_script(6)) as srv:
        def study(out):
            cfg = {"kind": "prompt", "levels": [40, 10], "seeds": [0], "out": str(out),
                   "eval": {"backend": "api", "base_url": srv.base_url, "model": "m", "dataset": "gsm8k",
                            "data": str(probs), "concurrency": 1, "max_tokens": 64}}
            path = tmp_path / f"{out.name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            return ["study", "length", "-c", str(path)]

        full = run(study(tmp_path / "full"))
        assert full.returncode == 0, full.stderr
        srv.script["delay"] = 0.4
        part = tmp_path / "part"
        cell = part / "cells" / "0-40-words-seed0"
        p = spawn(study(part), tmp_path / "log")
        text = stop_after_progress(p, cell / "eval" / "records.jsonl", 2, signal.SIGTERM, tmp_path / "log")
        assert p.returncode == 143, text
        assert "Traceback" not in text, text
        assert not (cell / "lock").exists() and not (cell / "done").exists()
        assert not (part / "cells" / "1-10-words-seed0" / "eval").exists()  # no other cell started
        cut = lines(cell / "eval" / "records.jsonl")
        assert 2 <= cut < 6, text
        srv.script["delay"] = 0.02
        again = run(study(part))
        assert again.returncode == 0, again.stderr
    for c in ("0-40-words-seed0", "1-10-words-seed0"):
        assert (by_id(part / "cells" / c / "eval" / "records.jsonl")
                == by_id(tmp_path / "full" / "cells" / c / "eval" / "records.jsonl"))
    rows = [json.loads((d / "results.json").read_text())["runs"] for d in (part, tmp_path / "full")]
    assert [{k: v for k, v in r.items() if k != "run"} for r in rows[0]] == \
           [{k: v for k, v in r.items() if k != "run"} for r in rows[1]]


# ----------------------------------------------------------------------------- pipeline
def test_pipeline_passes_sigterm_to_its_stage_and_the_rerun_continues_it(tmp_path):
    probs = problems_file(tmp_path / "p.jsonl")
    with FaultServer(server_script()) as srv:
        def recipe(root):
            path = tmp_path / f"{root.name}.yaml"
            path.write_text(yaml.safe_dump({"root": str(root), "stages": [
                {"name": "test", "command": "eval",
                 "args": {"backend": "api", "base_url": srv.base_url, "model": "m", "dataset": "gsm8k",
                          "data": str(probs), "concurrency": 2, "plot": False}}]}, sort_keys=False))
            return ["pipeline", str(path)]

        full = run(recipe(tmp_path / "full"))
        assert full.returncode == 0, full.stdout + full.stderr
        srv.script["delay"] = 0.4
        root = tmp_path / "part"
        p = spawn(recipe(root), tmp_path / "log")
        text = stop_after_progress(p, root / "test" / "records.jsonl", 2, signal.SIGTERM, tmp_path / "log")
        assert p.returncode == 143, text
        assert "Traceback" not in text, text
        state = json.loads((root / "pipeline.json").read_text())["stages"]["test"]
        assert state["status"] == "interrupted" and state["exit_code"] == 143, state
        cut = lines(root / "test" / "records.jsonl")
        assert 2 <= cut < N and not (root / "test" / "summary.json").exists()
        srv.script["delay"] = 0.02
        again = run(recipe(root))
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"{cut} of {N} problems already done" in again.stdout  # continued, not redone
    assert by_id(root / "test" / "records.jsonl") == by_id(tmp_path / "full" / "test" / "records.jsonl")
