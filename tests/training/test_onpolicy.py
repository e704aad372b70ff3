"""On-policy distillation (GKD): the generalized JSD, the batch sources, rollouts inside training."""

import math

import numpy as np
import pytest

from mlx_distill.training import sources, train

from mlx_distill.training import objectives
from mlx_distill.config import TrainConfig, build
from mlx_distill.io import InputError, read_jsonl
from mlx_distill.training.losses import kd_loss
from mlx_distill.paths import REPO

from helpers import arith_records, completion_batch, direct_train, write_jsonl

TEMPLATE = str(REPO / "prompts" / "train_user.txt")
P, Q = np.array([0.8, 0.2]), np.array([0.4, 0.6])  # teacher, student


def _one_position(p, q, kind, beta=0.5, tail=False):
    import mlx.core as mx

    z = mx.array(np.log(q)[None, None].astype(np.float32))
    ids = mx.array(np.arange(len(p))[None, None].astype(np.int32))
    a = mx.array(np.log(p)[None, None].astype(np.float32))
    s, n = kd_loss(z, ids, a, mx.ones((1, 1)), temperature=1.0, kind=kind, tail=tail, beta=beta)
    return s.item() / n.item()


# ----------------------------------------------------------------------------- the GKD divergence
def test_generalized_jsd_convention_hand_computed():
    """p = (0.8, 0.2) teacher, q = (0.4, 0.6) student, computed by hand:
    KL(p||q) = 0.8 ln 2 + 0.2 ln(1/3) = 0.334795; KL(q||p) = 0.4 ln(1/2) + 0.6 ln 3 = 0.381909;
    beta = 1/2: m = (0.6, 0.4), 0.5 (0.091516 + 0.081093) = 0.086305;
    beta = 1/4: m = beta p + (1-beta) q = (0.5, 0.5), 0.25 * 0.192745 + 0.75 * 0.020136 = 0.063288."""
    assert _one_position(P, Q, "forward") == pytest.approx(0.334795, abs=2e-6)
    assert _one_position(P, Q, "reverse") == pytest.approx(0.381909, abs=2e-6)
    assert _one_position(P, Q, "jsd", 0.5) == pytest.approx(0.086305, abs=2e-6)
    assert _one_position(P, Q, "jsd", 0.25) == pytest.approx(0.063288, abs=2e-6)
    # the end points are the limits (TRL's convention): beta = 0 forward KL, beta = 1 reverse KL
    assert _one_position(P, Q, "jsd", 0.0) == pytest.approx(0.334795, abs=2e-6)
    assert _one_position(P, Q, "jsd", 1.0) == pytest.approx(0.381909, abs=2e-6)
    eps = 1e-3
    assert _one_position(P, Q, "jsd", eps) / eps == pytest.approx(0.334795, rel=5e-3)
    assert _one_position(P, Q, "jsd", 1 - eps) / eps == pytest.approx(0.381909, rel=5e-3)
    with pytest.raises(ValueError, match="beta"):
        _one_position(P, Q, "jsd", 1.5)


def _np_kd(z, ids, a, mask, T, kind, tail, beta):
    """An independent float64 NumPy reference of `losses.kd_loss` (all slots non-empty but the -inf ones)."""
    z, a = z.astype(np.float64), a.astype(np.float64)
    tot, cnt = 0.0, 0.0
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            ok = np.isfinite(a[b, t])
            if not mask[b, t] or not ok.any():
                continue
            ta, sb = a[b, t, ok], z[b, t, ids[b, t, ok]]
            if tail:
                sb = sb - np.log(np.exp(z[b, t]).sum())
                ta = np.append(ta, np.log(max(1 - np.exp(ta).sum(), 1e-6)))
                sb = np.append(sb, np.log(max(1 - np.exp(sb).sum(), 1e-6)))
            p = np.exp(ta / T) / np.exp(ta / T).sum()
            q = np.exp(sb / T) / np.exp(sb / T).sum()
            kl = lambda x, y: float(np.sum(x * np.log(x / y)))  # noqa: E731
            if kind == "forward" or (kind == "jsd" and beta == 0):
                d = kl(p, q)
            elif kind == "reverse" or (kind == "jsd" and beta == 1):
                d = kl(q, p)
            else:
                m = beta * p + (1 - beta) * q
                d = beta * kl(p, m) + (1 - beta) * kl(q, m)
            tot, cnt = tot + T * T * d, cnt + 1
    return tot, cnt


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9),
                                       ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("tail", [False, True])
def test_mlx_loss_equals_numpy_reference(kind, beta, tail):
    import mlx.core as mx

    rng = np.random.default_rng(3)
    B, T, V, K = 2, 4, 13, 5
    z = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    ids = np.stack([[rng.choice(V, K, replace=False) for _ in range(T)] for _ in range(B)]).astype(np.int32)
    full = rng.normal(size=(B, T, V)) * 2
    lp = full - np.log(np.exp(full).sum(-1, keepdims=True))  # teacher log-probs over the whole vocabulary
    a = np.take_along_axis(lp, ids, -1).astype(np.float32)
    a[0, 1, 3:] = -np.inf  # empty slots
    a[1, 2, :] = -np.inf  # a position without a teacher
    mask = np.ones((B, T), np.float32)
    mask[1, 0] = 0
    s, n = kd_loss(mx.array(z), mx.array(ids), mx.array(a), mx.array(mask), temperature=1.5, kind=kind, tail=tail,
                   beta=beta)
    ref, cnt = _np_kd(z, ids, a, mask, 1.5, kind, tail, beta)
    assert n.item() == cnt == 6
    assert s.item() == pytest.approx(ref, rel=2e-5, abs=1e-6)
    try:
        import torch
    except ImportError:
        return
    st, nt = kd_loss(torch.from_numpy(z), torch.from_numpy(ids), torch.from_numpy(a), torch.from_numpy(mask),
                     temperature=1.5, kind=kind, tail=tail, beta=beta)
    assert st.item() == pytest.approx(ref, rel=2e-5, abs=1e-6) and nt.item() == cnt


def test_reverse_kl_is_bounded_with_the_tail_when_the_student_leaves_the_top_k():
    """verl #5041: reverse KL over the renormalised top-K cannot see the mass the student moves
    outside the teacher's top-K (the loss stays flat as the student leaves: nothing pulls it
    back). With the tail bucket the loss sees it, and stays bounded by log(1 / min bucket) *
    T^2 (rest mass >= 1e-6), with finite gradients."""
    import mlx.core as mx

    V, K = 50, 4
    teacher = np.full(V, -10.0)
    teacher[:K] = [3.0, 2.0, 1.0, 0.5]
    lp = teacher - np.log(np.exp(teacher).sum())
    ids = mx.array(np.arange(K, dtype=np.int32)[None, None])
    a = mx.array(lp[:K].astype(np.float32)[None, None])
    p_rest = 1 - np.exp(lp[:K]).sum()
    bound = -math.log(min(np.exp(lp[:K]).min(), p_rest))
    out = {}
    for shift in (0.0, 10.0, 30.0, 1000.0):  # the student's logit on tokens outside the top-K
        z = teacher.copy()
        z[K:] += shift
        for tail in (False, True):
            f = lambda x: kd_loss(x, ids, a, mx.ones((1, 1)), temperature=1.0, kind="reverse", tail=tail)[0]  # noqa: E731
            loss, g = mx.value_and_grad(f)(mx.array(z.astype(np.float32)[None, None]))
            assert math.isfinite(loss.item()) and bool(mx.all(mx.isfinite(g)).item())
            out[(shift, tail)] = loss.item()
    # renormalised: blind to the escape
    assert out[(1000.0, False)] == pytest.approx(out[(0.0, False)], abs=1e-5)
    # tail: grows as the student leaves, and stays bounded
    assert out[(0.0, True)] < 0.01 < out[(10.0, True)] < out[(30.0, True)]
    assert out[(1000.0, True)] <= bound * (1 + 1e-4), (out, bound)  # float32 rounding


def test_on_policy_batches_are_a_fixed_share():
    for lam in (0.25, 0.5, 0.3):
        marks = [sources.on_policy_at(7, k, lam) for k in range(400)]
        assert marks == [sources.on_policy_at(7, k, lam) for k in range(400)]
        for start in (0, 37, 200):  # exact share in any window (within one batch)
            assert abs(sum(marks[start: start + 100]) - 100 * lam) <= 1
    assert not any(sources.on_policy_at(0, k, 0.0) for k in range(50))
    assert all(sources.on_policy_at(0, k, 1.0) for k in range(50))
    assert len({tuple(sources.on_policy_at(s, k, 0.3) for k in range(40)) for s in range(10)}) > 1  # the seed shifts them


def test_all_masked_rollout_batch_gives_zero():
    import mlx.core as mx

    cfg = TrainConfig(on_policy_fraction=1.0, kd_kind="reverse", kd_top_k=3)
    obj = objectives.kd_objective(lambda m, x, keep: mx.array(np.random.default_rng(0).normal(size=(2, keep, 9)),
                                                        dtype=mx.float32), cfg)
    b = {"inputs": mx.zeros((2, 6), dtype=mx.int32), "targets": mx.zeros((2, 5), dtype=mx.int32),
         "mask": mx.zeros((2, 5)), "kd_ids": mx.zeros((2, 5, 3), dtype=mx.int32), "kd_logits": mx.full((2, 5, 3), -1.0),
         "kd_alpha": mx.array(1.0), "kd_scale": mx.array(0.0), "gold": mx.array(0.0)}
    s, n, parts = obj(None, b)
    assert s.item() == 0.0 and n.item() == 0.0 and parts["kd_loss"].item() == 0.0 and parts["sft_tokens"].item() == 0
    assert objectives.window_parts({"sft_loss": 0.0, "sft_tokens": 0.0, "kd_loss": 0.0, "kd_positions": 0.0}, 0) == {
        "sft_loss": None, "kd_loss": None, "kd_coverage": 0.0}


def test_refusals():
    with pytest.raises(InputError, match="torch backend does not generate rollouts"):
        sources.check_on_policy_options(TrainConfig(on_policy_fraction=0.5, kd_teacher="x"), "torch")
    with pytest.raises(InputError, match="needs --kd-teacher"):
        sources.check_on_policy_options(TrainConfig(on_policy_fraction=0.5, kd_dir="x"), "mlx")
    with pytest.raises(InputError, match=r"--on-policy-fraction must be in \[0, 1\]"):
        sources.check_on_policy_options(TrainConfig(on_policy_fraction=1.5), "mlx")
    with pytest.raises(InputError, match="--kd-beta"):
        sources.check_on_policy_options(TrainConfig(kd_beta=-0.1), "mlx")
    sources.check_on_policy_options(TrainConfig(), "torch")  # lambda = 0: nothing to refuse


# ----------------------------------------------------------------------------- in training (tiny models)
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("opc")
    write_jsonl(d / "train.jsonl", arith_records(16))
    write_jsonl(d / "valid.jsonl", arith_records(4, seed=1, start=100))
    return d


def op_cfg(student, teacher, d, out, **kw):
    base = dict(model=str(student), data=str(d), out=str(out), iters=10, batch_size=4, val_every=5, report_every=2,
                save_every=5, learning_rate=1e-2, warmup=0, max_seq_length=256, lora_layers=-1, prompt_template=TEMPLATE,
                kd_teacher=str(teacher), kd_top_k=6, on_policy_fraction=1.0, kd_kind="reverse", rollout_max_tokens=32)
    base.update(kw)
    return build(TrainConfig, base)


ON_POLICY_FIELDS = ("on_policy", "rollout_tokens", "rollout_tokens_per_sec", "rollout_mean_len", "rollout_truncated",
                    "teacher_seconds", "update_seconds", "kd_loss")


def test_on_policy_run_logs_its_fields_and_lowers_kd(tiny_llama, tiny_model, corpus, tmp_path):
    """The issue's done-when command on the tiny models (tiny llama student, tiny qwen2 teacher,
    same tokenizer): every report has the on-policy fields, and the KD loss on the student's
    own samples falls over the run."""
    run = tmp_path / "run"
    summary = train.run(op_cfg(tiny_llama, tiny_model, corpus, run, save_rollouts=3, select_by="accuracy",
                               val_accuracy_n=2, val_max_tokens=4), quiet=True)
    assert summary["last_iter"] == 10
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]
    assert len(rows) == 5
    for r in rows:
        for k in ON_POLICY_FIELDS:
            assert r.get(k) is not None, (k, r)
        assert r["on_policy"] == 1.0 and r["rollout_tokens"] > 0 and 0 <= r["rollout_truncated"] <= 1
        assert r["rollout_mean_len"] <= 32
        assert r.get("sft_loss") is None  # rollouts have no gold
    kd = [r["kd_loss"] for r in rows]
    assert kd[-1] < 0.9 * kd[0] and kd[-1] < min(kd[:2]), kd  # measured 0.783 -> 0.635 (-19%)
    vals = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["iter"] for r in vals] == [0, 5, 10]  # validation works unchanged, accuracy selection too
    assert all("val_accuracy" in r for r in vals) and summary["select_by"] == "accuracy"
    saved = read_jsonl(run / "rollouts.jsonl")
    assert [r["iter"] for r in saved] == [5] * 3 + [10] * 3
    for r in saved:
        assert len(r["teacher_token_logprobs"]) == r["tokens"] and r["teacher_logprob_mean"] <= 0
        assert r["prompt"] and isinstance(r["completion"], str) and isinstance(r["truncated"], bool)


def test_rollouts_are_identical_after_resume(tiny_llama, tiny_model, corpus, tmp_path):
    """Train 4 steps in one go, or 2 then resume (--extend, constant schedule) to 4: the resumed
    run samples exactly the same rollouts and logs the same losses."""
    kw = dict(iters=4, val_every=1, report_every=1, save_every=1, lr_schedule="constant", save_rollouts=4,
              on_policy_fraction=0.5, rollout_max_tokens=12, grad_accumulation=2, kd_kind="jsd", kd_beta=0.3,
              compile=False)
    train.run(op_cfg(tiny_llama, tiny_model, corpus, tmp_path / "a", **kw), quiet=True)
    train.run(op_cfg(tiny_llama, tiny_model, corpus, tmp_path / "b", **{**kw, "iters": 2}), quiet=True)
    train.run(op_cfg(tiny_llama, tiny_model, corpus, tmp_path / "b", **kw, resume=True, extend=True), quiet=True)
    ra, rb = (read_jsonl(tmp_path / x / "rollouts.jsonl") for x in "ab")
    assert len(ra) == 16 and [r["completion"] for r in ra] == [r["completion"] for r in rb]
    flat = lambda rows: [v for r in rows for v in r["teacher_token_logprobs"]]  # noqa: E731
    assert flat(ra) == pytest.approx(flat(rb), abs=1e-3)
    ma, mb = ([r for r in read_jsonl(tmp_path / x / "metrics.jsonl") if "train_loss" in r] for x in "ab")
    for x, y in zip(ma, mb):
        for k in ("train_loss", "kd_loss", "on_policy", "rollout_tokens", "rollout_truncated"):
            assert x[k] == pytest.approx(y[k], rel=1e-5), (k, x, y)
    assert [r["on_policy"] for r in ma] == [0.5] * 4  # 2 micro-batches per step, one rollout batch each


def test_lambda_zero_corpus_batches_equal_online_kd(tiny_llama, tiny_model, corpus, tmp_path):
    """lambda = 0 is the online-KD source itself (`KDSource`); the corpus batches of the
    on-policy source (lambda > 0 but none of these micro-batches drawn) give the very same
    losses as online KD on the same batches (both with the tail bucket)."""
    kw = dict(iters=4, val_every=4, report_every=1, kd_tail=True, kd_kind="jsd", kd_beta=0.7, kd_alpha=0.5)
    train.run(op_cfg(tiny_llama, tiny_model, corpus, tmp_path / "kd", **kw, on_policy_fraction=0.0), quiet=True)
    assert not any(sources.on_policy_at(0, k, 1e-9) for k in range(4))
    train.run(op_cfg(tiny_llama, tiny_model, corpus, tmp_path / "op", **kw, on_policy_fraction=1e-9), quiet=True)
    ka, kb = ([r for r in read_jsonl(tmp_path / x / "metrics.jsonl") if "train_loss" in r] for x in ("kd", "op"))
    for x, y in zip(ka, kb):
        for k in ("train_loss", "kd_loss", "sft_loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-6), (k, x, y)
        assert y["on_policy"] == 0.0 and "on_policy" not in x
        assert x["train_loss"] == pytest.approx(x["sft_loss"] + 0.5 * x["kd_loss"], rel=1e-5)


def test_mixed_step_objective_is_w_sft_over_gold_plus_alpha_kd():
    """One step of a gold and a rollout micro-batch (accumulation 2, lambda 0.5): the summed
    objective over the step's N tokens is exactly w * S / N_gold + alpha * K / N_KD (the
    backends divide by N once), not w * S / N. Sums from `losses` computed independently."""
    import mlx.core as mx

    from mlx_distill.training.losses import kd_loss, sft_loss

    rng = np.random.default_rng(3)
    cfg = TrainConfig(on_policy_fraction=0.5, kd_kind="reverse", kd_top_k=3, sft_weight=0.7, kd_alpha=0.5)
    z = {0: rng.normal(size=(2, 6, 9)).astype(np.float32), 1: rng.normal(size=(2, 6, 9)).astype(np.float32)}
    obj = objectives.kd_objective(lambda m, x, keep: mx.array(z[int(x[0, 0].item())]), cfg)
    mask = {0: np.ones((2, 6), np.float32), 1: np.ones((2, 6), np.float32)}
    mask[0][:, :2] = 0  # the gold batch: 8 tokens; the rollout batch: 12
    step = []
    for j in (0, 1):
        ids = np.stack([rng.permutation(9)[:3] for _ in range(12)]).reshape(2, 6, 3).astype(np.int32)
        lp = np.log(rng.dirichlet(np.ones(3), size=(2, 6)) * 0.9).astype(np.float32)
        step.append({"inputs": np.full((2, 7), j, np.int32), "targets": rng.integers(0, 9, (2, 6)).astype(np.int32),
                     "mask": mask[j], "kd_ids": ids, "kd_logits": lp, "gold": np.array(1.0 - j, np.float32)})
    scale, n, nk = objectives.kd_step_scale(step)
    sft_scale = objectives.sft_step_scale(step)
    assert (n, nk, sft_scale) == (20.0, 20.0, 20.0 / 8.0)
    total, parts = 0.0, {}
    for a in step:
        b = {k: mx.array(v) for k, v in {**a, "kd_alpha": np.array(0.5, np.float32), "kd_scale": np.array(scale, np.float32),
                                         "sft_scale": np.array(sft_scale, np.float32)}.items()}
        s, _, pr = obj(None, b)
        total += s.item()
        for k, v in pr.items():
            parts[k] = parts.get(k, 0.0) + v.item()
    s_gold, n_gold = sft_loss(mx.array(z[0]), mx.array(step[0]["targets"]), mx.array(mask[0]))
    k_sum = sum(kd_loss(mx.array(z[j]), mx.array(step[j]["kd_ids"]), mx.array(step[j]["kd_logits"]), mx.array(mask[j]),
                        temperature=cfg.kd_temperature, kind="reverse", tail=True, top_k=3)[0].item() for j in (0, 1))
    want = 0.7 * s_gold.item() / n_gold.item() + 0.5 * k_sum / 20.0
    assert total / n == pytest.approx(want, rel=1e-5)
    assert total / n != pytest.approx(0.7 * s_gold.item() / n + 0.5 * k_sum / 20.0, rel=1e-3)  # the old weighting
    win = {}
    objectives.fold_step(win, parts, n)
    row = objectives.window_parts(win, n)
    assert total / n == pytest.approx(0.7 * row["sft_loss"] + 0.5 * row["kd_loss"], rel=1e-5)


@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_logged_train_loss_is_w_sft_plus_alpha_kd_per_row(tiny_llama, tiny_model, corpus, tmp_path, fraction):
    """Accumulation 2, lambda 0.5 (each step holds a gold and a rollout micro-batch) and off-policy
    online KD (lambda 0): every logged row has train_loss == sft_weight * sft_loss + kd_alpha *
    kd_loss, within 2% (the identity outside checkers test; here it holds to float precision),
    with report windows of 2 steps."""
    run = tmp_path / "run"
    train.run(op_cfg(tiny_llama, tiny_model, corpus, run, iters=6, val_every=6, report_every=2, grad_accumulation=2,
                     on_policy_fraction=fraction, kd_alpha=0.5, sft_weight=0.8, kd_kind="jsd", kd_beta=0.5,
                     rollout_max_tokens=16, compile=False), quiet=True)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]
    assert [r["iter"] for r in rows] == [2, 4, 6]
    for r in rows:
        if fraction:
            assert r["on_policy"] == 0.5
        assert r["sft_loss"] > 0 and r["kd_loss"] > 0 and r["kd_alpha"] == 0.5
        assert r["train_loss"] == pytest.approx(0.8 * r["sft_loss"] + 0.5 * r["kd_loss"], rel=0.02), r
        assert r["train_loss"] == pytest.approx(0.8 * r["sft_loss"] + 0.5 * r["kd_loss"], rel=1e-4), r


def test_reverse_kl_without_sft_above_the_stable_rate_warns(capsys):
    from mlx_distill.training.train import REVERSE_KL_STABLE_LR, _warn_unstable_rate

    base = dict(kd_teacher="t", kd_kind="reverse", sft_weight=0.0)
    _warn_unstable_rate(TrainConfig(**base, learning_rate=3e-3))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: reverse KL with no SFT term") and "3e-03" not in err
    for kw in (dict(learning_rate=REVERSE_KL_STABLE_LR), dict(learning_rate=3e-3, sft_weight=0.5),
               dict(learning_rate=3e-3, kd_kind="forward"), dict(learning_rate=3e-3, kd_teacher="")):
        _warn_unstable_rate(TrainConfig(**{**base, **kw}))
        assert capsys.readouterr().err == "", kw


# ----------------------------------------------------------------------------- learning test
DIGITS = "0123456789"


def _valid(problem: str, answer: str) -> bool:
    """Task: from the digit d of the problem, climb 3 steps of +1 or +2 (mod 10): d=7 -> 890, 913,
    ... (8 correct answers of 1000)."""
    prev, a = int(problem), answer[:3]
    if len(a) < 3 or not a.isdigit():
        return False
    for c in a:
        if (int(c) - prev) % 10 not in (1, 2):
            return False
        prev = int(c)
    return True


def _climb(rng, problem: str) -> str:
    out, prev = "", int(problem)
    for _ in range(3):
        prev = (prev + rng.choice((1, 2))) % 10
        out += str(prev)
    return out


def _problems(rng, n):
    return [rng.choice(DIGITS) for _ in range(n)]


def _chat(tok, problem, answer=None):
    msgs = [{"role": "user", "content": problem}]
    if answer is None:
        return tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    return tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], return_dict=False)


def _pretrain(src, dst, iters, lr, answer_fn, rng):
    """The teacher, and the students' format pre-training (`helpers.direct_train`) on fresh problems
    each step."""

    def batch(tok):
        rows = [_chat(tok, p, answer_fn(p)) for p in _problems(rng, 64)]  # all one length
        return completion_batch(rows, [len(_chat(tok, "0"))] * len(rows))

    return direct_train(src, dst, iters, lr, batch, warmup=20, warmup_from=lr / 20)


def _student_eval(student, teacher_model, problems, adapter=None):
    """(greedy validity, sampled validity, mean per-token KL(student || teacher) on the student's
    own samples at T = 1, over the whole vocabulary, EOS position included)."""
    import mlx.core as mx
    from mlx_lm import load

    from mlx_distill.backends.rollouts import sample

    model, tok = load(str(student), adapter_path=str(adapter) if adapter else None)
    model.eval()
    prompts = [_chat(tok, p) for p in problems]
    greedy = sample(model, tok, prompts, 4, temperature=0.0, key=0)
    drawn = sample(model, tok, prompts, 4, temperature=1.0, key=1)
    acc_g = np.mean([_valid(p, tok.decode(r.tokens)) for p, r in zip(problems, greedy)])
    acc_s = np.mean([_valid(p, tok.decode(r.tokens)) for p, r in zip(problems, drawn)])
    kls = []
    for p, r in zip(prompts, drawn):
        x = mx.array([p + r.tokens])
        zs, zt = (m(x[:, :-1])[0, len(p) - 1:].astype(mx.float32) for m in (model, teacher_model))
        ls, lt = zs - mx.logsumexp(zs, -1, keepdims=True), zt - mx.logsumexp(zt, -1, keepdims=True)
        kls.append(float(mx.mean(mx.sum(mx.exp(ls) * (ls - lt), -1)).item()))
    return float(acc_g), float(acc_s), float(np.mean(kls))


@pytest.mark.slow
def test_on_policy_distillation_on_a_toy_task(tmp_path):
    """Task (`_valid`): from a digit, climb 3 steps of +1 or +2 mod 10; the teacher (hidden 64,
    2 layers) is trained to competence on random climbs, so its distribution is spread (two
    choices per step). Students (the teacher's shape, other seeds) pre-trained briefly on the same
    climbs (30 steps: a weak start), then the same budget (iterations, batch, learning rate, seed) of:
      sft: SFT on one teacher sample per training problem;
      off: KD on the same teacher samples (lambda = 0, online teacher, reverse KL + tail, T = 1,
           alpha 1, no SFT term);
      on:  the same KD on the student's own rollouts (lambda = 1).
    Scored on 100 held-out problems: greedy and sampled validity, and the student-teacher
    divergence KL(student || teacher) per token on the student's own samples.

    The learning rate is 1e-3: the stable range for reverse KL on the student's own samples with
    full fine-tuning and no SFT term (README, on-policy distillation; `train` warns above it).
    What is asserted is what held (2-core CPU, 3 seeds; (greedy valid, sampled valid, KL on own
    samples) per seed), at lr 1e-3:
      start [1.0 0.88 0.137] [1.0 0.90 0.094] [1.0 0.90 0.159]
      sft   [1.0 0.94 0.033] [1.0 0.92 0.035] [1.0 0.93 0.066]
      off   [1.0 0.99 0.002] [1.0 0.99 0.002] [1.0 0.99 0.031]
      on    [1.0 0.99 0.002] [1.0 0.99 0.002] [1.0 0.98 0.034]
    On-policy KD lowers the divergence in every seed as far as off-policy KD does (a tie, not a
    win: 0.002/0.002/0.034 against 0.002/0.002/0.031). Asserted, with margin: both KD arms
    <= 0.75 x the start's divergence in every seed, on-policy sampled validity >= 0.9.
    The same budget at lr 3e-3 (the earlier setting of this test) gave
      off   [1.0 0.98 0.004] [1.0 0.98 0.004] [1.0 0.98 0.112]
      on    [1.0 0.99 0.004] [0.78 0.88 0.295] [0.82 0.90 0.309]
    on-policy's KD loss on its own rollouts stalled or spiked in two seeds and ended above its
    start: reverse KL with nothing to anchor it (no SFT term) at too high a rate, not a code fault.
    With forward KL for both at 3e-3: a tie (off 0.005/0.004/0.006, on 0.004/0.005/0.007).
    Time: ~6 min on the 2-core box under a load average of ~12."""
    import random

    from mlx_lm import load

    from mlx_distill.backends.rollouts import sample
    from mlx_distill.tiny import build_model, build_tokenizer

    rng = random.Random(0)
    tokdir = tmp_path / "tok"
    build_tokenizer(tokdir, texts=[DIGITS] + ["user\nassistant\nsystem\n"] * 50, vocab_size=261 + 18)
    t0 = build_model(tmp_path / "t0", tokenizer_dir=tokdir, seed=0, hidden=64, layers=2, heads=4, kv_heads=2,
                     intermediate=128)
    teacher = _pretrain(t0, tmp_path / "teacher", 200, 3e-3, lambda p: _climb(rng, p), rng)
    held_out = _problems(rng, 100)
    tmodel, tok = load(str(teacher))
    assert all(len(tok.encode(d)) == 1 for d in DIGITS)
    t_acc = _student_eval(teacher, tmodel, held_out)
    assert t_acc[0] > 0.95 and t_acc[1] > 0.9, t_acc

    train_p, valid_p = _problems(rng, 160), _problems(rng, 16)
    traces = sample(tmodel, tok, [_chat(tok, p) for p in train_p], 4, temperature=1.0, key=5)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "train.jsonl", [{"id": f"t{i}", "prompt": p, "completion": tok.decode(r.tokens[:3])}
                                         for i, (p, r) in enumerate(zip(train_p, traces))])
    write_jsonl(corpus / "valid.jsonl", [{"id": f"v{i}", "prompt": p, "completion": _climb(rng, p)}
                                         for i, p in enumerate(valid_p)])
    (tmp_path / "plain.txt").write_text("{question}")
    results = {"start": [], "sft": [], "off": [], "on": []}
    for seed in range(3):
        s0 = build_model(tmp_path / f"s0-{seed}", tokenizer_dir=tokdir, seed=100 + seed, hidden=64, layers=2, heads=4,
                         kv_heads=2, intermediate=128)
        student = _pretrain(s0, tmp_path / f"student{seed}", 30, 3e-3, lambda p: _climb(rng, p), rng)  # a weak start
        results["start"].append(_student_eval(student, tmodel, held_out))
        for mode in ("sft", "off", "on"):
            kd = {} if mode == "sft" else dict(kd_teacher=str(teacher), kd_alpha=1.0, sft_weight=0.0, kd_temperature=1.0,
                                               kd_kind="reverse", kd_tail=True, kd_top_k=10, rollout_max_tokens=4,
                                               on_policy_fraction=1.0 if mode == "on" else 0.0)
            out = tmp_path / f"{mode}{seed}"
            train.run(build(TrainConfig, dict(model=str(student), data=str(corpus), out=str(out), fine_tune_type="full",
                                              lora_layers=-1, iters=100, batch_size=16, learning_rate=1e-3, warmup=10,
                                              val_every=100, val_batches=1, report_every=25, save_every=1000,
                                              patience=0, seed=seed, max_seq_length=32,
                                              prompt_template=str(tmp_path / "plain.txt"), **kd)), quiet=True)
            last = tmp_path / f"{mode}{seed}-last"  # the last state (selection by loss is not what is compared)
            last.mkdir()
            (last / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
            (last / "adapters.safetensors").write_bytes((out / "checkpoints" / "last" / "adapters.safetensors").read_bytes())
            results[mode].append(_student_eval(student, tmodel, held_out, adapter=last))
    r = {k: np.array(v) for k, v in results.items()}  # (seed, [greedy validity, sampled validity, KL on own samples])
    table = (f"teacher {np.round(t_acc, 3).tolist()} | per seed (greedy valid, sampled valid, KL(student||teacher) on "
             "own samples): " + " | ".join(f"{k} {np.round(v, 3).tolist()}" for k, v in r.items()))
    print(table)
    assert np.all(r["off"][:, 2] <= 0.75 * r["start"][:, 2]), table
    assert np.all(r["on"][:, 2] <= 0.75 * r["start"][:, 2]), table
    assert np.all(r["on"][:, 1] >= 0.9), table


def test_torch_off_policy_kd_rows_keep_the_identity(tiny_llama, tiny_model, corpus, tmp_path):
    """The torch backend (which refuses on-policy rollouts, `test_refusals`) logs the same identity
    for off-policy online KD with accumulation 2: train_loss == sft_weight * sft_loss + kd_alpha *
    kd_loss per row."""
    import importlib.util
    import os

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("peft") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("the torch extra (torch, peft) is missing under CI")
        pytest.skip("needs the torch extra: pip install -e '.[torch]'")
    run = tmp_path / "run"
    train.run(op_cfg(tiny_model, tiny_llama, corpus, run, backend="torch", iters=4, val_every=4, report_every=2,
                     grad_accumulation=2, on_policy_fraction=0.0, kd_kind="forward", kd_alpha=0.5, sft_weight=0.8,
                     compile=False), quiet=True)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]
    assert [r["iter"] for r in rows] == [2, 4]
    for r in rows:
        assert r["kd_loss"] > 0 and r["train_loss"] == pytest.approx(0.8 * r["sft_loss"] + 0.5 * r["kd_loss"], rel=1e-4), r
