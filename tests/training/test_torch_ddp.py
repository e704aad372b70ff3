"""torchrun with 2 CPU processes (gloo): each rank takes half the rows of every micro-batch and
the summed gradients are all-reduced, so the adapter equals a single-process run's; only rank 0
writes the run folder (rank 1 writes nothing)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mlx_distill.paths import REPO  # noqa: E402

from helpers import ddp_corpus, free_ports, run_one_and_torchrun_two  # noqa: E402


def test_torchrun_two_ranks_equals_one_process(tiny_model, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    corpus = ddp_corpus(tmp_path / "corpus")
    args = ["-m", "mlx_distill", "train", "--backend", "torch", "--model", str(tiny_model), "--data", str(corpus),
            "--iters", "3", "--batch-size", "4", "--grad-accumulation", "2", "--val-every", "3", "--report-every", "1",
            "--learning-rate", "3e-3", "--warmup", "1", "--lora-layers", "-1", "--lora-rank", "4",
            "--max-seq-length", "256"]
    run_one_and_torchrun_two(args, tmp_path / "one", tmp_path / "two", free_ports(), REPO)

    from safetensors.numpy import load_file

    a, b = load_file(str(tmp_path / "one" / "adapters.safetensors")), load_file(str(tmp_path / "two" / "adapters.safetensors"))
    assert set(a) == set(b)
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-5
    m1 = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    m2 = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["iter"] for r in m1] == [r["iter"] for r in m2]  # rank 0 alone wrote the folder's metrics
    for r1, r2 in zip(m1, m2):
        for k in ("train_loss", "val_loss"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-5)
    files = {run: sorted(p.name for p in (tmp_path / run).iterdir()) for run in ("one", "two")}
    assert files["two"] == files["one"]
    assert not (tmp_path / "two" / "ranks").exists()  # rank 1 wrote nothing
