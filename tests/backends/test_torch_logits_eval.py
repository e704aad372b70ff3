"""`logits --backend torch` writes the MLX path's store (interchangeable both ways, KD trains on
either backend from either store); `eval --backend torch` answers as `--backend mlx`."""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mlx_distill.training import train  # noqa: E402
from mlx_distill.config import EvalConfig, LogitsConfig, TrainConfig  # noqa: E402
from mlx_distill.evaluation.evaluate import evaluate  # noqa: E402
from mlx_distill.io import read_jsonl  # noqa: E402
from mlx_distill.teacher.logits import extract  # noqa: E402
from mlx_distill.teacher.store import TopMStore  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(14):
        a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        rows.append({"id": f"k{i}", "question": f"What is {a} + {b}?", "reasoning": f"{a} + {b} = {a + b}.",
                     "answer": str(a + b)})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    return d


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_llama, corpus):
    root = tmp_path_factory.mktemp("logits")
    out = {}
    for backend in ("mlx", "torch"):
        cfg = LogitsConfig(teacher=str(tiny_llama), data=str(corpus), out=str(root / backend), top_m=8,
                           batch_size=3, backend=backend, max_seq_length=256,
                           store_format=2)  # float16 arrays, compared file to file below (format 3: test_logits)
        extract(cfg, quiet=True)
        out[backend] = root / backend
    return out


def test_torch_teacher_writes_the_same_store(stores):
    mm = json.loads((stores["mlx"] / "manifest.json").read_text())
    mt = json.loads((stores["torch"] / "manifest.json").read_text())
    for k in ("format", "top_m", "tokenizer", "teacher", "teacher_vocab_size", "dtype"):
        assert mm[k] == mt[k], k
    assert mm["examples"].keys() == mt["examples"].keys()
    assert (stores["mlx"] / "vocab.json").read_text() == (stores["torch"] / "vocab.json").read_text()
    from safetensors.numpy import load_file

    n = same = 0
    for sm, st in zip(mm["shards"], mt["shards"]):
        a, b = load_file(str(stores["mlx"] / sm["file"])), load_file(str(stores["torch"] / st["file"]))
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        # log-probs agree to float16 rounding; ids agree except where two logits tie that closely
        np.testing.assert_allclose(a["logprobs"].astype(np.float32), b["logprobs"].astype(np.float32), atol=4e-3)
        n, same = n + a["ids"].size, same + int((a["ids"] == b["ids"]).sum())
    assert same / n > 0.99


@pytest.mark.parametrize("student_backend,store", [("mlx", "torch"), ("torch", "mlx")])
def test_kd_training_across_backends_and_stores(tmp_path, tiny_model, corpus, stores, student_backend, store):
    """A store from either teacher backend trains a student on either backend (same tokenizer:
    exact alignment), with the KD loss logged apart from the SFT loss."""
    cfg = TrainConfig(model=str(tiny_model), data=str(corpus), out=str(tmp_path / "run"), backend=student_backend,
                      iters=2, batch_size=4, val_every=2, report_every=1, save_every=100, lora_layers=-1, lora_rank=4,
                      kd_dir=str(stores[store]), kd_top_k=6, max_seq_length=256, compile=False)
    s = train.run(cfg, quiet=True)
    assert s["last_iter"] == 2
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    assert rows and all(r["kd_loss"] > 0 and np.isfinite(r["kd_loss"]) for r in rows)
    assert TopMStore(stores[store]).m == 8


def test_parity_with_a_teacher_cache(tiny_model, corpus, stores):
    """The parity check with a real teacher cache (from the torch teacher) instead of a synthetic one."""
    from mlx_distill import data, parity
    from mlx_distill.training.kd import kd_setup

    cfg = TrainConfig(model=str(tiny_model), data=str(corpus), kd_dir=str(stores["torch"]), kd_top_k=6,
                      lora_layers=-1, lora_rank=4, max_seq_length=256, batch_size=4)
    mb, _ = parity.build_pair(cfg)
    ex = {s: data.load_examples(cfg, mb.tokenizer, s) for s in ("train", "valid")}
    res = parity.run_parity(cfg, steps=1, kd_store=kd_setup(cfg, ex, mb.tokenizer))
    res.pop("_info")
    assert "kd loss (teacher cache)" in res
    for name, err in res.items():
        assert err <= (1e-4 if "grads" in name or "weights" in name else 1e-5), (name, err)


def test_eval_torch_backend_matches_mlx(tmp_path, tiny_model, shared_data):
    cfg = EvalConfig(model=str(tiny_model), dataset="gsm8k", limit=3, max_tokens=24, plot=False,
                     out=str(tmp_path / "mlx"))
    sm = evaluate(cfg, quiet=True)
    st = evaluate(dataclasses.replace(cfg, backend="torch", out=str(tmp_path / "torch")), quiet=True)
    rm, rt = read_jsonl(tmp_path / "mlx" / "records.jsonl"), read_jsonl(tmp_path / "torch" / "records.jsonl")
    assert [(r["id"], r["response"], r["tokens"], r["finish_reason"]) for r in rm] == \
           [(r["id"], r["response"], r["tokens"], r["finish_reason"]) for r in rt]
    assert st["backend"] == "torch" and st["accuracy"] == sm["accuracy"]
    assert st["parameters"] == sm["parameters"]
