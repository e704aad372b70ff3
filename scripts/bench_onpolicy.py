"""On-policy distillation cost: one on-policy step split into rollout, teacher scoring and
update; rollout tokens/s against mlx-lm's own batched generation on the same prompts, batch and
length, in the same run; the on-policy step time as a ratio to an SFT step on the same prompts.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python scripts/bench_onpolicy.py --model smollm2 --teacher smollm2 --batch-size 4 \
            --rollout-max-tokens 32 --steps 4 --out runs/bench_onpolicy

    # smoke test (random 2-block models; numbers meaningless):
    python scripts/bench_onpolicy.py --model tiny --teacher tiny --batch-size 2 --rollout-max-tokens 8 --steps 2 \
        --out runs/bench_onpolicy_smoke

Data: --data, a corpus folder (default corpora/demo, written first with `python -m mlx_distill
corpus synth` when missing). The student is the trainer's own: LoRA on 16 blocks, the compiled
step of `backends/mlx.py`, the batch source of `train` (`sources.OnPolicySource`, lambda = 1,
reverse KL with the tail bucket, K = --top-k, T = 1, alpha = 1).

Each measured step i (after --warmup steps that compile) is micro-batch i of the run: its
rollouts are sampled by the live model (temperature 1, key from (seed, i)), scored by the
teacher, then one optimizer update. Then, on the same prompts and caps, and with the same
sampling key (so the same tokens are drawn), mlx-lm's `batch_generate` (same completion and
prefill batch sizes) generates with the same live model: the rollout tokens/s ratio is
ours / mlx-lm's (target >= 0.8). The SFT step is the trainer's SFT step on the corpus batch of
the same micro index (its prompts, the gold completions). Medians over --steps.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEMO = REPO / "corpora" / "demo"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rollout-max-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_onpolicy")
    args = ap.parse_args(argv)

    from mlx_distill import blas

    if not blas.preloaded():
        print("warning: OpenBLAS is not preloaded (see the command above): CPU numbers will be slow", file=sys.stderr)
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_distill import data

    from mlx_distill.training import sources
    from mlx_distill.backends import get_backend
    from mlx_distill.config import TrainConfig, build
    from mlx_distill.training.kd import kd_setup
    from mlx_distill.backends.rollouts import rollout_key
    from mlx_distill.training.objectives import kd_objective, sft_objective

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_name, teacher_name = args.model, args.teacher
    if "tiny" in (args.model, args.teacher):
        from mlx_distill.tiny import build_model

        tiny = out / "tiny_model"
        if not tiny.exists():
            build_model(tiny)
        model_name = str(tiny) if args.model == "tiny" else args.model
        teacher_name = str(tiny) if args.teacher == "tiny" else args.teacher
    if args.data == str(DEMO) and not (DEMO / "train.jsonl").exists():
        subprocess.run([sys.executable, "-m", "mlx_distill", "corpus", "synth", "--out", str(DEMO)], check=True)

    load0 = os.getloadavg()
    cfg = build(TrainConfig, dict(model=model_name, data=args.data, out=str(out / "run"), batch_size=args.batch_size,
                                  kd_teacher=teacher_name, kd_top_k=args.top_k, kd_kind="reverse", kd_temperature=1.0,
                                  kd_alpha=1.0, on_policy_fraction=1.0, rollout_max_tokens=args.rollout_max_tokens,
                                  lora_layers=16, warmup=0, max_seq_length=1024))
    backend = get_backend(cfg)
    model, tok = backend.load()
    examples = data.load_examples(cfg, tok, "train")
    backend.prepare()
    backend.init_optimizer()
    store = kd_setup(cfg, {"train": examples}, tok)
    stream = data.BatchStream(examples, cfg.batch_size, cfg.seed, data.pad_id_of(tok))
    source = sources.make_source(cfg, backend, stream, store, tok)

    steps = {}
    for name, obj in (("sft", sft_objective(backend.forward)), ("op", kd_objective(backend.forward, cfg))):
        backend.build_step(obj)
        steps[name] = backend._step
    backend.train_mode(True)

    def train_step(name, arrays):
        backend._step = steps[name]
        t = time.perf_counter()
        backend.train_step(arrays, update=True)
        return time.perf_counter() - t

    def mlx_lm_generate(prompts, caps, key):
        backend.train_mode(False)
        mx.random.seed(key)
        n = len(prompts)
        t = time.perf_counter()
        r = batch_generate(model, tok, prompts, max_tokens=caps, sampler=make_sampler(temp=1.0, top_p=1.0),
                           completion_batch_size=n, prefill_batch_size=min(n, 8), return_token_ids=True)
        dt = time.perf_counter() - t
        backend.train_mode(True)
        return sum(len(x) for x in r.token_ids), dt

    rec = {k: [] for k in ("rollout", "teacher", "update", "op_step", "sft_step", "ours_tps", "lm_tps",
                           "tokens", "truncated")}
    for i in range(args.warmup + args.steps):
        b = stream.at(i)
        prompts = [b.tokens[r, : b.prompt_lens[r]].tolist() for r in range(len(b.ids))]
        caps = [max(1, min(cfg.rollout_max_tokens, cfg.max_seq_length - len(p))) for p in prompts]
        if i % 2:  # alternate which generator goes first, so load drift and warm caches hit both
            lm_tokens, lm_dt = mlx_lm_generate(prompts, caps, rollout_key(cfg.seed, i))
        source.stats = {}
        t = time.perf_counter()
        arrays, _ = source.batch(i, i + 1)  # rollouts (same weights, same key as mlx-lm's) + teacher scoring
        prep = time.perf_counter() - t
        s = source.stats
        if not i % 2:
            lm_tokens, lm_dt = mlx_lm_generate(prompts, caps, rollout_key(cfg.seed, i))
        upd = train_step("op", arrays)
        t = time.perf_counter()
        sft_a = data.trim_prompt(data.batch_arrays(b), b)
        sft_prep = time.perf_counter() - t
        sft = train_step("sft", sft_a)
        if i < args.warmup:
            continue
        rec["rollout"].append(s["rollout_seconds"])
        rec["teacher"].append(s["teacher_seconds"])
        rec["update"].append(upd)
        rec["op_step"].append(prep + upd)
        rec["sft_step"].append(sft + sft_prep)
        rec["ours_tps"].append(s["rollout_tokens"] / s["rollout_seconds"])
        rec["lm_tps"].append(lm_tokens / lm_dt)
        rec["tokens"].append(s["rollout_tokens"])
        rec["truncated"].append(s["rollout_truncated"])
        if lm_tokens != s["rollout_tokens"]:
            print(f"note: step {i}: mlx-lm drew {lm_tokens} tokens, ours {s['rollout_tokens']} (different samples)")
    med = {k: statistics.median(v) for k, v in rec.items()}
    load1 = os.getloadavg()
    print(f"on-policy step  student {args.model}, teacher {args.teacher}, batch {args.batch_size}, rollouts <= "
          f"{args.rollout_max_tokens} tokens (T = 1), K = {args.top_k}; median of {args.steps} steps "
          f"(after {args.warmup} warm-up):")
    print(f"  rollout           {med['rollout'] * 1e3:9.1f} ms  ({med['tokens']:.0f} tokens, "
          f"{med['truncated']:.0f} of {args.batch_size} truncated)")
    print(f"  teacher scoring   {med['teacher'] * 1e3:9.1f} ms")
    print(f"  update            {med['update'] * 1e3:9.1f} ms")
    print(f"  on-policy step    {med['op_step'] * 1e3:9.1f} ms  (all of the above + batch assembly)")
    print(f"  SFT step          {med['sft_step'] * 1e3:9.1f} ms  ratio on-policy / SFT {med['op_step'] / med['sft_step']:.2f}x")
    print(f"  rollout tokens/s  ours {med['ours_tps']:.1f} vs mlx-lm batch_generate {med['lm_tps']:.1f}: "
          f"{med['ours_tps'] / med['lm_tps']:.2f}x (target >= 0.8x)")
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()} {platform.system()}, load average "
          f"{load0[0]:.2f} at start, {load1[0]:.2f} at end; mlx {mx.__version__}, device {mx.default_device()}, "
          f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
