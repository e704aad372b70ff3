"""mlx_distill.teacher.align: pieces and offsets of two tokenizer families, the class of every position,
span grouping, the vocabulary map."""

import numpy as np
import pytest

from mlx_distill.teacher import align as A
from mlx_distill.tiny import build_tokenizer


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """A byte-level BPE (ChatML) and a Metaspace/Unigram tokenizer with byte fallback
    (Gemma-like template): two families."""
    d = tmp_path_factory.mktemp("toks")
    return build_tokenizer(d / "bpe"), build_tokenizer(d / "spm", kind="metaspace")


TEXT = "Ann has 3 + 48 = 51 coins, café.\n#### 51"


def render(tok, content=TEXT):
    msgs = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": content}]
    full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    prompt = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    return np.array(full), len(prompt)


def test_pieces_decode_like_the_tokenizer(toks):
    """Joined pieces = the tokenizer's own decode without special tokens (up to the leading
    space SentencePiece strips), for both families, multi-byte characters included."""
    for tok in toks:
        ids, _ = render(tok)
        raw = b"".join(A.token_pieces(tok)[i] for i in ids)
        assert raw.decode().strip() == tok.decode(ids, skip_special_tokens=True).strip()


def test_completion_text_is_shared_across_templates(toks):
    """Different templates and tokenizers, one completion text; ends are byte offsets into it,
    prompt tokens at 0 and the end-of-turn tokens at len(text)."""
    out = []
    for tok in toks:
        ids, plen = render(tok)
        text, ends = A.completion_text(tok, ids[plen:])
        assert text == TEXT.encode()
        assert ends[-1] == len(text) and np.all(np.diff(ends) >= 0)
        out.append((text, ends))
        # token_offsets against a given text: the same ends, prompt included (clipped to 0)
        full = A.token_offsets(tok, ids, TEXT)
        assert np.array_equal(full[plen:], ends) and np.all(full[:plen] == 0)
    assert A.text_sha(out[0][0]) == A.text_sha(out[1][0])
    with pytest.raises(ValueError, match="does not occur"):
        A.token_offsets(toks[0], render(toks[0])[0], "not there")


def test_align_hand_case():
    """text 'Ann has 48.' (11 bytes):
    teacher: 'Ann' ' has' ' 48'     '.' <eot>      ends 3 7 10 11 11
    student: 'A' 'nn' ' has' ' 4' '8' '.' <eot>    ends 1 3 7 9 10 11 11
    -> 'A','nn' one span with 'Ann'; ' has' matched; ' 4','8' one span with ' 48'; '.' matched;
    the end-of-turn tokens matched to each other."""
    t_ends = [0, 3, 7, 10, 11, 11]  # a prompt token first (zero width)
    s_ends = [0, 0, 1, 3, 7, 9, 10, 11, 11]
    al = A.align(t_ends, s_ends)
    names = [A.CLASS_NAMES[c] for c in al.cls]
    assert names == ["none", "none", "spans", "spans", "matched", "spans", "spans", "matched", "matched"]
    assert al.partner.tolist() == [-1, -1, 1, 1, 2, 3, 3, 4, 5]
    assert al.group.tolist() == [-1, -1, 0, 0, -1, 1, 1, -1, -1]
    assert al.s0.tolist() == [2, 5] and al.s1.tolist() == [3, 6]
    assert al.t0.tolist() == [1, 3] and al.t1.tolist() == [1, 3]
    assert al.counts() == {"matched": 3, "spans": 4, "none": 2}
    # identical tokenisations: everything matched, no spans
    same = A.align(t_ends, t_ends)
    assert [A.CLASS_NAMES[c] for c in same.cls] == ["none"] + ["matched"] * 5 and len(same.s0) == 0


def test_align_groups_crossing_boundaries_and_unclosed():
    """A span whose teacher side has several tokens too ('ab|c' vs 'a|bc'); a text the student
    does not reach to the end leaves its last group open (none)."""
    al = A.align([2, 3], [1, 3])
    assert [A.CLASS_NAMES[c] for c in al.cls] == ["spans", "spans"]
    assert (al.s0.tolist(), al.s1.tolist(), al.t0.tolist(), al.t1.tolist()) == ([0], [1], [0], [1])
    al = A.align([2, 4], [2, 3])  # the student's last token ends at 3, the teacher's never does
    assert [A.CLASS_NAMES[c] for c in al.cls] == ["matched", "none"]
    assert A.align([], [1, 2]).cls.tolist() == [0, 0]


def test_align_real_pair_has_every_class(toks):
    bpe, spm = toks
    t_ids, t_plen = render(bpe)
    s_ids, s_plen = render(spm)
    _, t_ends = A.completion_text(bpe, t_ids[t_plen:])
    _, s_ends = A.completion_text(spm, s_ids[s_plen:])
    al = A.align(t_ends, s_ends)
    c = al.counts()
    assert c["matched"] > 0 and c["spans"] > 0
    # every span covers the same text on both sides; every matched pair the same bytes
    ts, ss = A._starts(t_ends), A._starts(s_ends)
    for g in range(len(al.s0)):
        assert ss[al.s0[g]] == ts[al.t0[g]] and s_ends[al.s1[g]] == t_ends[al.t1[g]]
    tp, sp = A.token_pieces(bpe), A.token_pieces(spm)
    for k in np.nonzero(al.cls == A.MATCHED)[0][:-2]:
        assert sp[s_ids[s_plen + k]].strip() == tp[t_ids[t_plen + al.partner[k]]].strip()
    # after the text, in order: <end_of_turn> with <|im_end|>, then the templates' newlines
    after = [bpe.convert_ids_to_tokens(int(t_ids[t_plen + al.partner[k]])) for k in (-2, -1)]
    assert al.cls[-2] == al.cls[-1] == A.MATCHED and after == ["<|im_end|>", "Ċ"]


def test_pieces_round_trip_through_json(toks):
    """What `logits` stores (pieces.json + vocab.json) maps vocabularies like the tokenizer."""
    from mlx_distill.teacher.base import vocab_strings

    bpe, spm = toks
    stored = A.Pieces.from_json(A.pieces_of(bpe).to_json(), vocab_strings(bpe))
    assert stored.pieces == A.token_pieces(bpe) and np.array_equal(stored.special, A.special_mask(bpe))
    assert np.array_equal(A.vocab_map(stored, spm), A.vocab_map(bpe, spm))


def test_vocab_map(toks):
    bpe, spm = toks
    m = A.vocab_map(bpe, spm, extra={bpe.convert_tokens_to_ids("<|im_end|>"): spm.convert_tokens_to_ids("<end_of_turn>")})
    tp, sp = A.token_pieces(bpe), A.token_pieces(spm)
    ok = np.nonzero(m >= 0)[0]
    assert len(ok) > 50
    for i in ok:
        if tp[i]:
            assert sp[m[i]] == tp[i]
    assert m[bpe.convert_tokens_to_ids("<|im_end|>")] == spm.convert_tokens_to_ids("<end_of_turn>")
    assert m[bpe.convert_tokens_to_ids("<|im_start|>")] == -1  # no such special token in the other family
    # "\n": byte-level 'Ċ' -> the SentencePiece piece spelling a newline (a byte piece <0x0A> or "\n")
    assert sp[m[bpe.convert_tokens_to_ids("Ċ")]] == b"\n"
    # same tokenizer: the identity on every non-empty token
    ident = A.vocab_map(bpe, bpe)
    assert all(ident[i] == i for i in range(len(tp)) if tp[i] or A.special_mask(bpe)[i])
