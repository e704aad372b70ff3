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


def free_ports(n: int = 1) -> int:
    """The first of `n` consecutive loopback ports that are free now (a launcher's ranks take
    `port`, `port + 1`, ...). Never a fixed number: two suites, or anything else on the machine,
    may hold one."""
    import socket

    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n > 65535:
            continue
        socks = []
        try:
            for k in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", port + k))
            return port
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError(f"no {n} consecutive free loopback ports")


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


def completion_batch(rows, plens):
    """Token rows (lists of ids) and their prompt lengths -> right-padded tokens (B, L) int32 and the
    loss mask (B, L - 1) float32 over each row's completion tokens."""
    width = max(len(r) for r in rows)
    x = np.array([list(r) + [0] * (width - len(r)) for r in rows], np.int32)
    mask = np.zeros((len(rows), width - 1), np.float32)
    for i, (pl, r) in enumerate(zip(plens, rows)):
        mask[i, pl - 1: len(r) - 1] = 1.0
    return x, mask


def direct_train(src, dst, iters, lr, batch_fn, warmup, warmup_from):
    """All-parameter training of the model folder `src` for `iters` AdamW steps (lr rising linearly from
    `warmup_from` over `warmup` steps, then cosine to lr/10; gradients clipped to norm 1) on fresh
    batches ``batch_fn(tokenizer) -> (tokens, loss mask)``, written as the model folder `dst`. The
    learning tests' teachers and their students' pre-training: `train` keeps the embeddings frozen, as
    mlx-lm does, which suits fine-tuning a pretrained model, not learning from scratch."""
    import shutil

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from mlx_distill.training.losses import sft_loss

    model, tok = load(str(src))
    opt = optim.AdamW(optim.join_schedules([optim.linear_schedule(warmup_from, lr, warmup),
                                            optim.cosine_decay(lr, iters - warmup, lr * 0.1)], [warmup]),
                      weight_decay=0.0)

    def loss(m, x, mask):
        s, n = sft_loss(m(x[:, :-1]), x[:, 1:], mask)
        return s / n

    step = nn.value_and_grad(model, loss)
    for _ in range(iters):
        x, mask = batch_fn(tok)
        _, g = step(model, mx.array(x), mx.array(mask))
        g, _ = optim.clip_grad_norm(g, 1.0)
        opt.update(model, g)
        mx.eval(model.parameters(), opt.state)
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return dst
