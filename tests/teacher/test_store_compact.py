"""Store format 3 (`mlx_distill.teacher.codec`): exact ids, bounded log-prob error, edge cases."""

import numpy as np
import pytest

from mlx_distill.teacher import codec


def _topm_block(rng, n, m, vocab=5000, length=None, hole=False, sharp=0.0):
    z = rng.normal(0, 3, (n, vocab)).astype(np.float64)
    z[:, :50] += 4  # frequent tokens, as in a real teacher
    z[np.arange(n), rng.integers(0, vocab, n)] += sharp  # a confident teacher: one token holds most mass
    lp = z - np.log(np.exp(z).sum(1, keepdims=True))
    ids = np.argsort(-lp, 1)[:, :m]
    lps = np.take_along_axis(lp, ids, 1).astype(np.float32)
    if hole:  # slots a teacher left empty
        lps[::3, m // 2:] = -np.inf
        ids[::3, m // 2:] = 0
    length = length or n + 5
    tokens = rng.integers(0, vocab, length)
    targets = tokens[length - n:]
    targets[::2] = ids[::2, min(1, m - 1)]  # the token there is often in the row
    actual = np.take_along_axis(lp, targets[:, None], 1)[:, 0].astype(np.float32)
    ends = np.concatenate([np.zeros(length - n, np.int64), np.cumsum(rng.integers(0, 6, n))])
    return {"ids": ids, "logprobs": lps, "actual": actual, "targets": targets, "tokens": tokens, "ends": ends}


def _roundtrip(tmp_path, blocks, width, sampled=False):
    arrays, meta = codec.encode_shard(blocks, width, sampled=sampled)
    codec.write_shard(tmp_path / "s.safetensors", arrays, meta)
    f = codec.ShardFile(tmp_path / "s.safetensors")
    out, row = [], 0
    for i, b in enumerate(blocks):
        out.append(f.rows(i, row, len(b["ids"])))
        row += len(b["ids"])
    return f, out


def _by_id(ids, lps):
    o = np.argsort(np.where(np.isfinite(lps), np.asarray(ids, np.int64), 1 << 40), 1, kind="stable")
    return np.take_along_axis(ids, o, 1), np.take_along_axis(lps, o, 1)


def test_roundtrip_ids_exact_logprobs_within_bound(tmp_path):
    rng = np.random.default_rng(0)
    blocks = [_topm_block(rng, n, 25, hole=(i == 1), sharp=12.0 * (i % 2)) for i, n in enumerate((40, 1100, 3, 900))]
    f, out = _roundtrip(tmp_path, blocks, 25)
    assert len(f.offsets) > 2  # several chunks: a lookup decodes one
    tokens, lengths = f.tokens_and_lengths()
    t0 = 0
    for b, o in zip(blocks, out):
        assert np.all(o["logprobs"][:, :-1] >= o["logprobs"][:, 1:])  # sorted descending, like format 2
        ok = np.isfinite(b["logprobs"])
        assert (np.isfinite(o["logprobs"]) == np.take_along_axis(ok, np.argsort(-b["logprobs"], 1), 1)).all()
        ia, la = _by_id(b["ids"], b["logprobs"])
        ib, lb = _by_id(o["ids"], o["logprobs"])
        fin = np.isfinite(la)
        assert (ia[fin] == ib[fin]).all()
        sel = fin & (la >= codec.FLOOR)
        err = np.abs(la[sel].astype(np.float64) - lb[sel])
        assert err.max() <= codec.MAX_ERROR + 1e-6 and codec.MAX_ERROR <= 0.02 + 1e-12
        low = fin & (la < codec.FLOOR)
        assert np.abs(la[low] - lb[low]).max(initial=0) <= codec.COARSE_STEP / 2 + codec.MAX_ERROR
        # the actual token's log-prob: from its slot (0.02) or its own level (0.001)
        assert np.abs(o["actual"] - b["actual"]).max() <= codec.MAX_ERROR + 1e-6
        # the tail mass (T = 1): exact where the top slot can carry the fix (a confident teacher),
        # else within what the 0.02-nat bound allows
        rest, want = np.exp(o["tail"]), np.exp(codec.tail_logmass(b["logprobs"]))
        top = np.exp(np.nan_to_num(b["logprobs"].max(1), neginf=-50.0))
        sure = top > 0.5
        assert np.abs(rest - want)[sure].max(initial=0) <= 2e-4
        assert (np.abs(rest - want) <= 0.02 * (1 - want) + 1e-6).all()
        n = len(b["tokens"])
        assert (tokens[t0: t0 + n] == b["tokens"]).all()
        assert (codec.ends_of(lengths[t0: t0 + n]) == b["ends"]).all()
        t0 += n


def test_m1_nan_actual_and_empty_rows(tmp_path):
    rng = np.random.default_rng(1)
    b = _topm_block(rng, 30, 1)
    b["actual"][4] = np.nan  # a remote teacher that gave no log-prob there
    b["logprobs"][7] = -np.inf  # a row without any teacher slot
    _, (o,) = _roundtrip(tmp_path, [b], 1)
    assert o["ids"].shape == (30, 1)
    assert np.isnan(o["actual"][4]) and np.isfinite(np.delete(o["actual"], 4)).all()
    assert o["logprobs"][7, 0] == -np.inf and o["ids"][7, 0] == 0
    keep = np.isfinite(b["logprobs"][:, 0])
    assert (o["ids"][keep, 0] == b["ids"][keep, 0]).all()


def test_empty_shard(tmp_path):
    f, out = _roundtrip(tmp_path, [], 25)
    assert out == [] and len(f.tokens_and_lengths()[0]) == 0


def test_sampled_rows_keep_counts(tmp_path):
    rng = np.random.default_rng(2)
    n, N = 50, 12
    ids = rng.integers(0, 3000, (n, N))
    counts = rng.integers(0, 4, (n, N))
    ids[counts == 0] = 0
    ids = np.where(counts > 0, ids + np.arange(N) * 3000, 0)  # distinct per row
    lps = np.where(counts > 0, -rng.uniform(0, 9, (n, N)), -np.inf).astype(np.float32)
    b = {"ids": ids, "logprobs": lps, "counts": counts, "actual": -rng.uniform(0, 5, n).astype(np.float32),
         "tokens": rng.integers(0, 3000, n + 2), "ends": np.arange(n + 2)}
    _, (o,) = _roundtrip(tmp_path, [b], N, sampled=True)
    for r in range(n):
        want = {int(i): int(c) for i, c in zip(ids[r], counts[r]) if c}
        got = {int(i): int(c) for i, c in zip(o["ids"][r], o["counts"][r]) if c}
        assert got == want


def test_bytes_per_position_on_a_peaked_teacher(tmp_path):
    """The coding is compact on a teacher-like distribution (the real target, <= 48 B/token on the
    demo store with SmolLM2, is measured by `logits` and recorded in BENCHMARKS)."""
    rng = np.random.default_rng(3)
    blocks = [_topm_block(rng, 400, 25) for _ in range(3)]
    arrays, meta = codec.encode_shard(blocks, 25)
    n = sum(len(b["ids"]) for b in blocks)
    per_pos = sum(a.nbytes for a in arrays.values()) / n
    assert per_pos < (25 * 4 + 25 * 2) / 2, per_pos  # under half of format 2's int32 + float16 payload


def test_lazy_reader_maps_the_file(tmp_path):
    rng = np.random.default_rng(4)
    blocks = [_topm_block(rng, 600, 25) for _ in range(4)]
    _roundtrip(tmp_path, blocks, 25)
    f = codec.ShardFile(tmp_path / "s.safetensors", cache=1)
    assert isinstance(f._map, np.memmap) and not f._cache  # nothing decoded on opening
    f.rows(0, 0, 10)
    f.rows(3, 1800, 10)
    assert list(f._cache) == [1]  # decoded chunks are bounded


def test_lazy_shard_serves_format2_slices(tmp_path):
    """`LazyShard` answers the slices `TopMStore` takes of a format-2 shard (rows of one example,
    its scored tokens and their byte ends)."""
    rng = np.random.default_rng(5)
    blocks = [_topm_block(rng, n, 8) for n in (700, 500, 20)]
    arrays, meta = codec.encode_shard(blocks, 8)
    codec.write_shard(tmp_path / "s.safetensors", arrays, meta)
    sh = codec.LazyShard(tmp_path / "s.safetensors")
    assert "tail" in sh and "counts" not in sh
    row = tok = 0
    for b in blocks:
        n, L = len(b["ids"]), len(b["tokens"])
        assert sh["ids"][row: row + n].shape == (n, 8)
        assert (np.sort(sh["ids"][row: row + n], 1) == np.sort(b["ids"], 1)).all()
        assert (sh["tokens"][tok: tok + L] == b["tokens"]).all()
        assert (sh["ends"][tok: tok + L] == b["ends"]).all()
        row, tok = row + n, tok + L
    assert sh["logprobs"][0:row].shape == (row, 8)  # across chunks
    assert sh["ids"][row: row + 5].shape == (0, 8)


def test_draw_rows_follow_the_tempered_teacher(tmp_path):
    rng = np.random.default_rng(6)
    V, N, T = 7, 12, 2.0
    z = rng.normal(0, 2, V)
    p = np.exp(z / T) / np.exp(z / T).sum()
    logits = np.tile(z, (3000, 1))
    d = codec.draw_rows(logits, N, T, codec.example_seed(0, "ex-1"))
    assert (d["counts"].sum(1) == N).all()
    freq = np.zeros(V)
    np.add.at(freq, d["ids"][d["counts"] > 0], d["counts"][d["counts"] > 0])
    freq /= freq.sum()
    se = np.sqrt(p * (1 - p) / (3000 * N))
    assert np.all(np.abs(freq - p) <= 5 * se), (freq, p)
    assert np.allclose(d["logprobs"][d["counts"] > 0], np.log(p)[d["ids"][d["counts"] > 0]], atol=1e-5)
    again = codec.draw_rows(logits[:5], N, T, codec.example_seed(0, "ex-1"))
    assert (again["ids"] == d["ids"][:5]).all()  # the same seed and example id draw the same tokens
    # a sampled shard holds them in a few bytes per position
    blocks = [{**d, "actual": np.full(3000, -1.0, np.float32), "tokens": np.zeros(3001, np.int64),
               "ends": np.zeros(3001, np.int64)}]
    arrays, _ = codec.encode_shard(blocks, N, sampled=True)
    assert sum(a.nbytes for a in arrays.values()) / 3000 < 32


def test_map_safetensors_reads_format2_arrays_lazily(tmp_path):
    from safetensors.numpy import save_file

    a = {"ids": np.arange(60, dtype=np.int32).reshape(6, 10), "logprobs": np.linspace(-3, 0, 60).astype(np.float16)
         .reshape(6, 10), "actual": np.zeros(6, np.float32)}
    save_file(a, str(tmp_path / "s.safetensors"))
    m = codec.map_safetensors(tmp_path / "s.safetensors")
    assert all(isinstance(v.base, np.memmap) or isinstance(v, np.memmap) for v in m.values())
    for k in a:
        assert m[k].dtype == a[k].dtype and (np.asarray(m[k]) == a[k]).all()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_store_with_many_shards_reads_in_bounded_memory(tmp_path):
    """48 shards whose decoded rows total ~96 MB: reading every example once keeps the resident
    memory growth well below that (shards are mapped, decoded a chunk at a time, at most
    store.OPEN_SHARDS open)."""
    import json
    import shutil

    from mlx_distill.teacher import store

    rng = np.random.default_rng(7)
    n_ex, rows, m, n_shards = 40, 250, 25, 48
    blocks = [_topm_block(rng, rows, m, length=rows + 10) for _ in range(n_ex)]
    arrays, meta = codec.encode_shard(blocks, m)
    codec.write_shard(tmp_path / "shard-00000.safetensors", arrays, meta)
    examples, shards = {}, []
    for k in range(n_shards):
        if k:
            shutil.copy(tmp_path / "shard-00000.safetensors", tmp_path / store.shard_name(k))
        shards.append({"file": store.shard_name(k), "examples": n_ex, "positions": n_ex * rows})
        for i in range(n_ex):
            examples[f"s{k}-e{i}"] = {"shard": k, "row": i * rows, "n": rows, "first": 9, "tok": i * (rows + 10),
                                      "length": rows + 10, "prompt_len": 10}
    man = {"stage": "logits", "format": 3, "top_m": m, "examples": examples, "shards": shards,
           "tokenizer": {"fingerprint": "x", "file": "vocab.json"}, "config": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    st = store.TopMStore(tmp_path)
    decoded = n_shards * n_ex * rows * m * 8  # int32 ids + float32 log-probs
    before = _rss_bytes()
    total = 0.0
    for eid in examples:
        ids, lps = st.rows(eid)
        total += float(lps[:, 0].sum())
        assert ids.shape == (rows, m)
    grown = _rss_bytes() - before
    assert np.isfinite(total) and len(st._shards) <= store.OPEN_SHARDS
    assert grown < decoded / 3, (grown / 2**20, decoded / 2**20)


def test_kd_loss_from_the_compact_store_within_1pct_of_format2(tiny_model, tiny_llama, tmp_path):
    """The same teacher, corpus and batches through a format-2 and a format-3 store: the KD loss a
    student gets differs by < 1% (renormalised and tail bucket, T = 1 and 2)."""
    import json

    import mlx.core as mx
    from mlx_lm import load

    from mlx_distill import data
    from mlx_distill.config import LogitsConfig, TrainConfig, build
    from mlx_distill.paths import REPO
    from mlx_distill.teacher.logits import extract
    from mlx_distill.training.kd import kd_setup
    from mlx_distill.training.losses import kd_loss

    rng = np.random.default_rng(8)
    recs = []
    for i in range(12):
        a, b = int(rng.integers(1, 99)), int(rng.integers(1, 99))
        recs.append({"id": f"q{i}", "question": f"Ann has {a} coins and buys {b} more. How many now?",
                     "reasoning": f"Ann has {a} + {b} = {a + b} coins.", "answer": str(a + b)})
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tpl = str(REPO / "prompts" / "train_user.txt")
    srcs = {}
    model, tok = load(str(tiny_llama))
    for fmt in (2, 3):
        out = tmp_path / f"f{fmt}"
        extract(build(LogitsConfig, dict(teacher=str(tiny_model), data=str(corpus), out=str(out), top_m=16,
                                         prompt_template=tpl, max_seq_length=512, store_format=fmt)), quiet=True)
        cfg = build(TrainConfig, dict(model=str(tiny_llama), data=str(corpus), prompt_template=tpl, max_seq_length=512,
                                      kd_dir=str(out), kd_top_k=16, val_fraction=0.0))
        exs = data.load_examples(cfg, tok, "train")
        srcs[fmt] = kd_setup(cfg, {"train": exs}, tok)
    for idx in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]):
        b = data.collate(exs, idx, data.pad_id_of(tok))
        logits = model(mx.array(b.tokens[:, :-1]))
        mask = mx.array(data.batch_arrays(b)["mask"])
        arr = {f: srcs[f].batch_arrays(b, 16) for f in (2, 3)}
        for tail in (False, True):
            for T in (1.0, 2.0):
                k2, k3 = (float(kd_loss(logits, mx.array(arr[f]["kd_ids"]), mx.array(arr[f]["kd_logits"]), mask,
                                        temperature=T, tail=tail)[0]) for f in (2, 3))
                assert abs(k3 - k2) <= 0.01 * abs(k2), (idx, tail, T, k2, k3)
