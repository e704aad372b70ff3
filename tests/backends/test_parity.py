"""`python -m mlx_distill parity`: passes on a tiny model, exits 1 when the backends differ."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mlx_distill import parity  # noqa: E402
from mlx_distill.backends.torch import TorchBackend  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rows = [{"id": f"p{i}", "question": f"What is {i} + {2 * i}?", "reasoning": f"{i} + {2 * i} = {3 * i}.",
             "answer": str(3 * i)} for i in range(6)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_parity_command_passes(tiny_model, corpus, capsys):
    parity.main(["--model", str(tiny_model), "--data", str(corpus), "--lora-rank", "4", "--batch-size", "2",
                 "--kd-top-k", "5", "--steps", "2"])
    out = capsys.readouterr().out
    for name in ("base logits", "adapted logits", "sft loss", "kd loss (synthetic teacher)", "adapter grads",
                 "adapter weights after 2 steps"):
        assert name in out
    assert "FAIL" not in out and out.rstrip().endswith("parity ok")


def test_parity_command_fails_on_a_difference(tiny_model, corpus, capsys, monkeypatch):
    real_load = TorchBackend.load

    def load_slightly_different(self):
        model, tok = real_load(self)
        with torch.no_grad():  # what a wrong norm epsilon or rope detail would look like
            model.model.norm.weight.mul_(1.001)
        return model, tok

    monkeypatch.setattr(TorchBackend, "load", load_slightly_different)
    with pytest.raises(SystemExit) as e:
        parity.main(["--model", str(tiny_model), "--data", str(corpus), "--lora-rank", "4", "--batch-size", "2",
                     "--steps", "0"])
    assert e.value.code == 1
    out = capsys.readouterr()
    assert "base logits" in out.out and "FAIL" in out.out and "parity FAILED" in out.err


def test_synthetic_teacher_is_top_m_of_log_probs():
    z = np.random.default_rng(0).normal(0, 1, (2, 3, 50)).astype(np.float32)
    ids, lp = parity.synthetic_teacher(z, 4, seed=0)
    assert ids.shape == lp.shape == (2, 3, 4)
    assert (np.diff(lp, axis=-1) <= 0).all() and (lp < 0).all() and (np.exp(lp).sum(-1) < 1).all()
