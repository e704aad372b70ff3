"""4-bit layers on a CPU: MLX's `quantized_matmul` vs this project's dequantize-then-matmul path
(`models.use_blas_for_quantized`, what `load_mlx` switches on for a CPU device), side by side in one
process, on the shapes of a real model's blocks.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python scripts/bench_cpu_quantized.py --rows 4,40,1024 --rounds 3
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python scripts/bench_cpu_quantized.py --model gemma3-270m-4bit --batch-size 4 --seq-len 256

Part 1 (always): one 4-bit, group-64 linear layer per shape of Gemma-3-270M's blocks (640 -> 2048,
2048 -> 640, 640 -> 1024), for each --rows value: the forward product, and the gradient with respect
to the input (what LoRA's backward pass needs), MLX's kernel vs ours; median of --rounds, the two
taking turns; the largest difference relative to the output's largest entry.

Part 2 (--model): a LoRA training step (rank 8, 8 blocks, the model's own loss on random tokens) of
the whole model loaded by plain `mlx_lm.load` and by `load_mlx`, taking turns; seconds per step and
MLX's peak memory for each.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(fn) -> float:
    """Seconds to build and evaluate fn()'s arrays once."""
    import mlx.core as mx

    t = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t


def layers(rows_list: list[int], rounds: int) -> None:
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_distill.models import use_blas_for_quantized

    class Holder(nn.Module):  # a one-layer "model" for use_blas_for_quantized
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

    print(f"{'in -> out':>12} {'rows':>5} | {'fwd MLX s':>9} {'fwd ours s':>10} {'x':>6} | "
          f"{'grad MLX s':>10} {'grad ours s':>11} {'x':>6} | max rel diff")
    for d_in, d_out in ((640, 2048), (2048, 640), (640, 1024)):
        mx.random.seed(0)
        base = nn.QuantizedLinear.from_linear(nn.Linear(d_in, d_out, bias=False), group_size=64, bits=4)
        ours = nn.QuantizedLinear.from_linear(nn.Linear(d_in, d_out, bias=False), group_size=64, bits=4)
        ours.update(base.parameters())
        assert use_blas_for_quantized(Holder(ours)) == 1
        for rows in rows_list:
            x = mx.random.normal((rows, d_in))
            fa, fb = (lambda: base(x)), (lambda: ours(x))
            ga, gb = (mx.grad(lambda v, m=m: m(v).sum()) for m in (base, ours))
            for f in (fa, fb, lambda: ga(x), lambda: gb(x)):  # warm-up
                mx.eval(f())
            t = {k: [] for k in "abcd"}
            for _ in range(rounds):
                t["a"].append(timed(fa))
                t["b"].append(timed(fb))
                t["c"].append(timed(lambda: ga(x)))
                t["d"].append(timed(lambda: gb(x)))
            m = {k: statistics.median(v) for k, v in t.items()}
            ref = base(x)
            diff = (mx.abs(ref - ours(x)).max() / mx.abs(ref).max()).item()
            print(f"{d_in:>5} -> {d_out:<5} {rows:>5} | {m['a']:>9.4f} {m['b']:>10.4f} {m['a'] / m['b']:>5.1f}x | "
                  f"{m['c']:>10.4f} {m['d']:>11.4f} {m['c'] / m['d']:>5.1f}x | {diff:.1e}", flush=True)


def model_step(name: str, batch: int, seq: int, rounds: int) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_distill.models import load_mlx, resolve_model

    path = resolve_model(name)
    mx.random.seed(0)
    x = mx.random.randint(0, 1000, (batch, seq))
    runs = {}
    for label, loader in (("mlx_lm.load (MLX quantized matmul)", load), ("load_mlx (dequantize + BLAS)", load_mlx)):
        model, _ = loader(path)
        model.freeze()
        linear_to_lora_layers(model, 8, {"rank": 8, "scale": 20.0, "dropout": 0.0})
        opt = optim.Adam(learning_rate=1e-5)

        def loss(m):
            logits = m(x[:, :-1])
            return nn.losses.cross_entropy(logits, x[:, 1:]).mean()

        vg = nn.value_and_grad(model, loss)

        def step(model=model, vg=vg, opt=opt):
            value, grads = vg(model)
            opt.update(model, grads)
            return value, model.trainable_parameters()

        runs[label] = step
    for step in runs.values():  # warm-up
        mx.eval(step())
    times = {k: [] for k in runs}
    peaks = {k: 0.0 for k in runs}
    for _ in range(rounds):
        for label, step in runs.items():
            mx.reset_peak_memory()
            times[label].append(timed(step))
            peaks[label] = max(peaks[label], mx.get_peak_memory() / 1e9)
    base = statistics.median(times[next(iter(runs))])
    print(f"\n{name}, LoRA step on {batch} x {seq} tokens (both models resident; peak = the process's):")
    for label in runs:
        med = statistics.median(times[label])
        print(f"  {label:<36} {med:8.2f} s/step  x{base / med:5.1f}  peak {peaks[label]:.2f} GB", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="4,40,1024", help="input rows per product, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="", help="also time a LoRA step of this 4-bit model (e.g. gemma3-270m-4bit)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)
    layers([int(r) for r in args.rows.split(",")], args.rounds)
    if args.model:
        model_step(args.model, args.batch_size, args.seq_len, args.rounds)


if __name__ == "__main__":
    main()
