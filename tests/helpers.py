"""Small data builders shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

import json
import os
import subprocess
import sys

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


def run_one_and_torchrun_two(args, out_one, out_two, port, repo):
    """`python <args> --out out_one` as one process, then under torchrun with 2 ranks; both must succeed."""
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, *args, "--out", str(out_one)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), *args, "--out", str(out_two)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
