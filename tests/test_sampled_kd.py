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
