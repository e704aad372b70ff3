"""Grading that cannot be taken down: the worker pool (time and memory limits, threads, asyncio, clean
shutdown), the magnitude pre-check, and a fuzz of explosive answers through ``grade`` and the CLI."""

import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mlx_distill.paths import REPO
from mlx_distill.tasks import grading
from mlx_distill.tasks.answers import grade
from mlx_distill.tasks.equivalence import too_large

# A pair sympy cannot settle in seconds, though the pre-check lets it through (exponent 3000).
SLOW = ("\\boxed{(x+1)^{3000}}", "(x+1)^{2999}(x+2)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _all_gone(pids, wait_s: float = 30) -> bool:
    deadline = time.time() + wait_s
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


def test_pool_timeout_kills_and_replaces_the_worker():
    pool = grading.WorkerPool(memory_mb=1024, size=1)
    try:
        assert pool.call(abs, -3, timeout=60) == 3
        (first,) = pool.pids()
        with pytest.raises(grading.GradingLimit) as e:
            pool.call(time.sleep, 60, timeout=0.5)
        assert e.value.reason == "timeout"
        assert _all_gone([first])
        assert pool.call(abs, -4, timeout=60) == 4   # a fresh worker serves the next case
        assert pool.pids() and pool.pids()[0] != first
    finally:
        pool.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux only")
def test_pool_memory_cap():
    pool = grading.WorkerPool(memory_mb=512, size=1)
    try:
        with pytest.raises(grading.GradingLimit) as e:
            pool.call(bytearray, 1 << 30, timeout=60)   # 1 GiB under a 512 MB cap
        assert e.value.reason == "memory"
        assert len(pool.call(bytearray, 1 << 20, timeout=60)) == 1 << 20
        (pid,) = pool.pids()
        limits = open(f"/proc/{pid}/limits").read()
        line = next(ln for ln in limits.splitlines() if ln.startswith("Max address space"))
        assert str(512 * 2 ** 20) in line
    finally:
        pool.close()


def test_pool_close_leaves_no_process():
    pool = grading.WorkerPool(size=2)
    with ThreadPoolExecutor(2) as ex:
        assert list(ex.map(lambda v: pool.call(abs, v, timeout=60), [-1, -2])) == [1, 2]
    pids = pool.pids()
    assert pids
    pool.close()
    assert _all_gone(pids)


def test_grading_from_threads_and_asyncio():
    cases = [("\\boxed{x^2+2x+1}", "(x+1)^2", True), ("\\boxed{x^2+1}", "(x+1)^2", False),
             ("\\boxed{\\frac{\\sqrt{8}}{2}}", "\\sqrt{2}", True), ("\\boxed{2\\pi}", "\\pi", False)] * 2
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda c: grade(c[0], c[1], "math").correct, cases))
    assert got == [c[2] for c in cases]

    async def main():
        return await asyncio.gather(*(asyncio.to_thread(grade, c[0], c[1], "math") for c in cases))

    assert [v.correct for v in asyncio.run(main())] == [c[2] for c in cases]


def test_a_slow_comparison_is_invalid_timeout():
    v = grade(*SLOW, "math", timeout=1.0)
    assert (v.status, v.reason) == ("invalid", "timeout")
    assert grade("\\boxed{\\frac{1}{2}}", "0.5", "math").correct


@pytest.mark.parametrize("answer", [
    "2^{2^{2^{49}}}", "2**2**2**49", "10^{10^{10}}", "(10!)!", "100000!", "9^{9^{9}}", "1" * 3000,
    "(" * 60 + "1" + ")" * 60, "2^{10^{6}}",
])
def test_precheck_refuses_absurd_magnitudes(answer):
    assert too_large(answer)
    v = grade(f"\\boxed{{{answer}}}", "5", "math")
    assert v.status == "invalid" and not v.correct


@pytest.mark.parametrize("answer", [
    "2^{100}", "10^{\\frac{\\sqrt{13}-5}{6}}", "x^{2^{n}}", "5!", "2^{-3}", "e^{i\\pi}", "\\binom{10}{3}", "2^2^2^2",
])
def test_precheck_lets_ordinary_answers_through(answer):
    assert not too_large(answer)


def _explosive(rng: random.Random) -> str:
    """One generated explosive answer: towers, huge exponents, factorials, deep nesting, long numbers,
    and (1 in 20) a polynomial power the pre-check lets through and the worker's time limit stops."""
    k = rng.randrange(20)
    if k == 19:
        n = rng.randint(2000, 4000)
        return f"(x+{rng.randint(1, 9)})^{{{n}}}(x-1)-(x+1)^{{{n - 1}}}"
    k %= 8
    if k == 0:
        return "^".join(str(rng.randint(2, 9)) for _ in range(rng.randint(4, 6)))
    if k == 1:
        return f"{rng.randint(2, 99)}^{{{rng.randint(2, 9)}^{{{rng.randint(2, 9)}^{{{rng.randint(10, 99)}}}}}}}"
    if k == 2:
        return f"10^{{10^{{{rng.randint(6, 60)}}}}}"
    if k == 3:
        return f"{rng.randint(10 ** 5, 10 ** 9)}!"
    if k == 4:
        return f"({rng.randint(8, 20)}!)!"
    if k == 5:
        d = rng.randint(50, 400)
        return "(" * d + str(rng.randint(1, 9)) + ")" * d
    if k == 6:
        return str(rng.randint(1, 9)) + "".join(rng.choice("0123456789") for _ in range(rng.choice([3000, 100_000])))
    return f"{rng.randint(2, 9)}^{{{rng.randint(10 ** 6, 10 ** 12)}}}"


def test_fuzz_explosive_answers_each_within_the_limit():
    """200 generated explosive answers (seeded): each graded within timeout + 1 s, never correct, and
    this process's memory stays bounded (sympy runs, if at all, in a capped worker)."""
    rng = random.Random(18)
    timeout = 2.0
    grading.get_pool().warm()  # the workers' first start is not a case's time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    slowest = 0.0
    for i in range(200):
        answer = _explosive(rng)
        t = time.perf_counter()
        v = grade(f"The answer is $\\boxed{{{answer}}}$.", "7", "math", timeout=timeout)
        dt = time.perf_counter() - t
        slowest = max(slowest, dt)
        assert not v.correct, answer[:80]
        assert dt < timeout + 1, (answer[:80], dt)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB on Linux
    assert grown_mb < 300, grown_mb


def test_grade_cli_adversarial_beside_ordinary(tmp_path):
    """`python -m mlx_distill grade`: adversarial responses are not correct and the run returns; the
    ordinary answers beside them keep their verdicts."""
    golds = ["5", "\\frac{1}{2}", "7", "3", "(x+1)^2", "12", "2\\sqrt{3}", "10"]
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": f"Q{i}?", "answer": g}) + "\n"
                            for i, g in enumerate(golds)))
    responses = ["\\boxed{2^{2^{2^{49}}}}", "\\boxed{0.5}", "\\boxed{(10!)!}", "#### 3", "\\boxed{x^2+2x+1}",
                 "\\boxed{" + "9" * 100_000 + "}", "\\boxed{2 sqrt(3)}", "\\boxed{" + "(" * 300 + "10" + ")" * 300 + "}"]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"index": i, "response": r}) + "\n" for i, r in enumerate(responses)))
    out = tmp_path / "summary.json"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "grade", "--dataset", "jsonl", "--data", str(data),
                        "--answer-kind", "math", "--predictions", str(preds), "--out", str(out)],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - t < 120
    recs = [json.loads(line) for line in open(tmp_path / "summary.records.jsonl")]
    assert [x["correct"] for x in recs] == [False, True, False, True, True, False, True, False]
    s = json.loads(out.read_text())
    assert s["grading_limits"]["too large"] >= 3
    assert "grading limits" in r.stdout


def test_no_worker_outlives_its_process():
    """A process that graded (and exits without closing anything itself) leaves no worker behind."""
    code = ("from mlx_distill.tasks import grading\n"
            "from mlx_distill.tasks.answers import grade\n"
            "assert grade('\\\\boxed{x^2+2x+1}', '(x+1)^2', 'math').correct\n"
            "print(' '.join(map(str, grading.get_pool().pids())))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pids = [int(p) for p in r.stdout.split()]
    assert pids and _all_gone(pids)
