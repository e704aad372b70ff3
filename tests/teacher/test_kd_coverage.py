"""KD with partial teacher coverage: L_KD is averaged over the positions that carry teacher
targets (not over SFT tokens), `kd_coverage` is logged, a run without any teacher signal warns
then refuses, and the coverage error names its cause and that cause's fix."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_distill import data

from mlx_distill.training import train

from mlx_distill.training import objectives
from mlx_distill.config import LogitsConfig, TrainConfig, build
from mlx_distill.io import InputError, read_jsonl
from mlx_distill.teacher.logits import extract
from mlx_distill.teacher.store import TopMStore
from mlx_distill.training.losses import kd_loss, sft_loss
from mlx_distill.paths import REPO

from helpers import arith_records, write_jsonl

TEMPLATE = str(REPO / "prompts" / "train_user.txt")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model):
    """24 train + 6 valid records; `partial` holds teacher logits for only the first 10 train
    examples (`logits --limit 10`), `other` for a different corpus (no train id in common)."""
    d = tmp_path_factory.mktemp("kdcov")
    (d / "corpus").mkdir()
    write_jsonl(d / "corpus" / "train.jsonl", arith_records(24))
    write_jsonl(d / "corpus" / "valid.jsonl", arith_records(6, seed=1, start=100))
    (d / "other").mkdir()
    write_jsonl(d / "other" / "train.jsonl", arith_records(8, seed=7, start=500))
    common = dict(teacher=str(tiny_model), top_m=8, batch_size=8, prompt_template=TEMPLATE, max_seq_length=512)
    extract(build(LogitsConfig, dict(data=str(d / "corpus"), out=str(d / "partial"), limit=10, **common)), quiet=True)
    extract(build(LogitsConfig, dict(data=str(d / "other"), out=str(d / "none"), **common)), quiet=True)
    return d


def kd_cfg(student, d, out, store, **kw):
    base = dict(model=str(student), data=str(d / "corpus"), out=str(out), iters=8, batch_size=4, val_every=4,
                report_every=1, save_every=100, learning_rate=1e-2, warmup=0, max_seq_length=512, lora_layers=-1,
                prompt_template=TEMPLATE, kd_dir=str(d / store), kd_top_k=6, kd_alpha=0.5)
    base.update(kw)
    return build(TrainConfig, base)


# ----------------------------------------------------------------------------- the normaliser
def _case(seed, B=2, T=6, V=12, M=4, covered=None):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    ids = np.stack([np.stack([rng.permutation(V)[:M] for _ in range(T)]) for _ in range(B)]).astype(np.int32)
    lps = -rng.random((B, T, M)).astype(np.float32) * 3
    mask = np.ones((B, T), np.float32)
    mask[:, 0] = 0
    if covered is not None:  # positions without a teacher: every slot empty
        lps[~covered] = -np.inf
    return {"inputs": np.zeros((B, T), np.int32), "targets": rng.integers(0, V, (B, T)).astype(np.int32),
            "mask": mask, "kd_ids": ids, "kd_logits": lps}, z


def test_kd_objective_averages_kd_over_covered_positions():
    """One micro-batch, a third of its loss positions covered: objective / N equals
    S/N + alpha * K/N_KD, where K/N_KD is the plain per-position mean of the KD divergence."""
    covered = np.zeros((2, 6), bool)
    covered[0, 1:3] = covered[1, 4] = covered[1, 5] = True
    arrays, z = _case(0, covered=covered)
    cfg = TrainConfig(kd_temperature=2.0, kd_top_k=4)
    obj = objectives.kd_objective(lambda m, x, keep: mx.array(z), cfg)
    scale, n, nk = objectives.kd_step_scale([arrays])
    assert (n, nk) == (10.0, 4.0) and scale == 2.5
    b = {k: mx.array(v) for k, v in arrays.items()}
    b["kd_alpha"] = mx.array(0.5)
    s_ref, _ = sft_loss(mx.array(z), b["targets"], b["mask"])
    k_ref, nk_ref = kd_loss(mx.array(z), b["kd_ids"], b["kd_logits"], b["mask"], temperature=2.0, top_k=4)
    assert float(nk_ref) == 4.0 and float(k_ref) > 0
    want = float(s_ref) / n + 0.5 * float(k_ref) / nk
    for given in ({}, {"kd_scale": mx.array(scale)}):  # own ratio, or the loop's step ratio
        total, ntok, parts = obj(None, {**b, **given})
        assert float(ntok) == n and float(parts["kd_positions"]) == nk
        assert float(total) / n == pytest.approx(want, rel=1e-6)
    # a batch with no teacher target at all: the KD term is exactly 0 (no NaN)
    dry, _ = _case(1, covered=np.zeros((2, 6), bool))
    assert objectives.kd_step_scale([dry]) == (0.0, 10.0, 0.0)
    b = {**{k: mx.array(v) for k, v in dry.items()}, "kd_alpha": mx.array(0.5), "kd_scale": mx.array(0.0)}
    total, _, parts = obj(None, b)
    assert float(total) == pytest.approx(float(sft_loss(mx.array(z), b["targets"], b["mask"])[0]), rel=1e-6)
    assert float(parts["kd_loss"]) == 0.0 and float(parts["kd_positions"]) == 0.0


def test_kd_step_scale_spans_the_micro_batches_of_a_step():
    """With gradient accumulation the normaliser is counted over the whole step, so
    sum_i(S_i + alpha * scale * K_i) / N = S/N + alpha * K/N_KD exactly."""
    cov_a = np.zeros((2, 6), bool)
    cov_a[0, 1:6] = True
    a, _ = _case(2, covered=cov_a)
    b, _ = _case(3, covered=np.ones((2, 6), bool))
    assert objectives.kd_step_scale([a, b]) == (20.0 / 15.0, 20.0, 15.0)


def test_kd_objective_counts_span_positions_across_tokenizers():
    """Across tokenizers a position carries a signal through its id-mapped slots OR a span: the
    step normaliser and the objective's kd_positions count the union (never twice), and the
    objective's KD sum is kd_loss's with the span term (tail bucket forced)."""
    covered = np.zeros((2, 6), bool)
    covered[0, 1] = covered[1, 5] = True
    arrays, z = _case(4, covered=covered)
    span_in = np.zeros((2, 6), np.float32)
    span_in[0, 2:5] = span_in[1, 1:3] = 1.0
    span_len = np.zeros((2, 6), np.int32)
    span_len[0, 4], span_len[1, 2] = 3, 2
    span_logp = np.zeros((2, 6), np.float32)
    span_logp[0, 4], span_logp[1, 2] = -2.5, -0.7
    arrays.update(kd_span_in=span_in, kd_span_len=span_len, kd_span_logp=span_logp)
    scale, n, nk = objectives.kd_step_scale([arrays])
    assert (n, nk) == (10.0, 7.0)
    obj = objectives.kd_objective(lambda m, x, keep: mx.array(z), TrainConfig(kd_temperature=2.0, kd_top_k=4), tail=True)
    b = {**{k: mx.array(v) for k, v in arrays.items()}, "kd_alpha": mx.array(1.0), "kd_scale": mx.array(scale)}
    total, _, parts = obj(None, b)
    k_ref, nk_ref = kd_loss(mx.array(z), b["kd_ids"], b["kd_logits"], b["mask"], temperature=2.0, top_k=4, tail=True,
                            targets=b["targets"], span_logp=b["kd_span_logp"], span_len=b["kd_span_len"],
                            span_in=b["kd_span_in"])
    assert float(parts["kd_positions"]) == float(nk_ref) == 7.0
    assert float(parts["kd_loss"]) == pytest.approx(float(k_ref), rel=1e-6)
    no_span, _ = kd_loss(mx.array(z), b["kd_ids"], b["kd_logits"], b["mask"], temperature=2.0, top_k=4, tail=True)
    assert float(k_ref) > float(no_span) > 0  # the spans add their binary KL


def test_window_parts():
    assert objectives.window_parts({"sft_loss": 8.0, "kd_loss": 3.0, "kd_positions": 2.0}, 4) == \
        {"sft_loss": 2.0, "kd_loss": 1.5, "kd_coverage": 0.5}
    assert objectives.window_parts({"sft_loss": 8.0, "kd_loss": 0.0, "kd_positions": 0.0}, 4) == \
        {"sft_loss": 2.0, "kd_loss": None, "kd_coverage": 0.0}


# ----------------------------------------------------------------------------- runs
def test_partial_coverage_run_trains_kd_over_covered_positions(tiny_llama, corpus, tmp_path):
    """`logits --limit 10` on 24 training examples, train --kd --kd-min-coverage 0.2: every
    row logs kd_coverage; rows with covered positions have a non-zero KD loss, and the logged
    mix is L = L_SFT + alpha * L_KD with L_KD per covered position."""
    train.run(kd_cfg(tiny_llama, corpus, tmp_path / "run", "partial", kd_min_coverage=0.2), quiet=True)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    assert len(rows) == 8
    cov = [r["kd_coverage"] for r in rows]
    assert all(0.0 <= c <= 1.0 for c in cov) and any(0.0 < c for c in cov) and min(cov) < 1.0, cov
    for r in rows:
        if r["kd_coverage"] > 0:
            assert r["kd_loss"] > 0.01
            assert r["train_loss"] == pytest.approx(r["sft_loss"] + 0.5 * r["kd_loss"], rel=1e-5)
        else:
            assert r["kd_loss"] is None and r["train_loss"] == pytest.approx(r["sft_loss"], rel=1e-5)


def test_kd_run_without_teacher_signal_warns_then_refuses(tiny_llama, corpus, tmp_path, capsys):
    """Logits of another corpus, --kd-min-coverage 0: every batch has coverage 0. The first
    report warns; the run stops once a whole --val-every interval (4 steps) stayed dry."""
    with pytest.raises(InputError, match=r"without a teacher signal: no position of the last 4 training steps"):
        train.run(kd_cfg(tiny_llama, corpus, tmp_path / "dry", "none", kd_min_coverage=0.0, iters=12), quiet=True)
    err = capsys.readouterr().err
    assert err.count("warning: iter 1: no training position") == 1, err
    rows = list(read_jsonl(tmp_path / "dry" / "metrics.jsonl"))
    trained = [r for r in rows if "train_loss" in r]
    assert [r["iter"] for r in trained] == [1, 2, 3] and all(r["kd_coverage"] == 0.0 for r in trained)


# ----------------------------------------------------------------------------- the coverage error
def _examples(tok, corpus_dir, **kw):
    cfg = TrainConfig(data=str(corpus_dir), prompt_template=TEMPLATE, max_seq_length=512, **kw)
    return data.load_examples(cfg, tok, "train")


def test_coverage_error_not_extracted_names_logits_resume(tiny_model, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    exs = _examples(tok, corpus / "corpus")
    with pytest.raises(InputError) as e:
        TopMStore(corpus / "partial").check(exs, len(tok), tok, min_coverage=0.95)
    msg = str(e.value)
    assert "exact alignment: same tokenizer" in msg and "14 example(s) of this split were never extracted" in msg
    assert "logits --resume --teacher" in msg and f"--out {corpus / 'partial'}" in msg
    assert "tokenizer the student shares" not in msg and "shares the teacher's tokenizer" not in msg


def test_coverage_error_mask_prompt_and_tokenizer_differs(tiny_model, corpus, tmp_path):
    from transformers import AutoTokenizer

    from mlx_distill.tiny import build_tokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    # same tokens, but training on prompt positions the teacher never scored
    exs = [e for e in _examples(tok, corpus / "corpus", mask_prompt=False)]
    store = TopMStore(corpus / "partial")
    with pytest.raises(InputError, match=r"did not score .*--mask-prompt"):
        store.check([e for e in exs if e.id in store.entries], len(tok), tok, min_coverage=0.95)
    # another tokenizer (nearly one token per byte, so many of the student's token ends fall
    # inside a teacher token): the default (spans) gives every position a signal; --kd-align
    # matched leaves those without one, and says so, with the fix
    other = build_tokenizer(tmp_path / "tok", texts=["user assistant system"], vocab_size=270)
    exs = [e for e in _examples(other, corpus / "corpus") if e.id in store.entries]
    rep = TopMStore(corpus / "partial").check(exs, len(other), other, min_coverage=0.99)
    assert rep["mode"] == "spans" and rep["coverage"] == 1.0 and rep["classes"]["spans"] > 0
    with pytest.raises(InputError) as e:
        TopMStore(corpus / "partial").check(exs, len(other), other, min_coverage=0.99, mode="matched")
    msg = str(e.value)
    assert "matched alignment: different tokenizer" in msg and "the tokenizers differ (--kd-align matched)" in msg
    assert "--kd-align spans gives the rest the span signal" in msg and "never extracted" not in msg


def test_a_store_of_another_corpus_is_named_as_such(tiny_model, corpus, tmp_path):
    """Issue 18: a --kd store made from another corpus is named as such, not blamed on the prompt
    template: the same ids holding other records (same tokenizer: prompt and completion both differ),
    no id in common (not "never extracted: --resume"), and across tokenizers (no completion text matches)."""
    from transformers import AutoTokenizer

    from mlx_distill.tiny import build_tokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    exs = _examples(tok, corpus / "corpus")
    (tmp_path / "other").mkdir()
    write_jsonl(tmp_path / "other" / "train.jsonl", arith_records(24, seed=5))  # ids a0..a23 again, other sums
    extract(build(LogitsConfig, dict(teacher=str(tiny_model), data=str(tmp_path / "other"), out=str(tmp_path / "s"),
                                     top_m=8, batch_size=8, prompt_template=TEMPLATE, max_seq_length=512)), quiet=True)
    with pytest.raises(InputError) as e:
        TopMStore(tmp_path / "s").check(exs, len(tok), tok)
    msg = str(e.value)
    assert "made from another corpus than the student's" in msg and str(tmp_path / "other") in msg, msg
    assert "prompt-template" not in msg and "the prompt differs" not in msg
    with pytest.raises(InputError) as e:  # the `none` store: another corpus with other ids
        TopMStore(corpus / "none").check(exs, len(tok), tok)
    msg = str(e.value)
    assert "none of the 24 example ids of this split is in the store, which holds 8 other example(s)" in msg, msg
    assert "made from another corpus" in msg and "logits --resume" not in msg
    other = build_tokenizer(tmp_path / "tok", texts=["user assistant system"], vocab_size=270)
    with pytest.raises(InputError, match=r"24 example\(s\) have another completion text.*probably made from another "
                                         r"corpus"):
        TopMStore(tmp_path / "s").check(_examples(other, corpus / "corpus"), len(other), other)
