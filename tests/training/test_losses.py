"""SFT and top-K KD losses: NumPy references, hand values, gradients, MLX == torch.

The MLX tests never need torch (a Mac install has none): only the cases that run the torch
path, or compare it with MLX, are skipped when torch is absent (`needs_torch`). Every random
case is drawn from an explicitly seeded generator."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_distill.training.losses import kd_loss, sft_loss

try:
    import torch
except ImportError:  # the MLX-only install
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed: MLX-vs-torch comparisons only")

KINDS = ["forward", "reverse", "jsd"]


def _lsm(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _div(logp, logq, kind):
    p, q = np.exp(logp), np.exp(logq)
    if kind == "forward":
        return float(np.sum(p * (logp - logq)))
    if kind == "reverse":
        return float(np.sum(q * (logq - logp)))
    m = (p + q) / 2
    with np.errstate(divide="ignore"):
        logm = np.log(m)
    return float(0.5 * np.sum(p * (logp - logm)) + 0.5 * np.sum(q * (logq - logm)))


def kd_reference(student, ids, teacher, mask, T, kind, tail, top_k=None):
    """Position-by-position NumPy float64 reference of the docstring formula."""
    B, L, V = student.shape
    total, n = 0.0, 0
    for b in range(B):
        for t in range(L):
            a, i = teacher[b, t].astype(np.float64), ids[b, t]
            if top_k is not None:
                order = np.argsort(-a, kind="stable")[:top_k]
                a, i = a[order], i[order]
            ok = (a > -1e8) & (i >= 0) & (i < V)
            if not mask[b, t] or not ok.any():
                continue
            a, i = a[ok], i[ok]
            z = student[b, t].astype(np.float64)
            bb = z[i]
            if tail:
                bb = bb - (np.log(np.exp(z - z.max()).sum()) + z.max())
                a = np.append(a, np.log(max(1 - np.exp(a).sum(), 1e-6)))
                bb = np.append(bb, np.log(max(1 - np.exp(bb).sum(), 1e-6)))
            total += T * T * _div(_lsm(a / T), _lsm(bb / T), kind)
            n += 1
    return total, n


def random_case(seed=0, B=2, L=7, V=50, Vt=60, M=8, empty=True):
    """Teacher with a larger vocabulary (ids >= V appear), top-M log-probs, sorted."""
    rng = np.random.default_rng(seed)
    student = rng.normal(0, 2, (B, L, V)).astype(np.float32)
    tfull = rng.normal(0, 3, (B, L, Vt))
    ids = np.argsort(-tfull, -1)[..., :M].astype(np.int32)
    logits = np.take_along_axis(_lsm(tfull), ids, -1).astype(np.float32)
    if empty:  # a few empty slots and one position with no teacher at all
        logits[0, 1, -2:] = -np.inf
        logits[1, 3, :] = -np.inf
    mask = (rng.random((B, L)) > 0.25).astype(np.float32)
    if empty:
        mask[1, 3] = 1.0
    return student, ids, logits, mask


def run_mlx(student, ids, logits, mask, **kw):
    s, n = kd_loss(mx.array(student), mx.array(ids), mx.array(logits), mx.array(mask), **kw)
    return float(s), float(n)


def run_torch(student, ids, logits, mask, **kw):
    if torch is None:
        pytest.skip("torch not installed")
    s, n = kd_loss(torch.tensor(student), torch.tensor(ids), torch.tensor(logits), torch.tensor(mask), **kw)
    return float(s), float(n)


# one explicit seed per case (Python's hash() of a tuple would change between runs)
CASES = [(kind, tail, top_k, 10 * i + 4 * j + k) for i, kind in enumerate(KINDS) for j, tail in enumerate((False, True))
         for k, top_k in enumerate((None, 5))]
RUNS = [run_mlx, pytest.param(run_torch, marks=needs_torch)]


# ----------------------------------------------------------------------------- KD vs NumPy
@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("kind,tail,top_k,seed", CASES)
def test_kd_matches_numpy_reference(kind, tail, top_k, seed, run):
    student, ids, logits, mask = random_case(seed=seed)
    ref, nref = kd_reference(student, ids, logits, mask, 2.0, kind, tail, top_k)
    got, n = run(student, ids, logits, mask, temperature=2.0, kind=kind, tail=tail, top_k=top_k)
    assert n == nref
    assert got == pytest.approx(ref, rel=2e-5, abs=1e-6), run.__name__


def test_kd_full_vocab_equals_dense_kl():
    """With every vocabulary id in the cache (M = V), renormalised top-K KD is ordinary dense KD."""
    rng = np.random.default_rng(3)
    B, L, V, T = 2, 4, 16, 2.0
    s = rng.normal(0, 2, (B, L, V)).astype(np.float32)
    t = rng.normal(0, 2, (B, L, V)).astype(np.float32)
    ids = np.broadcast_to(np.arange(V, dtype=np.int32), (B, L, V)).copy()
    mask = np.ones((B, L), np.float32)
    dense = {"forward": 0.0, "reverse": 0.0}
    for b in range(B):
        for i in range(L):
            lp, lq = _lsm(t[b, i] / T), _lsm(s[b, i] / T)
            dense["forward"] += T * T * np.sum(np.exp(lp) * (lp - lq))
            dense["reverse"] += T * T * np.sum(np.exp(lq) * (lq - lp))
    for kind, want in dense.items():
        got, n = run_mlx(s, ids, t, mask, temperature=T, kind=kind)
        assert n == B * L and got == pytest.approx(want, rel=1e-5)
    # tail bucket is empty when the cache covers the vocabulary: same as renormalised at T = 1
    tl = _lsm(t).astype(np.float32)
    got, _ = run_mlx(s, ids, tl, mask, temperature=1.0, tail=True)
    want, _ = run_mlx(s, ids, tl, mask, temperature=1.0, tail=False)
    assert got == pytest.approx(want, rel=1e-3, abs=1e-4)


# ----------------------------------------------------------------------------- hand values, 2x3x5
def hand_case():
    """B=2, T=3, V=5, M=2. Every counted position has teacher logits [0, 0] on its two ids
    (p = [1/2, 1/2]) and student logits [0, 2 ln 3] there, so at T = 2: q = [1/4, 3/4]."""
    s = np.zeros((2, 3, 5), np.float32)
    ids = np.zeros((2, 3, 2), np.int32)
    t = np.zeros((2, 3, 2), np.float32)
    for b, pos, (i, j) in [(0, 0, (1, 3)), (0, 1, (4, 0)), (0, 2, (2, 1)), (1, 0, (0, 2)), (1, 1, (3, 4)), (1, 2, (1, 0))]:
        ids[b, pos] = (i, j)
        s[b, pos, j] = 2 * math.log(3)
        s[b, pos, [k for k in range(5) if k not in (i, j)]] = 7.0  # ignored by the renormalised loss
    t[1, 1] = -np.inf  # no teacher at this position: not counted although unmasked
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)  # 4 unmasked with a teacher
    return s, ids, t, mask


@pytest.mark.parametrize("run", RUNS)
def test_kd_hand_value(run):
    s, ids, t, mask = hand_case()
    # forward, T=2: T^2 * (1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4)) = 4 * 1/2 ln(4/3) per position
    got, n = run(s, ids, t, mask, temperature=2.0, kind="forward")
    assert n == 4 and got == pytest.approx(4 * 2 * math.log(4 / 3), rel=1e-6)
    # reverse, T=2: 4 * (1/4 ln(1/2) + 3/4 ln(3/2)) per position
    got, n = run(s, ids, t, mask, temperature=2.0, kind="reverse")
    assert got == pytest.approx(4 * 4 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5)), rel=1e-6)
    # jsd, T=2: m = [3/8, 5/8]
    js = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)) \
        + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625))
    got, n = run(s, ids, t, mask, temperature=2.0, kind="jsd")
    assert got == pytest.approx(4 * 4 * js, rel=1e-6)


@pytest.mark.parametrize("run", RUNS)
def test_kd_tail_hand_value(run):
    """Teacher log-probs ln(1/4) on both ids (rest 1/2); uniform student over V=5 (rest 3/5)."""
    s = np.zeros((2, 3, 5), np.float32)
    ids = np.tile(np.array([1, 3], np.int32), (2, 3, 1))
    t = np.full((2, 3, 2), math.log(0.25), np.float32)
    mask = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
    want = 2 * 0.25 * math.log(0.25 / 0.2) + 0.5 * math.log(0.5 / 0.6)
    got, n = run(s, ids, t, mask, temperature=1.0, tail=True)
    assert n == 3 and got == pytest.approx(3 * want, rel=1e-5)


# ----------------------------------------------------------------------------- masks, gradients, errors
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_kd_all_masked_is_zero_with_finite_gradients(kind, tail):
    student, ids, logits, mask = random_case(1)
    zero = np.zeros_like(mask)
    for m in (zero, mask):
        def f(x):
            return kd_loss(x, mx.array(ids), mx.array(logits), mx.array(m), kind=kind, tail=tail)

        val, g = mx.value_and_grad(lambda x: f(x)[0])(mx.array(student))
        n = f(mx.array(student))[1]
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.array(g)))
        if m is zero:
            assert float(val) == 0.0 and float(n) == 0.0 and not np.any(np.array(g))
        else:
            # the position with no teacher slot (row 1, t 3) is unmasked but not counted
            assert float(val) > 0 and float(n) == kd_reference(student, ids, logits, m, 2.0, kind, tail)[1] == mask.sum() - 1


@needs_torch
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_kd_torch_matches_mlx_value_and_gradient(kind, tail):
    student, ids, logits, mask = random_case(1)
    for m in (np.zeros_like(mask), mask):
        val, g = mx.value_and_grad(lambda x: kd_loss(x, mx.array(ids), mx.array(logits), mx.array(m), kind=kind,
                                                     tail=tail)[0])(mx.array(student))
        x = torch.tensor(student, requires_grad=True)
        s, n = kd_loss(x, torch.tensor(ids), torch.tensor(logits), torch.tensor(m), kind=kind, tail=tail)
        s.backward()
        assert torch.isfinite(s) and torch.isfinite(x.grad).all()
        assert float(s.detach()) == pytest.approx(float(val), rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(x.grad.numpy(), np.array(g), rtol=1e-4, atol=1e-6)


def test_kd_tail_rest_clamped_when_topk_covers_everything():
    """A teacher whose K ids hold all the mass: the rest bucket is clamped, not log(0)."""
    s = np.random.default_rng(0).normal(size=(1, 2, 4)).astype(np.float32)
    ids = np.tile(np.arange(4, dtype=np.int32), (1, 2, 1))
    t = np.log(np.full((1, 2, 4), 0.25, np.float32))
    val, g = mx.value_and_grad(lambda x: kd_loss(x, mx.array(ids), mx.array(t), mx.ones((1, 2)), tail=True)[0])(mx.array(s))
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.array(g)))


def test_kd_top_k_rules():
    student, ids, logits, mask = random_case(2, empty=False)
    M = ids.shape[-1]
    with pytest.raises(ValueError, match=r"top_k=9 > M=8"):
        run_mlx(student, ids, logits, mask, top_k=M + 1)
    if torch is not None:
        with pytest.raises(ValueError, match=r"top_k=9 > M=8"):
            run_torch(student, ids, logits, mask, top_k=M + 1)
    assert run_mlx(student, ids, logits, mask, top_k=M) == pytest.approx(run_mlx(student, ids, logits, mask))
    # K keeps the K *largest* whatever the slot order
    perm = np.random.default_rng(0).permutation(M)
    a = run_mlx(student, ids, logits, mask, top_k=3)
    b = run_mlx(student, ids[..., perm], logits[..., perm], mask, top_k=3)
    assert a == pytest.approx(b, rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        run_mlx(student, ids, logits, mask, kind="kl")
    with pytest.raises(ValueError, match="same shape"):
        run_mlx(student, ids, logits[..., :3], mask)


def test_kd_out_of_vocab_ids_are_empty_slots():
    """Teacher ids >= V (a larger teacher vocabulary) are dropped, never indexed: the loss
    equals the loss with those slots marked empty (-inf)."""
    student, ids, logits, mask = random_case(4, V=50, Vt=60)
    assert (ids >= 50).any()
    marked = np.where(ids >= 50, -np.inf, logits).astype(np.float32)
    for run in (run_mlx, run_torch) if torch is not None else (run_mlx,):
        assert run(student, ids, logits, mask) == pytest.approx(run(student, ids, marked, mask), rel=1e-6)


@needs_torch
def test_kd_gradient_matches_finite_difference():
    # the loss computes in float32 whatever the input dtype, hence the coarse eps/tolerance
    student, ids, logits, mask = random_case(5, B=1, L=3, V=10, Vt=10, M=4, empty=False)
    x = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    f = lambda z: kd_loss(z, torch.tensor(ids), torch.tensor(logits, dtype=torch.float64), torch.tensor(mask), kind="jsd", tail=True)[0]
    assert torch.autograd.gradcheck(lambda z: f(z).double(), (x,), eps=1e-3, atol=2e-3, rtol=1e-2)


# ----------------------------------------------------------------------------- SFT
@pytest.mark.parametrize("lib", ["mlx", pytest.param("torch", marks=needs_torch)])
def test_sft_hand_value_and_all_masked(lib):
    # one position: logits [0, ln 3] -> p(target=1) = 3/4; a masked position with a huge loss
    logits = np.array([[[0.0, math.log(3)], [50.0, -50.0]]], np.float32)
    targets = np.array([[1, 1]], np.int32)
    mask = np.array([[1.0, 0.0]], np.float32)
    conv = mx.array if lib == "mlx" else torch.tensor
    s, n = sft_loss(conv(logits), conv(targets), conv(mask))
    assert float(s) == pytest.approx(-math.log(0.75), rel=1e-6) and float(n) == 1
    s, n = sft_loss(conv(logits), conv(targets), conv(np.zeros_like(mask)))
    assert float(s) == 0.0 and float(n) == 0.0


# ----------------------------------------------------------------------------- cross-tokenizer terms
def _bkl(a, b):
    """Binary KL between Bernoulli(e^a) and Bernoulli(e^b), float64, 1 - x clamped at 1e-6."""
    p, q = math.exp(a), math.exp(b)
    return p * (a - b) + (1 - p) * (math.log(max(1 - p, 1e-6)) - math.log(max(1 - q, 1e-6)))


def span_case(seed=5, B=2, L=8, V=12, M=4):
    """Random student logits; no id-mapped teacher slots; spans (first, last) per row with a
    teacher span log-probability each; one span partly masked (row 1's first)."""
    rng = np.random.default_rng(seed)
    student = rng.normal(0, 2, (B, L, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    ids = np.zeros((B, L, M), np.int32)
    logits = np.full((B, L, M), -np.inf, np.float32)
    spans = {0: [(1, 3), (4, 4), (6, 7)], 1: [(0, 1), (3, 5)]}
    span_logp = np.zeros((B, L), np.float32)
    span_len = np.zeros((B, L), np.int32)
    span_in = np.zeros((B, L), np.float32)
    for b, ss in spans.items():
        for f, l in ss:
            span_len[b, l] = l - f + 1
            span_logp[b, l] = -float(rng.uniform(0.05, 4.0))
            span_in[b, f: l + 1] = 1.0
    mask = np.ones((B, L), np.float32)
    mask[1, 7] = 0.0
    return student, targets, ids, logits, mask, spans, span_logp, span_len, span_in


def test_span_term_hand_value():
    """One span of two student tokens, each with q = 1/2 (logits [0, 0] over V = 2), so
    Q = 1/4; the teacher's span log-probability is log(1/2): P = 1/2.
    D = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)."""
    s = np.zeros((1, 2, 2), np.float32)
    tgt = np.array([[0, 1]], np.int32)
    ids, t = np.zeros((1, 2, 1), np.int32), np.full((1, 2, 1), -np.inf, np.float32)
    got, n = run_mlx(s, ids, t, np.ones((1, 2), np.float32), targets=mx.array(tgt),
                     span_logp=mx.array(np.array([[0.0, math.log(0.5)]], np.float32)),
                     span_len=mx.array(np.array([[0, 2]], np.int32)),
                     span_in=mx.array(np.ones((1, 2), np.float32)))
    assert n == 2 and got == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


@pytest.mark.parametrize("lib", ["mlx", pytest.param("torch", marks=needs_torch)])
def test_span_term_matches_numpy_reference(lib):
    student, targets, ids, logits, mask, spans, span_logp, span_len, span_in = span_case()
    ref, nref = 0.0, 0
    for b, ss in spans.items():
        lq = _lsm(student[b])[np.arange(student.shape[1]), targets[b]]
        for f, l in ss:
            nref += int(mask[b, f: l + 1].sum())
            if mask[b, l]:
                ref += _bkl(float(span_logp[b, l]), float(lq[f: l + 1].sum()))
    conv = mx.array if lib == "mlx" else torch.tensor
    s, n = kd_loss(conv(student), conv(ids), conv(logits), conv(mask), targets=conv(targets),
                   span_logp=conv(span_logp), span_len=conv(span_len), span_in=conv(span_in))
    assert float(n) == nref and float(s) == pytest.approx(ref, rel=1e-5)


def test_span_term_gradient_pulls_q_to_p():
    """d D / d(student logit of its own token) has the sign of Q - P: a student surer of the
    span than the teacher is pushed down, a less sure one up; 0 at Q = P."""
    def grad(p_teacher):
        s = mx.zeros((1, 1, 2))
        def f(x):
            v, _ = kd_loss(x, mx.zeros((1, 1, 1), dtype=mx.int32), mx.full((1, 1, 1), -mx.inf), mx.ones((1, 1)),
                           targets=mx.zeros((1, 1), dtype=mx.int32), span_logp=mx.array([[math.log(p_teacher)]]),
                           span_len=mx.array([[1]]), span_in=mx.ones((1, 1)))
            return v
        return float(mx.grad(f)(s)[0, 0, 0])  # Q = 1/2 at zero logits
    assert grad(0.9) < 0 < grad(0.1) and abs(grad(0.5)) < 1e-6


def test_uld_and_span_terms_have_finite_gradients():
    """Both terms differentiate on MLX (the student's top-K indices carry no gradient)."""
    student, targets, ids, logits, mask, _, span_logp, span_len, span_in = span_case()
    lg = np.where(np.isfinite(logits), logits, -1.0).astype(np.float32)  # teacher top-K for ULD

    def f(x):
        v, _ = kd_loss(x, mx.full(ids.shape, -1, dtype=mx.int32), mx.array(lg), mx.array(mask),
                       targets=mx.array(targets), span_logp=mx.array(span_logp), span_len=mx.array(span_len),
                       span_in=mx.array(span_in), uld=mx.array(1.0 - span_in))
        return v
    g = np.array(mx.grad(f)(mx.array(student)))
    assert np.isfinite(g).all() and np.abs(g).sum() > 0


@pytest.mark.parametrize("lib", ["mlx", pytest.param("torch", marks=needs_torch)])
def test_uld_term_hand_value_and_reference(lib):
    """ULD at one position: teacher top-2 probabilities (0.6, 0.3) (id-less, ids -1), student
    softmax over V = 3 of logits (ln 1, ln 2, ln 7) -> sorted (0.7, 0.2, 0.1): |0.6 - 0.7| +
    |0.3 - 0.2| = 0.2; a second position with a mapped id keeps the ordinary KL."""
    conv = mx.array if lib == "mlx" else torch.tensor
    s = np.log(np.array([[[1.0, 2.0, 7.0], [1.0, 1.0, 1.0]]], np.float32))
    ids = np.array([[[-1, -1], [0, 1]]], np.int32)
    t = np.log(np.array([[[0.6, 0.3], [0.5, 0.5]]], np.float32))
    uld = np.array([[1.0, 0.0]], np.float32)
    got, n = kd_loss(conv(s), conv(ids), conv(t), conv(np.ones((1, 2), np.float32)), uld=conv(uld), temperature=1.0)
    assert float(n) == 2 and float(got) == pytest.approx(0.2, abs=1e-6)  # the KL at position 2 is 0
