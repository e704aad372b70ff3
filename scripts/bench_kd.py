"""KD cost: one SFT+KD training step vs one SFT step on the same batch, and teacher top-M
extraction throughput and bytes/token, measured side by side in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python scripts/bench_kd.py --model smollm2 --teacher smollm2 --n 48 --batch-size 4 --steps 8 --out runs/bench_kd

Data: the first --n GSM8K training problems from ../shared/data (reference solutions as the
traces). The teacher re-scores them with `mlx_distill logits` (M = --top-m); the student
(LoRA, the trainer's own compiled step from `backends/mlx.py`) then runs SFT steps and
SFT+KD steps (K = --top-k, T = 2, forward KL, alpha = 0.35) on the *same* batch, alternating
so that any drift in machine load hits both. Target (issue 4): KD step <= 1.15 x SFT step.

Prints: median step seconds of each and their ratio (compiled step only, and including the
host-side `TopMStore.batch_arrays` gather a real KD step also pays); extraction completion
tokens/s and bytes per completion token (payload: int32 ids + float16 log-probs, and the
whole files including the scored token ids).
"""

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def gsm8k_corpus(n: int, path: Path) -> Path:
    from mlx_distill.paths import shared_data_dir

    src = shared_data_dir() / "gsm8k" / "train.jsonl"
    rows = []
    with open(src) as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            r = json.loads(line)
            sol, ans = r["answer"].rsplit("####", 1)
            rows.append({"id": f"gsm8k-train-{i}", "question": r["question"],
                         "reasoning": re.sub(r"<<[^>]*>>", "", sol).strip(), "answer": ans.strip()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--n", type=int, default=48, help="GSM8K problems to score")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top-m", type=int, default=25)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each kind (after 2 warm-up steps each)")
    ap.add_argument("--out", default="runs/bench_kd")
    args = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    from mlx_distill import blas, data
    from mlx_distill.backends import get_backend
    from mlx_distill.config import LogitsConfig, TrainConfig, build
    from mlx_distill.logits import extract, kd_setup
    from mlx_distill.train import kd_objective, sft_objective

    out = Path(args.out)
    corpus = gsm8k_corpus(args.n, out / "gsm8k.jsonl")
    print(f"blas: {blas.status()}")

    # ---------------------------------------------------------------- extraction
    lcfg = build(LogitsConfig, dict(teacher=args.teacher, data=str(corpus), out=str(out / f"logits-{time.time_ns()}"),
                                    top_m=args.top_m, batch_size=args.batch_size, max_seq_length=1024))
    ex = extract(lcfg, quiet=True)
    print(f"extraction  teacher {args.teacher}, {ex['examples']} examples, {ex['positions']} completion tokens: "
          f"{ex['tokens_per_sec']} completion tokens/s ({ex['forward_tokens_per_sec']} forward tokens/s) | "
          f"{ex['payload_bytes_per_token']:.1f} bytes/token payload (target <= 150 for M = 25), "
          f"{ex['file_bytes_per_token']:.1f} bytes/token in files (with scored token ids, headers)")

    # ---------------------------------------------------------------- step timing
    cfg = build(TrainConfig, dict(model=args.model, data=str(corpus), out=str(out / "run"), batch_size=args.batch_size,
                                  max_seq_length=1024, kd_dir=lcfg.out, kd_top_k=args.top_k, lora_layers=16,
                                  warmup=0, val_fraction=0.0))
    backend = get_backend(cfg)
    _, tok = backend.load()
    examples = data.load_examples(cfg, tok, "train")
    backend.prepare()
    backend.init_optimizer()
    store = kd_setup(cfg, {"train": examples}, tok)
    stream = data.BatchStream(examples, cfg.batch_size, cfg.seed, data.pad_id_of(tok))
    b = stream.at(len(stream) // 2)  # a mid-length batch
    sft_arrays = data.batch_arrays(b)

    def kd_arrays():
        a = dict(sft_arrays)
        a.update(store.batch_arrays(b, cfg.kd_top_k))
        a["kd_alpha"] = np.array(cfg.kd_alpha, dtype=np.float32)
        return a

    steps = {}
    for name, obj in (("sft", sft_objective(backend.forward)), ("kd", kd_objective(backend.forward, cfg))):
        backend.build_step(obj)
        steps[name] = backend._step

    def run(name, arrays):
        backend._step = steps[name]
        t = time.perf_counter()
        r = backend.train_step(arrays, update=True)
        return time.perf_counter() - t, r

    kd_a = kd_arrays()
    for _ in range(2):  # compile + warm caches
        run("sft", sft_arrays)
        run("kd", kd_a)
    times = {"sft": [], "kd": [], "kd_with_prep": [], "prep": []}
    for _ in range(args.steps):
        times["sft"].append(run("sft", sft_arrays)[0])
        t = time.perf_counter()
        a = kd_arrays()
        prep = time.perf_counter() - t
        dt, r = run("kd", a)
        times["kd"].append(dt)
        times["prep"].append(prep)
        times["kd_with_prep"].append(dt + prep)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"step timing  model {args.model}, batch {b.tokens.shape[0]}x{b.tokens.shape[1]} ({b.ntokens} completion "
          f"tokens), vocab {store.student_vocab}, M={store.m} K={cfg.kd_top_k}, {args.steps} alternating steps, median:")
    print(f"  SFT step            {med['sft'] * 1e3:8.1f} ms")
    print(f"  SFT+KD step         {med['kd'] * 1e3:8.1f} ms   ratio {med['kd'] / med['sft']:.3f}x (target <= 1.15x)")
    print(f"  + batch_arrays prep {med['prep'] * 1e3:8.1f} ms   ratio {med['kd_with_prep'] / med['sft']:.3f}x")
    print(f"  last KD step: sft_loss {r['sft_loss'] / r['ntokens']:.4f} kd_loss {r['kd_loss'] / r['ntokens']:.4f} per token")
    print(f"  peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
