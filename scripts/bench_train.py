"""Training throughput: `python -m mlx_distill train` vs `mlx_lm lora`, same model, data and settings, one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python scripts/bench_train.py --model smollm2 --iters 12 --batch-size 4 --out runs/bench_train

Both trainers get the same chat-format copy of the sample corpus, prompt masking, LoRA
rank 8 / scale 20 on the same number of top blocks, AdamW at the same learning rate, the
same batch size and max length. Both count trained tokens the same way (completion tokens
only). The training set is cut to iters x batch-size examples, so each trainer runs exactly
one epoch over the same examples; batch *order* differs (each shuffles its own way), so the
loss curves are compared through the token-weighted mean train loss over the epoch.

Prints: trained tokens/s of each over the whole epoch (compilation included for both),
their ratio, padding fraction of our batches vs mlx-lm's, a float32 matmul measured in this
run, and the model FLOP utilisation MFU = 4 * non-embedding params * tokens/s / matmul FLOP/s
(forward 2N + input-gradient backward 2N; LoRA has no weight gradients to speak of).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# `mlx_lm lora`'s own main(), with its reporting-callback factory patched to print each
# train report as JSON (its terminal table rounds tokens/s to integers).
MLX_LM_LORA_WITH_METRICS = """
import json, sys
import mlx_lm.lora as L
from mlx_lm.tuner.callbacks import TrainingCallback
class Printer(TrainingCallback):
    def on_train_loss_report(self, info):
        print("METRICS " + json.dumps(info), flush=True)
L.get_reporting_callbacks = lambda *a, **k: Printer()
sys.argv = ["mlx_lm.lora"] + sys.argv[1:]
L.main()
"""


def matmul_gflops(n=1024, reps=10) -> float:
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def chat_corpus(src: Path, dst: Path, n_train: int) -> None:
    """Render corpus records to mlx-lm's {"messages": [...]} format (both trainers read it).
    Exactly iters x batch-size training examples: one epoch each, so both trainers see the
    same examples grouped the same way (both sort by length and cut batches), only in
    another order."""
    from mlx_distill.data import record_to_messages
    from mlx_distill.io import read_jsonl, write_jsonl

    template = (REPO / "prompts" / "train_user.txt").read_text()
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", 8)):
        rows = read_jsonl(src / f"{split}.jsonl")[:n]
        if len(rows) < n:
            raise SystemExit(f"{src / split}.jsonl has {len(rows)} records, the benchmark needs {n}")
        write_jsonl(dst / f"{split}.jsonl", ({"messages": record_to_messages(r, template)} for r in rows))


def non_embedding_params(model_path: str) -> int:
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(model_path)
    return sum(v.size for k, v in tree_flatten(model.parameters()) if "embed" not in k and "lm_head" not in k)


def run(cmd, env) -> str:
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    if p.returncode:
        print(p.stdout)
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return p.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(REPO / "corpora" / "gsm8k-sample"))
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lora-layers", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--report", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_train"))
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()

    from mlx_distill import blas
    from mlx_distill.models import resolve_model

    model = str(resolve_model(a.model))
    out = Path(a.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    chat = out / "data"
    chat_corpus(Path(a.data), chat, a.iters * a.batch_size)
    env = blas.preload_env()
    env["PYTHONUNBUFFERED"] = "1"

    ours = [sys.executable, "-m", "mlx_distill", "train", "--model", model, "--data", str(chat), "--out", str(out / "ours"),
            "--iters", str(a.iters), "--batch-size", str(a.batch_size), "--lora-layers", str(a.lora_layers),
            "--max-seq-length", str(a.max_seq_length), "--learning-rate", "1e-4", "--warmup", "0",
            "--lr-schedule", "constant", "--weight-decay", "0.01", "--max-grad-norm", "0",
            "--report-every", str(a.report), "--val-every", str(10 ** 6), "--patience", "0", "--save-every", str(10 ** 6)]
    cfg = out / "mlx_lm.yaml"
    cfg.write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
                               "optimizer_config": {"adamw": {"weight_decay": 0.01}}}))
    theirs = [sys.executable, "-c", MLX_LM_LORA_WITH_METRICS, "--model", model, "--train", "--data", str(chat), "-c", str(cfg),
              "--adapter-path", str(out / "mlx_lm"), "--iters", str(a.iters), "--batch-size", str(a.batch_size),
              "--num-layers", str(a.lora_layers), "--max-seq-length", str(a.max_seq_length), "--learning-rate", "1e-4",
              "--optimizer", "adamw", "--mask-prompt", "--steps-per-report", str(a.report),
              "--steps-per-eval", str(10 ** 6), "--val-batches", "1", "--save-every", str(10 ** 6)]

    gflops = matmul_gflops()
    run(ours, env)
    log = run(theirs, env)
    rows = [r for r in map(json.loads, (out / "ours" / "metrics.jsonl").read_text().splitlines()) if "tokens_per_sec" in r]
    theirs_rows = [json.loads(line[len("METRICS "):]) for line in log.splitlines() if line.startswith("METRICS ")]
    theirs_rows = [dict(iter=r["iteration"], train_loss=r["train_loss"], tokens_per_sec=r["tokens_per_second"],
                        trained_tokens=r["trained_tokens"]) for r in theirs_rows]
    if not theirs_rows:
        print(log)
        raise SystemExit("could not parse mlx_lm lora's report lines")

    def epoch(rs):
        """Trained tokens / training seconds over the whole epoch (compilation included for
        both), and the token-weighted mean train loss."""
        prev, toks, secs, loss = 0, 0, 0.0, 0.0
        for r in rs:
            n = r["trained_tokens"] - prev
            prev = r["trained_tokens"]
            toks, secs, loss = toks + n, secs + n / r["tokens_per_sec"], loss + n * r["train_loss"]
        return toks / secs, loss / toks, toks

    t_ours, l_ours, n_ours = epoch(rows)
    t_theirs, l_theirs, n_theirs = epoch(theirs_rows)
    if n_ours != n_theirs:
        print(f"note: trained tokens differ: {n_ours} vs {n_theirs}")
    n_ne = non_embedding_params(model)
    gflops_end = matmul_gflops()
    res = {
        "model": model, "non_embedding_params": n_ne, "iters": a.iters, "batch_size": a.batch_size,
        "matmul_gflops": round((gflops + gflops_end) / 2, 1),
        "trained_tokens": {"mlx_distill": n_ours, "mlx_lm_lora": n_theirs},
        "mlx_distill": {"tokens_per_sec": round(t_ours, 1), "mean_train_loss": round(l_ours, 4),
                        "mfu": round(4 * n_ne * t_ours / ((gflops + gflops_end) / 2 * 1e9), 4)},
        "mlx_lm_lora": {"tokens_per_sec": round(t_theirs, 1), "mean_train_loss": round(l_theirs, 4),
                        "mfu": round(4 * n_ne * t_theirs / ((gflops + gflops_end) / 2 * 1e9), 4)},
        "ratio": round(t_ours / t_theirs, 3), "blas": blas.status(),
    }
    print(json.dumps(res, indent=2))
    print(f"\ntrained tokens/s: mlx_distill {t_ours:.1f} vs mlx_lm lora {t_theirs:.1f} -> ratio {t_ours / t_theirs:.2f}x "
          f"| MFU {res['mlx_distill']['mfu']:.1%} vs {res['mlx_lm_lora']['mfu']:.1%} of a {res['matmul_gflops']} GFLOP/s matmul")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
