"""torch backend == MLX backend on tiny models (CPU, float32): schedule, logits, losses,
LoRA/DoRA gradients, 5 optimiser steps through `train_step`, and `train.run --backend torch`
producing a run folder that mlx-lm loads (and the MLX backend resumes)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import mlx.core as mx  # noqa: E402

from mlx_distill import data, parity

from mlx_distill.training import train  # noqa: E402

from mlx_distill.training import objectives
from mlx_distill.backends.mlx import MLXBackend  # noqa: E402
from mlx_distill.backends.torch import TorchBackend, lr_at  # noqa: E402
from mlx_distill.config import TrainConfig, build  # noqa: E402
from mlx_distill.io import read_jsonl  # noqa: E402

from helpers import arith_records, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_jsonl(d / "train.jsonl", arith_records(24))
    write_jsonl(d / "valid.jsonl", arith_records(4, seed=1, start=100))
    return d


def cfg_for(model, corpus, out="unused", **kw):
    base = dict(model=str(model), data=str(corpus), out=str(out), iters=8, batch_size=4, val_every=4,
                report_every=2, save_every=4, learning_rate=3e-3, warmup=2, max_seq_length=256, lora_layers=-1,
                lora_rank=4, compile=False)
    base.update(kw)
    return build(TrainConfig, base)


def test_schedule_is_mlx_schedule():
    for kw in (dict(lr_schedule="cosine", warmup=3), dict(lr_schedule="linear", warmup=0), dict(warmup=1),
               dict(lr_schedule="constant", warmup=2), dict(lr_schedule="cosine", warmup=0, min_lr_ratio=0.0)):
        cfg = TrainConfig(iters=12, learning_rate=2e-3, **kw)
        sched = MLXBackend(cfg).schedule()
        for s in range(15):
            assert lr_at(cfg, s) == pytest.approx(float(sched(mx.array(s)).item()), rel=1e-5), (kw, s)  # MLX: float32


@pytest.mark.parametrize("model_fixture,ftype,extra", [
    ("tiny_model", "lora", {}),
    ("tiny_llama", "dora", {"lora_keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}),
])
def test_logits_losses_and_gradients_agree(request, corpus, model_fixture, ftype, extra):
    """Relative differences: logits/SFT/KD <= 1e-5, LoRA gradients <= 1e-4 (`parity.run_parity`)."""
    model = request.getfixturevalue(model_fixture)
    for tail in (False, True):
        cfg = cfg_for(model, corpus, fine_tune_type=ftype, kd_tail=tail, kd_top_k=8, lora_layers=1, **extra)
        res = parity.run_parity(cfg, steps=0)
        info = res.pop("_info")
        assert info["trainable"] > 0
        for name, err in res.items():
            tol = 1e-4 if "grads" in name else 1e-5
            assert err <= tol, (name, err, tail)


def _pair(cfg):
    mb, tb = parity.build_pair(cfg)
    mb.prepare()
    tb.prepare()
    parity.share_adapter(mb, tb, seed=1)
    for b in (mb, tb):
        b.init_optimizer()
    return mb, tb


def test_five_optimizer_steps_through_train_step(tiny_model, corpus):
    """Different batches each step, grad accumulation 2, clipping active, SFT + KD: the
    adapters stay within 1e-4 and every reported number agrees."""
    cfg = cfg_for(tiny_model, corpus, grad_accumulation=2, max_grad_norm=0.05, learning_rate=2e-3, warmup=2,
                  iters=5, batch_size=3, kd_top_k=6, kd_alpha=0.5)
    mb, tb = _pair(cfg)
    ex = data.load_examples(cfg, mb.tokenizer, "train")
    stream = data.BatchStream(ex, cfg.batch_size, cfg.seed, data.pad_id_of(mb.tokenizer))
    rng = np.random.default_rng(0)
    batches = []
    for k in range(5 * cfg.grad_accumulation):
        arrays = data.batch_arrays(stream.at(k))
        logits = rng.normal(0, 2, (*arrays["inputs"].shape, 512)).astype(np.float32)
        arrays["kd_ids"], arrays["kd_logits"] = parity.synthetic_teacher(logits, cfg.kd_top_k, k)
        arrays["kd_alpha"] = np.array(cfg.kd_alpha, np.float32)
        batches.append(arrays)
    for b in (mb, tb):
        b.build_step(objectives.kd_objective(b.forward, cfg))
        b.train_mode(True)
    w0 = {k: np.array(v) for k, v in mb.adapter_weights().items()}
    for i, arrays in enumerate(batches):
        update = i % cfg.grad_accumulation == cfg.grad_accumulation - 1
        rm, rt = mb.train_step(arrays, update), tb.train_step(arrays, update)
        assert rt["ntokens"] == rm["ntokens"]
        for k in ("loss_sum", "sft_loss", "kd_loss"):
            assert rt[k] == pytest.approx(rm[k], rel=1e-5), k
        if update:
            assert tb.learning_rate() == pytest.approx(mb.learning_rate(), rel=1e-6)
    wm = {k: np.array(v) for k, v in mb.adapter_weights().items()}
    wt = {k: v.numpy() for k, v in tb.adapter_weights().items()}
    moved = max(np.abs(wm[k] - w0[k]).max() for k in wm)
    assert moved > 1e-3  # the steps did something
    assert max(np.abs(wm[k] - wt[k]).max() for k in wm) < 1e-4
    # AdamW moments too (same names and layouts in both checkpoints)
    from mlx.utils import tree_flatten

    om = dict(tree_flatten(mb.optimizer.state))
    assert int(om["step"].item()) == tb.opt_step == 5
    for n, (m, v) in tb.opt_state.items():
        t = n.endswith((".lora_a", ".lora_b"))
        np.testing.assert_allclose((m.T if t else m).numpy(), np.array(om[f"{n}.m"]), atol=1e-6, rtol=1e-4)


def test_full_fine_tuning_steps_agree(tiny_model, corpus):
    cfg = cfg_for(tiny_model, corpus, fine_tune_type="full", lora_layers=1, iters=3, learning_rate=1e-3)
    mb, tb = _pair(cfg)
    assert mb.parameter_counts() == tb.parameter_counts()
    arrays = data.batch_arrays(data.BatchStream(data.load_examples(cfg, mb.tokenizer, "train"), 4, 0,
                                                data.pad_id_of(mb.tokenizer)).at(0))
    for b in (mb, tb):
        b.build_step(objectives.sft_objective(b.forward))
        b.train_mode(True)
    for _ in range(3):
        mb.train_step(arrays, True)
        tb.train_step(arrays, True)
    wm = {k: np.array(v) for k, v in mb.adapter_weights().items()}
    wt = {k: v.numpy() for k, v in tb.adapter_weights().items()}
    assert set(wm) == set(wt)
    assert max(np.abs(wm[k] - wt[k]).max() for k in wm) < 1e-4


def test_train_run_torch_folder_loads_in_mlx_lm(tiny_model, corpus, tmp_path):
    from mlx_lm import load

    out = tmp_path / "run"
    cfg = cfg_for(tiny_model, corpus, out, backend="torch", iters=4, save_every=2, val_every=2)
    summary = train.run(cfg, quiet=True)
    assert summary["last_iter"] == 4
    man = json.loads((out / "manifest.json").read_text())
    assert man["backend"] == "torch"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert all(np.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["num_layers"] == 2 and acfg["lora_parameters"]["rank"] == 4

    # mlx-lm loads the adapter as it is, and gives the torch model's logits
    model, tok = load(str(tiny_model), adapter_path=str(out))
    tb = TorchBackend(cfg, device="cpu")
    tb.load()
    tb.prepare()
    tb.set_adapter_weights({k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()})
    x = np.array([tok.encode("What is 3 + 4?")], dtype=np.int32)
    with torch.no_grad():
        lt = tb.forward(tb.model, torch.from_numpy(x).long()).numpy()
    lm = np.array(model(mx.array(x)))
    assert np.abs(lm - lt).max() / np.abs(lm).max() < 1e-5


def test_checkpoint_from_torch_resumes_on_mlx_on_the_same_curve(tiny_model, corpus, tmp_path, monkeypatch):
    """Checkpoints hold MLX's names and layouts: torch for 4 steps, interrupted, then MLX to
    step 6 reports what an uninterrupted torch run reports."""
    whole = cfg_for(tiny_model, corpus, tmp_path / "whole", backend="torch", iters=6, save_every=2, val_every=2)
    train.run(whole, quiet=True)

    out = tmp_path / "split"
    real_step = TorchBackend.train_step

    def interrupt_at_step_5(self, arrays, update, micro=0):
        if micro == 4:
            raise KeyboardInterrupt
        return real_step(self, arrays, update, micro=micro)

    monkeypatch.setattr(TorchBackend, "train_step", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg_for(tiny_model, corpus, out, backend="torch", iters=6, save_every=2, val_every=2), quiet=True)
    assert json.loads((out / "checkpoints" / "last" / "state.json").read_text())["step"] == 4
    s = train.run(cfg_for(tiny_model, corpus, out, backend="mlx", iters=6, save_every=2, val_every=2,
                          resume=True), quiet=True)
    assert s["last_iter"] == 6
    a, b = read_jsonl(tmp_path / "whole" / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("train_loss", "val_loss", "learning_rate"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4), (ra["iter"], k)
