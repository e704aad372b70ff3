"""Top-K KD in `train`: a KD run lowers the KD loss; distillation transfers on a toy task."""

import json

import numpy as np
import pytest

from mlx_distill import train
from mlx_distill.config import LogitsConfig, TrainConfig, build
from mlx_distill.io import InputError, read_jsonl
from mlx_distill.logits import extract
from mlx_distill.paths import REPO

TEMPLATE = str(REPO / "prompts" / "train_user.txt")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arith(n, seed=0, start=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        out.append({"id": f"a{start + i}", "question": f"What is {a} + {b}?",
                    "reasoning": f"{a} + {b} = {a + b}.", "answer": str(a + b)})
    return out


@pytest.fixture(scope="module")
def kd_corpus(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("kdc")
    (d / "corpus").mkdir()
    write_jsonl(d / "corpus" / "train.jsonl", arith(24))
    write_jsonl(d / "corpus" / "valid.jsonl", arith(6, seed=1, start=100))
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
    write_jsonl(other / "train.jsonl", arith(24, seed=7, start=500))
    write_jsonl(other / "valid.jsonl", arith(6, seed=1, start=100))
    with pytest.raises(InputError, match="cover 0.0%"):
        train.run(kd_cfg(tiny_llama, kd_corpus, tmp_path / "o", data=str(other)), quiet=True)
