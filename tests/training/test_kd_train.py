"""Top-K KD in `train`: a KD run lowers the KD loss; distillation transfers on a toy task."""


import numpy as np
import pytest

from mlx_distill.training import train
from mlx_distill.config import LogitsConfig, TrainConfig, build
from mlx_distill.io import InputError, read_jsonl
from mlx_distill.teacher.logits import extract
from mlx_distill.paths import REPO

from helpers import arith_records, completion_batch, direct_train, write_jsonl

TEMPLATE = str(REPO / "prompts" / "train_user.txt")


@pytest.fixture(scope="module")
def kd_corpus(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("kdc")
    (d / "corpus").mkdir()
    write_jsonl(d / "corpus" / "train.jsonl", arith_records(24))
    write_jsonl(d / "corpus" / "valid.jsonl", arith_records(6, seed=1, start=100))
    extract(build(LogitsConfig, dict(teacher=str(tiny_model), data=str(d / "corpus"), out=str(d / "logits"), top_m=8,
                                     batch_size=8, prompt_template=TEMPLATE, max_seq_length=512)), quiet=True)
    return d


def kd_cfg(student, d, out, **kw):
    base = dict(model=str(student), data=str(d / "corpus"), out=str(out), iters=16, batch_size=4, val_every=8,
                report_every=4, save_every=8, learning_rate=1e-2, warmup=0, max_seq_length=512, lora_layers=-1,
                prompt_template=TEMPLATE, kd_dir=str(d / "logits"), kd_top_k=6, kd_alpha=0.5)
    base.update(kw)
    return build(TrainConfig, base)


def test_kd_run_lowers_kd_loss_and_logs_parts(tiny_llama, kd_corpus, tmp_path):
    """Student (tiny llama) distils the tiny qwen2 teacher it shares a tokenizer with."""
    summary = train.run(kd_cfg(tiny_llama, kd_corpus, tmp_path / "run"), quiet=True)
    assert summary["last_iter"] == 16
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    assert len(rows) == 4
    for r in rows:
        assert r["kd_alpha"] == 0.5
        # the mix is logged beside its parts: L = L_SFT + alpha * L_KD (per token)
        assert r["train_loss"] == pytest.approx(r["sft_loss"] + 0.5 * r["kd_loss"], rel=1e-5)
    assert rows[-1]["kd_loss"] < 0.8 * rows[0]["kd_loss"], [r["kd_loss"] for r in rows]


def test_kd_alpha_warmup_and_refusals(tiny_llama, kd_corpus, tmp_path):
    train.run(kd_cfg(tiny_llama, kd_corpus, tmp_path / "w", iters=8, report_every=2, kd_warmup=8), quiet=True)
    alphas = [r["kd_alpha"] for r in read_jsonl(tmp_path / "w" / "metrics.jsonl") if "kd_alpha" in r]
    assert alphas == pytest.approx([0.125, 0.25, 0.375, 0.5])
    with pytest.raises(InputError, match=r"--kd-top-k 9 > M=8"):
        train.run(kd_cfg(tiny_llama, kd_corpus, tmp_path / "k", kd_top_k=9), quiet=True)
    # a corpus the teacher never scored is refused before any step
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "train.jsonl", arith_records(24, seed=7, start=500))
    write_jsonl(other / "valid.jsonl", arith_records(6, seed=1, start=100))
    with pytest.raises(InputError, match="cover 0.0%"):
        train.run(kd_cfg(tiny_llama, kd_corpus, tmp_path / "o", data=str(other)), quiet=True)


def test_online_teacher_matches_the_offline_cache(tiny_model, tiny_llama, kd_corpus, tmp_path):
    """--kd-teacher (teacher in memory) trains on the same targets as the extracted cache:
    the same run, offline and online, logs the same KD losses (the store's format-3 coding, log-probs
    within 0.02 nats, vs float32)."""
    kw = dict(iters=4, report_every=1, val_every=4, learning_rate=1e-3)
    off = train.run(kd_cfg(tiny_llama, kd_corpus, tmp_path / "off", **kw), quiet=True)
    on = train.run(kd_cfg(tiny_llama, kd_corpus, tmp_path / "on", kd_dir="", kd_teacher=str(tiny_model), **kw),
                   quiet=True)
    a = [r for r in read_jsonl(tmp_path / "off" / "metrics.jsonl") if "kd_loss" in r]
    b = [r for r in read_jsonl(tmp_path / "on" / "metrics.jsonl") if "kd_loss" in r]
    assert len(a) == len(b) == 4
    # step 1 sees identical weights: the targets agree to the store's coding (format 3: within 1% of
    # float32, tests/test_store_compact.py; measured 0.18% here, 1e-3 with format 2's float16)
    assert b[0]["kd_loss"] == pytest.approx(a[0]["kd_loss"], rel=1e-2)
    assert b[0]["sft_loss"] == pytest.approx(a[0]["sft_loss"], rel=1e-6)
    # later steps drift apart only through that rounding
    for x, y in zip(a[1:], b[1:]):
        assert y["kd_loss"] == pytest.approx(x["kd_loss"], rel=3e-2)
        assert y["sft_loss"] == pytest.approx(x["sft_loss"], rel=1e-2)
    assert on["best_val_loss"] == pytest.approx(off["best_val_loss"], rel=1e-2)
    with pytest.raises(InputError, match="either --kd .* or --kd-teacher"):
        train.run(kd_cfg(tiny_llama, kd_corpus, tmp_path / "both", kd_teacher=str(tiny_model)), quiet=True)


# ----------------------------------------------------------------------------- learning test
# Task: given six distinct digits, answer with a digit d such that d + x != 9 for every
# listed x (the nines' complement of a missing digit). Every problem has four correct
# answers, so a trace shows one of them while the teacher's logits carry all four: exactly
# the token-level uncertainty KD is meant to transfer. (Single-answer arithmetic such as
# 2-digit addition was tried first: a tiny teacher did not learn it within ~1000 steps on
# a 2-core CPU, and on a single-answer task a good teacher's top-K is nearly one-hot, so KD
# adds little over its traces.)
DIGITS = "0123456789"


def correct_answers(problem: str) -> list[str]:
    return [d for d in DIGITS if str(9 - int(d)) not in problem]


def toy_problems(rng, n: int) -> list[str]:
    return ["".join(rng.sample(DIGITS, 6)) for _ in range(n)]


def _chat(tok, problem, answer=None):
    msgs = [{"role": "user", "content": problem}]
    if answer is None:
        return tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    return tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], return_dict=False)


def _direct_train(src, dst, iters, lr, answer_fn, rng):
    """The teacher, and the stand-in for a student's pre-training (`helpers.direct_train`) on fresh
    problems each step; `train` itself runs the students' SFT / SFT+KD."""

    def batch(tok):
        ps = toy_problems(rng, 64)
        return completion_batch([_chat(tok, p, answer_fn(p)) for p in ps], [len(_chat(tok, p)) for p in ps])

    return direct_train(src, dst, iters, lr, batch, warmup=50, warmup_from=lr / 50)


def _answer_probs(model_dir, problems, adapter=None):
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    z = model(mx.array([_chat(tok, p) for p in problems]))[:, -1].astype(mx.float32)
    return np.array(mx.softmax(z, axis=-1)), tok


def _score(model_dir, problems, adapter=None) -> tuple[float, float]:
    """(greedy accuracy, mean probability of a correct answer) on `problems`."""
    probs, tok = _answer_probs(model_dir, problems, adapter)
    ids = {d: tok.convert_tokens_to_ids(d) for d in DIGITS}
    greedy = [tok.convert_ids_to_tokens(int(i)) for i in probs.argmax(-1)]
    acc = np.mean([g in correct_answers(p) for g, p in zip(greedy, problems)])
    mass = np.mean([sum(probs[i, ids[d]] for d in correct_answers(p)) for i, p in enumerate(problems)])
    return float(acc), float(mass)


@pytest.mark.slow
def test_distillation_transfers_on_a_toy_task(tmp_path):
    """Teacher (hidden 64, 2 layers) trained to ~100%; students (hidden 48, 2 layers, briefly
    pre-trained on the answer format with random digits) get the teacher's sampled traces on
    100 problems and train 300 steps with SFT, or SFT + KD (K = 10, T = 1, alpha = 2), same
    seed and budget. Scored on 400 held-out problems by greedy accuracy (chance 0.4) and the
    probability of a correct answer. SFT is scored both at its early-stopped best adapter
    (which mostly stays at iteration 0: its validation loss rises as it memorises one answer
    per problem) and at its last step; the better of the two is compared.

    Stated margin, over 4 seeds: SFT+KD beats SFT by >= 0.15 mean greedy accuracy and in at
    least 3 of 4 seeds. Measured (2-core Linux CPU, ~100 s): SFT+KD 0.73/0.86/0.82/0.86,
    SFT best 0.38/0.38/0.42/0.40, SFT last 0.41/0.57/0.59/0.67.

    Third arm: SFT + KD from a sampled store (`logits --sampled-k 12`, T = 1; the unbiased
    estimator `losses.sampled_kd_loss`), same budget. Measured once with the format-3 stores
    (2026-12-07, loaded machine, ~8.5 min): SFT+KD top-10 0.545/0.685/0.798/0.825 (mean 0.713),
    sampled 0.382/0.685/0.718/0.782 (mean 0.642), SFT best-of-two 0.41/0.57/0.59/0.67 (mean 0.561);
    p(correct) 0.530 / 0.498 / 0.465. The sampled arm beats SFT in 3 of 4 seeds but not the top-10
    store: 12 draws of a 4-answer distribution are noisier targets than its exact top-10.
    The top-10 arm itself: 0.73/0.86/0.82/0.86 (mean 0.817) from a format-2 store, 0.713 from the
    format-3 default (margin 0.152, just above 0.15; the stores agree within 0.022 nats on every
    slot >= -12, but where the teacher is sure, its other slots are all below -12 and share the
    0.5-nat coarse grid; why training moves this much is not established)."""
    import random
    import shutil

    from mlx_distill.tiny import build_model, build_tokenizer

    rng = random.Random(0)
    tokdir = tmp_path / "tok"
    # one character per digit; "user"/"assistant" merged so the chat frame stays short
    build_tokenizer(tokdir, texts=[DIGITS] + ["user\nassistant\nsystem\n"] * 50, vocab_size=261 + 18)
    t0 = build_model(tmp_path / "t0", tokenizer_dir=tokdir, seed=0, hidden=64, layers=2, heads=4, kv_heads=2,
                     intermediate=128)
    teacher = _direct_train(t0, tmp_path / "teacher", 1000, 2e-3, lambda p: rng.choice(correct_answers(p)), rng)
    held_out = toy_problems(rng, 400)
    t_acc, t_mass = _score(teacher, held_out)
    assert t_acc > 0.95 and t_mass > 0.9, (t_acc, t_mass)

    # the teacher's traces: one sampled answer per problem (T = 1), then its top-K logits
    train_p, valid_p = toy_problems(rng, 100), toy_problems(rng, 100)
    probs, tok = _answer_probs(teacher, train_p)
    nrng = np.random.default_rng(0)
    traces = [tok.convert_ids_to_tokens(int(nrng.choice(len(p), p=p / p.sum()))) for p in probs]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "train.jsonl", [{"id": f"t{i}", "prompt": p, "completion": c}
                                         for i, (p, c) in enumerate(zip(train_p, traces))])
    write_jsonl(corpus / "valid.jsonl", [{"id": f"v{i}", "prompt": p, "completion": rng.choice(correct_answers(p))}
                                         for i, p in enumerate(valid_p)])
    (tmp_path / "plain.txt").write_text("{question}")
    common = dict(data=str(corpus), prompt_template=str(tmp_path / "plain.txt"), max_seq_length=64)
    extract(build(LogitsConfig, dict(teacher=str(teacher), out=str(tmp_path / "logits"), top_m=10, batch_size=50,
                                     **common)), quiet=True)
    # the third arm: a sampled store (12 draws per position at T = 1, `losses.sampled_kd_loss`)
    extract(build(LogitsConfig, dict(teacher=str(teacher), out=str(tmp_path / "sampled"), sampled_k=12,
                                     sampled_temperature=1.0, batch_size=50, **common)), quiet=True)

    results = {"sft": [], "sft_last": [], "kd": [], "sampled": []}
    for seed in range(4):
        s0 = build_model(tmp_path / f"s0-{seed}", tokenizer_dir=tokdir, seed=100 + seed, hidden=48, layers=2, heads=4,
                         kv_heads=2, intermediate=96)
        student = _direct_train(s0, tmp_path / f"student{seed}", 150, 3e-3, lambda p: rng.choice(DIGITS), rng)
        for mode in ("sft", "kd", "sampled"):
            store = {"kd": "logits", "sampled": "sampled"}.get(mode)
            kd = dict(kd_dir=str(tmp_path / store), kd_alpha=2.0, kd_temperature=1.0, kd_top_k=10) if store else {}
            out = tmp_path / f"{mode}{seed}"
            train.run(build(TrainConfig, dict(model=str(student), out=str(out), fine_tune_type="full", lora_layers=-1,
                                              iters=300, batch_size=16, learning_rate=3e-3, warmup=10, val_every=25,
                                              report_every=50, save_every=1000, patience=0, seed=seed, **common, **kd)),
                      quiet=True)
            results[mode].append(_score(student, held_out, adapter=out))
            if mode == "sft":  # the last SFT state too, so early stopping is not what SFT loses by
                last = tmp_path / f"sft-last{seed}"
                last.mkdir()
                shutil.copy(out / "adapter_config.json", last)
                shutil.copy(out / "checkpoints" / "last" / "adapters.safetensors", last)
                results["sft_last"].append(_score(student, held_out, adapter=last))
    sft, kd, sft_last, sampled = (np.array(results[k]) for k in ("sft", "kd", "sft_last", "sampled"))
    table = (f"teacher {t_acc:.3f}/{t_mass:.3f} | (greedy acc, p(correct)) per seed: "
             + " | ".join(f"{k} {np.round(v, 3).tolist()}" for k, v in results.items()))
    print(table)
    best_sft = np.maximum(sft, sft_last)  # SFT's better state, per seed and metric
    assert kd[:, 0].mean() - best_sft[:, 0].mean() >= 0.15, table
    assert np.sum(kd[:, 0] > best_sft[:, 0]) >= 3, table
    assert kd[:, 1].mean() > best_sft[:, 1].mean(), table
    # the sampled store (12 draws a position, unbiased) carries the teacher's uncertainty too, less
    # well than its top-10 here (measured once, see the docstring): asserted only above SFT
    assert sampled[:, 0].mean() > best_sft[:, 0].mean() and np.sum(sampled[:, 0] > best_sft[:, 0]) >= 2, table
    assert sampled[:, 1].mean() > best_sft[:, 1].mean(), table
