"""--loss-chunk: peak memory and step time of one training step, the LM head and the losses
applied chunk by chunk vs one full logits tensor, side by side in one process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python scripts/bench_loss_chunk.py --model smollm2 --batch-size 4 --seq-len 256 --chunks 0,256,1024 --steps 3
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python scripts/bench_loss_chunk.py --model gemma3-270m-4bit --batch-size 4 --seq-len 256 --chunks 0,256,1024 --steps 3

    # smoke test (a random 2-block model with a 262,144-row vocabulary; numbers meaningless):
    python scripts/bench_loss_chunk.py --model tiny262k --batch-size 2 --seq-len 64 --chunks 0,64 --steps 1

The student is the trainer's own: `MLXBackend` (LoRA rank 8 on every block, the compiled step of
`build_step`), one batch of random token ids (--batch-size x --seq-len; the first 32 positions of
every row are prompt, masked), the objective `kd_objective` (SFT + top-10 KD with the tail bucket,
T = 2, alpha = 0.35, random teacher log-probabilities) or, with --sft, `sft_objective`. The content
of the tokens does not matter: the cost of the head is positions x vocabulary x width.

For each --chunks value (0 = off) a step is compiled, run once to warm up, then the settings take
turns, --steps rounds, so a change of machine load hits all of them. Peak memory is MLX's
(`mx.get_peak_memory`, reset before each step): the whole process's arrays, weights included; the
column "above weights" subtracts the memory in use before the step (weights, adapter, optimizer).
Prints the median step seconds, the peaks, and the ratios to chunk 0.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tiny262k(out: Path) -> str:
    """A random 2-block qwen2 (width 64) whose vocabulary has Gemma 3's 262,144 rows."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from mlx_distill.tiny import build_model

    build_model(out)  # its tokenizer; the embedding gets 262,144 rows (ids past the tokenizer are never read)
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = 262_144
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(out)


def batch(vocab: int, bsz: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, min(vocab, 200_000), (bsz, seq + 1)).astype(np.int32)
    mask = np.ones((bsz, seq), np.float32)
    mask[:, :32] = 0.0
    lp = np.log(rng.dirichlet(np.ones(10), (bsz, seq)) * 0.9).astype(np.float32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask,
            "kd_ids": rng.integers(0, vocab, (bsz, seq, 10)).astype(np.int32), "kd_logits": lp,
            "kd_alpha": np.array(0.35, np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chunks", default="0,256,1024")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sft", action="store_true", help="SFT objective instead of SFT + KD")
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_distill.backends.mlx import MLXBackend
    from mlx_distill.config import TrainConfig
    from mlx_distill.training.objectives import kd_objective, sft_objective

    model = args.model
    tmp = tempfile.TemporaryDirectory()
    if model == "tiny262k":
        model = tiny262k(Path(tmp.name) / "m")
    chunks = [int(c) for c in args.chunks.split(",")]
    cfg = TrainConfig(model=model, lora_layers=-1, lora_rank=8, kd_top_k=10, kd_tail=True, loss_chunk=0,
                      learning_rate=1e-5)
    be = MLXBackend(cfg)
    be.load()
    be.prepare()
    if be._head is None:
        sys.exit(f"{args.model}: the head could not be split off (logits != head(hidden)); nothing to compare")
    vocab = be._vocab
    arrays = batch(vocab, args.batch_size, args.seq_len)
    steps = {}
    for c in chunks:  # one compiled step per setting: forward reads loss_chunk when the step is traced
        be.loss_chunk = c
        obj = sft_objective(be.forward, split=True) if args.sft else kd_objective(be.forward, cfg, split=True)
        be.build_step(obj)
        be.train_step(arrays, update=True)  # trace + warm-up
        steps[c] = be._step
    times, peaks, above = {c: [] for c in chunks}, {c: [] for c in chunks}, {c: [] for c in chunks}
    for _ in range(args.steps):
        for c in chunks:
            be._step = steps[c]
            mx.synchronize()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            tic = time.perf_counter()
            be.train_step(arrays, update=True)
            times[c].append(time.perf_counter() - tic)
            peaks[c].append(mx.get_peak_memory() / 1e9)
            above[c].append((mx.get_peak_memory() - base) / 1e9)
    t0, p0, a0 = statistics.median(times[chunks[0]]), max(peaks[chunks[0]]), max(above[chunks[0]])
    print(f"model {args.model} | vocab {vocab} | batch {args.batch_size} x {args.seq_len} | "
          f"{'SFT' if args.sft else 'SFT + KD (top-10, tail)'} | LoRA r8 all blocks | {args.steps} rounds")
    print(f"{'chunk':>6} {'step s':>8} {'x':>6} {'peak GB':>8} {'x':>6} {'above weights GB':>17} {'x':>6}")
    for c in chunks:
        t, p, a = statistics.median(times[c]), max(peaks[c]), max(above[c])
        print(f"{c or 'off':>6} {t:8.2f} {t / t0:6.2f} {p:8.3f} {p / p0:6.2f} {a:17.3f} {a / a0:6.2f}")


if __name__ == "__main__":
    main()
