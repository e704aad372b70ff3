"""Data-parallel MLX training under `mlx.launch`: 1 rank against 2 ranks on this machine, the same
global batch, and what the all-reduce costs per optimizer step.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python scripts/bench_mlx_ddp.py --model smollm2 --iters 6 --batch-size 4 --out runs/bench_mlx_ddp

    # smoke test (a random 2-block model, seconds; numbers meaningless):
    python scripts/bench_mlx_ddp.py --model tiny --iters 3 --batch-size 4 --out runs/bench_mlx_ddp_smoke

Three launches, one after the other:

1. ``python -m mlx_distill train ...`` (one process);
2. ``mlx.launch --backend ring -n 2 -- python -m mlx_distill train ...`` (two ranks on 127.0.0.1,
   each taking half the rows of every micro-batch), the same options;
3. ``mlx.launch -n 2 -- python scripts/bench_mlx_ddp.py --probe ...``: the same model and LoRA
   layers on two ranks, timing alone the collectives one training step makes (the gradient
   buckets of `backends.mlx.sum_over_ranks` once per update, the loss-sum/token-count vector
   once per micro-batch, the stop flag once per step), --probe-reps times each, medians.

Printed: the median optimizer-step time (the first, compiling step excluded) and trained
tokens/s of each run, the all-reduce payload per step (bytes handed to ``all_sum``; the ring
sends 2(w-1)/w of it per rank) and its time per step, its share of the 2-rank step, and the
largest relative difference between the two loss curves (they should agree to float noise).
With both ranks on the same CPU cores the 2-rank run computes the same FLOPs on the same
cores: it measures communication overhead, not a speed-up (on two Macs each rank has its own
machine). The load average (`uptime`) is printed before and after.

Data: --data, a corpus folder; by default corpora/demo (written with ``python -m mlx_distill
corpus synth --out corpora/demo`` when missing).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def train_args(a, model: str) -> list:
    return ["-m", "mlx_distill", "train", "--model", model, "--data", a.data, "--iters", str(a.iters),
            "--batch-size", str(a.batch_size), "--grad-accumulation", str(a.grad_accumulation),
            "--lora-layers", str(a.lora_layers), "--lora-rank", str(a.lora_rank), "--learning-rate", "1e-4",
            "--warmup", "0", "--lr-schedule", "constant", "--report-every", "1", "--val-every", str(a.iters + 1),
            "--val-batches", "1", "--max-seq-length", str(a.max_seq_length), "--save-every", str(a.iters + 1),
            "--no-preflight"]


def step_times(run: Path) -> tuple[list, list, float]:
    """(step seconds, train losses, trained tokens/s) from metrics.jsonl, the first step excluded."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train_loss" in r]
    secs, prev = [], 0
    for r in rows:
        secs.append((r["trained_tokens"] - prev) / r["tokens_per_sec"])
        prev = r["trained_tokens"]
    toks = rows[-1]["trained_tokens"] - rows[0]["trained_tokens"]
    return secs[1:], [r["train_loss"] for r in rows], toks / max(sum(secs[1:]), 1e-9)


def probe(a) -> None:
    """Under mlx.launch: time the collectives of one training step on this model's LoRA gradients."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_distill.backends.mlx import MLXBackend, sum_over_ranks
    from mlx_distill.config import TrainConfig, build

    cfg = build(TrainConfig, dict(model=a.model, lora_layers=a.lora_layers, lora_rank=a.lora_rank))
    b = MLXBackend(cfg)
    b.load()
    b.prepare()
    g = b.dist
    grads = tree_map(lambda p: mx.ones_like(p) * (g.rank + 1), b.model.trainable_parameters())
    stats = mx.ones((3,), mx.float32)  # loss sum, token count, sft_loss: what an SFT micro-step sums

    def timed(fn, reps):
        mx.eval(fn())  # warm-up (connection, compilation of nothing)
        out = []
        for _ in range(reps):
            tic = time.perf_counter()
            mx.eval(fn())
            out.append(time.perf_counter() - tic)
        return statistics.median(out)

    t_grads = timed(lambda: sum_over_ranks(grads, g.all_reduce), a.probe_reps)
    t_stats = timed(lambda: g.all_reduce(stats), a.probe_reps)
    tic = time.perf_counter()
    for _ in range(a.probe_reps):
        g.any(False)
    t_flag = (time.perf_counter() - tic) / a.probe_reps
    if g.is_main:
        print("PROBE " + json.dumps({"world": g.world, "grad_bytes": b.grad_bytes(), "grad_seconds": t_grads,
                                     "stats_bytes": int(stats.nbytes), "stats_seconds": t_stats, "flag_bytes": 4,
                                     "flag_seconds": t_flag}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model (name, folder or 'tiny': a random 2-block model)")
    p.add_argument("--data", default=str(REPO / "corpora" / "demo"))
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4, help="the global batch (each of 2 ranks takes half)")
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument("--lora-layers", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--probe-reps", type=int, default=20)
    p.add_argument("--port", type=int, default=32650, help="first ring port (2 per launch)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_mlx_ddp"))
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.probe:
        return probe(a)

    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: {out} is not empty: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    model = a.model
    if model == "tiny":
        from mlx_distill.tiny import build_model

        model = str(build_model(out / "tiny"))
    if not Path(a.data, "train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "mlx_distill", "corpus", "synth", "--out", a.data], cwd=REPO, env=env,
                       check=True)
    launch = [str(Path(sys.executable).with_name("mlx.launch")), "--backend", "ring", "-n", "2"]
    load_before = load_average()
    runs = {}
    for name, prefix in (("1 rank", [sys.executable]),
                         ("2 ranks", [*launch, "--starting-port", str(a.port), "--", sys.executable])):
        folder = out / name.replace(" ", "_")
        cmd = [*prefix, *train_args(a, model), "--out", str(folder)]
        print("$", " ".join(cmd), flush=True)
        tic = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: {name} run failed:\n{r.stderr[-3000:]}")
        runs[name] = (*step_times(folder), time.perf_counter() - tic)
    cmd = [*launch, "--starting-port", str(a.port + 2), "--", sys.executable, str(Path(__file__).resolve()), "--probe",
           "--model", model, "--lora-layers", str(a.lora_layers), "--lora-rank", str(a.lora_rank),
           "--probe-reps", str(a.probe_reps)]
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("PROBE ")]
    if r.returncode or not lines:
        sys.exit(f"error: the all-reduce probe failed:\n{r.stderr[-3000:]}")
    pr = json.loads(lines[0][len("PROBE "):])
    load_after = load_average()

    micro = a.grad_accumulation
    comm_bytes = pr["grad_bytes"] + micro * pr["stats_bytes"] + pr["flag_bytes"]
    comm_s = pr["grad_seconds"] + micro * pr["stats_seconds"] + pr["flag_seconds"]
    (s1, l1, t1, w1), (s2, l2, t2, w2) = runs["1 rank"], runs["2 ranks"]
    step1, step2 = statistics.median(s1), statistics.median(s2)
    rel = max(abs(x - y) / abs(x) for x, y in zip(l1, l2))
    blocks = a.lora_layers if a.lora_layers >= 0 else "all"
    print(f"\nmodel {a.model} | LoRA rank {a.lora_rank} on {blocks} blocks | global batch {a.batch_size} x "
          f"{micro} micro-batch(es) | {a.iters} steps (step 1, compiling, excluded)")
    print(f"load average before {load_before}, after {load_after}")
    print("| | median step s | trained tokens/s | wall s (with loading) |")
    print("|---|---|---|---|")
    print(f"| 1 rank | {step1:.3f} | {t1:.1f} | {w1:.1f} |")
    print(f"| 2 ranks (mlx.launch, ring on 127.0.0.1) | {step2:.3f} | {t2:.1f} | {w2:.1f} |")
    print(f"2-rank / 1-rank step time: {step2 / step1:.2f}x")
    print(f"all-reduce per step: {comm_bytes} bytes handed to all_sum (gradients {pr['grad_bytes']} in "
          f"{-(-pr['grad_bytes'] // (64 << 20))} bucket(s), {micro} x {pr['stats_bytes']} loss/count, "
          f"{pr['flag_bytes']} stop flag); {comm_s * 1e3:.2f} ms (gradients {pr['grad_seconds'] * 1e3:.2f} ms, "
          f"loss/count {micro} x {pr['stats_seconds'] * 1e3:.3f} ms, stop flag {pr['flag_seconds'] * 1e3:.3f} ms) "
          f"= {comm_s / step2:.2%} of the 2-rank step")
    print(f"loss curves, 2 ranks vs 1: max relative difference {rel:.2e} over {len(l1)} steps")
    (out / "result.json").write_text(json.dumps({
        "model": a.model, "iters": a.iters, "batch_size": a.batch_size, "grad_accumulation": micro,
        "lora_layers": a.lora_layers, "lora_rank": a.lora_rank, "step_seconds": {"1": step1, "2": step2},
        "tokens_per_sec": {"1": t1, "2": t2}, "probe": pr, "allreduce_bytes_per_step": comm_bytes,
        "allreduce_seconds_per_step": comm_s, "loss_max_rel_diff": rel,
        "load_average": {"before": load_before, "after": load_after}}, indent=2))


if __name__ == "__main__":
    main()
