"""Training throughput: `python -m mlx_distill train` vs `mlx_lm lora`, same model, data and settings,
repetitions interleaved (A B A B ...), medians reported.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python scripts/bench_train.py --model smollm2 --iters 12 --batch-size 4 --reps 3 --out runs/bench_train

    # smoke test (a random 2-block model, seconds; numbers meaningless):
    python scripts/bench_train.py --model tiny --iters 2 --batch-size 2 --reps 1 --out runs/bench_train_smoke

Data: --data, a corpus folder (train.jsonl / valid.jsonl of {id, question, reasoning, answer});
by default corpora/demo, written first with `python -m mlx_distill corpus synth --out corpora/demo`
when it is missing. Both trainers get the same chat-format copy of its first iters x batch-size
training records, prompt masking, LoRA rank 8 / scale 20 on the same top --lora-layers blocks,
AdamW at the same constant learning rate, the same batch size and max length, no validation.
Each runs exactly one epoch over those examples (both sort by length and cut the same groups;
batch *order* differs, so losses are compared as the token-weighted mean over the epoch).

The two trainers run --reps times each, alternating (ours, mlx-lm, ours, mlx-lm, ...), so a
drift in machine load hits both; a float32 matmul is measured before each pair. Printed per
trainer (median over repetitions, and each repetition):

- trained tokens/s: completion tokens (the loss positions) over the epoch's training seconds,
  compilation included for both (the sum of the report windows; model loading excluded);
- padding fraction: the share of the positions the blocks compute that hold no token of the
  row (padding), over the epoch's batches as each trainer cuts them (ours: `data.BatchStream`,
  rows padded to a multiple of 16; mlx-lm: `iterate_batches`, 32k + 1 then the last column
  dropped); and the positions the LM head computes (ours skips the prompt columns every row
  masks, `data.trim_prompt`; mlx-lm projects all);
- model FLOPs of the epoch by `mlx_distill.training.flops.step_flops` (every computed position forward,
  backward only from the lowest adapted block up, weight gradients for LoRA only; the
  formula is in that module's docstring), achieved GFLOP/s, and MFU = achieved / the matmul
  GFLOP/s measured in the same run.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEMO = REPO / "corpora" / "demo"
LR, RANK, SCALE, WEIGHT_DECAY = 1e-4, 8, 20.0, 0.01

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


def demo_corpus(data: str | None) -> Path:
    """--data as given, or corpora/demo (generated once by `corpus synth` when missing)."""
    if data:
        return Path(data)
    if not (DEMO / "train.jsonl").is_file():
        if not (REPO / "mlx_distill" / "corpus" / "synth.py").is_file():
            raise SystemExit(f"{DEMO} is missing and this checkout has no `corpus synth`: pass --data CORPUS_FOLDER")
        run([sys.executable, "-m", "mlx_distill", "corpus", "synth", "--out", str(DEMO)], None)
    return DEMO


def chat_corpus(src: Path, dst: Path, n_train: int) -> None:
    """Render corpus records to mlx-lm's {"messages": [...]} format (both trainers read it),
    exactly iters x batch-size training examples: one epoch each."""
    from mlx_distill.data import record_to_messages
    from mlx_distill.io import read_jsonl, write_jsonl

    template = (REPO / "prompts" / "train_user.txt").read_text()
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", 8)):
        rows = read_jsonl(src / f"{split}.jsonl")[:n]
        if len(rows) < n:
            raise SystemExit(f"{src / split}.jsonl has {len(rows)} records, the benchmark needs {n}")
        write_jsonl(dst / f"{split}.jsonl", ({"messages": record_to_messages(r, template)} for r in rows))


def epoch_batches(model: str, chat: Path, a) -> dict:
    """Each trainer's batches of the epoch, cut by its own code: (rows, width through the blocks,
    real positions, LM-head positions, trained tokens) per batch."""
    import numpy as np
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import iterate_batches
    from mlx_lm.utils import load_tokenizer

    from mlx_distill import data
    from mlx_distill.config import TrainConfig, build

    tok = load_tokenizer(Path(model))
    cfg = build(TrainConfig, dict(model=model, data=str(chat), batch_size=a.batch_size, max_seq_length=a.max_seq_length))
    examples = data.load_examples(cfg, tok, "train")
    stream = data.BatchStream(examples, cfg.batch_size, cfg.seed, data.pad_id_of(tok))
    ours = []
    for k in range(len(stream)):
        b = stream.at(k)
        arrays = data.trim_prompt(data.batch_arrays(b), b)  # what the trainer's step receives
        rows, width = arrays["inputs"].shape
        ours.append(dict(rows=rows, width=width, real=int(np.minimum(b.lengths, width).sum()),
                         head=rows * arrays["targets"].shape[1], trained=b.ntokens))

    train_set, _, _ = load_local_dataset(chat, tok, SimpleNamespace(mask_prompt=True))
    theirs = []
    for batch, lengths in iterate_batches(CacheDataset(train_set), a.batch_size, a.max_seq_length):
        rows, width = batch.shape[0], batch.shape[1] - 1  # default_loss: inputs = batch[:, :-1]
        offs, lens = np.array(lengths[:, 0]), np.array(lengths[:, 1])
        steps = np.arange(1, width + 1)[None, :]
        trained = int(((steps >= offs[:, None]) & (steps <= lens[:, None])).sum())  # default_loss's mask
        theirs.append(dict(rows=rows, width=width, real=int(np.minimum(lens, width).sum()), head=rows * width,
                           trained=trained))
    return {"mlx_distill": ours, "mlx_lm_lora": theirs}


def epoch_flops(batches: list[dict], shape, lora_layers: int) -> float:
    from mlx_distill.training.flops import adapted_blocks, lora_params, step_flops

    n_lora = lora_params(shape, RANK, lora_layers)
    return sum(step_flops(shape, b["rows"], b["width"], b["head"], backprop_blocks=adapted_blocks(shape, lora_layers),
                          lora=n_lora)["total"] for b in batches)


def run(cmd, env) -> str:
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    if p.returncode:
        print(p.stdout)
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return p.stdout


def epoch(rows: list[dict]) -> tuple[float, float, int, float]:
    """(trained tokens/s, token-weighted mean train loss, trained tokens, training seconds) over the
    report windows of one run (compilation included)."""
    prev, toks, secs, loss = 0, 0, 0.0, 0.0
    for r in rows:
        n = r["trained_tokens"] - prev
        prev = r["trained_tokens"]
        toks, secs, loss = toks + n, secs + n / r["tokens_per_sec"], loss + n * r["train_loss"]
    return toks / secs, loss / toks, toks, secs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model folder, hub id, 'smollm2', or 'tiny' (random, smoke tests)")
    ap.add_argument("--data", default=None, help=f"corpus folder (default: {DEMO.relative_to(REPO)}, generated if missing)")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lora-layers", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--report", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="runs of each trainer, interleaved")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_train"))
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()

    from mlx_distill import blas

    blas.ensure_fast_blas([__file__, *sys.argv[1:]])  # the matmul below runs in this process

    from mlx_distill.training.flops import Shape
    from mlx_distill.io import read_json
    from mlx_distill.models import resolve_model

    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if a.model == "tiny":
        from mlx_distill.tiny import build_model

        model = str(build_model(out / "tiny-model"))
    else:
        model = resolve_model(a.model)
    chat = out / "data"
    chat_corpus(demo_corpus(a.data), chat, a.iters * a.batch_size)
    env = blas.preload_env()
    env["PYTHONUNBUFFERED"] = "1"

    def ours(rep):
        return [sys.executable, "-m", "mlx_distill", "train", "--model", model, "--data", str(chat),
                "--out", str(out / f"ours-{rep}"), "--iters", str(a.iters), "--batch-size", str(a.batch_size),
                "--lora-layers", str(a.lora_layers), "--lora-rank", str(RANK), "--lora-scale", str(SCALE),
                "--max-seq-length", str(a.max_seq_length), "--learning-rate", str(LR), "--warmup", "0",
                "--lr-schedule", "constant", "--weight-decay", str(WEIGHT_DECAY), "--max-grad-norm", "0",
                "--report-every", str(a.report), "--val-every", str(10 ** 6), "--patience", "0",
                "--save-every", str(10 ** 6)]

    cfg = out / "mlx_lm.yaml"
    cfg.write_text(json.dumps({"lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0},
                               "optimizer_config": {"adamw": {"weight_decay": WEIGHT_DECAY}}}))

    def theirs(rep):
        return [sys.executable, "-c", MLX_LM_LORA_WITH_METRICS, "--model", model, "--train", "--data", str(chat),
                "-c", str(cfg), "--adapter-path", str(out / f"mlx_lm-{rep}"), "--iters", str(a.iters),
                "--batch-size", str(a.batch_size), "--num-layers", str(a.lora_layers),
                "--max-seq-length", str(a.max_seq_length), "--learning-rate", str(LR), "--optimizer", "adamw",
                "--mask-prompt", "--steps-per-report", str(a.report), "--steps-per-eval", str(10 ** 6),
                "--val-batches", "1", "--save-every", str(10 ** 6)]

    names = ("mlx_distill", "mlx_lm_lora")
    runs = {n: [] for n in names}
    gflops = []
    for rep in range(a.reps):
        gflops.append(matmul_gflops())
        run(ours(rep), env)
        ours_rows = [r for r in map(json.loads, (out / f"ours-{rep}" / "metrics.jsonl").read_text().splitlines())
                     if "tokens_per_sec" in r]
        log = run(theirs(rep), env)
        theirs_rows = [json.loads(line[len("METRICS "):]) for line in log.splitlines() if line.startswith("METRICS ")]
        if not theirs_rows:
            print(log)
            raise SystemExit("could not parse mlx_lm lora's report lines")
        theirs_rows = [dict(train_loss=r["train_loss"], tokens_per_sec=r["tokens_per_second"],
                            trained_tokens=r["trained_tokens"]) for r in theirs_rows]
        for name, rows in zip(names, (ours_rows, theirs_rows)):
            tps, loss, toks, secs = epoch(rows)
            runs[name].append({"tokens_per_sec": tps, "mean_train_loss": loss, "trained_tokens": toks, "seconds": secs})
    gflops.append(matmul_gflops())

    # what each trainer computed: its own batching of the epoch, and the FLOPs of those shapes
    shape = Shape.from_config(read_json(Path(model) / "config.json"))
    batches = epoch_batches(model, chat, a)
    peak = statistics.median(gflops) * 1e9
    res = {"model": a.model, "model_path": model, "iters": a.iters, "batch_size": a.batch_size,
           "lora_layers": a.lora_layers, "reps": a.reps, "matmul_gflops": [round(g, 1) for g in gflops],
           "blas": blas.status()}
    for name in names:
        bs, rs = batches[name], runs[name]
        positions = sum(b["rows"] * b["width"] for b in bs)
        flops = epoch_flops(bs, shape, a.lora_layers)
        secs = statistics.median(r["seconds"] for r in rs)
        expected = sum(b["trained"] for b in bs)
        if any(r["trained_tokens"] != expected for r in rs):
            print(f"note: {name} reported {[r['trained_tokens'] for r in rs]} trained tokens, its batches hold {expected}")
        res[name] = {
            "tokens_per_sec": round(statistics.median(r["tokens_per_sec"] for r in rs), 1),
            "tokens_per_sec_each": [round(r["tokens_per_sec"], 1) for r in rs],
            "mean_train_loss": round(statistics.median(r["mean_train_loss"] for r in rs), 4),
            "trained_tokens": expected, "batches": len(bs), "positions": positions,
            "padding_fraction": round(1 - sum(b["real"] for b in bs) / positions, 4),
            "head_positions": sum(b["head"] for b in bs),
            "epoch_gflop": round(flops / 1e9, 1), "seconds_median": round(secs, 2),
            "achieved_gflops": round(flops / secs / 1e9, 1), "mfu": round(flops / secs / peak, 4),
        }
    ratios = [o["tokens_per_sec"] / t["tokens_per_sec"] for o, t in zip(runs["mlx_distill"], runs["mlx_lm_lora"])]
    res["ratio"] = round(res["mlx_distill"]["tokens_per_sec"] / res["mlx_lm_lora"]["tokens_per_sec"], 3)
    res["ratio_each"] = [round(r, 3) for r in ratios]
    print(json.dumps(res, indent=2))

    o, t = res["mlx_distill"], res["mlx_lm_lora"]
    print(f"\n{a.reps} interleaved runs each, medians; matmul {statistics.median(gflops):.1f} GFLOP/s "
          f"(measured {len(gflops)}x in this run)")
    print(f"{'':<22}{'trained tok/s':>14}{'padding':>9}{'head pos.':>10}{'GFLOP/epoch':>13}{'GFLOP/s':>9}{'MFU':>7}"
          f"{'mean loss':>11}")
    for label, r in (("mlx_distill train", o), ("mlx_lm lora", t)):
        print(f"{label:<22}{r['tokens_per_sec']:>14.1f}{r['padding_fraction']:>9.1%}{r['head_positions']:>10}"
              f"{r['epoch_gflop']:>13.1f}{r['achieved_gflops']:>9.1f}{r['mfu']:>7.1%}{r['mean_train_loss']:>11.4f}")
    print(f"ratio of medians {res['ratio']:.2f}x (each pair: {', '.join(f'{r:.2f}' for r in ratios)})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
