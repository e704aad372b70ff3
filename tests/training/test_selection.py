"""--select-by accuracy: gold answers per record format, the kept adapter is the most accurate
one (not the lowest-loss one), patience counts accuracy validations, generation uses the live
model with its current adapter, and the CLI writes the promised fields."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlx_distill.training import selection, train
from mlx_distill.config import TrainConfig, build
from mlx_distill.io import InputError, read_jsonl

from helpers import arith_corpus, write_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return arith_corpus(tmp_path_factory.mktemp("corpus"))


def cfg_for(model, corpus, out, **kw):
    base = dict(model=str(model), data=str(corpus), out=str(out), iters=12, batch_size=4, val_every=2,
                report_every=2, save_every=100, learning_rate=3e-3, warmup=2, max_seq_length=256, lora_layers=-1,
                select_by="accuracy", val_accuracy_n=4, val_max_tokens=8, patience=0)
    base.update(kw)
    return build(TrainConfig, base)


def test_gold_answer_and_kind_per_record_format():
    assert selection.gold_of({"question": "q", "answer": "12"}) == ("12", "gsm8k")
    assert selection.gold_of({"question": "q", "answer": "\\frac12", "answer_format": "boxed"}) == ("\\frac12", "math")
    assert selection.gold_of({"prompt": "p", "completion": "so 3 + 4 = 7\n#### 7"}) == ("7", "gsm8k")
    # the last marker wins, whichever it is
    assert selection.gold_of({"prompt": "p", "completion": "#### 1\nno: $\\boxed{2}$"}) == ("2", "math")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>#### 9</think>\\boxed{x^2}"}]
    assert selection.gold_of({"messages": msgs}) == ("x^2", "math")  # graded on the text after </think>
    assert selection.gold_of({"prompt": "p", "completion": "seven"}) is None


def test_kept_adapter_is_the_most_accurate_not_the_lowest_loss(tiny_model, corpus, tmp_path, monkeypatch):
    """Accuracy is injected at the selection seam (`AccuracyValidator.__call__`): it peaks early
    while the loss keeps falling. The kept adapter is the one of the accuracy peak (the lower
    loss of the tied iterations), byte for byte, and the manifest names it."""
    acc = {0: 0.0, 4: 0.5, 8: 0.5, 12: 0.25}
    snapshots = {}

    def fake(self, backend, step):
        assert not backend.model.training  # generation runs without dropout
        snapshots[step] = {k: np.array(v) for k, v in backend.adapter_weights().items()}
        return {"val_accuracy": acc[step], "val_accuracy_n": 4, "val_invalid": 0.0, "val_mean_words": 1.0,
                "val_accuracy_seconds": 0.0}

    monkeypatch.setattr(selection.AccuracyValidator, "__call__", fake)
    out = tmp_path / "run"
    s = train.run(cfg_for(tiny_model, corpus, out, val_accuracy_every=4), quiet=True)
    rows = read_jsonl(out / "metrics.jsonl")
    loss = {r["iter"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(loss) == [0, 2, 4, 6, 8, 10, 12] and sorted(snapshots) == [0, 4, 8, 12]
    assert [r["iter"] for r in rows if "val_accuracy" in r] == [0, 4, 8, 12]  # aligned with val_every
    want = 4 if loss[4] < loss[8] else 8
    assert min(loss, key=loss.get) not in (want, 0)  # loss and accuracy disagree here
    assert s["best_iter"] == want and s["best_value"] == 0.5 and s["select_by"] == "accuracy"
    man = json.loads((out / "manifest.json").read_text())
    assert man["selection"]["criterion"] == "accuracy" and man["selection"]["best_iter"] == want
    assert man["selection"]["best_value"] == 0.5 and man["status"] == "finished"
    import mlx.core as mx

    kept = mx.load(str(out / "adapters.safetensors"))
    for k, v in snapshots[want].items():
        assert np.array_equal(np.array(kept[k]), v), k

    # patience counts accuracy validations only (loss-only ones at 2, 6, 10 do not count)
    acc.clear()
    acc.update({0: 0.0, 4: 0.5, 8: 0.25, 12: 0.25, 16: 1.0, 20: 1.0})
    s = train.run(cfg_for(tiny_model, corpus, tmp_path / "p", iters=20, val_accuracy_every=4, patience=2),
                  quiet=True)
    assert s["last_iter"] == 12 and s["stop_reason"].startswith("early stop: no accuracy improvement for 2")


def test_generation_uses_the_live_model_and_its_current_adapter(tiny_model, corpus, tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from mlx_distill.backends.mlx import MLXBackend

    cfg = cfg_for(tiny_model, corpus, tmp_path / "o")
    be = MLXBackend(cfg)
    be.load()
    be.prepare()
    mx.random.seed(3)  # a non-zero adapter, so that it changes the generations
    weights = {k: mx.random.normal(v.shape) * 0.5 for k, v in tree_flatten(be.model.trainable_parameters())}
    be.model.load_weights(list(weights.items()), strict=False)
    be.model.eval()
    prompts = [be.tokenizer.encode("What is 3 + 4?"), be.tokenizer.encode("12 + 30 =")]
    got = be.generate(prompts, 10)
    # the same adapter through mlx-lm's own loader and its one-sequence greedy loop
    be.save_adapter(tmp_path / "o")
    (tmp_path / "o" / "adapter_config.json").write_text(json.dumps(be.adapter_config()))
    ref_model, tok = load(str(tiny_model), adapter_path=str(tmp_path / "o"))
    base_model, _ = load(str(tiny_model))

    def greedy(model, p):
        out = []
        for t, _ in generate_step(mx.array(p), model, max_tokens=10):
            if t in tok.eos_token_ids:
                break
            out.append(int(t))
        return out

    assert got == [greedy(ref_model, p) for p in prompts]
    assert got != [greedy(base_model, p) for p in prompts]  # the adapter mattered


def test_records_without_gold_are_refused(tiny_model, tmp_path):
    d = tmp_path / "pc"
    d.mkdir()
    rows = [{"id": f"p{i}", "prompt": f"say {i}", "completion": f"number {i}"} for i in range(8)]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "valid.jsonl", rows[:4])
    with pytest.raises(InputError, match=r"valid\.jsonl:\d: --select-by accuracy needs a gold answer.*--select-by loss"):
        train.run(cfg_for(tiny_model, d, tmp_path / "run"), quiet=True)
    with pytest.raises(InputError, match="--val-accuracy-every 3 must be a multiple of --val-every 2"):
        train.run(cfg_for(tiny_model, d, tmp_path / "run", val_accuracy_every=3), quiet=True)


def test_cli_select_by_accuracy_writes_the_promised_fields(tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "mlx_distill", "train", "--model", str(tiny_model), "--data", str(corpus),
                        "--out", str(out), "--select-by", "accuracy", "--val-accuracy-every", "10",
                        "--val-accuracy-n", "32", "--val-max-tokens", "16", "--iters", "20", "--val-every", "5",
                        "--max-seq-length", "256", "--learning-rate", "3e-3"],
                       env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "val_accuracy" in r]
    assert [r["iter"] for r in rows] == [0, 10, 20]
    for r in rows:
        assert r["val_accuracy_n"] == 8  # the whole (8-problem) validation split
        assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["val_invalid"] <= 1 and r["val_mean_words"] >= 0
        assert r["val_accuracy_seconds"] > 0 and r["val_loss_seconds"] > 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["selection"]["criterion"] == "accuracy" and man["selection"]["best_iter"] in (0, 10, 20)
    assert man["selection"]["best_value"] == max(r["val_accuracy"] for r in rows)
    assert len(man["validation"]["accuracy_ids"]) == 8 and len(man["validation"]["ids"]) == 8


def test_torch_backend_selects_by_accuracy(tiny_model, corpus, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    s = train.run(cfg_for(tiny_model, corpus, tmp_path / "t", backend="torch", iters=4, val_every=2, compile=False),
                  quiet=True)
    rows = [r for r in read_jsonl(tmp_path / "t" / "metrics.jsonl") if "val_accuracy" in r]
    assert [r["iter"] for r in rows] == [0, 2, 4] and all(r["val_accuracy_n"] == 4 for r in rows)
    assert s["select_by"] == "accuracy" and s["best_iter"] in (0, 2, 4)
