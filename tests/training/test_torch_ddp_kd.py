"""torchrun with 2 CPU processes and partial teacher coverage: the KD normaliser (positions with
a teacher target, `objectives.kd_step_scale`) is counted over the whole step before the rows are
split between the ranks, so the 2-rank KD run gives the single-process adapter and metrics."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mlx_distill.config import LogitsConfig, build  # noqa: E402
from mlx_distill.teacher.logits import extract  # noqa: E402
from mlx_distill.paths import REPO  # noqa: E402

from helpers import ddp_corpus, free_ports, run_one_and_torchrun_two  # noqa: E402


@pytest.mark.slow  # three processes that import torch (~50 s on an idle 2-core CPU)
def test_torchrun_two_ranks_kd_with_partial_coverage(tiny_model, tiny_llama, tmp_path):
    """Student tiny_llama, teacher tiny_model (same tokenizer, other weights)."""
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    corpus = ddp_corpus(tmp_path / "corpus")
    # teacher logits for 5 of the 10 training examples only
    extract(build(LogitsConfig, dict(teacher=str(tiny_model), data=str(corpus), out=str(tmp_path / "kd"), top_m=6,
                                     limit=5, max_seq_length=256, backend="mlx")), quiet=True)
    args = ["-m", "mlx_distill", "train", "--backend", "torch", "--model", str(tiny_llama), "--data", str(corpus),
            "--iters", "3", "--batch-size", "4", "--grad-accumulation", "2", "--val-every", "3", "--report-every", "1",
            "--learning-rate", "3e-3", "--warmup", "1", "--lora-layers", "-1", "--lora-rank", "4",
            "--max-seq-length", "256", "--kd", str(tmp_path / "kd"), "--kd-top-k", "4", "--kd-min-coverage", "0.2"]
    run_one_and_torchrun_two(args, tmp_path / "one", tmp_path / "two", free_ports(), REPO)

    from safetensors.numpy import load_file

    a, b = load_file(str(tmp_path / "one" / "adapters.safetensors")), load_file(str(tmp_path / "two" / "adapters.safetensors"))
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-5
    m1 = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    m2 = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    trained = [r for r in m1 if "train_loss" in r]
    assert len(trained) == 3 and any(0 < r["kd_coverage"] < 1 for r in trained), trained
    assert all(r["kd_loss"] is None or r["kd_loss"] > 1e-3 for r in trained), trained
    for r1, r2 in zip(m1, m2):
        for k in ("train_loss", "sft_loss", "kd_loss", "kd_coverage", "val_loss"):
            if r1.get(k) is not None:
                assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), k
