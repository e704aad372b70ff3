"""Cross-tokenizer KD evidence (issue 12, item 5): two tiny tokenizer families that split the
same text differently, the `logits` -> `train --kd` path between them, and a learning test.

The pair: `tiny_model` (byte-level BPE, ChatML template, trained on `tiny.synthetic_texts`)
teaches `tiny_metaspace` (SentencePiece-style BPE: Metaspace, byte fallback, whole-number
pieces; a Gemma-like `<start_of_turn>` template; trained on `tiny.synthetic_texts_alt`)."""

import json

import numpy as np
import pytest

from mlx_distill import data
from mlx_distill.io import read_json
from mlx_distill.paths import REPO

from helpers import arith_records, completion_batch, direct_train, write_jsonl

TEMPLATE = str(REPO / "prompts" / "train_user.txt")


def _hf_tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def token_spans(tok, text: str) -> list[tuple[int, int]]:
    """(start, end) character span of every token of `text` (no special tokens). A token that
    covers no character of its own (SentencePiece's prepended "▁", the 2nd..nth byte piece of
    one character) gets the span its tokenizer reports, which repeats its neighbour's: such a
    token never counts as agreeing unless the other side has the same duplicate."""
    return [tuple(s) for s in tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]]


def disagreement(teacher_tok, student_tok, texts) -> tuple[float, int]:
    """Share of student token positions whose character span is not exactly one teacher
    token's span (the positions a by-position or by-span-equality alignment cannot give a
    one-to-one teacher distribution), and the number of student positions."""
    total = differ = 0
    for text in texts:
        t = set(token_spans(teacher_tok, text))
        s = token_spans(student_tok, text)
        total += len(s)
        differ += sum(x not in t for x in s)
    return differ / total, total


# ----------------------------------------------------------------------------- the two families
def test_metaspace_family_is_a_complete_mlx_lm_tokenizer(tiny_metaspace, tiny_model):
    """mlx_lm.load picks its SentencePiece streaming detokenizer; byte fallback round-trips
    text the pieces do not cover; the chat template and end of turn are Gemma-like, not ChatML."""
    from mlx_lm import load
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

    _, stok = load(str(tiny_metaspace))
    _, ttok = load(str(tiny_model))
    assert isinstance(stok.detokenizer, SPMStreamingDetokenizer)
    assert isinstance(ttok.detokenizer, BPEStreamingDetokenizer)
    text = "Ann has 12 + 36 = 48 coins.\n#### 48 caf\u00e9 \U0001F600"
    msgs = [{"role": "user", "content": "What is 12 + 36?"}, {"role": "assistant", "content": text}]
    ids = stok.apply_chat_template(msgs, return_dict=False)
    rendered = stok.decode(ids)
    assert rendered == ("<start_of_turn>user\nWhat is 12 + 36?<end_of_turn>\n"
                        f"<start_of_turn>model\n{text}<end_of_turn>\n")
    assert "<|im_start|>" in ttok.decode(ttok.apply_chat_template(msgs, return_dict=False))
    pieces = stok.convert_ids_to_tokens(ids)
    assert "<0xC3>" in pieces and "<0xF0>" in pieces  # é and the emoji as UTF-8 byte pieces
    assert "▁12" in pieces  # a number as one piece (the byte-level side: "Ġ" "1" "2")
    prompt = stok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_dict=False)
    det = stok.detokenizer
    det.reset()
    for i in ids[len(prompt):]:
        det.add_token(i)
    det.finalize()
    assert det.text == text + "<end_of_turn>\n"
    assert stok.eos_token_ids == {stok.convert_tokens_to_ids("<end_of_turn>")}
    cfg = read_json(tiny_metaspace / "config.json")
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == len(stok._tokenizer) != len(ttok._tokenizer)


def test_metaspace_under_qwen2_is_refused(tmp_path):
    """transformers >= 5 would load a Metaspace tokenizer as a byte-level Qwen2 one under a
    qwen2 config.json, silently dropping every "▁" and byte piece: build_model refuses it."""
    from mlx_distill.tiny import build_model

    with pytest.raises(ValueError, match="model_type='llama'"):
        build_model(tmp_path / "m", kind="metaspace", model_type="qwen2")


def test_the_pair_splits_completions_differently(tiny_model, tiny_metaspace):
    """Issue 12 asks for >= 30% of positions split differently. Measured on the completions of
    `arith_records(200)` (the corpus most KD tests use): 73.2% of the student's 2400 completion
    positions have no teacher token with the same span (numbers: teacher "Ġ" "4" "1", student
    "▁41"; "74.": teacher "7" "4" ".", student "▁7" "4."; "####": one teacher token, four
    student byte pieces), and the vocabularies differ."""
    ttok, stok = _hf_tok(tiny_model), _hf_tok(tiny_metaspace)
    texts = [data.render_assistant(r) for r in arith_records(200)]
    share, n = disagreement(ttok, stok, texts)
    print(f"student completion positions {n}, split differently {share:.1%}")
    assert share >= 0.30, share
    # and it is the tokenizers that differ, not the measure: a tokenizer agrees with itself
    assert disagreement(ttok, ttok, texts)[0] == 0.0
    tv, sv = set(ttok.get_vocab()), set(stok.get_vocab())
    assert len(tv & sv) < 0.2 * len(sv)  # the token strings themselves barely overlap


# ----------------------------------------------------------------------------- learning test
# Task: six distinct digits ("3 0 5 7 1 8"); the answer is the code word of the first digit
# (CODES[3] = "fo"). The teacher's tokenizer (byte-level BPE) spells every code as one token
# "fo"; the student's (Metaspace BPE, never trained on the codes) as two letters "f" "o": every
# answer is a span, never a matched position. Half of the corpus's traces come from a weak
# source that answers by another rule (the code of the *second* digit), as an unverified corpus
# might; the teacher, trained on the right rule, gives those answers almost no probability.
# SFT alone cannot tell the sources apart (which one wrote a trace is random, not visible in the
# problem); the span term hands the student the teacher's probability of each trace's answer,
# which is all that differs between them. (Two-digit answers were tried first: the teacher's
# tokenizer, loaded as transformers loads a qwen2 model, splits digits one by one, and a student
# that must emit a two-digit piece learns a 90-way table that 300 steps of SFT did not.)
DIGITS = "0123456789"
CODES = ["ba", "ce", "di", "fo", "gu", "ha", "ji", "ko", "lu", "nu"]  # no pair the student merges ("mo" of "model")


def toy_problems(rng, n: int) -> list[str]:
    return [" ".join(rng.sample(DIGITS, 6)) for _ in range(n)]


def right_answer(problem: str) -> str:
    return CODES[int(problem[0])]


def weak_answer(problem: str) -> str:
    return CODES[int(problem.split()[1])]


def _chat(tok, problem, answer=None):
    msgs = [{"role": "user", "content": problem}]
    if answer is None:
        return tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    return tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], return_dict=False)


def _direct_train(src, dst, iters, lr, answer_fn, rng, batch=64):
    """The teacher, and the stand-in for a student's pre-training (`helpers.direct_train`) on fresh
    problems each step, for prompts of either tokenizer; `train` runs the students' SFT / KD."""

    def make(tok):
        ps = toy_problems(rng, batch)
        return completion_batch([_chat(tok, p, answer_fn(p)) for p in ps], [len(_chat(tok, p)) for p in ps])

    return direct_train(src, dst, iters, lr, make, warmup=min(50, iters // 4), warmup_from=lr / 50)


def _score(model_dir, problems, adapter=None, steps: int = 3) -> tuple[float, float]:
    """(greedy accuracy, mean probability of the right answer) on `problems`: greedy decoding
    for `steps` tokens (cut at the end of turn), and the chain-rule probability of the right
    answer's tokens under teacher forcing, in the model's own tokenizer and template."""
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    eot = tok.eos_token_id
    prompts = [_chat(tok, p) for p in problems]
    full = [_chat(tok, p, right_answer(p)) for p in problems]
    hit, mass = np.zeros(len(problems)), np.zeros(len(problems))
    for width in sorted({len(x) for x in prompts}):  # one batch per prompt length: no padding
        rows = [i for i, x in enumerate(prompts) if len(x) == width]
        x = np.array([prompts[i] for i in rows], np.int32)
        for _ in range(steps):
            nxt = np.array(mx.argmax(model(mx.array(x))[:, -1], axis=-1)).astype(np.int32)
            x = np.concatenate([x, nxt[:, None]], axis=1)
        for i, out in zip(rows, x[:, width:].tolist()):
            hit[i] = tok.decode(out[: out.index(eot)] if eot in out else out).strip() == right_answer(problems[i])
        longest = max(len(full[i]) for i in rows)
        y = np.array([full[i] + [0] * (longest - len(full[i])) for i in rows], np.int32)
        z = model(mx.array(y[:, :-1])).astype(mx.float32)
        lp = np.array(z - mx.logsumexp(z, axis=-1, keepdims=True))
        for r, i in enumerate(rows):
            ans = full[i][width: full[i].index(eot, width)]  # the answer, up to the end of turn
            mass[i] = np.exp(sum(lp[r, width - 1 + k, t] for k, t in enumerate(ans)))
    return float(hit.mean()), float(mass.mean())


def _tokenizers(tmp):
    """The pair for the toy task: the teacher's byte-level BPE knows every code as one token;
    the student's Metaspace BPE is trained on the problems and the alphabet, not on the codes."""
    import random

    from mlx_distill.tiny import build_tokenizer

    build_tokenizer(tmp / "ttok", texts=[DIGITS] + ["user\nassistant\nsystem\n"] * 50 + [" ".join(CODES)] * 20,
                    vocab_size=261 + 40)
    srng = random.Random(7)
    build_tokenizer(tmp / "stok", kind="metaspace", vocab_size=150,
                    texts=[f"user\n{p}\nmodel\nx" for p in toy_problems(srng, 300)]
                    + [" ".join("abcdefghijklmnopqrstuvwxyz")])
    t, s = _hf_tok(tmp / "ttok"), _hf_tok(tmp / "stok")
    for code in CODES:  # every answer a span: one teacher token, two student tokens
        assert len(t.encode(code, add_special_tokens=False)) == 1, code
        assert s.convert_ids_to_tokens(s.encode(f"\n{code}", add_special_tokens=False))[-2:] == list(code), code
    return tmp / "ttok", tmp / "stok"


def cross_kd_experiment(tmp, seeds, modes=("sft", "kd", "matched"), teacher_iters=200, pre_iters=50, iters=100,
                        weak_share=0.5, alpha=2.0):
    """Teacher -> corpus (half weak-source traces) -> `logits` -> per seed a pre-trained student
    trained by `train` in each mode: "sft", "kd" (the default --kd-align, auto) or a --kd-align
    mode. Returns (teacher score, {mode: [(greedy accuracy, p(right answer)) per seed]},
    {mode: the run manifest's kd_alignment})."""
    import random
    import shutil

    from mlx_distill.training import train
    from mlx_distill.config import LogitsConfig, TrainConfig, build
    from mlx_distill.teacher.logits import extract
    from mlx_distill.tiny import build_model

    rng = random.Random(0)
    ttok, stok = _tokenizers(tmp)
    t0 = build_model(tmp / "t0", tokenizer_dir=ttok, seed=0, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    teacher = _direct_train(t0, tmp / "teacher", teacher_iters, 2e-3, right_answer, rng)
    held_out = toy_problems(rng, 400)
    t_score = _score(teacher, held_out)

    train_p, valid_p = toy_problems(rng, 200), toy_problems(rng, 100)
    traces = [weak_answer(p) if rng.random() < weak_share else right_answer(p) for p in train_p]
    corpus = tmp / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "train.jsonl", [{"id": f"t{i}", "prompt": p, "completion": c}
                                         for i, (p, c) in enumerate(zip(train_p, traces))])
    write_jsonl(corpus / "valid.jsonl", [{"id": f"v{i}", "prompt": p, "completion": right_answer(p)}
                                         for i, p in enumerate(valid_p)])
    (tmp / "plain.txt").write_text("{question}")
    common = dict(data=str(corpus), prompt_template=str(tmp / "plain.txt"), max_seq_length=64)
    extract(build(LogitsConfig, dict(teacher=str(teacher), out=str(tmp / "logits"), top_m=10, batch_size=50,
                                     **common)), quiet=True)

    results, alignment = {m: [] for m in modes}, {}
    for seed in seeds:
        s0 = build_model(tmp / f"s0-{seed}", tokenizer_dir=stok, seed=100 + seed, hidden=48, layers=2, heads=4,
                         kv_heads=2, intermediate=96)
        # pre-training stand-in: answer with the code of a random listed digit (the format, no rule)
        student = _direct_train(s0, tmp / f"student{seed}", pre_iters, 3e-3,
                                lambda p: CODES[int(rng.choice(p.split()))], rng)
        for mode in modes:
            kd = {} if mode == "sft" else dict(kd_dir=str(tmp / "logits"), kd_alpha=alpha, kd_temperature=1.0,
                                               kd_top_k=10, kd_min_coverage=0.0)
            if mode not in ("sft", "kd"):
                kd["kd_align"] = mode
            out = tmp / f"{mode}{seed}"
            train.run(build(TrainConfig, dict(model=str(student), out=str(out), fine_tune_type="full", lora_layers=-1,
                                              iters=iters, batch_size=16, learning_rate=3e-3, warmup=10,
                                              val_every=iters, report_every=50, save_every=1000, patience=0,
                                              seed=seed, **common, **kd)), quiet=True)
            # the last state: early stopping on a valid split of right answers would hand SFT
            # the teacher's rule through the back door
            last = tmp / f"{mode}{seed}-last"
            last.mkdir()
            shutil.copy(out / "adapter_config.json", last)
            shutil.copy(out / "checkpoints" / "last" / "adapters.safetensors", last)
            results[mode].append(_score(student, held_out, adapter=last))
            if mode != "sft":
                alignment[mode] = read_json(out / "manifest.json")["kd_alignment"]
    return t_score, results, alignment


@pytest.mark.slow
def test_cross_tokenizer_kd_beats_sft_on_a_toy_task(tmp_path):
    """The toy task above (code word of the first digit; half the traces by a weak source's
    rule), teacher (qwen2, hidden 64, byte-level BPE, ChatML) trained to 100%; per seed a student
    (llama, hidden 48, Metaspace BPE, <start_of_turn> template; 50 steps of format-only
    pre-training) trains 100 steps (batch 16, lr 3e-3, full fine-tuning) with SFT, SFT + KD
    with the default alignment (auto = matched + spans; K = 10, T = 1, alpha = 2), or SFT + KD
    with --kd-align matched (the ablation). Scored at the last step on 400 held-out problems:
    greedy accuracy (the code of the first digit; SFT's expected ceiling is ~0.5, one rule per
    source) and the probability of the right answer.

    Stated margins over 3 seeds: default KD beats SFT by >= 0.2 mean greedy accuracy and
    >= 0.15 mean p(right), in every seed; the ablation's spans term is what does it: default
    KD beats matched-only KD by >= 0.2 mean accuracy. Every answer is a span here (one teacher
    token, two student tokens), so matched positions carry only the end of turn and matched-only
    KD stays at SFT's level (not asserted: it is a tie).
    Measured (2-core Linux CPU under load 4-6 from other jobs, 61-75 s, the same numbers twice):
    greedy accuracy per seed SFT 0.575/0.315/0.468 (mean 0.452, p 0.283), KD 0.965/0.978/0.842
    (mean 0.928, p 0.642), matched only 0.555/0.492/0.560 (mean 0.536, p 0.321). Seeds 3-6 as a
    check (`cross_kd_experiment(tmp, seeds=(3, 4, 5, 6))`): SFT mean 0.510 (p 0.269), KD 0.959
    (p 0.707), matched only 0.537 (p 0.304); KD above SFT in all 7 seeds, by >= 0.29. Alignment
    of the train split: 800 completion positions, 50% matched (the end of turn and the newline
    after it), 50% spans, 0% none; with --kd-align matched the spans become none (coverage 50%).
    Not asserted, measured once on seeds 0-2 (`modes=("uld",)`): --kd-align uld 0.058/0.110/0.098
    (p 0.105), below SFT: ULD pairs the span's first student position with the teacher's one and
    matches sorted probabilities, the shape of a near one-hot distribution, not which code."""
    t_score, res, alignment = cross_kd_experiment(tmp_path, seeds=(0, 1, 2))
    assert t_score[0] > 0.95 and t_score[1] > 0.9, t_score
    sft, kd, matched = (np.array(res[k]) for k in ("sft", "kd", "matched"))
    table = (f"teacher {t_score[0]:.3f}/{t_score[1]:.3f} | (greedy acc, p(right)) per seed: "
             + " | ".join(f"{k} {np.round(v, 3).tolist()} mean {np.round(np.mean(v, 0), 3).tolist()}"
                          for k, v in res.items()))
    print(table)
    print("kd_alignment:", json.dumps(alignment))
    train = alignment["kd"]["train"]
    assert train["mode"] == "spans" and train["coverage"] == 1.0, train  # auto across tokenizers = spans
    assert train["classes"]["spans"] == train["classes"]["matched"] == train["positions"] // 2, train
    assert alignment["matched"]["train"]["classes"]["none"] == train["positions"] // 2
    assert kd[:, 0].mean() - sft[:, 0].mean() >= 0.2, table
    assert kd[:, 1].mean() - sft[:, 1].mean() >= 0.15, table
    assert np.all(kd[:, 0] > sft[:, 0]), table
    assert kd[:, 0].mean() - matched[:, 0].mean() >= 0.2, table
