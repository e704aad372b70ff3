"""Stage 1: data rendering/masking, malformed input, early stopping, resume, adapter round trip."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_distill import data
from mlx_distill.config import ConfigError, TrainConfig, build
from mlx_distill.io import InputError, read_jsonl

from helpers import arith_records, write_jsonl


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "train.jsonl", arith_records(48))
    write_jsonl(d / "valid.jsonl", arith_records(8, seed=1, start=1000))
    return d


def cfg_for(model, corpus, out, **kw):
    base = dict(model=str(model), data=str(corpus), out=str(out), iters=12, batch_size=4, val_every=4,
                report_every=2, save_every=4, learning_rate=3e-3, warmup=2, max_seq_length=256, lora_layers=-1)
    base.update(kw)
    return build(TrainConfig, base)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from mlx_lm import load

    return load(str(tiny_model))[1]


# ----------------------------------------------------------------------------- data
def test_prompt_mask_exact_positions(tok, tmp_path, corpus):
    cfg = cfg_for("x", corpus, tmp_path / "o")
    ex = data.load_examples(cfg, tok, "train")[0]
    rec = read_jsonl(corpus / "train.jsonl")[0]
    template = Path("prompts/train_user.txt").read_text()
    msgs = data.record_to_messages(rec, template)
    prompt_ids = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_dict=False)
    assert ex.prompt_len == len(prompt_ids)
    assert list(ex.tokens[: ex.prompt_len]) == list(prompt_ids)
    completion = tok.decode(list(ex.tokens[ex.prompt_len:]))
    assert completion.startswith(rec["reasoning"])
    assert "#### " + rec["answer"] in completion and completion.rstrip().endswith("<|im_end|>")
    # the loss mask covers exactly the completion tokens (targets t+1 >= prompt_len)
    b = data.collate([ex], [0], pad_id=0)
    m = data.loss_mask(b)[0]
    on = np.nonzero(m)[0]
    assert on[0] == ex.prompt_len - 1 and on[-1] == len(ex.tokens) - 2
    assert m.sum() == len(ex.tokens) - ex.prompt_len
    assert b.tokens[0, 1:][on].tolist() == ex.tokens[ex.prompt_len:].tolist()


def test_record_formats(tok):
    t = "{question}\n\n{format_instruction}"
    chat = data.record_to_messages({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, t)
    assert chat[-1]["content"] == "a"
    boxed = data.record_to_messages({"question": "q", "reasoning": "r", "answer": "5", "answer_format": "boxed"}, t)
    assert boxed[-1]["content"].endswith("$\\boxed{5}$.")
    think = data.record_to_messages({"question": "q", "reasoning": "", "thinking": "hmm", "answer": "5"}, t)
    assert think[-1]["content"].startswith("<think>\nhmm\n</think>") and think[-1]["content"].endswith("#### 5")
    # an answer-only record (empty reasoning) trains just the marker line
    assert data.record_to_messages({"question": "q", "reasoning": "", "answer": "7"}, t)[-1]["content"] == "#### 7"
    # reasoning that already carries the marker is not marked twice
    assert data.record_to_messages({"question": "q", "reasoning": "x\n#### 7", "answer": "7"}, t)[-1]["content"].count("####") == 1


def test_long_examples_skipped_and_reported_or_rejected(tok, tmp_path):
    rows = arith_records(6)
    rows[2]["reasoning"] = "1 + 1 = 2. " * 200
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    rep = data.LoadReport(path="")
    cfg = cfg_for("x", f, tmp_path / "o", val_fraction=0.0, max_seq_length=128)
    ex = data.load_examples(cfg, tok, "train", rep)
    assert rep.skipped_long == 1 and len(ex) == 5 and "a2" not in {e.id for e in ex}
    assert all(len(e.tokens) <= 128 for e in ex)
    cfg = cfg_for("x", f, tmp_path / "o", val_fraction=0.0, max_seq_length=128, long_examples="error")
    with pytest.raises(InputError, match=r"d\.jsonl:3: example 'a2' has \d+ tokens > --max-seq-length 128"):
        data.load_examples(cfg, tok, "train")


@pytest.mark.parametrize("content,msg", [
    ('{"id": "x", "question": "q", "answer": "1"}\n{"id": "y", "question": \n', r"bad\.jsonl:2: not valid JSON"),
    ('{"id": "x", "question": "q"}\n', r"bad\.jsonl:1: missing field\(s\) \['answer'\]"),
    ("", r"bad\.jsonl: no records \(empty file\)"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "q"}]}\n', r"bad\.jsonl:1: the last message must be the assistant"),
])
def test_malformed_input_names_file_and_line(tok, tmp_path, content, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    cfg = cfg_for("x", f, tmp_path / "o", val_fraction=0.0)
    with pytest.raises(InputError, match=msg):
        data.load_examples(cfg, tok, "train")


def test_batches_grouped_by_length_and_deterministic(tok, corpus, tmp_path):
    cfg = cfg_for("x", corpus, tmp_path / "o")
    ex = data.load_examples(cfg, tok, "train")
    s1, s2 = data.BatchStream(ex, 4, 0, 0), data.BatchStream(ex, 4, 0, 0)
    for k in range(2 * len(s1)):
        b1, b2 = s1.at(k), s2.at(k)
        assert b1.ids == b2.ids and np.array_equal(b1.tokens, b2.tokens)
    # length bucketing: padding is far below what a random grouping gives
    pad = sum(b.tokens.size - b.lengths.sum() for b in (s1.at(k) for k in range(len(s1))))
    assert pad / sum(len(e.tokens) for e in ex) < 0.5
    assert sorted(i for k in range(len(s1)) for i in s1.at(k).ids) == sorted(e.id for e in ex)


def test_validation_subset_spreads_over_lengths():
    import random

    ex = [data.Example(f"e{i}", np.zeros(10 + i, np.int32), 2) for i in range(100)]  # lengths 10..109
    idx = data.spread_subset(ex, 10)
    assert sorted((len(ex[i].tokens) - 10) // 10 for i in idx) == list(range(10))  # one per length decile
    shuffled = ex[:]
    random.Random(0).shuffle(shuffled)  # fixed by ids and lengths, not by the file order
    assert sorted(ex[i].id for i in idx) == sorted(shuffled[i].id for i in data.spread_subset(shuffled, 10))
    assert len(data.spread_subset(ex, 0)) == len(data.spread_subset(ex, 500)) == 100
    sub = [e for b in data.eval_batches(ex, 4, 0, limit=3) for e in b.ids]
    lengths = sorted(int(e[1:]) + 10 for e in sub)
    assert len(sub) == 12 and lengths[0] < 20 and lengths[-1] > 100  # not the 12 shortest
    assert sum(len(b.ids) for b in data.eval_batches(ex, 4, 0, limit=-1)) == 100
    # the default validates every example of a split of up to 256, at any batch size
    assert TrainConfig().val_batches * 1 >= 256


def test_yaml_below_flags(tmp_path):
    import argparse

    from mlx_distill import config

    y = tmp_path / "c.yaml"
    y.write_text("iters: 50\nlearning_rate: 1e-3\nkd:\n  alpha: 0.5\n")
    p = argparse.ArgumentParser()
    config.add_arguments(p, TrainConfig)
    cfg = config.resolve(TrainConfig, p.parse_args(["-c", str(y), "--iters", "7"]))
    assert cfg.iters == 7 and cfg.learning_rate == 1e-3 and cfg.kd_alpha == 0.5 and cfg.batch_size == 4
    y.write_text("iterz: 5\n")
    with pytest.raises(ConfigError, match="c.yaml: unknown option"):
        config.resolve(TrainConfig, p.parse_args(["-c", str(y)]))


# ----------------------------------------------------------------------------- training
def test_early_stopping_keeps_best_adapter(tiny_model, corpus, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    from mlx_distill.training.train import run

    # a large learning rate over-fits / diverges quickly, so validation loss turns up
    cfg = cfg_for(tiny_model, corpus, tmp_path / "run", iters=60, val_every=2, patience=3, learning_rate=5e-2,
                  warmup=0, lr_schedule="constant")
    res = run(cfg, quiet=True)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    vals = {r["iter"]: r["val_loss"] for r in rows}
    best = min(vals, key=vals.get)
    assert res["best_iter"] == best and res["best_val_loss"] == pytest.approx(vals[best])
    assert res["stop_reason"].startswith("early stop") and res["last_iter"] < 60
    assert res["last_iter"] == max(vals) and sum(1 for i in vals if i > best) == 3
    # the kept adapter is the best one: reloading it reproduces the best validation loss
    model, tok = load(str(tiny_model), adapter_path=str(tmp_path / "run"))
    cfg2 = cfg_for(tiny_model, corpus, tmp_path / "x")
    val = data.load_examples(cfg2, tok, "valid")
    from mlx_distill.training.losses import sft_loss

    tot = n = 0.0
    for b in data.eval_batches(val, cfg.batch_size, data.pad_id_of(tok)):
        a = data.batch_arrays(b)
        s, k = sft_loss(model(mx.array(a["inputs"])), mx.array(a["targets"]), mx.array(a["mask"]))
        tot, n = tot + s.item(), n + k.item()
    assert tot / n == pytest.approx(vals[best], rel=1e-4)


def test_adapter_loads_in_mlx_lm_with_same_logits(tiny_model, corpus, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    from mlx_distill.backends.mlx import MLXBackend
    from mlx_distill.training.train import run

    cfg = cfg_for(tiny_model, corpus, tmp_path / "run", iters=6, lora_dropout=0.0, patience=0)
    run(cfg, quiet=True)
    cfgd = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfgd["fine_tune_type"] == "lora" and cfgd["lora_parameters"]["rank"] == 8
    # the trainer's model with the best adapter vs mlx-lm's own loader
    be = MLXBackend(cfg)
    model, _ = be.load()
    be.prepare()
    model.load_weights(str(tmp_path / "run" / "adapters.safetensors"), strict=False)
    model.eval()
    ref, _ = load(str(tiny_model), adapter_path=str(tmp_path / "run"))
    x = mx.array([[1, 5, 9, 30, 42, 7]])
    assert np.abs(np.array(model(x)) - np.array(ref(x))).max() < 1e-5
    # and the adapter changed the model
    base, _ = load(str(tiny_model))
    assert np.abs(np.array(base(x)) - np.array(ref(x))).max() > 1e-4


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_fine_tuning(tiny_model, corpus, tmp_path, kind):
    from mlx_lm import load

    from mlx_distill.training.train import run

    res = run(cfg_for(tiny_model, corpus, tmp_path / kind, iters=4, val_every=2, fine_tune_type=kind,
                      learning_rate=1e-3), quiet=True)
    rows = read_jsonl(tmp_path / kind / "metrics.jsonl")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and res["best_iter"] > 0
    load(str(tiny_model), adapter_path=str(tmp_path / kind))  # mlx-lm accepts the folder


def test_qlora_on_quantized_base(tiny_model, corpus, tmp_path):
    from mlx_lm import convert

    from mlx_distill.training.train import run

    q = tmp_path / "q4"
    convert(str(tiny_model), mlx_path=str(q), quantize=True, q_bits=4, q_group_size=32)
    res = run(cfg_for(q, corpus, tmp_path / "run", iters=4, val_every=2, grad_accumulation=2,
                      grad_checkpoint=True), quiet=True)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert res["best_iter"] > 0 and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert all(k in rows[-1] for k in ("train_loss", "learning_rate", "tokens_per_sec", "trained_tokens", "peak_memory_gb"))


def test_refuses_to_overwrite_and_checks_resume_config(tiny_model, corpus, tmp_path):
    from mlx_distill.training.train import run

    run(cfg_for(tiny_model, corpus, tmp_path / "run", iters=2, val_every=2), quiet=True)
    with pytest.raises(InputError, match="already holds a run"):
        run(cfg_for(tiny_model, corpus, tmp_path / "run", iters=2), quiet=True)
    with pytest.raises(InputError, match="changed option.*batch_size"):
        run(cfg_for(tiny_model, corpus, tmp_path / "run", iters=2, val_every=2, batch_size=2, resume=True), quiet=True)


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "mlx_distill", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_sigkill_continues_the_same_curve(tiny_model, corpus, tmp_path):
    """SIGKILL at any moment (with gradient accumulation 2, so also between micro-batches):
    the resumed run reports what the uninterrupted one reports."""
    common = ["--model", str(tiny_model), "--data", str(corpus), "--iters", "40", "--batch-size", "4",
              "--grad-accumulation", "2",
              "--val-every", "8", "--report-every", "1", "--save-every", "4", "--learning-rate", "3e-3",
              "--lora-dropout", "0.1", "--lora-layers", "-1", "--max-seq-length", "256", "--patience", "0"]
    ref = _cli(common + ["--out", str(tmp_path / "ref")])
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    # kill a second run after its checkpoint at iter 8 and before the end
    p = _cli(common + ["--out", str(tmp_path / "cut")])
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        rows = read_jsonl(metrics, tolerate_torn_tail=True) if metrics.exists() else []
        if rows and rows[-1]["iter"] >= 10:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert read_jsonl(metrics, tolerate_torn_tail=True)[-1]["iter"] < 40
    r = _cli(common + ["--out", str(tmp_path / "cut"), "--resume"])
    assert r.wait(timeout=300) == 0, r.stdout.read()
    a = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    b = read_jsonl(metrics)
    assert [x["iter"] for x in a] == [x["iter"] for x in b]
    for x, y in zip(a, b):
        for k in ("train_loss", "val_loss", "learning_rate", "trained_tokens"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["iter"], k)


def test_trimmed_prompt_positions_give_the_same_loss(tiny_model, corpus, tmp_path):
    """Logits only at trained positions (the vocabulary projection skips the shared prompt)."""

    from mlx_distill.backends.mlx import MLXBackend
    from mlx_distill.training.objectives import sft_objective

    cfg = cfg_for(tiny_model, corpus, tmp_path / "o")
    be = MLXBackend(cfg)
    _, tok = be.load()
    be.prepare()
    assert be._head is not None  # qwen2: logits == lm_head(model.model(x)), verified numerically
    ex = data.load_examples(cfg, tok, "train")
    b = data.collate(ex, list(range(4)), data.pad_id_of(tok))
    full = data.batch_arrays(b)
    trimmed = data.trim_prompt(full, b)
    assert trimmed["targets"].shape[1] < full["targets"].shape[1]  # prompts here are > 16 tokens
    assert trimmed["mask"].sum() == full["mask"].sum()
    obj = sft_objective(be.forward)
    s_full, n_full, _ = obj(be.model, be.to_arrays(full))
    s_trim, n_trim, _ = obj(be.model, be.to_arrays(trimmed))
    assert n_full.item() == n_trim.item() and abs(s_full.item() - s_trim.item()) < 1e-4 * abs(s_full.item())


def test_progress_line_while_the_model_loads_off_a_terminal(tiny_model, corpus, tmp_path, monkeypatch, capsys):
    """Off a terminal `train` prints a progress line at least every MLX_DISTILL_PROGRESS_EVERY
    seconds (README: 10 s), also while nothing else prints: here a model load that does not
    return until such a line has been printed (no timing assumed: it waits for the line)."""
    import threading

    from mlx_distill import progress
    from mlx_distill.backends.mlx import MLXBackend
    from mlx_distill.training.train import run

    monkeypatch.setenv("MLX_DISTILL_PROGRESS_EVERY", "0.05")
    printed = threading.Event()
    real_line, real_load = progress.Heartbeat.line, MLXBackend.load

    def line(self):
        text = real_line(self)
        if "phase loading the model" in text:
            printed.set()
        return text

    def slow_load(self):
        assert printed.wait(timeout=300), "no progress line while the model loaded"
        return real_load(self)

    monkeypatch.setattr(progress.Heartbeat, "line", line)
    monkeypatch.setattr(MLXBackend, "load", slow_load)
    run(cfg_for(tiny_model, corpus, tmp_path / "run", iters=2, val_every=2), quiet=False)
    out = capsys.readouterr().out
    beats = [x for x in out.splitlines() if x.startswith("train: ")]
    assert any("phase loading the model" in x for x in beats), out
    assert all(" steps" in x and "elapsed" in x for x in beats), beats
    assert "finished 2 iterations" in out
