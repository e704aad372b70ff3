"""Reasoning that survives rendering: a chat template that drops the <think> part of assistant
turns (as DeepSeek-R1-Distill templates do) stops the run with the fix; --think-in-content is
that fix. Also: the split seed is separate from the training seed."""

import json
import shutil

import pytest

from mlx_distill import data

from mlx_distill.training import train
from mlx_distill.config import TrainConfig, build
from mlx_distill.io import InputError
from mlx_distill.paths import REPO

from helpers import arith_records, write_jsonl

TEMPLATE = str(REPO / "prompts" / "train_user.txt")

# ChatML, but like DeepSeek-R1-Distill: an assistant turn keeps only the text after </think>,
# and the generation prompt opens the <think> block itself
R1_LIKE = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def r1_model(tiny_model, tmp_path_factory):
    """A copy of the tiny model whose tokenizer_config.json carries the R1-like template."""
    d = tmp_path_factory.mktemp("r1") / "model"
    shutil.copytree(tiny_model, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = R1_LIKE
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    if (d / "chat_template.jinja").is_file():  # newer transformers keep it in its own file
        (d / "chat_template.jinja").write_text(R1_LIKE)
    return d


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def thinking_records(n=6):
    recs = arith_records(n)
    for i, r in enumerate(recs):
        r["thinking"] = f"Hmm, let me add carefully, step {i} of the check."
    return recs


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "c").mkdir()
    write_jsonl(tmp_path / "c" / "train.jsonl", thinking_records(6))
    write_jsonl(tmp_path / "c" / "valid.jsonl", thinking_records(2))
    return tmp_path / "c"


def cfg(corpus, **kw):
    return TrainConfig(data=str(corpus), prompt_template=TEMPLATE, max_seq_length=512, **kw)


def test_template_that_drops_thinking_stops_with_the_fix(r1_model, corpus):
    tok = _tok(r1_model)
    assert "</think>" in tok.chat_template
    with pytest.raises(InputError) as e:
        data.load_examples(cfg(corpus), tok, "train")
    msg = str(e.value)
    assert msg.startswith(f"{corpus / 'train.jsonl'}:1: the chat template of {r1_model}")
    assert "drops the reasoning inside <think>" in msg and "--think-in-content" in msg and "plain chat template" in msg
    # a messages record whose assistant content carries <think> is checked the same way
    write_jsonl(corpus / "train.jsonl", [{"messages": [{"role": "user", "content": "2+2?"},
                                                       {"role": "assistant", "content": "<think>two and two</think>4"}]}])
    with pytest.raises(InputError, match="drops the reasoning"):
        data.load_examples(cfg(corpus), tok, "train")
    # records without thinking render fine under the same template
    write_jsonl(corpus / "train.jsonl", arith_records(3))
    assert len(data.load_examples(cfg(corpus), tok, "train")) == 3


def test_train_run_stops_before_training(r1_model, corpus, tmp_path):
    with pytest.raises(InputError, match=r"drops the reasoning .*--think-in-content"):
        train.run(build(TrainConfig, dict(model=str(r1_model), data=str(corpus), out=str(tmp_path / "run"), iters=2,
                                          prompt_template=TEMPLATE, max_seq_length=512)), quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_think_in_content_keeps_the_reasoning(r1_model, corpus):
    tok = _tok(r1_model)
    exs = data.load_examples(cfg(corpus, think_in_content=True), tok, "train")
    recs = thinking_records(6)
    assert len(exs) == 6
    for ex, rec in zip(exs, recs):
        prompt = tok.decode(ex.tokens[: ex.prompt_len].tolist())
        completion = tok.decode(ex.tokens[ex.prompt_len:].tolist())
        # the prompt is the template's generation prompt (which opens <think>) ...
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        # ... and the completion the record's thinking, reasoning and answer, closed as the template closes a turn
        assert completion.startswith(rec["thinking"]) and "<think>" not in completion
        assert f"</think>\n\n{rec['reasoning']}\n#### {rec['answer']}<|im_end|>\n" in completion


def test_think_in_content_equals_the_template_when_it_keeps_everything(tiny_model, corpus):
    """Under a template that keeps assistant content (ChatML), both renderings give the same tokens."""
    tok = _tok(tiny_model)
    a = data.load_examples(cfg(corpus), tok, "train")
    b = data.load_examples(cfg(corpus, think_in_content=True), tok, "train")
    assert [(x.tokens.tolist(), x.prompt_len) for x in a] == [(x.tokens.tolist(), x.prompt_len) for x in b]
    assert "let me add carefully" in tok.decode(a[0].tokens[a[0].prompt_len:].tolist())


def test_split_seed_is_separate_from_the_training_seed(tiny_model, tmp_path):
    """One JSONL file: the hold-out follows --split-seed only; seed 0 keeps the old split."""
    tok = _tok(tiny_model)
    f = write_jsonl(tmp_path / "all.jsonl", arith_records(60))

    def valid_ids(**kw):
        c = TrainConfig(data=str(f), prompt_template=TEMPLATE, max_seq_length=512, val_fraction=0.25, **kw)
        return {e.id for e in data.load_examples(c, tok, "valid")}

    base = valid_ids()
    assert base == valid_ids(seed=1) == valid_ids(seed=7, split_seed=0)
    assert base == {f"a{i}" for i in range(60) if data._in_valid(f"a{i}", 0.25, 0)}  # the pre-split-seed split
    other = valid_ids(seed=0, split_seed=3)
    assert other != base and 5 <= len(other) <= 25
