"""The memory preflight's estimate against the measured peak, one fresh process per configuration.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python scripts/bench_preflight.py
    python scripts/bench_preflight.py --models smollm2 --configs "batch_size=4" "batch_size=4 grad_checkpoint=1"
    python scripts/bench_preflight.py --models tiny --configs "kd_teacher=self" "kd_teacher=self on_policy_fraction=0.5"

Each configuration trains a few steps on a corpus of nearly one length (so the first steps
reach the run's longest batch), reads the peak from metrics.jsonl (`mx.get_peak_memory`, the
number `train` reports as peak_memory_gb) and prints it beside `mlx_distill.training.preflight`'s
estimate: the ratio of the totals and of the parts above the weights (which dominate a
small-batch run of a real model).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
from mlx_distill import config
from mlx_distill.training import preflight, train
from mlx_distill.config import TrainConfig
from mlx_distill.io import read_jsonl
kw = json.loads(sys.argv[1])
seen = {}
real = preflight.run
def spy(*a, **k):
    seen["est"] = real(*a, **k)
    return seen["est"]
preflight.run = spy
cfg = config.build(TrainConfig, {}, kw)
train.run(cfg, quiet=True)
peak = max(r["peak_memory_gb"] for r in read_jsonl(cfg.out + "/metrics.jsonl") if "peak_memory_gb" in r) * 1e9
e = seen["est"]
print(json.dumps({"estimate": e.total, "weights": e.parts["weights"], "peak": peak, "batch": e.batch}))
"""


def corpus(folder: Path, n: int, repeat: int) -> Path:
    import random

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("valid", 4)):
        rows = []
        for i in range(count):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            rows.append({"id": f"{split}{i}", "question": f"Ann has {a} apples and buys {b} more. How many now?",
                         "reasoning": " ".join(f"{a} + {b} = {a + b}." for _ in range(repeat)), "answer": str(a + b)})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], help="'tiny' (built here) or a model")
    ap.add_argument("--configs", nargs="+", default=["", "grad_checkpoint=1", "batch_size=8",
                                                      "batch_size=8 grad_checkpoint=1", "lora_layers=16"],
                    help="space-separated key=value TrainConfig overrides, one string per configuration")
    ap.add_argument("--repeat", type=int, default=10, help="reasoning repeats per record (sets the length)")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_preflight-"))
    data = corpus(tmp / "corpus", 16, args.repeat)
    print(f"{'model':<8} {'config':<32} {'batch':>12} {'estimate':>10} {'peak':>10} {'ratio':>6} {'above weights':>14}")
    for model in args.models:
        if model == "tiny":
            from mlx_distill.tiny import build_model

            model = str(build_model(tmp / "tiny"))
        for i, spec in enumerate(args.configs):
            kw = dict(model=model, data=str(data), out=str(tmp / f"run-{Path(model).name}-{i}"), iters=args.iters,
                      batch_size=4, val_every=1000, val_batches=1, report_every=1, save_every=1000, warmup=1,
                      max_seq_length=1024, lora_layers=8)
            for item in spec.split():
                k, v = item.split("=")
                kw[k] = model if v == "self" else v  # kd_teacher=self: online KD from the model itself
            r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True)
            if r.returncode:
                print(f"{Path(model).name:<8} {spec or 'defaults':<32} failed: {r.stderr.strip().splitlines()[-1]}")
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            above = (m["estimate"] - m["weights"]) / max(m["peak"] - m["weights"], 1)
            b, t, n = m["batch"]
            print(f"{Path(model).name[:8]:<8} {spec or 'defaults':<32} {f'{b}x{t}/{n}':>12} "
                  f"{m['estimate'] / 1e6:>8.1f}MB {m['peak'] / 1e6:>8.1f}MB {m['estimate'] / m['peak']:>6.2f} "
                  f"{above:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
