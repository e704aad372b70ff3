"""Gemma-3-270M in training (issue 20, items 2 and 4): QLoRA on the real 4-bit base (the adapter
works with `mlx_lm generate`), the memory preflight against the measured peak at batch 4 x 256
tokens, and real cross-family KD both ways between SmolLM2 (49,152-token byte-level BPE, ChatML)
and Gemma-3 (262,144-token SentencePiece, turn template): an offline store scored by SmolLM2 for a
Gemma student, a store scored by Gemma for a SmolLM2 student, and Gemma as an online --kd-teacher.
Class counts are asserted against the independent count from both tokenizers' character offsets
(`test_align_smollm2.expected_classes`). Sizes are the smallest that show it: on a loaded 2-core CPU
each test takes 3-20 min (the 262k-wide head). The 4-bit base runs at the float32 base's speed on a
CPU since `models.load_mlx` computes its quantized layers by dequantize-then-BLAS (MLX's own CPU
quantized matmul was 30-60x slower)."""

import json
import subprocess
import sys

import pytest

from mlx_distill.config import LogitsConfig, TrainConfig, build
from mlx_distill.io import read_json, read_jsonl
from mlx_distill.teacher.logits import extract
from mlx_distill.training import train

from helpers import write_jsonl
from test_align_smollm2 import TEMPLATE, expected_classes, word_problems


def corpus(d, n_train=8, n_valid=4):
    (d / "corpus").mkdir(parents=True)
    write_jsonl(d / "corpus" / "train.jsonl", word_problems(n_train, seed=0))
    write_jsonl(d / "corpus" / "valid.jsonl", word_problems(n_valid, seed=1, start=100))
    return d / "corpus"


def train_cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), out=str(out), iters=4, batch_size=4, val_every=4, val_batches=1,
                report_every=1, save_every=100, learning_rate=1e-3, warmup=0, max_seq_length=256, lora_layers=4,
                prompt_template=TEMPLATE)
    base.update(kw)
    return build(TrainConfig, base)


def kd_rows(out):
    return [r for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r]


# ----------------------------------------------------------------------------- QLoRA
@pytest.mark.slow
@pytest.mark.heavy
def test_qlora_on_the_4bit_base_and_mlx_lm_generate_reads_the_adapter(gemma3_4bit, tmp_path):
    data = corpus(tmp_path)
    out = tmp_path / "run"
    train.run(train_cfg("gemma3-270m-4bit", data, out, iters=2, batch_size=2, max_seq_length=128, val_every=2),
              quiet=True)
    rows = kd_rows(out)
    assert len(rows) == 2 and all(r["train_loss"] == r["train_loss"] for r in rows), rows
    assert (out / "adapters.safetensors").is_file() and (out / "adapter_config.json").is_file()
    r = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(gemma3_4bit), "--adapter-path",
                        str(out), "--prompt", "Mira has 3 pencils and gets 4 more.", "--max-tokens", "4"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Generation:" in r.stdout or "==========" in r.stdout, r.stdout


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("name", ["gemma3-270m", "gemma3-270m-4bit"])
def test_preflight_within_30_percent_of_the_peak_at_batch_4x256(name, gemma3_4bit, tmp_path, monkeypatch):
    """Gemma's shapes (head size 256 x 4 heads > width 640, four norms per block, the 262k-wide
    logits under the automatic --loss-chunk) at batch 4 x 256 tokens, on the float32 folder and on
    the QLoRA base, whose weights term is the quantized weights as stored (packed uint32 + scales +
    biases + the float32 embedding: `model_bytes` sums `nbytes`). Measured ratios recorded in
    docs/BENCHMARKS.md."""
    import gc

    import mlx.core as mx

    from test_preflight import TOL, long_records, run_measured

    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "train.jsonl", long_records(8, repeat=14))
    write_jsonl(d / "valid.jsonl", long_records(4, seed=1, repeat=14, start=100))
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    cfg = build(TrainConfig, dict(model=name, data=str(d), out=str(tmp_path / "run"), iters=2,
                                  batch_size=4, val_every=100, val_batches=1, report_every=1, save_every=1000,
                                  warmup=0, max_seq_length=256, lora_layers=8))
    est, peak = run_measured(cfg, monkeypatch)
    ratio = est.total / peak
    print(f"{name}: estimate {est.describe()} | measured peak {peak / 1e9:.3f} GB | ratio {ratio:.2f}")
    float32 = 268.1e6 * 4
    if name == "gemma3-270m":
        assert abs(est.parts["weights"] - float32) < 0.02e9
    else:  # the float32 embedding (167.8M x 4 bytes) + the blocks at ~5 bits per weight
        assert 167.8e6 * 4 < est.parts["weights"] < 0.8 * float32
    assert 1 - TOL <= ratio <= 1 + TOL, (est.describe(), peak)


# ----------------------------------------------------------------------------- cross-family KD
@pytest.fixture(scope="module")
def smollm2_store(tmp_path_factory, smollm2):
    d = tmp_path_factory.mktemp("smol_for_gemma")
    data = corpus(d, n_train=4)  # one training batch of 4, seen at every step
    extract(build(LogitsConfig, dict(teacher="smollm2", data=str(data), out=str(d / "logits"), top_m=16,
                                     batch_size=4, prompt_template=TEMPLATE, max_seq_length=256)), quiet=True)
    return d


def assert_alignment(out, teacher_dir, student_dir, data):
    ka = read_json(out / "manifest.json")["kd_alignment"]
    print(json.dumps(ka))
    for split in ("train", "valid"):
        assert ka[split]["coverage"] >= 0.95, ka[split]
    want = expected_classes(teacher_dir, student_dir, read_jsonl(data / "train.jsonl"))
    got = ka["train"]["classes"]
    assert (got["matched"], got["spans"]) == (want["matched"], want["spans"]), (got, want)
    return ka


def assert_kd_falls(out):
    rows = kd_rows(out)
    kd = [r["kd_loss"] for r in rows]
    print("kd_loss", kd)
    assert all(r.get("kd_coverage", 1.0) >= 0.95 for r in rows), rows
    assert kd[-1] < kd[0], kd


@pytest.mark.slow
@pytest.mark.heavy
def test_smollm2_teaches_gemma_from_a_store(smollm2_store, smollm2, gemma3_4bit, tmp_path):
    """Issue 20's check as named: `train --model gemma3-270m-4bit --kd STORE` on a SmolLM2 store."""
    d = smollm2_store
    out = tmp_path / "run"
    # one batch of 4, seen 4 times: the KD loss on it must fall. lr 1e-3 made Gemma's LoRA diverge
    # at step 2 (sft and kd up).
    train.run(train_cfg("gemma3-270m-4bit", d / "corpus", out, iters=4, kd_dir=str(d / "logits"), kd_top_k=16,
                        kd_alpha=0.5, val_every=4, learning_rate=2e-4), quiet=True)
    assert_alignment(out, smollm2, gemma3_4bit, d / "corpus")
    assert_kd_falls(out)


@pytest.mark.slow
@pytest.mark.heavy
def test_gemma_teaches_smollm2_offline_and_online(gemma3, smollm2, tmp_path):
    data = corpus(tmp_path, n_train=4)
    extract(build(LogitsConfig, dict(teacher="gemma3-270m", data=str(data), out=str(tmp_path / "logits"), top_m=16,
                                      batch_size=4, prompt_template=TEMPLATE, max_seq_length=256)), quiet=True)
    out = tmp_path / "offline"
    train.run(train_cfg("smollm2", data, out, iters=4, kd_dir=str(tmp_path / "logits"), kd_top_k=16, kd_alpha=0.5,
                        val_every=4, learning_rate=2e-4), quiet=True)
    offline = assert_alignment(out, gemma3, smollm2, data)
    assert_kd_falls(out)
    out = tmp_path / "online"
    train.run(train_cfg("smollm2", data, out, iters=2, kd_teacher="gemma3-270m", kd_top_k=16, kd_alpha=0.5,
                        val_every=2), quiet=True)
    online = assert_alignment(out, gemma3, smollm2, data)
    assert online["train"]["classes"] == offline["train"]["classes"]
