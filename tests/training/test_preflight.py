"""Memory preflight (issue 14 item 5): the estimate against the measured peak, the refusal and
its suggestions, --no-preflight, the device limit."""

import json

import numpy as np
import pytest

from mlx_distill import config, data

from mlx_distill.training import preflight, train
from mlx_distill.config import TrainConfig
from mlx_distill.io import InputError, read_jsonl

TOL = 0.30  # the bound: estimate within +-30% of the measured peak


def long_records(n, seed=0, repeat=10, start=0):
    """Records of nearly one length (~100-150 tokens with the tiny tokenizer): every batch is
    about the longest, so a few steps reach the run's true peak."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = int(rng.integers(10, 99)), int(rng.integers(10, 99))
        out.append({"id": f"p{start + i}", "question": f"Ann has {a} apples and buys {b} more. How many now?",
                    "reasoning": " ".join(f"{a} + {b} = {a + b}." for _ in range(repeat)), "answer": str(a + b)})
    return out


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for split, n, start in (("train", 16, 0), ("valid", 4, 100)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long_records(n, start, start=start)))
    return d


def cfg_for(model, corpus, out, **kw):
    base = dict(model=str(model), data=str(corpus), out=str(out), iters=4, batch_size=4, val_every=100,
                val_batches=1, report_every=1, save_every=1000, warmup=1, max_seq_length=512, lora_layers=8)
    base.update(kw)
    return config.build(TrainConfig, {}, base)


def run_measured(cfg, monkeypatch):
    """Train; return (the preflight's estimate, the run's measured peak from metrics.jsonl)."""
    seen = {}
    real = preflight.run

    def spy(*a, **k):
        seen["est"] = real(*a, **k)
        return seen["est"]

    monkeypatch.setattr(preflight, "run", spy)
    train.run(cfg, quiet=True)
    peak = max(r["peak_memory_gb"] for r in read_jsonl(cfg.out + "/metrics.jsonl") if "peak_memory_gb" in r)
    return seen["est"], peak * 1e9


# ----------------------------------------------------------------------------- pure parts
def test_batch_shapes_match_the_training_batches(tiny_model, corpus, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    cfg = cfg_for(tiny_model, corpus, tmp_path / "o", batch_size=3)
    ex = data.load_examples(cfg, tok, "train")
    stream = data.BatchStream(ex, 3, 0, data.pad_id_of(tok))
    want = set()
    for k in range(len(stream)):
        b = stream.at(k)
        arrays = data.trim_prompt(data.batch_arrays(b), b)
        want.add((len(b.ids), arrays["inputs"].shape[1], arrays["targets"].shape[1]))
    assert set(preflight.batch_shapes(ex, 3)) == want


def test_activation_formula_terms():
    dims = preflight.Dims(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=16, vocab=512)
    a = preflight.activation_bytes(dims, 2, 128, 64, 4, 4)
    # linear in the rows, grows with the trained blocks, with the logits positions; checkpointing saves
    assert preflight.activation_bytes(dims, 4, 128, 64, 4, 4) == pytest.approx(2 * a, rel=1e-6)
    assert preflight.activation_bytes(dims, 2, 128, 64, 2, 4) < a
    assert preflight.activation_bytes(dims, 2, 128, 128, 4, 4) - a == 3 * 2 * 64 * 512 * 4
    assert preflight.activation_bytes(dims, 2, 128, 64, 4, 4, grad_checkpoint=True) < a
    assert preflight.activation_bytes(dims, 2, 128, 64, 4, 4, kd_slots=8) > a


def test_estimate_counts_optimizer_kd_teacher_and_rollouts():
    dims = preflight.Dims(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=16, vocab=512)
    shapes = [(4, 127, 64), (4, 255, 200)]
    base = preflight.estimate(TrainConfig(lora_layers=2), dims, 10_000, 1_000, 4, shapes)
    assert base.parts["weights"] == 10_000 and base.parts["trainable+AdamW"] == 5_000  # param, 2 moments, 2 grads
    assert base.batch == (4, 255, 200)  # the worst batch, not the last
    acc = preflight.estimate(TrainConfig(lora_layers=2, grad_accumulation=4), dims, 10_000, 1_000, 4, shapes)
    assert acc.parts["trainable+AdamW"] == 6_000  # + the accumulated gradient
    kd = preflight.estimate(TrainConfig(lora_layers=2, kd_dir="x"), dims, 10_000, 1_000, 4, shapes, kd_slots=25,
                            kd_store=3_000)
    assert kd.parts["activations"] > base.parts["activations"] and kd.parts["KD store"] == 3_000
    online = preflight.estimate(TrainConfig(lora_layers=2, kd_teacher="t", on_policy_fraction=0.5,
                                            rollout_max_tokens=300), dims, 10_000, 1_000, 4, shapes, kd_slots=10,
                                teacher=7_000, teacher_dims=dims, prompt_max=40)
    assert online.parts["teacher weights"] == 7_000
    assert online.parts["rollout KV cache"] == 4 * (40 + 300) * 4 * 2 * 2 * 16 * 4
    assert online.batch == (4, 351, 300)  # a rollout batch: prompt + --rollout-max-tokens, padded to 16
    assert all(s in online.describe() for s in ("teacher weights", "rollout KV cache", "4 x 351 tokens"))


def test_dims_from_config_variants():
    d = preflight.Dims.from_config({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                                    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152})
    assert (d.head_dim, d.kv_heads, d.layers) == (64, 3, 30)
    nested = preflight.Dims.from_config({"text_config": {"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 10,
                                                         "num_attention_heads": 2}})
    assert (nested.hidden, nested.heads, nested.kv_heads, nested.intermediate) == (8, 2, 2, 32)


def test_device_limit_env_and_meminfo(monkeypatch):
    monkeypatch.setenv(preflight.LIMIT_ENV, "1.5")
    assert preflight.device_limit("mlx") == (1_500_000_000, f"{preflight.LIMIT_ENV}=1.5")
    monkeypatch.setenv(preflight.LIMIT_ENV, "lots")
    with pytest.raises(InputError, match=preflight.LIMIT_ENV):
        preflight.device_limit("mlx")
    monkeypatch.delenv(preflight.LIMIT_ENV)
    limit, source = preflight.device_limit("mlx")
    import mlx.core as mx

    if not mx.metal.is_available():  # Linux: MemAvailable (+ what this process holds)
        assert source.startswith("MemAvailable") and limit >= preflight.mem_available() > 0


def test_no_preflight_flag_parses():
    assert config.from_cli(TrainConfig, ["--no-preflight"], "t").preflight is False
    assert config.from_cli(TrainConfig, [], "t").preflight is True


# ----------------------------------------------------------------------------- refusal
def test_refuses_above_the_limit_with_suggestions_and_no_preflight_overrides(tiny_model, corpus, tmp_path,
                                                                             monkeypatch, capsys):
    monkeypatch.setenv(preflight.LIMIT_ENV, "0.000001")  # 1 kB: no run fits
    # lengths that vary, so a shorter --max-seq-length keeps most examples
    rows = [r for k in range(2, 10) for r in long_records(2, seed=k, repeat=k, start=10 * k)]
    (corpus / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_for(tiny_model, corpus, tmp_path / "refused", iters=1)
    with pytest.raises(InputError) as e:
        train.run(cfg, quiet=True)
    msg = str(e.value)
    assert "memory preflight" in msg and "exceeds the limit" in msg
    for flag in ("--batch-size 1 --grad-accumulation 4", "--grad-checkpoint (~", "--lora-layers 1 (~",
                 "--max-seq-length ", "--grad-checkpoint --batch-size 1", "still above", "--no-preflight"):
        assert flag in msg, (flag, msg)
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()  # refused before the first step

    cfg = cfg_for(tiny_model, corpus, tmp_path / "forced", iters=1, preflight=False)
    train.run(cfg, quiet=True)
    assert (tmp_path / "forced" / "adapters.safetensors").is_file()
    assert "--no-preflight: training anyway" in capsys.readouterr().err


def test_suggestions_pick_the_mildest_change_that_fits(tiny_model, corpus, tmp_path):
    from dataclasses import replace
    from types import SimpleNamespace

    from mlx_lm import load

    model, tok = load(str(tiny_model))
    backend = SimpleNamespace(name="mlx", model=model, model_path=str(tiny_model), num_layers=2)
    cfg = cfg_for(tiny_model, corpus, tmp_path / "o", batch_size=8)
    ex = data.load_examples(cfg, tok, "train")
    at = lambda **kw: preflight.for_run(replace(cfg, **kw), backend, ex).total  # noqa: E731
    assert at(batch_size=2) < at(batch_size=4) < at()
    limit = (at(batch_size=4, grad_accumulation=2) + at()) // 2  # batch 4 fits, 8 does not
    tips = preflight.suggestions(cfg, backend, ex, limit)
    assert tips[0].startswith("--batch-size 4 --grad-accumulation 2 (~") and "still above" not in tips[0], tips


# ----------------------------------------------------------------------------- estimate vs measured peak
@pytest.mark.parametrize("extra", [{}, {"grad_checkpoint": True}], ids=["plain", "grad-checkpoint"])
def test_estimate_within_30_percent_of_peak_tiny(tiny_model, corpus, tmp_path, monkeypatch, extra):
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    est, peak = run_measured(cfg_for(tiny_model, corpus, tmp_path / "run", **extra), monkeypatch)
    ratio = est.total / peak
    print(f"tiny {extra}: estimate {est.describe()} | measured peak {peak / 1e6:.1f} MB | ratio {ratio:.2f}")
    assert 1 - TOL <= ratio <= 1 + TOL, (est.describe(), peak)


@pytest.mark.slow
def test_estimate_within_30_percent_of_peak_smollm2(corpus, tmp_path, monkeypatch):
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    cfg = cfg_for("smollm2", corpus, tmp_path / "run", iters=2, batch_size=2, report_every=1)
    est, peak = run_measured(cfg, monkeypatch)
    ratio = est.total / peak
    above = (est.total - est.parts["weights"]) / max(peak - est.parts["weights"], 1)
    print(f"smollm2: estimate {est.describe()} | measured peak {peak / 1e9:.3f} GB | ratio {ratio:.2f} "
          f"| above the weights {above:.2f}")
    assert 1 - TOL <= ratio <= 1 + TOL, (est.describe(), peak)
