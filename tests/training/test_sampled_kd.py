"""The sampled-KD estimator (`losses.sampled_kd_loss`) is unbiased: over many independent draws its
mean gradient (and value) match the full-distribution forward KL's within their standard error."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_distill.training.losses import kd_loss, sampled_kd_loss


def _draws(rng, p, n_draws, reps):
    """reps positions, each the distinct ids of n_draws draws from p with their counts."""
    V = len(p)
    x = rng.choice(V, size=(reps, n_draws), p=p)
    counts = np.zeros((reps, V), np.float32)
    np.add.at(counts, (np.repeat(np.arange(reps), n_draws), x.ravel()), 1.0)
    order = np.argsort(-counts, 1)[:, :n_draws]  # at most n_draws distinct ids per position
    return order.astype(np.int32), np.take_along_axis(counts, order, 1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mean_sampled_gradient_matches_full_kl(temperature):
    rng = np.random.default_rng(0)
    V, N, reps = 12, 12, 4000
    t_logits = rng.normal(0, 2.0, V)
    p_T = np.exp(t_logits / temperature - np.log(np.exp(t_logits / temperature).sum()))
    z = mx.array(rng.normal(0, 1.0, (1, 1, V)).astype(np.float32))
    ids, counts = _draws(rng, p_T, N, reps)
    logp = np.log(p_T)[ids].astype(np.float32)
    ids, counts, logp = (mx.array(a[None]) for a in (ids, counts, logp))
    mask = mx.ones((1, reps))

    def sampled(zz):  # every position sees the same student logits and its own draws
        s, n = sampled_kd_loss(mx.broadcast_to(zz, (1, reps, V)), ids, logp, counts, mask, temperature)
        return s

    # per-draw gradients: the gradient of the sum is the sum of the per-position gradients, so
    # take them one by one through the position axis instead
    def per_position(zz):
        s, _ = sampled_kd_loss(zz, ids, logp, counts, mask, temperature)
        return s

    g_each = np.array(mx.grad(per_position)(mx.broadcast_to(z, (1, reps, V))))[0]  # (reps, V)
    vals = []
    full_ids = mx.array(np.arange(V, dtype=np.int32)[None, None])
    full_lp = mx.array((t_logits - np.log(np.exp(t_logits).sum())).astype(np.float32)[None, None])

    def full(zz):
        s, _ = kd_loss(zz, full_ids, full_lp, mx.ones((1, 1)), temperature=temperature, kind="forward")
        return s

    g_full = np.array(mx.grad(full)(z))[0, 0]
    mean, se = g_each.mean(0), g_each.std(0, ddof=1) / np.sqrt(reps)
    assert np.all(np.abs(mean - g_full) <= 4 * se + 1e-6), (mean, g_full, se)
    # not vacuous: one draw's gradient is far from the full one, the mean is close
    assert np.abs(g_each[0] - g_full).max() > 10 * se.max()
    # the value: mean of the per-position estimates vs the full KL
    total, count = sampled_kd_loss(mx.broadcast_to(z, (1, reps, V)), ids, logp, counts, mask, temperature)
    full_val = float(full(z))
    est = float(total) / float(count)
    q = np.array(mx.softmax(z[0, 0] / temperature))
    per = (temperature ** 2) * np.sum(np.array(counts[0]) / N * (np.array(logp[0]) - np.log(q[np.array(ids[0])])), 1)
    assert abs(est - per.mean()) < 1e-3 * max(1.0, abs(est))
    assert abs(est - full_val) <= 4 * per.std(ddof=1) / np.sqrt(reps)
    assert float(sampled(z)) == pytest.approx(float(total))


def test_masked_and_empty_positions_count_nothing():
    z = mx.zeros((1, 3, 5))
    ids = mx.array(np.array([[[1, 2], [0, 0], [3, 0]]], np.int32))
    counts = mx.array(np.array([[[2, 1], [0, 0], [3, 0]]], np.float32))
    logp = mx.array(np.full((1, 3, 2), -1.0, np.float32))
    s, n = sampled_kd_loss(z, ids, logp, counts, mx.array([[1.0, 1.0, 0.0]]), 1.0)
    assert float(n) == 1.0  # position 1 has no draws, position 2 is masked
    assert float(s) == pytest.approx(-1.0 + np.log(5.0), rel=1e-5)
    s, n = sampled_kd_loss(z, ids, logp, counts, mx.zeros((1, 3)), 1.0)
    assert float(s) == 0.0 and float(n) == 0.0


# ----------------------------------------------------------------------------- logits --sampled-k -> train --kd
def _records(n):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a, b = int(rng.integers(1, 99)), int(rng.integers(1, 99))
        out.append({"id": f"q{i}", "question": f"Ann has {a} coins and buys {b} more. How many now?",
                    "reasoning": f"Ann has {a} + {b} = {a + b} coins.", "answer": str(a + b)})
    return out


def test_sampled_store_trains_with_falling_kd_loss(tiny_model, tiny_llama, tmp_path):
    """`logits --sampled-k 12` on a tiny teacher, then `train --kd` of a student of the same tokenizer:
    the store records N, T and the seed, holds N draws per position (the same ones whatever the
    batching), serves counts beside the ids, refuses reverse KL and another temperature, and its
    KD loss is finite and falls."""
    import json

    from mlx_distill.config import LogitsConfig, TrainConfig, build
    from mlx_distill.io import InputError, read_jsonl
    from mlx_distill.paths import REPO
    from mlx_distill.teacher.logits import extract
    from mlx_distill.teacher.store import TopMStore
    from mlx_distill.training import train
    from mlx_distill.training.kd import kd_setup

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in _records(16)))
    tpl = str(REPO / "prompts" / "train_user.txt")

    def lcfg(out, **kw):
        base = dict(teacher=str(tiny_model), data=str(corpus), out=str(out), sampled_k=12, batch_size=3,
                    prompt_template=tpl, max_seq_length=512)
        return build(LogitsConfig, {**base, **kw})

    s = extract(lcfg(tmp_path / "s"), quiet=True)
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["format"] == 3 and man["sampled"] == {"n": 12, "temperature": 2.0, "seed": 0}
    # a random tiny teacher is flat (~12 distinct ids a position): still under the 32 B the real one meets
    assert 0 < man["stats"]["file_bytes_per_token"] <= 32, man["stats"]
    extract(lcfg(tmp_path / "s2", **{"batch_size": 5}), quiet=True)  # other batches: the same draws
    a, b = TopMStore(tmp_path / "s"), TopMStore(tmp_path / "s2")
    same = total = 0
    for eid in a.entries:
        (ia, _), (ib, _), ca, cb = a.rows(eid), b.rows(eid), a.counts(eid), b.counts(eid)
        assert (ca.sum(-1) == 12).all()
        for r in range(len(ia)):  # a draw at a CDF boundary may flip with the padding's float noise
            same += dict(zip(ia[r].tolist(), ca[r].tolist())) == dict(zip(ib[r].tolist(), cb[r].tolist()))
            total += 1
    assert same / total > 0.95, (same, total)

    def tcfg(**kw):
        base = dict(model=str(tiny_llama), data=str(corpus), prompt_template=tpl, max_seq_length=512,
                    kd_dir=str(tmp_path / "s"), out=str(tmp_path / "run"), iters=16, batch_size=4, val_every=8,
                    report_every=4, save_every=100, learning_rate=1e-2, warmup=0, lora_layers=-1, seed=0,
                    kd_alpha=1.0, sft_weight=0.0)
        base.update(kw)
        return build(TrainConfig, base)

    from mlx_lm import load

    from mlx_distill import data

    _, tok = load(str(tiny_llama))
    exs = data.load_examples(tcfg(), tok, "train")
    with pytest.raises(InputError, match="forward KL"):
        kd_setup(tcfg(kd_kind="reverse"), {"train": exs}, tok)
    with pytest.raises(InputError, match="drawn at T=2.0"):
        kd_setup(tcfg(kd_temperature=1.0), {"train": exs}, tok)
    src = kd_setup(tcfg(), {"train": exs}, tok)
    batch = data.collate(exs, [0, 1, 2], data.pad_id_of(tok))
    arr = src.batch_arrays(batch, 5)  # --kd-top-k does not cut a sampled store: every draw counts
    assert arr["kd_counts"].shape == arr["kd_ids"].shape and arr["kd_ids"].shape[-1] == 12
    mask = data.batch_arrays(batch)["mask"]
    n = arr["kd_counts"].sum(-1)
    assert set(np.unique(n[mask > 0]).tolist()) == {12.0}
    assert np.isfinite(arr["kd_logits"][arr["kd_counts"] > 0]).all()

    train.run(tcfg(), quiet=True)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    kd = [r["kd_loss"] for r in rows]
    assert len(kd) == 4 and all(np.isfinite(kd)) and kd[-1] < 0.9 * kd[0], kd


def test_sampled_k_refusals_before_any_work():
    from mlx_distill.config import LogitsConfig, build
    from mlx_distill.io import InputError
    from mlx_distill.teacher.logits import open_teacher

    with pytest.raises(InputError, match="prompt_logprobs are a top-k"):
        open_teacher(build(LogitsConfig, dict(teacher="api", sampled_k=12)))
    with pytest.raises(InputError, match="drop --store-format 2"):
        open_teacher(build(LogitsConfig, dict(teacher="smollm2", sampled_k=12, store_format=2)))
