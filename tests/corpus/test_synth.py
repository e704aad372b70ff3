"""`corpus synth`: the generated demo corpus is deterministic, its arithmetic is right (checked
here by an evaluation of our own, not the generator's), its splits are disjoint, and `train`
and `eval --dataset corpus` read it."""

import json
import re
from fractions import Fraction

import pytest

from mlx_distill import data
from mlx_distill.config import SynthConfig, TrainConfig
from mlx_distill.corpus import synth
from mlx_distill.io import InputError, sha256_file
from mlx_distill.paths import REPO
from mlx_distill.tasks.problems import normalize_text

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: Fraction(a, b)}


def splits(**kw):
    return synth.generate(SynthConfig(**kw))


def check_record(r):
    """Every line is one step `a op b = c` that is exactly right; operands come from the question or
    an earlier step; the answer is the last step's result."""
    lines = r["reasoning"].split("\n")
    assert 1 <= len(lines) <= 3, r
    assert "####" not in r["reasoning"]  # data.render_assistant adds the marker
    given = {int(x) for x in re.findall(r"\d+", r["question"])}
    known, ops, last = set(given), [], None
    for line in lines:
        steps = STEP.findall(line)
        assert len(steps) == 1, (line, r)
        a, op, b, c = steps[0]
        a, b, c = int(a), int(b), int(c)
        value = OPS[op](a, b)
        assert value == c and value >= 0, (line, r)  # whole-number, non-negative, correct
        assert a in known and b in known, (line, r)
        known.add(c)
        ops.append(op)
        last = c
    assert ops == r["ops"]
    assert r["answer"] == str(last)
    assert r["answer_format"] == "####"


def test_every_step_and_answer_is_right():
    s = splits(n_train=300, n_valid=30, n_test=30, seed=3)
    recs = [r for rows in s.values() for r in rows]
    assert len(recs) == 360
    for r in recs:
        check_record(r)
    assert {len(r["ops"]) for r in recs} == {1, 2, 3}
    assert {op for r in recs for op in r["ops"]} == {"+", "-", "*", "/"}
    assert len({r["template"] for r in recs}) >= 20  # all the templates get drawn


def test_same_seed_same_corpus_other_seed_other_corpus():
    a, b, c = splits(seed=7, n_train=50), splits(seed=7, n_train=50), splits(seed=8, n_train=50)
    assert a == b
    assert [r["question"] for r in a["train"]] != [r["question"] for r in c["train"]]


def test_splits_are_disjoint_and_ids_unique():
    s = splits(n_train=400, n_valid=40, n_test=60, seed=0)
    assert {k: len(v) for k, v in s.items()} == {"train": 400, "valid": 40, "test": 60}
    qs = {k: {normalize_text(r["question"]) for r in v} for k, v in s.items()}
    assert sum(len(q) for q in qs.values()) == 500  # no question twice, in or across splits
    ids = [r["id"] for v in s.values() for r in v]
    assert len(set(ids)) == len(ids)


def test_test_split_does_not_move_when_the_training_split_grows():
    assert splits(n_train=20)["test"] == splits(n_train=200)["test"]


@pytest.mark.parametrize("lo,hi", [(1, 1), (2, 2), (3, 3), (2, 3)])
def test_operation_bounds(lo, hi):
    for rows in splits(n_train=60, n_valid=0, n_test=0, min_ops=lo, max_ops=hi).values():
        for r in rows:
            assert lo <= len(r["ops"]) <= hi
            check_record(r)


def test_bad_settings_are_one_clear_error(monkeypatch):
    with pytest.raises(InputError, match="min-ops"):
        splits(min_ops=3, max_ops=2)
    with pytest.raises(InputError, match="n-valid"):
        splits(n_valid=-1)

    def coin(d, s):  # a template with only two distinct problems
        a = d.n(1, 2)
        return f"Add {a} and 1.", s.calc(a, "+", 1, "{eq}")

    monkeypatch.setattr(synth, "TEMPLATES", {"coin": (1, coin)})
    with pytest.raises(InputError, match="only 2 distinct problems"):
        splits(n_train=3, n_valid=0, n_test=0)


def test_cli_writes_splits_and_manifest(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--n-train", "30", "--n-valid", "5", "--n-test", "8", "--seed", "2"]
    synth.main(argv)
    assert "wrote" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "corpus-synth" and man["generator"] == synth.GENERATOR and man["seed"] == 2
    assert man["counts"] == {"train": 30, "valid": 5, "test": 8}
    for split in ("train", "valid", "test"):
        assert man["sha256"][f"{split}.jsonl"] == sha256_file(out / f"{split}.jsonl")
    first = {f: (out / f).read_bytes() for f in ("train.jsonl", "valid.jsonl", "test.jsonl")}
    synth.main(argv)  # a generated corpus is rewritten, byte for byte the same
    assert first == {f: (out / f).read_bytes() for f in first}
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"]  # no temporary folder left


def test_cli_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(InputError, match="--overwrite"):
        synth.main(["--out", str(out), "--n-train", "5"])
    assert (out / "train.jsonl").read_text() == '{"id": "x"}\n'
    synth.main(["--out", str(out), "--n-train", "5", "--overwrite"])
    assert len((out / "train.jsonl").read_text().splitlines()) == 5


def test_train_and_eval_read_the_corpus(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from mlx_distill.evaluation.evaluate import load_eval_problems

    out = tmp_path / "demo"
    synth.main(["--out", str(out), "--n-train", "40", "--n-valid", "6", "--n-test", "7"])
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    cfg = TrainConfig(data=str(out), prompt_template=str(REPO / "prompts" / "train_user.txt"), max_seq_length=512)
    train, valid = data.load_examples(cfg, tok, "train"), data.load_examples(cfg, tok, "valid")
    assert (len(train), len(valid)) == (40, 6)
    recs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    text = tok.decode(train[0].tokens[train[0].prompt_len:].tolist())
    assert recs[0]["reasoning"].split("\n")[-1] in text and f"#### {recs[0]['answer']}" in text
    probs = load_eval_problems("corpus", data=str(out))
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert [(p["id"], p["question"], p["answer"]) for p in probs] == \
        [(r["id"], r["question"], r["answer"]) for r in test]
