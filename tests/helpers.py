"""Small data builders shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def arith_records(n, seed=0, start=0):
    """Short corpus records `What is a + b?` with ids a<start>..., one-line reasoning and the sum."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        out.append({"id": f"a{start + i}", "question": f"What is {a} + {b}?",
                    "reasoning": f"{a} + {b} = {a + b}.", "answer": str(a + b)})
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arith_corpus(d, n_train=32, n_valid=8):
    """A corpus folder of `arith_records`: train.jsonl and a disjoint valid.jsonl."""
    write_jsonl(d / "train.jsonl", arith_records(n_train))
    write_jsonl(d / "valid.jsonl", arith_records(n_valid, seed=1, start=1000))
    return d


def ddp_corpus(d):
    """The torchrun tests' corpus: 12 `What is i + (i + 3)?` records, 10 train / 2 valid."""
    d.mkdir()
    rows = [{"id": f"d{i}", "question": f"What is {i} + {i + 3}?", "reasoning": f"{i} + {i + 3} = {2 * i + 3}.",
             "answer": str(2 * i + 3)} for i in range(12)]
    write_jsonl(d / "train.jsonl", rows[:10])
    write_jsonl(d / "valid.jsonl", rows[10:])
    return d


def run_session(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` in a session of its own, whose whole process
    group is killed afterwards: a launcher's ranks (mlx.launch, torchrun) never outlive a timeout or a
    failed assertion as orphans spinning in a collective."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        kill_group(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the process group of `p` (started with ``start_new_session=True``) and reap `p`."""
    import signal

    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if p.poll() is None:
        p.communicate()


def run_one_and_two(args, out_one, out_two, launch, repo):
    """`python <args> --out out_one` as one process, then `<launch> <args> --out out_two` (a
    launcher starting 2 ranks); both must succeed. The environment (LD_PRELOAD, MLX_DISTILL_DATA,
    ...) is the test process's. Returns the two CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    runs = []
    for prefix, out in (([sys.executable], out_one), (launch, out_two)):
        r = run_session([*prefix, *args, "--out", str(out)], 300, cwd=repo, env=env)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        runs.append(r)
    return runs


def run_one_and_torchrun_two(args, out_one, out_two, port, repo):
    """`python <args> --out out_one` as one process, then under torchrun with 2 ranks; both must succeed."""
    return run_one_and_two(args, out_one, out_two, [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc-per-node", "2", "--master-port", str(port)], repo)


def run_one_and_mlx_launch_two(args, out_one, out_two, port, repo):
    """`python <args> --out out_one` as one process, then `mlx.launch -n 2` (the ring backend on
    127.0.0.1, ports `port` and `port + 1`); both must succeed."""
    launch = [str(Path(sys.executable).with_name("mlx.launch")), "--backend", "ring", "-n", "2",
              "--starting-port", str(port), "--", sys.executable]
    return run_one_and_two(args, out_one, out_two, launch, repo)
