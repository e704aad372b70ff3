"""`python -m mlx_distill parity`: the same weights and batch through MLX and PyTorch (float32).

    python -m mlx_distill parity --model smollm2 --data corpora/demo
    python -m mlx_distill parity -c train.yaml --kd runs/teacher-logits     # the config you will train with

Run it to trust a new model family on both paths. It loads the model in both backends,
tokenises the first training batch with each backend's tokenizer (they must agree), puts
adapters on both (the training config's LoRA/DoRA rank, scale, blocks and keys) with the
*same non-zero* weights, and prints the largest differences of

- base logits (no adapter) and adapted logits,
- the SFT loss, and the top-K KD loss (teacher top-M from ``--kd``, or a synthetic teacher:
  the student's own log-probabilities plus noise, top ``kd_top_k``),
- the adapter gradients of the training objective (SFT [+ alpha * KD]),
- the adapter weights after ``--steps`` optimiser updates through each backend's `train_step`
  (AdamW, schedule, clipping).

Both backends run the code training runs (`objectives.sft_objective` / `kd_objective`,
`mlx_distill.training.losses`). Dropout is set to 0 (the two libraries draw different masks). Errors
are relative: max |a - b| / max |a| over the tensor (the max over tensors for gradients and
weights). Exit status 1 when any is above its tolerance.
"""

import argparse
import sys
from dataclasses import replace

import numpy as np

from mlx_distill import config, data
from mlx_distill.config import TrainConfig

TOLERANCES = {"logits": 1e-5, "loss": 1e-5, "grads": 1e-4, "params": 1e-4}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))


def _np(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().float().cpu().numpy()
    import mlx.core as mx

    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


def synthetic_teacher(logits: np.ndarray, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-m ids and log-probabilities of (logits + N(0, 1)): a teacher close to the student."""
    z = logits + np.random.default_rng(seed).normal(0, 1, logits.shape)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=-1)[..., :m]
    return ids.astype(np.int32), np.take_along_axis(logp, ids, -1).astype(np.float32)


def build_pair(cfg: TrainConfig, examples: bool = True):
    """MLX and torch (CPU, float32) backends on the same model, before `prepare`."""
    from mlx_distill.backends.mlx import MLXBackend
    from mlx_distill.backends.torch import TorchBackend

    mb, tb = MLXBackend(cfg), TorchBackend(cfg, device="cpu", dtype="float32")
    mb.load()
    tb.load()
    return mb, tb


def first_batch(cfg: TrainConfig, mb, tb) -> tuple[dict, data.Batch]:
    """The first training batch, checking that both tokenizers give the same tokens."""
    ex_m = data.load_examples(cfg, mb.tokenizer, "train")
    ex_t = data.load_examples(cfg, tb.tokenizer, "train")
    for a, b in zip(ex_m, ex_t):
        if a.id != b.id or a.prompt_len != b.prompt_len or not np.array_equal(a.tokens, b.tokens):
            raise SystemExit(f"tokenizers disagree on example {a.id!r}: mlx-lm {a.tokens[:20].tolist()}... "
                             f"(prompt {a.prompt_len}) vs transformers {b.tokens[:20].tolist()}... (prompt {b.prompt_len})")
    if len(ex_m) != len(ex_t):
        raise SystemExit(f"tokenizers disagree: {len(ex_m)} vs {len(ex_t)} examples kept")
    stream = data.BatchStream(ex_m, cfg.batch_size, cfg.seed, data.pad_id_of(mb.tokenizer))
    b = stream.at(0)
    return data.batch_arrays(b), b


def share_adapter(mb, tb, seed: int, b_std: float = 0.02) -> dict:
    """Give both backends the same adapter: MLX's A (and m), B ~ N(0, b_std) instead of 0."""
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    w = {k: _np(v) for k, v in mb.adapter_weights().items()}
    for k in w:
        if k.endswith(".lora_b"):
            w[k] = rng.normal(0, b_std, w[k].shape).astype(np.float32)
    mb.model.load_weights([(k, mx.array(v)) for k, v in w.items()], strict=False)
    tb.set_adapter_weights(w)
    return w


def mlx_grads(mb, objective, arrays: dict):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    def f(m, b):
        s, n, parts = objective(m, b)
        return s, (n, parts)

    (s, (n, parts)), g = nn.value_and_grad(mb.model, f)(mb.model, mb.to_arrays(arrays))
    mx.eval(s, g)
    return float(s.item()), {k: v.item() for k, v in parts.items()}, {k: _np(v) for k, v in tree_flatten(g)}


def torch_grads(tb, objective, arrays: dict):
    b = tb.to_arrays(arrays)
    for _, p, _ in tb.params:
        p.grad = None
    s, n, parts = objective(tb.model, b)
    s.backward()
    g = {n_: _np(p.grad.T if t else p.grad) for n_, p, t in tb.params}
    for _, p, _ in tb.params:
        p.grad = None
    return float(s.item()), {k: float(v.item()) for k, v in parts.items()}, g


def run_parity(cfg: TrainConfig, steps: int = 2, kd_store=None, quiet: bool = False) -> dict:
    """Compare the two backends; returns {name: relative error} (see the module doc)."""
    import torch

    from mlx_distill.training import objectives
    from mlx_distill.training.losses import kd_loss, sft_loss

    cfg = replace(cfg, lora_dropout=0.0, compile=False, resume=False, grad_accumulation=1)
    mb, tb = build_pair(cfg)
    arrays, batch = first_batch(cfg, mb, tb)
    x_m, x_t = mb.to_arrays(arrays), tb.to_arrays(arrays)
    out = {}
    with torch.no_grad():
        out["base logits"] = rel_err(_np(mb.forward(mb.model, x_m["inputs"])), _np(tb.forward(tb.model, x_t["inputs"])))
    mb.prepare()
    tb.prepare()
    share_adapter(mb, tb, cfg.seed)
    mb.train_mode(False)
    tb.train_mode(False)
    lm = mb.forward(mb.model, x_m["inputs"])
    with torch.no_grad():
        lt = tb.forward(tb.model, x_t["inputs"])
    lm_np = _np(lm)
    out["adapted logits"] = rel_err(lm_np, _np(lt))
    sm, nm = sft_loss(lm, x_m["targets"], x_m["mask"])
    st, nt = sft_loss(lt, x_t["targets"], x_t["mask"])
    out["sft loss"] = rel_err(float(sm.item()) / float(nm.item()), float(st.item()) / float(nt.item()))
    if kd_store is not None:
        arrays.update(kd_store.batch_arrays(batch, cfg.kd_top_k))
        kd_source = "teacher cache"
    else:
        arrays["kd_ids"], arrays["kd_logits"] = synthetic_teacher(lm_np, max(cfg.kd_top_k, 1), cfg.seed)
        kd_source = "synthetic teacher"
    arrays["kd_alpha"] = np.array(cfg.kd_alpha, dtype=np.float32)
    x_m, x_t = mb.to_arrays(arrays), tb.to_arrays(arrays)
    kw = dict(temperature=cfg.kd_temperature, kind=cfg.kd_kind, tail=cfg.kd_tail, top_k=cfg.kd_top_k)
    km, _ = kd_loss(lm, x_m["kd_ids"], x_m["kd_logits"], x_m["mask"], **kw)
    kt, _ = kd_loss(lt, x_t["kd_ids"], x_t["kd_logits"], x_t["mask"], **kw)
    out[f"kd loss ({kd_source})"] = rel_err(float(km.item()), float(kt.item()))

    obj_m = objectives.kd_objective(mb.forward, cfg)
    obj_t = objectives.kd_objective(tb.forward, cfg)
    mb.train_mode(True)
    tb.train_mode(True)
    _, _, gm = mlx_grads(mb, obj_m, arrays)
    _, _, gt = torch_grads(tb, obj_t, arrays)
    if set(gm) != set(gt):
        raise SystemExit(f"the backends adapt different parameters: mlx only {sorted(set(gm) - set(gt))[:5]}, "
                         f"torch only {sorted(set(gt) - set(gm))[:5]}")
    scale = max(float(np.abs(v).max()) for v in gm.values())
    out["adapter grads (SFT + KD)"] = max(float(np.abs(gm[k] - gt[k]).max()) for k in gm) / max(scale, 1e-30)
    if steps > 0:
        cfg_steps = replace(cfg, iters=max(cfg.iters, steps))
        mb.cfg, tb.cfg = cfg_steps, cfg_steps
        mb.init_optimizer()
        tb.init_optimizer()
        mb.build_step(obj_m)
        tb.build_step(obj_t)
        for _ in range(steps):
            mb.train_step(arrays, update=True)
            tb.train_step(arrays, update=True)
        wm = {k: _np(v) for k, v in mb.adapter_weights().items()}
        wt = {k: _np(v) for k, v in tb.adapter_weights().items()}
        scale = max(float(np.abs(v).max()) for v in wm.values())
        out[f"adapter weights after {steps} steps"] = max(float(np.abs(wm[k] - wt[k]).max()) for k in wm) / scale
    out["_info"] = {"model": mb.model_path, "batch": list(arrays["inputs"].shape), "ids": batch.ids,
                    "fine_tune_type": cfg.fine_tune_type, "num_layers": mb.num_layers,
                    "trainable": mb.parameter_counts()["trainable"]}
    return out


def tolerance_of(name: str, tol: dict) -> float:
    for key, t in (("logits", tol["logits"]), ("loss", tol["loss"]), ("grads", tol["grads"]), ("weights", tol["params"])):
        if key in name:
            return t
    return tol["logits"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_distill parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the training options that decide the numbers (a training YAML given with -c may hold the rest)
    config.add_arguments(parser, TrainConfig, exclude=("out", "backend", "resume", "compile", "patience", "min_delta",
                                                       "report_every", "save_every", "val_every", "val_batches"))
    parser.add_argument("--steps", dest="parity_steps", type=int, default=2,
                        help="Optimiser updates to compare through train_step (0 = none). (default: 2)")
    for k, v in TOLERANCES.items():
        parser.add_argument(f"--tol-{k}", dest=f"tol_{k}", type=float, default=v,
                            help=f"Largest relative difference of the {k} that passes. (default: {v:g})")
    args = parser.parse_args(argv)
    steps = args.parity_steps
    tol = {k: getattr(args, f"tol_{k}") for k in TOLERANCES}
    for k in ["parity_steps", *[f"tol_{k}" for k in TOLERANCES]]:
        delattr(args, k)
    cfg = config.resolve(TrainConfig, args)
    kd_store = None
    if cfg.kd_dir:
        from mlx_distill.training.kd import kd_setup
        from mlx_distill.backends.mlx import MLXBackend

        probe = MLXBackend(cfg)
        _, tok = probe.load()
        ex = {s: data.load_examples(cfg, tok, s) for s in ("train", "valid") if data.has_split(cfg.data, s)}
        kd_store = kd_setup(cfg, ex, tok)
    res = run_parity(cfg, steps=steps, kd_store=kd_store)
    info = res.pop("_info")
    print(f"model {info['model']} | batch {info['batch']} ({', '.join(info['ids'][:4])}"
          f"{', ...' if len(info['ids']) > 4 else ''}) | {info['fine_tune_type']} on the top {info['num_layers']} "
          f"blocks, {info['trainable']} trainable | float32, CPU torch vs MLX")
    failed = []
    for name, err in res.items():
        t = tolerance_of(name, tol)
        ok = err <= t
        failed += [] if ok else [name]
        print(f"  {name:<34} max rel diff {err:.2e}   (tol {t:.0e})  {'ok' if ok else 'FAIL'}")
    if failed:
        print(f"parity FAILED: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    print("parity ok")
