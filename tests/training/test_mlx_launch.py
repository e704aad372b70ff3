"""`mlx.launch -n 2` (the ring backend on 127.0.0.1) runs the one training loop data-parallel:
each rank takes half the rows of every micro-batch, loss sums, token counts and gradients are
summed over the ranks with ``mx.distributed.all_sum`` and divided by the global token count,
so the curve is the single-process curve; rank 0 alone writes the run folder, and on resume
hands the checkpoint to rank 1. Also the collectives of `mlx_distill.backends.distributed.Group` and the
rank-sharded on-policy sampling, in one launched script."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

from mlx_distill.config import LogitsConfig, build
from mlx_distill.io import read_jsonl
from mlx_distill.paths import REPO

from helpers import ddp_corpus, free_ports, kill_group, run_one_and_mlx_launch_two, run_session

pytestmark = pytest.mark.skipif(not mx.distributed.is_available(), reason="this MLX build has no distributed backend")

MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")
ARGS = ["-m", "mlx_distill", "train", "--iters", "3", "--batch-size", "4", "--grad-accumulation", "2",
        "--val-every", "3", "--report-every", "1", "--learning-rate", "3e-3", "--warmup", "1", "--lora-layers", "-1",
        "--lora-rank", "4", "--max-seq-length", "256"]


def same_run(one: Path, two: Path, keys=("train_loss", "val_loss", "learning_rate", "trained_tokens")):
    """The 2-rank run folder holds exactly the files of the 1-process one (rank 1 wrote nothing)
    and its curve equals the single-process curve within 1e-4 relative."""
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    m1, m2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [r["iter"] for r in m1] == [r["iter"] for r in m2]
    for r1, r2 in zip(m1, m2):
        assert set(r1) == set(r2)
        for k in keys:
            if r1.get(k) is not None:
                assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), (r1["iter"], k)
    # the adapters agree to float32 noise, which a few AdamW steps amplify (the first steps are
    # nearly sign(g) * lr, so an element whose gradient is ~0 may step either way): per-matrix
    # relative difference, measured ~5e-4 after 3 steps here. (The curve is the sharp check:
    # with the gradients left unsummed, train_loss at iter 2 was off by 7e-3 relative.)
    a, b = mx.load(str(one / "adapters.safetensors")), mx.load(str(two / "adapters.safetensors"))
    assert set(a) == set(b)
    assert max((mx.linalg.norm(a[k] - b[k]) / mx.linalg.norm(a[k])).item() for k in a) < 5e-3
    return m1, m2


@pytest.fixture(scope="module")
def sft_runs(tiny_model, tmp_path_factory):
    """The same 3-step SFT run as one process (``one``) and under `mlx.launch -n 2` (``two``)."""
    d = tmp_path_factory.mktemp("launch")
    corpus = ddp_corpus(d / "corpus")
    args = [*ARGS, "--model", str(tiny_model), "--data", str(corpus)]
    _, launched = run_one_and_mlx_launch_two(args, d / "one", d / "two", free_ports(2), REPO)
    return args, d, launched


@pytest.mark.slow  # one process + a 2-rank launch (the fixture: 30-60 s on 2 cores at load 5-7)
def test_mlx_launch_two_ranks_equals_one_process(sft_runs):
    _, d, launched = sft_runs
    assert "backend mlx" in launched.stdout and launched.stdout.count("finished 3 iterations") == 1  # rank 0 talks
    same_run(d / "one", d / "two")


@pytest.mark.slow  # two 2-rank launches (45-50 s on 2 cores at load 5-7)
def test_mlx_launch_resume_continues_the_same_curve(sft_runs, tmp_path):
    """--resume under 2 ranks (here --extend of the finished 3-step run to 5 steps): rank 0 reads
    the checkpoint, rank 1 receives it (adapter, AdamW moments and step, loop state, the decay
    span), and both continue exactly the uninterrupted 2-rank run of 5 steps with the same
    schedule (the 1-process comparison is the test above: AdamW amplifies float noise over
    more steps, beyond 1e-4)."""
    args, d, _ = sft_runs
    shutil.copytree(d / "two", tmp_path / "resumed")
    at = args.index("--iters")
    five = [*args[:at], "--iters", "5", *args[at + 2:]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for extra, out in ((["--resume", "--extend"], "resumed"), (["--decay-iters", "3"], "straight")):
        r = run_session([str(MLX_LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", str(free_ports(2)), "--",
                         sys.executable, *five, *extra, "--out", str(tmp_path / out)], 300, cwd=REPO, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    resumed, straight = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("resumed", "straight"))
    assert [r["iter"] for r in resumed] == [r["iter"] for r in straight] == [0, 1, 2, 3, 4, 5]
    for r1, r2 in zip(straight, resumed):
        for k in ("train_loss", "val_loss", "learning_rate", "trained_tokens"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-6), (r1["iter"], k)
    a, b = (mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("straight", "resumed"))
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) < 1e-6
    assert not (tmp_path / "resumed" / "ranks").exists()


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of rank `rank` among the launcher's children (mlx.launch exports MLX_RANK to each)."""
    kids = " ".join(p.read_text() for p in Path(f"/proc/{launcher_pid}/task").glob("*/children")).split()
    for k in kids:
        if f"MLX_RANK={rank}" in Path(f"/proc/{k}/environ").read_bytes().decode(errors="replace").split("\0"):
            return int(k)
    raise AssertionError(f"no rank {rank} among {kids}")


@pytest.mark.slow  # one 2-rank launch interrupted after a few steps (19-65 s on 2 cores at load 5-7)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's pid in /proc")
def test_sigint_to_one_rank_stops_every_rank_at_the_same_step(tiny_model, tmp_path):
    """SIGINT to rank 1 alone: the stop flag is all-reduced, so both ranks finish the same step,
    and rank 0 writes the checkpoint and an 'interrupted' manifest before any rank exits."""
    corpus = ddp_corpus(tmp_path / "corpus")
    at = ARGS.index("--iters")
    args = [*ARGS[:at], "--iters", "500", *ARGS[at + 2:], "--model", str(tiny_model), "--data", str(corpus)]
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([str(MLX_LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", str(free_ports(2)), "--",
                          sys.executable, *args, "--out", str(out)], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and len(read_jsonl(out / "metrics.jsonl")) >= 3):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
            time.sleep(0.5)
        os.kill(_rank_pid(p.pid, 1), signal.SIGINT)
        _, err = p.communicate(timeout=240)
    finally:  # the whole group: no rank may outlive the test
        kill_group(p)
    # both ranks stopped (rank 1 exits first and mlx.launch then stops rank 0: only its writes,
    # before the barrier, are sure to have happened, so rank 0's own exit line is not asserted)
    assert "interrupted; everything finished so far is saved" in err, err[-3000:]
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert 2 <= state["step"] < 500 and state["micro"] == 2 * state["step"]
    assert read_jsonl(out / "metrics.jsonl")[-1]["iter"] == state["step"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"


@pytest.mark.slow  # two runs, one of them a 2-rank launch (53 s on 2 cores at load 5-7)
def test_mlx_launch_two_ranks_kd_with_partial_coverage(tiny_model, tiny_llama, tmp_path):
    """Offline KD store covering half of the training examples: the KD normaliser is counted
    over the whole step before the rows are split, so 2 ranks give the single-process run."""
    from mlx_distill.teacher.logits import extract

    corpus = ddp_corpus(tmp_path / "corpus")
    extract(build(LogitsConfig, dict(teacher=str(tiny_model), data=str(corpus), out=str(tmp_path / "kd"), top_m=6,
                                     limit=5, max_seq_length=256, backend="mlx")), quiet=True)
    args = [*ARGS, "--model", str(tiny_llama), "--data", str(corpus), "--kd", str(tmp_path / "kd"), "--kd-top-k", "4",
            "--kd-min-coverage", "0.2"]
    run_one_and_mlx_launch_two(args, tmp_path / "one", tmp_path / "two", free_ports(2), REPO)
    m1, _ = same_run(tmp_path / "one", tmp_path / "two", keys=("train_loss", "sft_loss", "kd_loss", "kd_coverage",
                                                               "val_loss"))
    trained = [r for r in m1 if "train_loss" in r]
    assert len(trained) == 3 and any(0 < r["kd_coverage"] < 1 for r in trained), trained


COLLECTIVES = """
import json, sys
import numpy as np
import mlx.core as mx
from mlx_distill.backends.mlx import MLXBackend, sum_over_ranks
from mlx_distill.config import TrainConfig

b = MLXBackend(TrainConfig(model=sys.argv[1] if len(sys.argv) > 1 else "", lora_layers=-1, lora_rank=4))
g = b.dist
r = g.rank
out = {"world": g.world, "rank": r}
if len(sys.argv) == 1:
    out["json"] = g.broadcast_json({"step": 7, "best": float("inf")} if r == 0 else None)
    out["any_one"] = g.any(r == 1)
    out["any_none"] = g.any(False)
    out["rows"] = g.gather_rows({i: list(range(i + 1)) for i in range(r, 5, 2)}, 5)
    out["bcast"] = g.broadcast(mx.array([1.0 + r, 2.0])).tolist()
    # gradients summed in small buckets (40 bytes: several all_sums, two dtypes) = summed whole
    tree = {"a": mx.arange(12, dtype=mx.float32).reshape(3, 4) * (r + 1), "b": [mx.ones((5,), mx.bfloat16) * (r + 1)],
            "c": mx.array([0.5 * (r + 1)])}
    s = sum_over_ranks(tree, g.all_reduce, bucket_bytes=40)
    out["grads"] = {"a": s["a"].tolist(), "b": s["b"][0].astype(mx.float32).tolist(), "c": s["c"].tolist()}
else:  # rank-sharded on-policy rollouts: every rank returns all of them, identical
    from mlx_distill.backends.rollouts import sample

    b.load(); b.prepare()
    prompts, caps = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], [6, 5, 4, 3]
    out["rolls"] = [[x.tokens, x.finished] for x in b.sample(prompts, caps, 1.0, 1.0, key=11)]
    # rank r's rows are its own sample of its shard, with key 11 * world + r
    mine = sample(b.model, b.tokenizer, prompts[r::2], caps[r::2], 1.0, 1.0, 11 * 2 + r)
    out["mine"] = [[x.tokens, x.finished] for x in mine]
    # a batch of one row on two ranks: rank 1 holds none and adds zeros (the model takes no empty batch)
    from mlx_distill.training.objectives import sft_objective

    one = {"inputs": np.array([[1, 2, 3, 4, 5]], np.int32), "targets": np.array([[2, 3, 4, 5, 6]], np.int32),
           "mask": np.array([[0, 1, 1, 1, 1]], np.float32)}
    got = b.eval_step(sft_objective(b.forward), one)
    s, n, _ = sft_objective(b.forward)(b.model, {k: mx.array(v) for k, v in one.items()})
    out["one_row"] = [got["loss_sum"], got["ntokens"], s.item(), n.item()]
print("RESULT " + json.dumps(out), flush=True)
"""


def launch_collectives(tmp_path, port, *argv) -> dict:
    """COLLECTIVES under `mlx.launch -n 2` -> {rank: its result}."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = run_session([str(MLX_LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", str(port), "--",
                     sys.executable, str(script), *argv], 180, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x[len("RESULT "):] for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    res = {d["rank"]: d for d in map(json.loads, lines)}
    assert sorted(res) == [0, 1] and res[0]["world"] == 2, r.stdout[-2000:]
    return res


def test_group_collectives_under_mlx_launch(tmp_path):
    for d in launch_collectives(tmp_path, free_ports(2)).values():
        assert d["json"] == {"step": 7, "best": float("inf")}  # rank 0's loop state, on every rank
        assert d["any_one"] is True and d["any_none"] is False  # a stop request on rank 1 stops both
        assert d["rows"] == [list(range(i + 1)) for i in range(5)]
        assert d["bcast"] == [1.0, 2.0]  # rank 0's value, not the sum
        np.testing.assert_allclose(d["grads"]["a"], np.arange(12).reshape(3, 4) * 3)
        assert d["grads"]["b"] == [3.0] * 5 and d["grads"]["c"] == [1.5]


@pytest.mark.slow  # two ranks load the tiny model and sample (14-46 s on 2 cores at load 5-8)
def test_rollouts_by_shard_and_fewer_rows_than_ranks_under_mlx_launch(tiny_model, tmp_path):
    res = launch_collectives(tmp_path, free_ports(2), str(tiny_model))
    assert res[0]["rolls"] == res[1]["rolls"] and len(res[0]["rolls"]) == 4
    for rank in (0, 1):
        assert res[rank]["rolls"][rank::2] == res[rank]["mine"]
    assert all(1 <= len(t) <= c for (t, _), c in zip(res[0]["rolls"], [6, 5, 4, 3]))
    for d in res.values():  # the 1-row batch: every rank gets the single-process sums
        loss_sum, ntokens, want_sum, want_n = d["one_row"]
        assert ntokens == want_n == 4 and loss_sum == pytest.approx(want_sum, rel=1e-6)
