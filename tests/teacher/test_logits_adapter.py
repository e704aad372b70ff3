"""`logits --adapter`: a fine-tuned, frozen teacher scores the traces (the demo recipe's KD teacher)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_distill.training import train
from mlx_distill.config import LogitsConfig, TrainConfig, build
from mlx_distill.io import InputError
from mlx_distill.teacher.logits import extract, load_all_examples
from mlx_distill.teacher.store import TopMStore
from mlx_distill.paths import REPO

TEMPLATE = str(REPO / "prompts" / "train_user.txt")


def test_adapter_teacher_scores_with_the_adapter_and_resume_checks_it(tiny_model, tmp_path):
    from mlx_lm import load

    rows = [{"id": f"q{i}", "question": f"Ann has {i} coins and gets {i + 2} more. How many?",
             "reasoning": f"{i} + {i + 2} = {2 * i + 2}.", "answer": str(2 * i + 2)} for i in range(8)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(data=str(corpus), prompt_template=TEMPLATE, max_seq_length=256)
    # a teacher adapter that moved away from the base (large LR, a few full steps on the LoRA)
    run = tmp_path / "teacher"
    train.run(build(TrainConfig, dict(model=str(tiny_model), out=str(run), iters=6, batch_size=4, learning_rate=5e-2,
                                      val_every=6, report_every=6, save_every=6, seed=0, lora_layers=2, **common)),
              quiet=True)
    lc = lambda out, **kw: build(LogitsConfig, dict(teacher=str(tiny_model), out=str(out), top_m=4, batch_size=4,  # noqa: E731
                                                    **common, **kw))
    extract(lc(tmp_path / "base"), quiet=True)
    extract(lc(tmp_path / "tuned", adapter=str(run)), quiet=True)
    base, tuned = TopMStore(tmp_path / "base"), TopMStore(tmp_path / "tuned")
    assert tuned.manifest["teacher"]["adapter"] == str(run)
    assert tuned.manifest["teacher"]["weights"]["adapter"]["files"] == 1

    model, tok = load(str(tiny_model), adapter_path=str(run))
    ex = load_all_examples(lc("unused"), tok)[0]
    ent = tuned.entries[ex.id]
    z = model(mx.array(ex.tokens[None, :-1])).astype(mx.float32)
    logp = np.array(z - mx.logsumexp(z, axis=-1, keepdims=True))[0, ent["first"]:]
    ids, lps = tuned.rows(ex.id)
    np.testing.assert_allclose(lps.astype(np.float32), np.take_along_axis(logp, ids.astype(np.int64), -1),
                               atol=2e-2, rtol=2e-3)  # float16 storage
    b_ids, b_lps = base.rows(ex.id)
    assert np.abs(b_lps.astype(np.float32) - lps.astype(np.float32)).max() > 0.05  # the adapter changed the teacher

    # --resume with the base teacher into the adapter's store is refused (another teacher)
    with pytest.raises(InputError, match="different teacher"):
        extract(lc(tmp_path / "tuned", resume=True), quiet=True)
    with pytest.raises(InputError, match="adapter_config.json"):
        extract(lc(tmp_path / "x", adapter=str(tmp_path)), quiet=True)


def test_val_every_zero_is_refused_before_loading(tmp_path):
    from mlx_distill.config import ConfigError

    # refused by the option checks (config.build), or by train itself: before any model is loaded
    with pytest.raises((InputError, ConfigError), match=r"val.every must be >= 1"):
        train.run(build(TrainConfig, dict(model=str(tmp_path / "nothing"), data=str(tmp_path), val_every=0)), quiet=True)
