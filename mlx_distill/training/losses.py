"""Losses, written once for both backends.

Every function here takes arrays of one library (MLX or PyTorch) and uses only the small
`ops(x)` namespace below, so the SFT and KD formulas exist exactly once: the MLX trainer
and the torch trainer call the same code and cannot drift apart.

Conventions (as in mlx-lm's trainer and torchtune's KD losses):
- logits are upcast to float32 before any reduction;
- `mask` is 1.0 on positions that carry loss (completion tokens) and 0.0 elsewhere;
- a loss returns ``(sum over unmasked positions, number of unmasked positions)`` so that
  gradient accumulation divides once by the total token count; an all-masked batch gives
  ``(0, 0)``, never NaN.
"""

import math

from mlx_distill.backends.ops import ops


def sft_loss(logits, targets, mask):
    """Masked next-token cross-entropy.

    L_SFT = sum_{b,t} mask[b,t] * ( logsumexp_v z[b,t,v] - z[b,t,y[b,t]] )

    logits: (B, T, V) student logits at positions predicting `targets` (B, T) int;
    mask: (B, T) float. Returns (sum, ntokens).
    """
    o = ops(logits)
    z = o.f32(logits)
    mask = o.f32(mask)
    lse = o.squeeze(o.logsumexp(z, -1), -1)
    tgt = o.squeeze(o.take(z, o.expand(o.as_index(targets), -1), -1), -1)
    nll = (lse - tgt) * mask
    return o.sum(nll), o.sum(mask)


def sampled_kd_loss(student_logits, teacher_ids, teacher_logp, counts, mask, temperature: float = 2.0):
    """Forward KL from a sampled teacher store (`logits --sampled-k N`): "Sparse Logit Sampling"
    (Anshumann et al., ACL 2025, arXiv 2503.16870), random-sampling KD.

    Shapes: student_logits (B, T, V); teacher_ids, teacher_logp, counts (B, T, K); mask (B, T).
    At each position the store holds the distinct ids among N draws x_1..x_N, made with
    replacement from the teacher's tempered distribution p_T = softmax(z_teacher / T), with
    ``counts`` (how often each was drawn; 0 = empty slot, N = their sum) and ``teacher_logp``
    = log p_T(id) (used only for the value, not the gradient).

    With q_T = softmax(z / T) the student's tempered distribution, the estimator is

        L_hat = T^2 * sum_k (c_k / N) * (log p_T(x_k) - log q_T(x_k))
              = T^2 * (1/N) sum_{i=1..N} (log p_T(x_i) - log q_T(x_i)).

    Unbiased: the draws are i.i.d. from p_T, so E[(1/N) sum_i f(x_i)] = E_{p_T}[f] for any f;
    with f = log p_T - log q_T that is KL(p_T || q_T), the loss `kd_loss` computes over the
    whole vocabulary (T^2 KL, forward kind). The gradient is unbiased too: p_T does not depend
    on the student, so grad L_hat = -T^2 (1/N) sum_i grad log q_T(x_i), whose expectation is
    -T^2 sum_x p_T(x) grad log q_T(x) = grad T^2 KL(p_T || q_T) (the teacher's entropy is a
    constant). In logits, d L_hat / d z = T (q_T - c / N): the full-KL gradient T (q_T - p_T)
    with p_T replaced by the empirical distribution of the draws. This holds only when the
    draws were made at the training temperature T (the store records its temperature; `train`
    refuses another). Reverse KL and JSD need q's mass on ids the teacher never drew and have
    no such estimator here (`train` refuses them with a sampled store).

    Returns (sum over masked positions with draws of L_hat, their number), like `kd_loss`.
    """
    o = ops(student_logits)
    if not temperature > 0:
        raise ValueError(f"kd temperature must be > 0, got {temperature}")
    z = o.f32(student_logits) / temperature
    c = o.f32(counts)
    valid = c > 0
    ids = o.where(valid, o.as_index(teacher_ids), 0)
    logq = o.take(z, ids, -1) - o.logsumexp(z, -1)
    n = o.sum(c, -1)
    has = o.f32(n > 0)
    w = c / o.expand(o.maximum(n, o.full_like(n, 1.0)), -1)
    a = o.stop_gradient(o.where(valid, o.f32(teacher_logp), o.full_like(logq, 0.0)))
    per_pos = (temperature * temperature) * o.sum(w * (a - logq), -1)
    m = o.f32(mask) * has
    return o.sum(per_pos * m), o.sum(m)


def sampled_lm_losses(out, targets, mask, teacher_ids, teacher_logp, counts, temperature: float):
    """`lm_losses` for a sampled store: (sft_sum, ntokens, kd_sum, kd_count) with the KD term from
    `sampled_kd_loss`. A `SplitHead` (``--loss-chunk``) is applied whole here (its full logits)."""
    logits = out.head(out.hidden) if hasattr(out, "head") and hasattr(out, "hidden") else out
    s, n = sft_loss(logits, targets, mask)
    k, nk = sampled_kd_loss(logits, teacher_ids, teacher_logp, counts, mask, temperature)
    return s, n, k, nk


# ----------------------------------------------------------------------------- top-K logit distillation
KD_KINDS = ("forward", "reverse", "jsd")
EMPTY_BELOW = -1e8  # a teacher logit at or below this (e.g. -inf) marks an empty slot
_FILL = -1e9  # finite stand-in for empty slots: exp() underflows to 0 and no inf/NaN reaches a gradient
_MIN_REST = 1e-6  # smallest "rest of vocabulary" mass, so log(rest) stays finite


def _log1mexp(o, x):
    """log(1 - exp(x)) for x <= 0, clamped so that 1 - exp(x) >= _MIN_REST."""
    x = o.minimum(x, o.full_like(x, -_MIN_REST))
    return o.log(-o.expm1(x))


def kd_loss(student_logits, teacher_ids, teacher_logits, mask, temperature: float = 2.0,
            kind: str = "forward", tail: bool = False, top_k: int | None = None, beta: float = 0.5,
            targets=None, span_logp=None, span_len=None, span_in=None, uld=None):
    """Top-K logit distillation against cached teacher tokens.

    Shapes: student_logits (B, T, V); teacher_ids (B, T, M) int; teacher_logits (B, T, M)
    float; mask (B, T), 1.0 where the position carries loss. Position t of all four is the
    same prediction (of token t+1).

    Slots. K = top_k (default M) slots are kept per position: the K largest teacher logits
    (``top_k > M`` is an error; ``top_k == M`` keeps all). A slot is *empty* when its
    teacher logit is ``-inf`` (anything <= EMPTY_BELOW) or its id is outside ``[0, V)``.
    This is how a caller drops teacher tokens the student does not have (a 152064-row
    teacher vs a 151936-row student) or pads positions without a teacher: write ``-inf``
    (`TopMStore.batch_arrays` does, and counts the drops). Out-of-range ids are also
    treated as empty here, so they are never used as indices (MLX does not bounds-check).

    With S the non-empty slots at a position, a_k the teacher logits and b_k = z[id_k] the
    student logits at those ids (k in S):

    renormalised (tail=False):
        p = softmax_S(a / T),  q = softmax_S(b / T)

    rest-of-vocabulary bucket (tail=True): `teacher_logits` must be log-probabilities over
    the teacher's whole vocabulary (what `mlx_distill logits` stores); the student's are
    b_k = z[id_k] - logsumexp_v z_v. One extra bucket holds the remaining mass,
    a_rest = log(1 - sum_S exp a_k) (same for b), and the K+1 buckets are tempered:
        p = softmax(a_S ++ a_rest / T),  q = softmax(b_S ++ b_rest / T)
    (bucket, then temper: the teacher's mass outside its top-M is known only at T = 1; the
    rest mass is clamped to >= 1e-6.)

    Divergence per position (teacher side is a constant, no gradient):
        forward: KL(p || q) = sum_k p_k (log p_k - log q_k)
        reverse: KL(q || p) = sum_k q_k (log q_k - log p_k)
        jsd:     the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), with
                 beta the teacher's weight in the mixture (TRL's GKDTrainer convention):
                     m = beta p + (1 - beta) q
                     JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)
                 beta = 1/2 is the symmetric JSD (the default, and this module's earlier
                 `jsd`). JSD_beta -> 0 at both ends, but JSD_beta / beta -> KL(p || q) as
                 beta -> 0 and JSD_beta / (1 - beta) -> KL(q || p) as beta -> 1, so the end
                 points are defined as those limits: beta = 0 is forward KL and beta = 1 is
                 reverse KL exactly (tests/test_onpolicy.py pins both with numbers).

    Reverse KL (and JSD with beta near 1) restricted to the top-K is unstable on a student's
    own samples: renormalised over K slots it cannot see the mass the student moves outside
    the teacher's top-K, so nothing stops it from moving there. With the tail bucket that
    mass is the student's rest bucket, compared with the teacher's (>= 1e-6): the loss sees
    it and stays bounded, by T^2 (log(1/1e-6) + ...) per position rather than growing without
    limit (tested). On-policy training (`--on-policy-fraction > 0`) always uses the bucket.

    L_KD = T^2 * sum_{b,t} w[b,t] * D[b,t],   w = mask * [S non-empty]

    Across tokenizers (`mlx_distill.teacher.align`) two more signals, both optional (B, T) arrays:

    spans (``targets``, ``span_logp``, ``span_len``, ``span_in``): a run of student positions
    whose tokens do not line up one-to-one with the teacher's covers one text s, scored by both
    models as a whole. At the span's last position t, ``span_len[t] = n`` (its n positions are
    t-n+1 .. t, marked by ``span_in``) and ``span_logp[t] = a = log P_T(s)``, the teacher's
    sequence log-probability (the sum of its own tokens' log-probabilities). The student's is
    the chain rule over its tokens, b = log Q_S(s) = sum_{u=t-n+1..t} log q(targets[u]). The
    term is the KL between the two Bernoulli distributions "the next text is s / is not":

        D_span = P log(P / Q) + (1 - P) log((1 - P) / (1 - Q)),   P = e^a, Q = e^b

    Why this one: it is defined whatever the vocabularies (both sides give s a probability);
    it is a true divergence (0 iff Q = P, so it pulls the student's span probability to the
    teacher's from either side, where a squared log-ratio would weigh a 1e-9 vs 1e-8 gap like
    0.1 vs 1); by the data-processing inequality it lower-bounds the KL between the two
    models' distributions over the span's continuations, so it never asks for more than the
    per-token KL would; and it is the two-bucket form of the tail bucket above (s against the
    rest). Its gradient in b is (Q - P) / (1 - Q): bounded as Q -> 0, large only when the
    student is surer of s than the teacher. 1 - P and 1 - Q are clamped
    to >= 1e-6. No temperature: the teacher's span probability is only known at T = 1. A span
    counts its n positions in the returned count and adds D_span once (the KL of the joint).

    ULD (``uld``, 1.0 where set): ULD's distance (Boizard et al. 2024) between sorted
    probability vectors, for positions whose teacher distribution cannot be mapped id by id
    (`teacher_ids` < 0 there; `teacher_logits` hold the teacher's top-K log-probabilities):
        D_uld = sum_{k<K} | p_(k) - q_(k) |
    with p_(k) the teacher's k-th largest probability and q_(k) the student's (softmax at
    T = 1 over its whole vocabulary).

    Returns ``(L_KD + sum w_span D_span + sum w_uld D_uld, count)``, the count being the
    masked positions that carry any of the three signals. Masked positions and positions with
    no teacher signal contribute nothing and are not counted; an all-masked batch gives
    (0, 0), never NaN.
    """
    _check_kd_args(student_logits, teacher_ids, teacher_logits, temperature, kind, beta)
    o = ops(student_logits)
    m_slots, vocab = teacher_ids.shape[-1], student_logits.shape[-1]
    a = o.stop_gradient(o.f32(teacher_logits))
    ids = o.as_index(teacher_ids)
    if top_k is not None:
        if top_k > m_slots:
            raise ValueError(f"top_k={top_k} > M={m_slots}: the teacher cache holds {m_slots} tokens per "
                             f"position; use top_k <= {m_slots} or re-extract with --top-m >= {top_k}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_k < m_slots:
            keep = o.topk_idx(a, top_k)
            a, ids = o.take(a, keep, -1), o.take(ids, keep, -1)
    a_top = a  # the kept teacher slots, for ULD
    valid = (a > EMPTY_BELOW) & (ids >= 0) & (ids < vocab)
    ids = o.where(valid, ids, 0)
    b = o.f32(o.take(student_logits, ids, -1))
    a = o.where(valid, a, _FILL)
    lse = None  # the student's log-sum-exp over its vocabulary: computed once, for the tail, spans and ULD
    if tail:
        lse = o.logsumexp(o.f32(student_logits), -1)
        b = b - lse
        b = o.where(valid, b, _FILL)
        a = o.concat([a, _log1mexp(o, o.logsumexp(a, -1))], -1)
        b = o.concat([b, _log1mexp(o, o.logsumexp(b, -1))], -1)
    else:
        b = o.where(valid, b, _FILL)
    a, b = a / temperature, b / temperature
    logp, logq = a - o.logsumexp(a, -1), b - o.logsumexp(b, -1)
    div = _divergence(o, logp, logq, kind, beta)
    mask = o.f32(mask)
    w = mask * o.f32(o.sum(o.f32(valid), -1) > 0)
    total, covered = (temperature * temperature) * o.sum(div * w), w
    if (span_logp is not None or uld is not None) and lse is None:
        lse = o.logsumexp(o.f32(student_logits), -1)  # (B, T, 1)
    if span_logp is not None:
        if targets is None:
            raise ValueError("the span term needs the targets (the student's own tokens)")
        d_span, at_end = _span_divergence(o, student_logits, lse, targets, span_logp, span_len, span_in)
        total = total + o.sum(d_span * at_end * mask)
        covered = o.maximum(covered, mask * o.f32(span_in))
    if uld is not None:
        d_uld = _uld_distance(o, student_logits, lse, a_top)
        wu = mask * o.f32(uld)
        total = total + o.sum(d_uld * wu)
        covered = o.maximum(covered, wu)
    return total, o.sum(covered)


def _check_kd_args(student_logits, teacher_ids, teacher_logits, temperature, kind, beta) -> None:
    """`kd_loss`'s option and shape checks (one ValueError naming what is wrong)."""
    if kind not in KD_KINDS:
        raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"kd beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"kd temperature must be > 0, got {temperature}")
    if tuple(teacher_ids.shape) != tuple(teacher_logits.shape):
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (B, T, M)")
    if tuple(student_logits.shape[:-1]) != tuple(teacher_ids.shape[:-1]):
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher arrays "
                         f"{tuple(teacher_ids.shape)} disagree on (B, T)")


def _divergence(o, logp, logq, kind: str, beta: float):
    """Per-position divergence between the tempered bucket distributions (`kd_loss`'s docstring):
    forward KL(p || q), reverse KL(q || p), or the generalized JSD with the teacher's weight beta."""
    p, q = o.exp(logp), o.exp(logq)
    if kind == "jsd" and beta in (0.0, 1.0):  # the end points: forward / reverse KL (see kd_loss)
        kind = "forward" if beta == 0.0 else "reverse"
    if kind == "forward":
        return o.sum(p * (logp - logq), -1)
    if kind == "reverse":
        return o.sum(q * (logq - logp), -1)
    logm = o.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * o.sum(p * (logp - logm), -1) + (1.0 - beta) * o.sum(q * (logq - logm), -1)


def _span_divergence(o, student_logits, lse, targets, span_logp, span_len, span_in):
    """(D_span at each span's last position (B, T), 1.0 there): see `kd_loss`."""
    tgt = o.squeeze(o.take(o.f32(student_logits), o.expand(o.as_index(targets), -1), -1), -1)
    lq = (tgt - o.squeeze(lse, -1)) * o.f32(span_in)  # the student's log q of its own token, in spans only
    c = o.cumsum(lq, 1)
    n = o.as_index(span_len)
    t = o.expand(o.as_index(o.arange(lq.shape[1], lq)), 0)
    # the span's first position; t itself off span ends (n = 0), never out of range (MLX does not check)
    first = o.maximum(t - o.maximum(n, o.full_like(n, 1)) + 1, o.full_like(n, 0))
    b = c - o.take(c, first, 1) + o.take(lq, first, 1)  # sum of lq over first .. t
    b = o.minimum(b, o.full_like(b, 0.0))
    a = o.minimum(o.stop_gradient(o.f32(span_logp)), o.full_like(b, 0.0))
    p = o.exp(a)
    d = p * (a - b) + (1.0 - p) * (_log1mexp(o, a) - _log1mexp(o, b))
    at_end = o.f32(n > 0)
    return o.where(n > 0, d, o.full_like(d, 0.0)), at_end


def _uld_distance(o, student_logits, lse, teacher_logp):
    """ULD: sum_k |p_(k) - q_(k)| over the teacher's K slots (empty slots: p = 0)."""
    k = teacher_logp.shape[-1]
    z = o.f32(student_logits)
    q = o.sort_desc(o.exp(o.take(z, o.topk_idx(o.stop_gradient(z), k), -1) - lse))
    p = o.sort_desc(o.exp(o.where(teacher_logp > EMPTY_BELOW, teacher_logp, o.full_like(teacher_logp, _FILL))))
    return o.sum(o.abs(p - q), -1)


# ----------------------------------------------------------------------------- the LM head chunk by chunk (issue 20)
def lm_losses(out, targets, mask, kd: dict | None = None):
    """SFT and (with `kd`, `kd_loss`'s keyword arguments but the logits and the mask) KD terms of one
    batch -> ``(sft_sum, ntokens, kd_sum, kd_count)`` (the last two None without `kd`).

    `out` is the backend's forward: logits (B, T, V), or a `SplitHead` (``--loss-chunk``). Then the
    B*T positions are taken `chunk` at a time: the head makes that chunk's logits, `sft_loss` and
    `kd_loss` sum over it, and the sums add up (the same (sum, count) as the whole batch; float32
    reduction order aside). Each chunk runs under the backend's checkpoint, so its backward
    recomputes its logits: memory grows with `chunk` x V, not with B*T x V (`SplitHead.run`: in MLX
    a few chunks are in flight at once).

    The one term not local to a position, the span KL across tokenizers, needs the student's
    log-probability of its own token over each span's positions, which a chunk border may cut: each
    chunk returns those log-probabilities (B*T floats in all) and the span term is computed once
    after the loop, from them, by `_span_divergence` (fed them as one-entry "logits" with a zero
    log-sum-exp). Inside the chunks the span arrays still mark the covered positions (the count)."""
    from mlx_distill.backends.base import SplitHead

    if not isinstance(out, SplitHead):
        s, n = sft_loss(out, targets, mask)
        if kd is None:
            return s, n, None, None
        k, nk = kd_loss(out, mask=mask, **kd)
        return s, n, k, nk
    o = ops(out.hidden)
    B, T = targets.shape[0], targets.shape[1]
    per_pos = {"targets": targets, "mask": mask}
    opts, spans = {}, False
    if kd is not None:
        per_pos.update(teacher_ids=kd["teacher_ids"], teacher_logits=kd["teacher_logits"])
        opts = {k: v for k, v in kd.items() if k in ("temperature", "kind", "tail", "top_k", "beta")}
        if kd.get("uld") is not None:
            per_pos["uld"] = kd["uld"]
        spans = kd.get("span_logp") is not None
        if spans:
            per_pos["span_in"] = kd["span_in"]

    def flat(x):
        return x.reshape((1, B * T) + tuple(x.shape[2:]))

    h = flat(out.hidden)
    arrays = {k: flat(v) for k, v in per_pos.items()}

    bounds = [(i, min(i + out.chunk, B * T)) for i in range(0, B * T, out.chunk)]
    # the batch's arrays enter as constants (closure), the hidden states as the one input: no
    # cotangent is asked of token ids (MLX refuses one) or of the teacher's numbers
    chunks = [{k: v[:, lo:hi] for k, v in arrays.items()} for lo, hi in bounds]

    def piece(h_c, j):
        a = chunks[j]
        logits = out.head(h_c)
        s, n = sft_loss(logits, a["targets"], a["mask"])
        if kd is None:
            return s, n
        extra = {}
        if spans:  # marks the span positions as covered; the span KL itself comes after the loop
            zero = o.f32(a["span_in"]) * 0.0
            extra = {"targets": a["targets"], "span_logp": zero, "span_len": o.as_index(zero), "span_in": a["span_in"]}
        k, nk = kd_loss(logits, a["teacher_ids"], a["teacher_logits"], a["mask"], uld=a.get("uld"), **opts, **extra)
        if not spans:
            return s, n, k, nk
        z = o.f32(logits)
        lq = o.squeeze(o.take(z, o.expand(o.as_index(a["targets"]), -1), -1) - o.logsumexp(z, -1), -1)
        return s, n, k, nk, lq

    flat_out = out.run(piece, h, bounds)
    per = len(flat_out) // len(bounds)
    sums, lqs = None, []
    for j in range(len(bounds)):
        r = flat_out[j * per:(j + 1) * per]
        if spans:
            lqs.append(r[4])
            r = r[:4]
        sums = list(r) if sums is None else [x + y for x, y in zip(sums, r)]
    if kd is None:
        return sums[0], sums[1], None, None
    s, n, k, nk = sums
    if spans:
        lq = o.concat(lqs, 1).reshape((B, T))
        zero = o.stop_gradient(lq) * 0.0
        d_span, at_end = _span_divergence(o, o.expand(lq, -1), o.expand(zero, -1), o.as_index(zero), kd["span_logp"],
                                          kd["span_len"], kd["span_in"])
        k = k + o.sum(d_span * at_end * o.f32(mask))
    return s, n, k, nk
