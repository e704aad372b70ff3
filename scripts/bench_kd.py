"""KD cost: one SFT+KD training step vs one SFT step on the same batch, through the trainer's
real batch path, and teacher top-M extraction throughput and bytes/token, side by side in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python scripts/bench_kd.py --model smollm2 --teacher smollm2 --n 48 --batch-size 4 --steps 8 --out runs/bench_kd

    # smoke test (a random 2-block model; numbers meaningless):
    python scripts/bench_kd.py --model tiny --teacher tiny --n 8 --batch-size 2 --steps 2 --out runs/bench_kd_smoke

Data: the first --n training records of --data: a corpus folder or JSONL file, by default
corpora/demo (written first with `python -m mlx_distill corpus synth --out corpora/demo` when
missing), or ``gsm8k`` for the GSM8K training problems of the data setting (MLX_DISTILL_DATA)
with their reference solutions as traces. The teacher re-scores them with `mlx_distill logits`
(M = --top-m); the student (LoRA on 16 blocks, the trainer's own compiled step from
`backends/mlx.py`) then runs SFT steps and SFT+KD steps (K = --top-k, T = 2, forward KL,
alpha = 0.35) on the *same* batch, alternating so that any drift in machine load hits both.
Target (issue 4): KD step <= 1.15 x SFT step.

Each step gets its arrays the way `train` builds them: ``data.batch_arrays`` (+ the store's
``TopMStore.batch_arrays`` gather, ``kd_alpha`` and the step's ``kd_scale`` for KD), then
``data.trim_prompt``, which drops the prompt columns every row masks, so the step is timed on
the shapes the trainer really runs. Prints the median step seconds of each and their ratio,
for the compiled step alone and with that host-side preparation; extraction completion
tokens/s and bytes per completion token (payload: int32 ids + float16 log-probs, and the
whole files including the scored token ids).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEMO = REPO / "corpora" / "demo"


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


def corpus_file(arg: str, n: int, out: Path) -> Path:
    """The first `n` training records of --data as one JSONL file (see the module docstring)."""
    from mlx_distill.io import read_jsonl, write_jsonl

    if arg == "gsm8k":
        return gsm8k_corpus(n, out / "gsm8k.jsonl")
    src = Path(arg)
    if arg == str(DEMO) and not (src / "train.jsonl").is_file():
        if not (REPO / "mlx_distill" / "corpus" / "synth.py").is_file():
            raise SystemExit(f"{DEMO} is missing and this checkout has no `corpus synth`: pass --data")
        subprocess.run([sys.executable, "-m", "mlx_distill", "corpus", "synth", "--out", str(DEMO)], check=True, cwd=REPO)
    path = src / "train.jsonl" if src.is_dir() else src
    rows = read_jsonl(path)[:n]
    if len(rows) < n:
        raise SystemExit(f"{path} has {len(rows)} records, --n asks for {n}")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "corpus.jsonl", rows)
    return out / "corpus.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="student: model folder, hub id, 'smollm2', or 'tiny' (random)")
    ap.add_argument("--teacher", default="smollm2", help="teacher (as --model; 'tiny' = the same random model)")
    ap.add_argument("--data", default=str(DEMO), help="corpus folder / JSONL file, or 'gsm8k' (default: %(default)s)")
    ap.add_argument("--n", type=int, default=48, help="training records to score and batch")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top-m", type=int, default=25)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each kind (after 2 warm-up steps each)")
    ap.add_argument("--out", default="runs/bench_kd")
    args = ap.parse_args()
    from mlx_distill import blas

    blas.ensure_fast_blas([__file__, *sys.argv[1:]])

    import mlx.core as mx
    import numpy as np

    from mlx_distill import data

    from mlx_distill.training import train

    from mlx_distill.training import objectives
    from mlx_distill.backends import get_backend
    from mlx_distill.config import LogitsConfig, TrainConfig, build
    from mlx_distill.teacher.logits import extract
    from mlx_distill.training.kd import kd_setup
    from mlx_distill.training.objectives import kd_objective, sft_objective

    out = Path(args.out)
    corpus = corpus_file(args.data, args.n, out)
    if "tiny" in (args.model, args.teacher):
        from mlx_distill.tiny import build_model

        tiny = str(build_model(out / "tiny-model"))
        args.model, args.teacher = (tiny if m == "tiny" else m for m in (args.model, args.teacher))
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

    # the trainer's batch path (train.py, batch_for; one micro-batch per optimizer step)
    def sft_arrays():
        return data.trim_prompt(data.batch_arrays(b), b)

    def kd_arrays():
        a = {**data.batch_arrays(b), **store.batch_arrays(b, cfg.kd_top_k)}
        a["kd_alpha"] = np.array(cfg.kd_alpha, dtype=np.float32)
        a["kd_scale"] = np.array(objectives.kd_step_scale([a])[0], dtype=np.float32)  # N / N_KD of the step
        return data.trim_prompt(a, b)

    steps = {}
    for name, obj in (("sft", sft_objective(backend.forward)), ("kd", kd_objective(backend.forward, cfg))):
        backend.build_step(obj)
        steps[name] = backend._step

    def run(name, arrays):
        backend._step = steps[name]
        t = time.perf_counter()
        r = backend.train_step(arrays, update=True)
        return time.perf_counter() - t, r

    sft_a, kd_a = sft_arrays(), kd_arrays()
    for _ in range(2):  # compile + warm caches
        run("sft", sft_a)
        run("kd", kd_a)
    times = {"sft": [], "kd": [], "sft_prep": [], "kd_prep": []}
    for _ in range(args.steps):
        for name, prepare in (("sft", sft_arrays), ("kd", kd_arrays)):
            t = time.perf_counter()
            a = prepare()
            times[f"{name}_prep"].append(time.perf_counter() - t)
            dt, r = run(name, a)
            times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    with_prep = {k: statistics.median(s + p for s, p in zip(times[k], times[f"{k}_prep"])) for k in ("sft", "kd")}
    rows, width = kd_a["inputs"].shape
    print(f"step timing  model {args.model}, batch {b.tokens.shape[0]}x{b.tokens.shape[1]} ({b.ntokens} completion "
          f"tokens; the step sees inputs {rows}x{width}, logits for the last {kd_a['targets'].shape[1]} positions), "
          f"vocab {store.student_vocab}, M={store.m} K={cfg.kd_top_k}, {args.steps} alternating steps, median:")
    print(f"  SFT step            {med['sft'] * 1e3:8.1f} ms")
    print(f"  SFT+KD step         {med['kd'] * 1e3:8.1f} ms   ratio {med['kd'] / med['sft']:.3f}x (target <= 1.15x)")
    print(f"  with batch prep     {with_prep['sft'] * 1e3:8.1f} ms vs {with_prep['kd'] * 1e3:.1f} ms   ratio "
          f"{with_prep['kd'] / with_prep['sft']:.3f}x (prep: SFT {med['sft_prep'] * 1e3:.2f} ms, "
          f"KD {med['kd_prep'] * 1e3:.2f} ms)")
    nk = r.get("kd_positions") or r["ntokens"]
    print(f"  last KD step: sft_loss {r['sft_loss'] / r['ntokens']:.4f} per completion token, "
          f"kd_loss {r['kd_loss'] / max(nk, 1):.4f} per {'teacher-covered position' if 'kd_positions' in r else 'token'}")
    print(f"  peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
