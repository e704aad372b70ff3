"""Feature (hidden-state) distillation, `train --kd-teacher MODEL --kd-hidden GAMMA` (issue 20 item 5):
the layer map, the distance, runs between tiny models of different widths (same tokenizer and
across families), the projection's files and resume, the refusals, and a learning test."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mlx_distill.config import TrainConfig, build
from mlx_distill.io import InputError, read_jsonl
from mlx_distill.paths import REPO
from mlx_distill.training import train
from mlx_distill.training.hidden import hidden_distance, parse_layers

from helpers import arith_records, write_jsonl

TEMPLATE = str(REPO / "prompts" / "train_user.txt")


def test_layer_map():
    assert parse_layers("auto", 2, 3) == [(0, 1), (1, 2)]
    assert parse_layers("auto", 30, 18) == [(7, 4), (14, 8), (22, 13), (29, 17)]  # evenly spaced, last blocks paired
    assert parse_layers("auto", 1, 5) == [(0, 4)]
    assert parse_layers(" 0:2, 1:4 ", 2, 5) == [(0, 2), (1, 4)]
    with pytest.raises(InputError, match="'0-2' is not S:T"):
        parse_layers("0-2", 2, 5)
    with pytest.raises(InputError, match="pair 2:1 is outside the blocks"):
        parse_layers("2:1", 2, 5)
    with pytest.raises(InputError, match="listed twice"):
        parse_layers("0:1,0:1", 2, 5)


def test_hidden_distance_values():
    import mlx.core as mx

    from mlx_distill.backends.ops import ops

    x = mx.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    y = mx.array([[0.0, 3.0], [2.0, 2.0], [1.0, 1.0]])
    cos = np.array(hidden_distance(ops(x), x, y, "cosine"))
    np.testing.assert_allclose(cos, [1.0, 0.0, 1 - 1 / np.sqrt(2)], atol=1e-6)  # orthogonal, parallel, 45 degrees
    mse = np.array(hidden_distance(ops(x), x, y, "mse"))
    np.testing.assert_allclose(mse, [(1 + 9) / 2, (1 + 1) / 2, (1 + 1) / 2], atol=1e-6)


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory, tiny_model):
    """A 3-block, width-96 teacher with the tokenizer of `tiny_model` (width 64, 2 blocks)."""
    from mlx_distill.tiny import build_model

    return build_model(tmp_path_factory.mktemp("wide") / "model", tokenizer_dir=tiny_model, hidden=96, layers=3,
                       heads=4, kv_heads=2, intermediate=160, seed=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hkd")
    write_jsonl(d / "train.jsonl", arith_records(24))
    write_jsonl(d / "valid.jsonl", arith_records(6, seed=1, start=100))
    return d


def _cfg(student, teacher, corpus, out, **kw):
    base = dict(model=str(student), data=str(corpus), out=str(out), iters=12, batch_size=4, val_every=6,
                report_every=3, save_every=6, learning_rate=1e-2, warmup=0, max_seq_length=512, lora_layers=-1,
                prompt_template=TEMPLATE, kd_teacher=str(teacher), kd_hidden=1.0)
    base.update(kw)
    return build(TrainConfig, base)


def test_cli_same_tokenizer_other_width(tiny_model, wide_teacher, corpus, tmp_path):
    """The outside check: `train --kd-teacher TINY --kd-hidden 1.0` between widths 64 and 96 writes
    falling hidden_loss rows, hidden_projection.safetensors beside the adapter (and in the
    checkpoint), an adapter without the projection that mlx-lm loads, and the manifest's kd_hidden."""
    import mlx.core as mx

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlx_distill", "train", "--model", str(tiny_model), "--data", str(corpus),
           "--out", str(out), "--iters", "12", "--batch-size", "4", "--val-every", "6", "--report-every", "3",
           "--save-every", "6", "--learning-rate", "1e-2", "--warmup", "0", "--lora-layers", "-1",
           "--prompt-template", TEMPLATE, "--kd-teacher", str(wide_teacher), "--kd-hidden", "1.0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "kd hidden: pairs 0:1, 1:2 (cosine, gamma 1.0), widths 64 -> 96" in p.stderr
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r]
    h = [r["hidden_loss"] for r in rows]
    assert len(h) == 4 and all(np.isfinite(h)) and h[-1] < 0.7 * h[0], h
    for r in rows:  # L = w L_SFT + alpha L_KD + gamma L_hidden; every position covered here (same tokenizer)
        assert r["train_loss"] == pytest.approx(r["sft_loss"] + 0.35 * r["kd_loss"] + r["hidden_loss"], rel=1e-4)
    proj = mx.load(str(out / "hidden_projection.safetensors"))
    assert sorted(proj) == ["hidden_projection.maps.0.weight", "hidden_projection.maps.1.weight"]
    assert proj["hidden_projection.maps.0.weight"].shape == (96, 64)
    assert (out / "checkpoints" / "last" / "hidden_projection.safetensors").is_file()
    adapter = mx.load(str(out / "adapters.safetensors"))
    assert adapter and not any("hidden_projection" in k for k in adapter)
    man = json.loads((out / "manifest.json").read_text())["kd_hidden"]
    assert man["layer_pairs"] == ["0:1", "1:2"] and man["loss"] == "cosine"
    assert (man["student_width"], man["teacher_width"], man["position_share"]) == (64, 96, 1.0)
    from mlx_lm import load  # generation needs the adapter alone

    load(str(tiny_model), adapter_path=str(out))


def test_resume_restores_the_projection(tiny_model, wide_teacher, corpus, tmp_path):
    """4 steps, then --resume --extend to 8, logs what 8 straight steps log: the projection and its
    optimizer state come back from the checkpoint (a fresh projection would move hidden_loss)."""
    kw = dict(report_every=2, val_every=4, save_every=4, kd_hidden_loss="mse", kd_hidden_layers="1:2")
    train.run(_cfg(tiny_model, wide_teacher, corpus, tmp_path / "a", iters=8, decay_iters=4, **kw), quiet=True)
    train.run(_cfg(tiny_model, wide_teacher, corpus, tmp_path / "b", iters=4, **kw), quiet=True)
    train.run(_cfg(tiny_model, wide_teacher, corpus, tmp_path / "b", iters=8, resume=True, extend=True, **kw),
              quiet=True)
    a = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "hidden_loss" in r]
    b = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "hidden_loss" in r]
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == [2, 4, 6, 8]
    for x, y in zip(a, b):
        assert y["hidden_loss"] == pytest.approx(x["hidden_loss"], rel=1e-4), (x["iter"], x, y)
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-4)


def test_across_families_only_matched_positions(tiny_metaspace, wide_teacher, corpus, tmp_path):
    """A Metaspace student (llama, width 64) and the byte-level teacher (width 96): the hidden
    targets sit on the positions whose text prefixes end at the same byte on both sides (align's
    matched class); their share is recorded and the loss is averaged over them."""
    out = tmp_path / "x"
    train.run(_cfg(tiny_metaspace, wide_teacher, corpus, out, iters=6, report_every=2, kd_min_coverage=0.3),
              quiet=True)
    man = json.loads((out / "manifest.json").read_text())
    share = man["kd_hidden"]["position_share"]
    classes = man["kd_alignment"]["train"]["classes"]
    assert 0.05 < share < 1.0
    assert share == pytest.approx(classes["matched"] / man["kd_alignment"]["train"]["positions"], abs=1e-4)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r]
    assert all(np.isfinite(r["hidden_loss"]) and r["hidden_loss"] > 0 for r in rows)


def test_refusals(tiny_model, wide_teacher, corpus, tmp_path):
    with pytest.raises(InputError, match="--kd-hidden needs --kd-teacher"):
        train.run(_cfg(tiny_model, "", corpus, tmp_path / "a"), quiet=True)
    with pytest.raises(InputError, match="MLX backend only"):
        train.run(_cfg(tiny_model, wide_teacher, corpus, tmp_path / "b", backend="torch"), quiet=True)
    with pytest.raises(InputError, match="pair 5:0 is outside"):
        train.run(_cfg(tiny_model, wide_teacher, corpus, tmp_path / "c", kd_hidden_layers="5:0"), quiet=True)
    # a user's error is one line on the command line, exit 2 .. not a traceback
    p = subprocess.run([sys.executable, "-m", "mlx_distill", "train", "--model", str(tiny_model), "--data", str(corpus),
                        "--out", str(tmp_path / "d"), "--kd-hidden", "1.0", "--backend", "torch",
                        "--kd-teacher", str(wide_teacher)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode != 0 and p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr, p.stderr


# ----------------------------------------------------------------------------- learning test
@pytest.mark.slow
@pytest.mark.heavy
def test_feature_kd_on_the_toy_task(tmp_path):
    """SFT vs SFT + logit KD vs SFT + feature KD, 3 seeds, on `test_kd_train`'s toy task (six
    digits given; four digits are correct answers; a trace shows one, the teacher's distribution
    holds all four). Teacher: width 64, 2 blocks, trained to ~100%; students: width 48, 2 blocks,
    briefly pre-trained on the answer format, then 300 full fine-tuning steps on 100 sampled
    traces, same seed and budget per arm. Logit KD: the online teacher, K = 10, T = 1, alpha = 2.
    Feature KD: the same teacher online, alpha = 0, gamma = 1, cosine, auto pairs (0:0, 1:1): the
    student's block outputs projected to width 64 match the teacher's at every completion position.
    Scored at each run's last state on 400 held-out problems: greedy accuracy and p(correct).

    Measured once (2-core Linux CPU under heavy parallel load, 654 s; greedy accuracy per seed,
    chance 0.4): SFT 0.41/0.57/0.59 (mean 0.52), + logit KD 0.72/0.79/0.83 (0.78), + feature KD
    0.41/0.63/0.65 (0.56); hidden_loss fell 0.26 -> 0.17, 0.25 -> 0.13, 0.25 -> 0.14. Seed 0's SFT
    and feature runs both collapsed to one constant answer (0.41). So on this task matching the
    teacher's block outputs moved accuracy little (+0.04 mean, within seed noise) while matching
    its answer distribution moved it much: here the answer distribution is what transfers.

    Asserted is only what held: logit KD beats SFT on mean accuracy, and feature KD trains (finite,
    falling hidden loss); no claim that feature KD beats SFT."""
    import random
    import shutil

    from test_kd_train import DIGITS, _answer_probs, _direct_train, _score, correct_answers, toy_problems

    from mlx_distill.tiny import build_model, build_tokenizer

    rng = random.Random(0)
    tokdir = tmp_path / "tok"
    build_tokenizer(tokdir, texts=[DIGITS] + ["user\nassistant\nsystem\n"] * 50, vocab_size=261 + 18)
    t0 = build_model(tmp_path / "t0", tokenizer_dir=tokdir, seed=0, hidden=64, layers=2, heads=4, kv_heads=2,
                     intermediate=128)
    teacher = _direct_train(t0, tmp_path / "teacher", 1000, 2e-3, lambda p: rng.choice(correct_answers(p)), rng)
    held_out = toy_problems(rng, 400)
    t_acc, t_mass = _score(teacher, held_out)
    assert t_acc > 0.95, t_acc
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
    arms = {"sft": {}, "logit": dict(kd_teacher=str(teacher), kd_alpha=2.0, kd_temperature=1.0, kd_top_k=10),
            "feature": dict(kd_teacher=str(teacher), kd_alpha=0.0, kd_hidden=1.0)}
    results = {k: [] for k in arms}
    hidden_rows = []
    for seed in range(3):
        s0 = build_model(tmp_path / f"s0-{seed}", tokenizer_dir=tokdir, seed=100 + seed, hidden=48, layers=2, heads=4,
                         kv_heads=2, intermediate=96)
        student = _direct_train(s0, tmp_path / f"student{seed}", 150, 3e-3, lambda p: rng.choice(DIGITS), rng)
        for arm, kw in arms.items():
            out = tmp_path / f"{arm}{seed}"
            train.run(build(TrainConfig, dict(model=str(student), out=str(out), fine_tune_type="full", lora_layers=-1,
                                              iters=300, batch_size=16, learning_rate=3e-3, warmup=10, val_every=100,
                                              report_every=50, save_every=1000, patience=0, seed=seed, **common,
                                              **kw)), quiet=True)
            last = tmp_path / f"{arm}-last{seed}"  # each arm at its last state: early stopping is not compared
            last.mkdir()
            shutil.copy(out / "adapter_config.json", last)
            shutil.copy(out / "checkpoints" / "last" / "adapters.safetensors", last)
            results[arm].append(_score(student, held_out, adapter=last))
            if arm == "feature":
                hidden_rows.append([r["hidden_loss"] for r in read_jsonl(out / "metrics.jsonl") if "hidden_loss" in r])
    res = {k: np.array(v) for k, v in results.items()}
    table = (f"teacher {t_acc:.3f}/{t_mass:.3f} | (greedy acc, p(correct)) per seed: "
             + " | ".join(f"{k} {np.round(v, 3).tolist()} mean acc {v[:, 0].mean():.3f}" for k, v in res.items())
             + f" | feature hidden_loss first/last {[(round(h[0], 3), round(h[-1], 3)) for h in hidden_rows]}")
    print(table)
    assert res["logit"][:, 0].mean() > res["sft"][:, 0].mean(), table
    assert all(np.isfinite(h).all() and h[-1] < h[0] for h in hidden_rows), table
