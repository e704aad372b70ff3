"""KD cost and store size: one SFT+KD training step per teacher store vs one SFT step on the same
batch, through the trainer's real batch path, with each store's bytes/token, its decoding cost and
the KD loss it gives, side by side in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python scripts/bench_kd.py --model smollm2 --teacher smollm2 --n 48 --batch-size 4 --steps 8 --out runs/bench_kd

    # smoke test (a random 2-block model; numbers meaningless):
    python scripts/bench_kd.py --model tiny --teacher tiny --n 8 --batch-size 2 --steps 2 --out runs/bench_kd_smoke

Data: the first --n training records of --data: a corpus folder or JSONL file, by default
corpora/demo (written first with `python -m mlx_distill corpus synth --out corpora/demo` when
missing), or ``gsm8k`` for the GSM8K training problems of the data setting (MLX_DISTILL_DATA)
with their reference solutions as traces.

Stores (--arms, default ``2,3,s12,s24``): the teacher re-scores the records with `mlx_distill
logits` once per arm: ``2`` the format-2 top-M store (int32 ids + float16 log-probs), ``3`` the
compact format-3 top-M store (`teacher.codec`), ``sN`` a sampled store of N draws per position
(`logits --sampled-k N`, T = 2). The student (LoRA on 16 blocks, the trainer's own compiled step
from `backends/mlx.py`) runs SFT steps and SFT+KD steps of every arm (K = --top-k for top-M
stores, every draw for sampled ones, T = 2, forward KL, alpha = 0.35) on the *same* batch,
alternating the order so that drift in machine load hits all arms.

Each step gets its arrays the way `train` builds them: ``data.batch_arrays`` + the store's
``batch_arrays`` gather, ``kd_alpha`` and the step's ``kd_scale``, then ``data.trim_prompt``.
Printed per arm: bytes per completion token in the files (and the ratio to the first arm), the
median KD step, its ratio to the SFT step, the warm prep (gather) time, the decode time (the
gather with every shard opened and decoded from its file again, minus the warm gather) and that
cold gather as a share of the KD step (target <= 3%), and the KD loss of the untrained student on
the batch (forward only, before any step).
"""

import argparse
import dataclasses
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
    ap.add_argument("--arms", default="2,3,s12,s24", help="stores compared: 2 / 3 (top-M store of that format), "
                    "sN (sampled store, N draws); the first is the reference (default: %(default)s)")
    ap.add_argument("--stores", default="", help="ARM=DIR,...: stores already extracted by `logits` from --data "
                    "(the same records and rendering), used instead of extracting those arms again")
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

    # ---------------------------------------------------------------- extraction: one store per arm
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    stores = {}
    given = dict(x.split("=", 1) for x in args.stores.split(",") if x)
    for arm in arms:  # "2" / "3": top-M store of that format; "sN": sampled store, N draws (format 3)
        if arm in given:  # a store made before by `logits` from these records (the manifest has its stats)
            st = json.loads((Path(given[arm]) / "manifest.json").read_text())["stats"]
            stores[arm] = (given[arm], st)
            print(f"store       {arm_name(arm, args.top_m)}: {given[arm]} (given) | {st['payload_bytes_per_token']:.1f} "
                  f"B/token payload, {st['file_bytes_per_token']:.1f} B/token in files")
            continue
        kw = dict(sampled_k=int(arm[1:])) if arm.startswith("s") else dict(store_format=int(arm))
        lcfg = build(LogitsConfig, dict(teacher=args.teacher, data=str(corpus), out=str(out / f"logits-{arm}-"
                                        f"{time.time_ns()}"), top_m=args.top_m, batch_size=args.batch_size,
                                        max_seq_length=1024, **kw))
        ex = extract(lcfg, quiet=True)
        stores[arm] = (lcfg.out, ex)
        print(f"extraction  {arm_name(arm, args.top_m)}: teacher {args.teacher}, {ex['examples']} examples, "
              f"{ex['positions']} completion tokens, {ex['tokens_per_sec']} completion tokens/s | "
              f"{ex['payload_bytes_per_token']:.1f} B/token payload, {ex['file_bytes_per_token']:.1f} B/token in files")

    # ---------------------------------------------------------------- the student, one batch
    cfg = build(TrainConfig, dict(model=args.model, data=str(corpus), out=str(out / "run"), batch_size=args.batch_size,
                                  max_seq_length=1024, kd_dir=stores[arms[0]][0], kd_top_k=args.top_k, lora_layers=16,
                                  warmup=0, val_fraction=0.0))
    backend = get_backend(cfg)
    _, tok = backend.load()
    examples = data.load_examples(cfg, tok, "train")
    backend.prepare()
    backend.init_optimizer()
    stream = data.BatchStream(examples, cfg.batch_size, cfg.seed, data.pad_id_of(tok))
    b = stream.at(len(stream) // 2)  # a mid-length batch
    srcs = {arm: kd_setup(dataclasses.replace(cfg, kd_dir=stores[arm][0]), {"train": examples}, tok) for arm in arms}

    # the trainer's batch path (train.py, batch_for; one micro-batch per optimizer step)
    def sft_arrays():
        return data.trim_prompt(data.batch_arrays(b), b)

    def kd_arrays(arm, cold=False):
        if cold:  # decode from the files again: the cost a shuffled run over a large store pays
            srcs[arm]._shards.clear()
        a = {**data.batch_arrays(b), **srcs[arm].batch_arrays(b, cfg.kd_top_k)}
        a["kd_alpha"] = np.array(cfg.kd_alpha, dtype=np.float32)
        a["kd_scale"] = np.array(objectives.kd_step_scale([a])[0], dtype=np.float32)  # N / N_KD of the step
        return data.trim_prompt(a, b)

    objs = {"sft": sft_objective(backend.forward), "kd": kd_objective(backend.forward, cfg)}
    # the KD loss of the untrained student on this batch, per arm (forward only, before any step)
    kd_loss_at = {}
    for arm in arms:
        _, _, parts = objs["kd"](backend.model, backend.to_arrays(kd_arrays(arm)))
        kd_loss_at[arm] = float(parts["kd_loss"]) / max(float(parts["kd_positions"]), 1.0)

    steps = {}
    for name, obj in objs.items():
        backend.build_step(obj)
        steps[name] = backend._step

    def run(name, arrays):
        backend._step = steps[name]
        t = time.perf_counter()
        r = backend.train_step(arrays, update=True)
        return time.perf_counter() - t, r

    warm = {arm: kd_arrays(arm) for arm in arms}
    for _ in range(2):  # compile + warm caches
        run("sft", sft_arrays())
        for arm in arms:
            run("kd", warm[arm])
    times = {k: [] for k in ["sft", "sft_prep"] + [f"kd{a}" for a in arms] + [f"kd{a}_prep" for a in arms]
             + [f"kd{a}_cold" for a in arms]}
    for i in range(args.steps):
        t = time.perf_counter()
        a = sft_arrays()
        times["sft_prep"].append(time.perf_counter() - t)
        times["sft"].append(run("sft", a)[0])
        for arm in (arms if i % 2 == 0 else arms[::-1]):  # alternate the order: drift in load hits all arms
            t = time.perf_counter()
            a = kd_arrays(arm)
            times[f"kd{arm}_prep"].append(time.perf_counter() - t)
            t = time.perf_counter()
            kd_arrays(arm, cold=True)
            times[f"kd{arm}_cold"].append(time.perf_counter() - t)
            times[f"kd{arm}"].append(run("kd", a)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    rows, width = warm[arms[0]]["inputs"].shape
    print(f"step timing  model {args.model}, batch {b.tokens.shape[0]}x{b.tokens.shape[1]} ({b.ntokens} completion "
          f"tokens; the step sees inputs {rows}x{width}), vocab {srcs[arms[0]].student_vocab}, K={cfg.kd_top_k} "
          f"(sampled: every draw), T={cfg.kd_temperature}, {args.steps} alternating steps, median:")
    print(f"  SFT step                  {med['sft'] * 1e3:8.1f} ms   (prep {med['sft_prep'] * 1e3:.2f} ms)")
    base = stores[arms[0]][1]["file_bytes_per_token"]
    print(f"  {'store':<22}{'B/token':>9}{'vs first':>16}{'KD step ms':>12}"
          f"{'KD/SFT':>8}{'prep ms':>9}{'decode ms':>11}{'decode %':>10}{'KD loss':>10}")
    for arm in arms:
        ex = stores[arm][1]
        step = med[f"kd{arm}"] + med[f"kd{arm}_prep"]
        decode = max(med[f"kd{arm}_cold"] - med[f"kd{arm}_prep"], 0.0)  # cold gather - warm gather
        print(f"  {arm_name(arm, args.top_m):<22}{ex['file_bytes_per_token']:>9.1f}"
              f"{base / ex['file_bytes_per_token']:>15.2f}x{med[f'kd{arm}'] * 1e3:>12.1f}"
              f"{med[f'kd{arm}'] / med['sft']:>8.3f}{med[f'kd{arm}_prep'] * 1e3:>9.2f}{decode * 1e3:>11.2f}"
              f"{100 * med[f'kd{arm}_cold'] / step:>9.2f}%{kd_loss_at[arm]:>10.4f}")
    print("  (decode %: the cold gather, every shard decoded from its file again, as a share of a warm KD step "
          "with its prep; KD loss: forward KL per covered position of the untrained student on this batch)")
    print(f"  peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


def arm_name(arm: str, m: int) -> str:
    return f"sampled N={arm[1:]}" if arm.startswith("s") else f"format {arm} top-{m}"


if __name__ == "__main__":
    main()
