"""Objectives of the one training loop: SFT, top-K logit KD (offline store, online teacher,
on-policy mix) and the KD schedule (alpha warm-up, the per-step KD scale). The loop in
`training.train` takes an objective as an argument; batch sources (`training.sources`) use the
schedule helpers here, so neither imports the other for them."""

import numpy as np

from mlx_distill.config import TrainConfig
from mlx_distill.training.losses import lm_losses, sampled_lm_losses


def sft_objective(forward, split: bool = False):
    """SFT. `split`: ask the backend's forward for a `SplitHead` (``--loss-chunk``): the losses then
    apply the LM head chunk by chunk (`losses.lm_losses`); plain logits otherwise."""
    def objective(model, b):
        out = forward(model, b["inputs"], b["targets"].shape[1], **({"split": True} if split else {}))
        s, n, _, _ = lm_losses(out, b["targets"], b["mask"])
        return s, n, {"sft_loss": s}

    return objective


def kd_objective(forward, cfg: TrainConfig, tail: bool = False, split: bool = False, hidden=None):
    """Per optimizer step, L = S / N + alpha_t * K / N_KD: the SFT sum S over its N completion
    tokens, the KD sum K over the N_KD positions that carry teacher targets (never over SFT
    tokens, so positions without a teacher do not dilute it); alpha_t rises linearly to
    kd_alpha over kd_warmup steps.

    The backends divide the summed objective of a step's micro-batches once by N, so the KD
    sum is returned scaled by ``kd_scale = N / N_KD``, counted by the loop over the whole step
    (every micro-batch, every rank; `kd_step_scale`). Callers that give no ``kd_scale`` get
    the micro-batch's own ratio. A step without any teacher target has ``kd_scale = 0``.

    The SFT term is weighted by ``sft_weight`` (1 = the formula above). On-policy runs
    (`sources.OnPolicySource`) mark each batch with ``gold``: a rollout batch (gold 0) is the
    student's own sample and carries no SFT term. One step may hold gold and rollout
    micro-batches (accumulation with 0 < lambda < 1): the SFT sum is then returned scaled by
    ``sft_scale = N / N_gold`` of the step (`sft_step_scale`), so that after the backends'
    division by N the step's objective is exactly w * S / N_gold + alpha_t * K / N_KD, whatever
    the mix (not w * S / N, whose weight would move with the rollouts' length). They always use
    the tail bucket (see `losses.kd_loss`), as
    does KD across tokenizers (``tail=True``: teacher candidates the student cannot spell).
    Batches aligned across tokenizers also carry the span / ULD arrays (`teacher.store.TopMStore`).

    `split`: as in `sft_objective` (``--loss-chunk``). `hidden` (``--kd-hidden``, a
    `hidden.HiddenKD`): gamma * H / N_H is added, H the hidden-state loss summed over the N_H
    positions it covers (`HiddenKD.loss`), returned scaled by N / N_H of the micro-batch; the parts
    gain ``hidden_loss`` and ``hidden_positions``."""
    from mlx_distill.training.losses import ops

    tail = cfg.kd_tail or cfg.on_policy_fraction > 0 or tail

    def objective(model, b):
        out = forward(model, b["inputs"], b["targets"].shape[1], **({"split": True} if split else {}))
        cross = {}
        if "kd_span_len" in b:
            cross = {"targets": b["targets"], "span_logp": b["kd_span_logp"], "span_len": b["kd_span_len"],
                     "span_in": b["kd_span_in"]}
        if "kd_uld" in b:
            cross["uld"] = b["kd_uld"]
        if "kd_counts" in b:  # a sampled store: the unbiased forward-KL estimator (`losses.sampled_kd_loss`)
            s, n, k, nk = sampled_lm_losses(out, b["targets"], b["mask"], b["kd_ids"], b["kd_logits"], b["kd_counts"],
                                            cfg.kd_temperature)
        else:
            s, n, k, nk = lm_losses(out, b["targets"], b["mask"], kd=dict(
                teacher_ids=b["kd_ids"], teacher_logits=b["kd_logits"], temperature=cfg.kd_temperature,
                kind=cfg.kd_kind, tail=tail, top_k=cfg.kd_top_k, beta=cfg.kd_beta, **cross))
        if "kd_scale" in b:
            scale = b["kd_scale"]
        else:
            o = ops(nk)
            scale = n / o.maximum(nk, o.full_like(nk, 1.0))
        kd = b["kd_alpha"] * scale * k
        if hidden is not None:  # feature KD: its own average over the positions it covers
            h, nh = hidden.loss(model, b)
            o = ops(nh)
            kd = kd + cfg.kd_hidden * (n / o.maximum(nh, o.full_like(nh, 1.0))) * h
            parts = {"sft_loss": s, "kd_loss": k, "kd_positions": nk, "hidden_loss": h, "hidden_positions": nh}
            return cfg.sft_weight * s + kd, n, parts
        if "gold" in b:
            g = b["gold"]
            gs = g * b["sft_scale"] if "sft_scale" in b else g  # no step scale: the micro-batch's own (N / N = 1)
            return cfg.sft_weight * gs * s + kd, n, {"sft_loss": g * s, "sft_tokens": g * n, "kd_loss": k,
                                                     "kd_positions": nk}
        return cfg.sft_weight * s + kd, n, {"sft_loss": s, "kd_loss": k, "kd_positions": nk}

    return objective


def kd_step_scale(step_arrays: list[dict]) -> tuple[float, float, float]:
    """(N / N_KD, N, N_KD) over the micro-batches of one optimizer step (NumPy arrays as
    `data.batch_arrays` + a KD source give them): N counts loss positions, N_KD those with at
    least one teacher slot (`losses.kd_loss`'s count). 0 when no position has a teacher."""
    from mlx_distill.training.losses import EMPTY_BELOW

    n = sum(float(a["mask"].sum()) for a in step_arrays)
    nk = sum(float((a["mask"] * np.maximum((a["kd_logits"] > EMPTY_BELOW).any(-1), a.get("kd_span_in", 0.0))).sum())
             for a in step_arrays)
    return (n / nk if nk else 0.0), n, nk


def sft_step_scale(step_arrays: list[dict]) -> float:
    """N / N_gold over the micro-batches of one on-policy step (arrays with ``gold``): the SFT sum
    of the gold batches, so scaled, is averaged over the step's gold tokens once the backend
    divides the step by N. 0 when the step holds no gold token (its objective has no SFT term)."""
    n = sum(float(a["mask"].sum()) for a in step_arrays)
    gold = sum(float(a["mask"].sum()) * float(a.get("gold", 1.0)) for a in step_arrays)
    return n / gold if gold else 0.0


def fold_step(window: dict, parts: dict, ntokens: float) -> None:
    """Add one optimizer step's objective parts (sums over its micro-batches, as the objective
    returns them) to a report window, so that `window_parts` gives each term as the objective
    takes it: per step, ``sft_loss`` over the step's gold tokens and ``kd_loss`` over its KD
    positions; across the window's steps, both weighted by the step's tokens N, as
    ``train_loss`` (the steps' summed objective / their N) is. Then, with alpha constant over
    the window and every step holding both terms, ``train_loss == sft_weight * sft_loss +
    kd_alpha * kd_loss`` exactly (on-policy mixes and off-policy KD alike). Other parts are
    summed as they come (`window_parts` divides them by the window's tokens)."""
    for k, v in parts.items():
        if k not in ("sft_loss", "sft_tokens", "kd_loss", "kd_positions"):
            window[k] = window.get(k, 0.0) + v
    if "sft_loss" in parts:
        gold = parts.get("sft_tokens", ntokens)
        if gold:
            window["sft_loss"] = window.get("sft_loss", 0.0) + ntokens * parts["sft_loss"] / gold
            window["sft_tokens"] = window.get("sft_tokens", 0.0) + ntokens
        else:  # a step of rollouts only: no SFT term
            window.setdefault("sft_tokens", 0.0)
    if "kd_positions" in parts:
        nk = parts["kd_positions"]
        window["kd_positions"] = window.get("kd_positions", 0.0) + nk
        window.setdefault("kd_loss", 0.0)
        window.setdefault("kd_weight", 0.0)
        if nk:
            window["kd_loss"] += ntokens * parts.get("kd_loss", 0.0) / nk
            window["kd_weight"] += ntokens


def window_parts(parts: dict, ntokens: int) -> dict:
    """A report window's averages of the objective's parts: ``sft_loss`` per completion token;
    ``kd_loss`` per position carrying a teacher target (None when none did) and
    ``kd_coverage``, the share of completion tokens that carried one."""
    out = {k: v / max(ntokens, 1) for k, v in parts.items()
           if k not in ("kd_loss", "kd_positions", "kd_weight", "sft_tokens", "hidden_loss", "hidden_positions")}
    if "hidden_positions" in parts:  # --kd-hidden: per position it covers
        nh = parts["hidden_positions"]
        out["hidden_loss"] = parts.get("hidden_loss", 0.0) / nh if nh else None
    if "sft_tokens" in parts:  # the SFT term's own weight (on-policy: gold batches only; `fold_step`)
        out["sft_loss"] = parts.get("sft_loss", 0.0) / parts["sft_tokens"] if parts["sft_tokens"] else None
    if "kd_positions" in parts:
        nk = parts["kd_positions"]
        w = parts.get("kd_weight", nk)  # `fold_step` windows weigh steps by N; raw sums by N_KD
        out["kd_loss"] = parts.get("kd_loss", 0.0) / w if nk and w else None
        out["kd_coverage"] = round(nk / max(ntokens, 1), 4)
    return out


def kd_alpha_at(cfg: TrainConfig, step: int) -> float:
    if cfg.kd_warmup <= 0:
        return cfg.kd_alpha
    return cfg.kd_alpha * min(1.0, step / cfg.kd_warmup)
