"""GPU training throughput: a random-weight Qwen2.5-0.5B-shaped model, fixed steps, torch vs MLX (CUDA).

    python scripts/bench_gpu_train.py --steps 30 --batch-size 8 --seq-len 1024 --out runs/bench_gpu_train.json

    # CPU smoke test of the same code path (a tiny model; numbers meaningless):
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python scripts/bench_gpu_train.py --tiny --device cpu --steps 2 --batch-size 2 --seq-len 64

Needs the torch extra (`pip install 'mlx_distill[torch]'` with a CUDA build of torch). MLX is
benchmarked too when its CUDA build is installed (`pip install 'mlx[cuda]'`); with the CPU
build it is skipped and the report says so. No download: the model is Qwen2.5-0.5B's real
config (hidden 896, 24 blocks, 14 query / 2 key-value heads, MLP 4864, vocabulary 151936,
tied embeddings) with random bf16 weights.

Each backend runs the trainer's own code (`TorchBackend` / `MLXBackend`: LoRA or full
fine-tuning, the SFT loss of `mlx_distill.training.losses`, gradient division by the token count,
clipping, MLX-semantics AdamW) on random token batches of exactly --batch-size x --seq-len,
every position in the loss. The first --warmup steps (allocation, kernels, compilation) are
not timed; then --steps steps are, with a device synchronisation at both ends.

Printed and written (JSON) per backend: tokens/s, step time, peak memory, and the model FLOP
utilisation MFU = model FLOP/s / the GPU's dense bf16 peak (table below, or --peak-tflops).
Model FLOPs come from `mlx_distill.training.flops.step_flops`, the one formula every benchmark uses
(its docstring derives it): the forward pass over every position, the backward pass only
through the blocks from the lowest trained one up (activation gradients) plus weight
gradients of the trained weights; here every position is in the loss, so the LM head sees
all of them. With LoRA on all 24 blocks that is ~ 4N + 6 N_lora per token, with full
fine-tuning ~ 6N (N: matmul weights incl. the tied head), plus attention's 12 * L * T * d_q
over the full score matrix (PaLM appendix B). Both backends start from the same random
weights (torch's, copied), so their first losses agree to bf16 rounding; ratios are measured
in one process, one after the other.
"""

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QWEN25_05B = {  # Qwen/Qwen2.5-0.5B config.json (the values that shape compute)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "hidden_act": "silu", "attention_bias": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "sliding_window": 32768, "max_window_layers": 21, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643,
}
TINY = dict(QWEN25_05B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, bos_token_id=0, eos_token_id=0)

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets.
BF16_PEAK_TFLOPS = [("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0),
                    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 6000 Ada", 364.2), ("A6000", 154.8)]


def peak_tflops(name: str) -> float | None:
    for key, tf in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tf
    return None


def flops_per_token(c: dict, args, n_lora: int) -> float:
    """`mlx_distill.training.flops.step_flops` of one (batch x seq_len) step, per token."""
    from mlx_distill.training.flops import Shape, adapted_blocks, step_flops

    shape = Shape.from_config(c)
    full = args.fine_tune_type == "full"
    f = step_flops(shape, args.batch_size, args.seq_len, backprop_blocks=adapted_blocks(shape, args.lora_layers),
                   lora=0 if full else n_lora, full=full)
    return f["total"] / (args.batch_size * args.seq_len)


def train_cfg(args):
    from mlx_distill.config import TrainConfig

    return TrainConfig(model="random-qwen2.5-0.5b", iters=args.warmup + args.steps, learning_rate=1e-4, warmup=0,
                       fine_tune_type=args.fine_tune_type, lora_rank=args.lora_rank, lora_layers=args.lora_layers,
                       grad_checkpoint=args.grad_checkpoint, compile=True, seed=0)


def batches(args, vocab: int, n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        toks = rng.integers(0, vocab, (args.batch_size, args.seq_len + 1)).astype(np.int32)
        out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                    "mask": np.ones((args.batch_size, args.seq_len), np.float32)})
    return out


def timed(backend, data: list[dict], warmup: int, sync) -> tuple[float, list[float]]:
    from mlx_distill.training import train
    from mlx_distill.training import objectives

    backend.build_step(objectives.sft_objective(backend.forward))
    backend.train_mode(True)
    losses = []
    for i, arrays in enumerate(data):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        losses.append(backend.train_step(arrays, update=True, micro=i)["loss_sum"])  # .item(): syncs every step
    sync()
    return time.perf_counter() - t0, losses


def bench_torch(args, c: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mlx_distill.backends.torch import TorchBackend

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch.manual_seed(0)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in c.items() if k != "architectures"})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    # the same random weights go to MLX, so the two first losses must agree (a bf16 parity check)
    weights = {k: v.float().cpu().numpy() for k, v in model.state_dict().items()} if "mlx" in args.backends else None
    tb = TorchBackend(train_cfg(args), device=device, dtype=dtype)
    tb.model, tb.tokenizer, tb.model_path = model, None, "random (Qwen2.5-0.5B config)"
    model.config.use_cache = False
    tb.prepare()
    tb.init_optimizer()
    counts = tb.parameter_counts()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    secs, losses = timed(tb, batches(args, c["vocab_size"], args.warmup + args.steps), args.warmup, sync)
    res = {"backend": "torch", "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "dtype": dtype, "torch": torch.__version__, "parameters": counts, "seconds": secs,
           "peak_memory_gb": tb.peak_memory_gb(), "first_loss": losses[0] / (args.batch_size * args.seq_len),
           "last_loss": losses[-1] / (args.batch_size * args.seq_len)}
    del tb, model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res, weights


def mlx_cuda_available() -> tuple[bool, str]:
    try:
        import mlx.core as mx
    except ImportError as e:
        return False, f"mlx not importable ({e})"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return True, f"mlx {mx.__version__} (CUDA)"
    return False, f"mlx {mx.__version__} has no CUDA backend here (pip install 'mlx[cuda]')"


def bench_mlx(args, c: dict, on_gpu: bool, weights: dict | None) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes

    from mlx_distill.backends.mlx import MLXBackend

    mx.set_default_device(mx.gpu if on_gpu else mx.cpu)
    mx.random.seed(0)
    model_cls, args_cls = _get_classes(c)
    model = model_cls(args_cls.from_dict(c))
    dtype = mx.bfloat16 if on_gpu else mx.float32
    if weights is not None:  # torch's random weights (same names for qwen2)
        from mlx.utils import tree_flatten

        names = dict(tree_flatten(model.parameters()))
        missing = sorted(set(names) - set(weights))
        if missing:
            raise SystemExit(f"torch weights lack {missing[:3]}")
        model.load_weights([(k, mx.array(weights[k])) for k in names])
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    mb = MLXBackend(train_cfg(args))
    mb.model, mb.tokenizer, mb.model_path = model, None, "random (Qwen2.5-0.5B config)"
    mb.prepare()
    mb.init_optimizer()
    counts = mb.parameter_counts()
    mx.reset_peak_memory()
    secs, losses = timed(mb, batches(args, c["vocab_size"], args.warmup + args.steps), args.warmup,
                         lambda: mx.synchronize())
    return {"backend": "mlx", "device": "gpu" if on_gpu else "cpu", "dtype": str(dtype), "mlx": mx.__version__,
            "parameters": counts, "seconds": secs, "peak_memory_gb": mb.peak_memory_gb(),
            "first_loss": losses[0] / (args.batch_size * args.seq_len),
            "last_loss": losses[-1] / (args.batch_size * args.seq_len)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="Timed optimiser steps.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--fine-tune-type", choices=["lora", "full"], default="lora")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-layers", type=int, default=-1, help="Top blocks with adapters (-1 = all 24).")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--backends", nargs="*", default=["torch", "mlx"], choices=["torch", "mlx"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available).")
    p.add_argument("--peak-tflops", type=float, default=None, help="The GPU's dense bf16 peak (default: table).")
    p.add_argument("--tiny", action="store_true", help="A 2-block toy model: smoke-tests the script on CPU.")
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = p.parse_args(argv)
    c = TINY if args.tiny else QWEN25_05B

    results, notes, weights = [], [], None
    if "torch" in args.backends:
        r, weights = bench_torch(args, c)
        results.append(r)
    if "mlx" in args.backends:
        ok, why = mlx_cuda_available()
        if ok:
            results.append(bench_mlx(args, c, on_gpu=True, weights=weights))
        elif args.tiny or args.device == "cpu":
            results.append(bench_mlx(args, c, on_gpu=False, weights=weights))
            notes.append(f"MLX on CPU: {why}")
        else:
            notes.append(f"MLX skipped: {why}")

    gpu = next((r["device"] for r in results if r["backend"] == "torch"), "cpu")
    peak = args.peak_tflops or peak_tflops(gpu)
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"model: {'tiny' if args.tiny else 'Qwen2.5-0.5B'} shape, random weights | {args.fine_tune_type}"
          f"{f' rank {args.lora_rank}' if args.fine_tune_type == 'lora' else ''} | batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.steps} timed steps after {args.warmup} | device {gpu}"
          f"{f', bf16 peak {peak:g} TFLOP/s' if peak else ', bf16 peak unknown (pass --peak-tflops)'}")
    for r in results:
        n_lora = r["parameters"]["trainable"] if args.fine_tune_type == "lora" else 0
        fpt = flops_per_token(c, args, n_lora)
        r["tokens_per_sec"] = tokens / r["seconds"]
        r["step_seconds"] = r["seconds"] / args.steps
        r["model_tflops_per_token"] = fpt / 1e12
        r["achieved_tflops"] = fpt * r["tokens_per_sec"] / 1e12
        r["mfu"] = r["achieved_tflops"] / peak if peak and r["device"] != "cpu" else None
        mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a"
        print(f"  {r['backend']:<6} {r['device']:<28} {r['tokens_per_sec']:>10.0f} tokens/s  "
              f"{r['step_seconds'] * 1e3:8.1f} ms/step  {r['achieved_tflops']:7.1f} TFLOP/s  {mfu}  "
              f"peak mem {r['peak_memory_gb']:.2f} GB  loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    if len(results) == 2:
        print(f"  torch / mlx tokens/s: {results[0]['tokens_per_sec'] / results[1]['tokens_per_sec']:.2f}")
    for n in notes:
        print(f"  note: {n}")
    if args.out:
        from mlx_distill.io import atomic_write_json, versions

        atomic_write_json(args.out, {"args": vars(args), "config": c, "peak_bf16_tflops": peak, "results": results,
                                     "notes": notes, "versions": versions()})


if __name__ == "__main__":
    main()
