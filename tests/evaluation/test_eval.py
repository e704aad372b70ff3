"""`python -m mlx_distill eval`: tiny MLX model + adapter end to end, an OpenAI-compatible server,
the honesty (overlap) check, prompts, seeded sampling, judge, reports."""

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mlx_distill import data as train_data
from mlx_distill.config import EvalConfig, TrainConfig
from mlx_distill.tasks.answers import repetition
from mlx_distill.evaluation.evaluate import build_messages, evaluate, load_eval_problems, render_user, template_for
from mlx_distill.generation import mlx_client
from mlx_distill.io import InputError
from mlx_distill.evaluation.metrics import REPEAT, wilson
from mlx_distill.tasks.overlap import question_key, training_keys
from mlx_distill.paths import REPO, prompt_path


def has_repetition(text):
    return repetition(text, **REPEAT) is not None

RECORD_FIELDS = {"id", "prompt", "response", "extracted", "gold", "correct", "status", "tokens", "words",
                 "words_final", "finish_reason", "latency_s", "truncated", "arithmetic_checked", "failure_kind"}


def _rows(path):
    return [json.loads(line) for line in open(path)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model, shared_data):
    """A LoRA adapter trained for 2 steps on 8 GSM8K *train* problems (so GSM8K test does not overlap)."""
    from mlx_distill.training import train

    root = tmp_path_factory.mktemp("adapter")
    corpus = root / "corpus"
    corpus.mkdir()
    rows = _rows(shared_data / "gsm8k" / "train.jsonl")[:10]
    recs = [{"id": f"gsm8k-train-{i:05d}", "question": r["question"], "reasoning": r["answer"].split("####")[0].strip(),
             "answer": r["answer"].split("####")[1].strip()} for i, r in enumerate(rows)]
    _write(corpus / "train.jsonl", recs[:8])
    _write(corpus / "valid.jsonl", recs[8:])
    run = root / "run"
    train.run(TrainConfig(model=str(tiny_model), data=str(corpus), out=str(run), iters=2, batch_size=2, val_every=2,
                          save_every=100, report_every=1, lora_layers=-1), quiet=True)
    return run


# ----------------------------------------------------------------------------- end to end, MLX
def test_eval_cli_tiny_model_with_adapter(tmp_path, tiny_model, adapter_run):
    """The README command, on the tiny model: records, summary, report, plot, manifest; --show prints samples."""
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "eval", "--model", str(tiny_model), "--adapter",
                        str(adapter_run), "--dataset", "gsm8k", "--limit", "5", "--max-tokens", "200", "--out", str(out),
                        "--show", "2"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("gold='") == 2 and "accuracy" in r.stdout
    for f in ("records.jsonl", "summary.json", "report.md", "lengths.png", "manifest.json"):
        assert (out / f).is_file(), f
    recs = _rows(out / "records.jsonl")
    assert len(recs) == 5 and RECORD_FIELDS <= set(recs[0])
    assert [x["id"] for x in recs] == [f"gsm8k-test-{i:05d}" for i in range(5)]
    s = json.loads((out / "summary.json").read_text())
    for k in ("n", "correct", "invalid", "accuracy", "accuracy_ci95", "words", "tokens", "truncation_rate",
              "arithmetic", "throughput_tokens_per_s", "peak_memory_gb", "parameters", "failure_kinds"):
        assert k in s, k
    assert s["n"] == 5 and s["adapter"] == str(adapter_run)
    assert s["parameters"]["adapter"] > 0 and s["parameters"]["total"] > s["parameters"]["adapter"]
    assert s["generated_tokens"] == sum(x["tokens"] for x in recs) > 0
    assert s["overlap"]["checked"] and s["overlap"]["overlapping"] == 0  # the adapter's train_questions.json
    assert s["overlap"]["source"].endswith("train_questions.json")
    assert s["peak_memory_gb"] > 0


def test_overlap_refuse_drop_warn(tmp_path, tiny_model, shared_data):
    test = _rows(shared_data / "gsm8k" / "test.jsonl")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # two test questions leak into train (one re-cased and re-spaced), one into valid as a chat record
    _write(corpus / "train.jsonl", [{"question": test[0]["question"], "answer": "1"},
                                    {"question": "  " + test[2]["question"].upper() + " ", "answer": "1"}])
    _write(corpus / "valid.jsonl", [{"messages": [{"role": "user", "content": test[3]["question"] + "\n\nSolve it."},
                                                  {"role": "assistant", "content": "#### 1"}]}])
    base = EvalConfig(model=str(tiny_model), dataset="gsm8k", limit=5, max_tokens=2, train_data=str(corpus),
                      out=str(tmp_path / "e"), plot=False, overwrite=True)
    with pytest.raises(InputError, match=r"3 of 5 evaluation problems also occur in the training data"):
        evaluate(base, quiet=True)
    s = evaluate(dataclasses.replace(base, overlap="drop"), quiet=True)
    assert s["n"] == 2 and s["overlap"]["overlapping"] == 3
    s = evaluate(dataclasses.replace(base, overlap="warn"), quiet=True)
    assert s["n"] == 5 and s["seen_in_training"] == 3
    flagged = [r["id"] for r in _rows(tmp_path / "e" / "records.jsonl") if r.get("seen_in_training")]
    assert flagged == ["gsm8k-test-00000", "gsm8k-test-00002", "gsm8k-test-00003"]


def test_overlap_keys_ignore_unrelated(tmp_path, shared_data):
    probs = load_eval_problems("gsm8k", limit=3)
    f = _write(tmp_path / "c.jsonl", [{"question": "What is 2 + 2?", "answer": "4"}])
    keys = training_keys([f])
    assert keys == {question_key("what is 2+2")} and not any(question_key(p["question"]) in keys for p in probs)


def test_seeded_sampling_reproducible(tmp_path, tiny_model):
    client = mlx_client(str(tiny_model), batch_size=4)
    try:
        cfg = EvalConfig(model=str(tiny_model), dataset="gsm8k", limit=3, max_tokens=12, temperature=1.0,
                         out=str(tmp_path / "s"), plot=False)
        runs = {}
        for name, seed in (("a", 0), ("b", 0), ("c", 1)):
            evaluate(dataclasses.replace(cfg, seed=seed, out=str(tmp_path / name)), client=client, quiet=True)
            runs[name] = [r["response"] + str(r["tokens"]) for r in _rows(tmp_path / name / "records.jsonl")]
        assert runs["a"] == runs["b"]
        assert runs["a"] != runs["c"]
        greedy = evaluate(dataclasses.replace(cfg, temperature=0.0), client=client, quiet=True, write=False)
        assert greedy["temperature"] == 0.0
    finally:
        asyncio.run(client.aclose())


# ----------------------------------------------------------------------------- prompts
def test_prompts_match_training_and_fewshot(tiny_model, shared_data):
    q = "Ann has 3 apples and buys 4 more. How many apples does she have?"
    name, tpl = template_for(EvalConfig(dataset="gsm8k"))
    train_tpl = prompt_path("train_user.txt").read_text()
    trained = train_data.record_to_messages({"question": q, "reasoning": "3 + 4 = 7", "answer": "7"}, train_tpl)
    assert render_user(tpl, q, "####") == trained[0]["content"].rstrip("\n")  # an adapter sees its training prompt
    boxed = train_data.record_to_messages({"question": q, "reasoning": "7", "answer": "7", "answer_format": "boxed"},
                                          train_tpl)
    assert render_user(tpl, q, "boxed") == boxed[0]["content"].rstrip("\n") and "\\boxed{}" in boxed[0]["content"]
    from mlx_distill.evaluation.evaluate import answer_format, budget_text, fewshot_examples

    assert answer_format(EvalConfig(dataset="math500"), "math") == "boxed"
    assert answer_format(EvalConfig(dataset="gsm8k", prompt_style="cot_boxed"), "gsm8k") == "boxed"
    # few-shot exemplars: drawn at run time from the task's train split, seeded, in the prompt's format
    shots = fewshot_examples("gsm8k", 2, "####", seed=0, exclude=set())
    assert shots == fewshot_examples("gsm8k", 2, "####", seed=0, exclude=set())
    assert shots != fewshot_examples("gsm8k", 2, "####", seed=1, exclude=set())
    assert all(s["id"].startswith("gsm8k-train-") and "<<" not in s["solution"] for s in shots)
    msgs = build_messages(q, tpl, "####", shots, system="Be brief.", budget=budget_text(50))
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"].splitlines()[-1].startswith("#### ") and "50 words" in msgs[-1]["content"]
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(str(tiny_model)).apply_chat_template(msgs, tokenize=False,
                                                                               add_generation_prompt=True)
    assert text.count("<|im_start|>user") == 3 and text.endswith("<|im_start|>assistant\n")
    # MATH-500 draws from MATH train (disjoint from every evaluation set), with a boxed answer
    from mlx_distill.tasks.problems import leakage_index, normalize_text

    index, loaded, missing = leakage_index()
    assert not missing
    mshots = fewshot_examples("math500", 3, "boxed", seed=0, exclude=set())
    assert all(s["id"].startswith("math-train") and "\\boxed" in s["solution"] for s in mshots)
    assert not any(normalize_text(s["question"]) in index for s in shots + mshots)
    # an evaluated problem is never its own exemplar
    train = load_eval_problems("gsm8k", split="train")
    ex = {p["id"] for p in train[:-2]}
    assert {s["id"] for s in fewshot_examples("gsm8k", 2, "####", 0, ex)} == {p["id"] for p in train[-2:]}
    with pytest.raises(InputError, match="no train split"):
        fewshot_examples("corpus", 1, "####", 0, set())


# ----------------------------------------------------------------------------- OpenAI-compatible server
class _FakeOpenAI(BaseHTTPRequestHandler):
    replies: dict = {}
    delay = 0.0   # seconds before each chat reply
    asked: list = []  # user turns of the chat requests served

    def log_message(self, *a):
        pass

    def _send(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = req["messages"][-1]["content"]
        self.asked.append(user)
        if self.delay:
            import time

            time.sleep(self.delay)
        if "INCORRECT" in user:  # the judge prompt: an explicit final verdict line
            content, finish = "The response's final answer equals the reference.\nVERDICT: CORRECT", "stop"
        else:
            content, finish = next((v for k, v in self.replies.items() if k in user), ("no idea", "stop"))
        self._send({"id": "c1", "object": "chat.completion", "created": 0, "model": "fake-model-2024",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": finish}],
                    "usage": {"prompt_tokens": 50, "completion_tokens": len(content.split()),
                              "total_tokens": 50 + len(content.split())}})


@pytest.fixture
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_api_backend_think_truncation_judge_and_side_by_side(tmp_path, fake_server):
    probs = load_eval_problems("gsm8k", limit=4)
    golds = [p["answer"] for p in probs]
    _FakeOpenAI.replies = {
        probs[0]["question"][:60]: (f"16 - 3 - 4 = 9 and 9 * 2 = 18.\n#### {golds[0]}", "stop"),
        probs[1]["question"][:60]: (f"<think>maybe it is {golds[1]}, let me check again</think>\n#### 4", "stop"),
        probs[2]["question"][:60]: ("Let me compute this carefully, step by", "length"),
        probs[3]["question"][:60]: (f"So 2 + 2 = 5.\n#### {golds[3]}", "stop"),
    }
    teacher = _write(tmp_path / "verified.jsonl", [{"id": p["id"], "reasoning": "TEACHER-TRACE", "answer": p["answer"]}
                                                   for p in probs])
    cfg = EvalConfig(backend="api", base_url=fake_server, model="fake-model", dataset="gsm8k", limit=4,
                     judge="api", judge_base_url=fake_server, judge_model="fake-model", compare=str(teacher),
                     report_samples=4, out=str(tmp_path / "api"))
    s = evaluate(cfg, quiet=True)
    assert (s["n"], s["correct"], s["wrong"], s["invalid"]) == (4, 2, 1, 1)
    assert s["truncated"] == 1 and s["served_models"] == ["fake-model-2024"]
    assert s["arithmetic"]["steps_wrong"] == 1 and s["arithmetic"]["steps_checked"] == 3
    assert s["failure_kinds"] == {"wrong answer": 1, "truncated at max tokens": 1}
    assert s["judge"] == {"judged": 4, "undecided": 0, "accuracy": 1.0, "agreement": 0.5}
    assert s["peak_memory_gb"] is None and s["parameters"] is None
    recs = _rows(tmp_path / "api" / "records.jsonl")
    think = recs[1]
    assert think["reasoning"].startswith("maybe") and think["final"] == "#### 4"
    assert think["extracted"] == "4" and think["status"] == "wrong"  # graded on the answer after </think>
    assert think["words"] > think["words_final"] == 2
    report = (tmp_path / "api" / "report.md").read_text()
    assert report.count("TEACHER-TRACE") == 4 and "<table>" in report and "truncated at max tokens" in report


def test_api_backend_failed_requests_counted(tmp_path):
    cfg = EvalConfig(backend="api", base_url="http://127.0.0.1:9/v1", model="m", dataset="gsm8k", limit=2,
                     out=str(tmp_path / "x"), plot=False)
    from mlx_distill.generation import make_client

    # (make_eval_client would refuse this server before any work: nothing listens there)
    client = make_client("api", base_url=cfg.base_url, model="m", api_key_env=cfg.api_key_env, max_retries=0)
    s = evaluate(cfg, client=client, quiet=True)
    assert s["invalid"] == 2 and s["invalid_reasons"] == {"generation failed": 2}


# ----------------------------------------------------------------------------- datasets and helpers
def test_corpus_test_split_and_user_csv(tmp_path):
    corpus = tmp_path / "corp"
    corpus.mkdir()
    _write(corpus / "test.jsonl", [{"id": "gsm8k-train-00007", "question": "What is 2+3?", "answer": "5",
                                    "source": "gsm8k"}])
    probs = load_eval_problems("corpus", str(corpus))
    assert probs[0]["id"] == "gsm8k-train-00007"
    from mlx_distill.evaluation.evaluate import answer_kind_for

    assert answer_kind_for("corpus", probs) == "gsm8k"
    csv = tmp_path / "comp.csv"
    csv.write_text("problem,answer,year,figure\nWhat is 1+1?,2,2020,no\nSee the diagram.,3,2020,yes\n")
    probs = load_eval_problems("csv", str(csv))
    assert len(probs) == 1 and answer_kind_for("csv", probs) == "math"
    with pytest.raises(InputError, match="needs --data"):
        load_eval_problems("jsonl")
    with pytest.raises(InputError, match="test.jsonl: corpus split not found"):
        load_eval_problems("corpus", str(tmp_path))


def test_wilson_and_repetition(shared_data):
    lo, hi = wilson(0, 10)
    assert lo == 0 and abs(hi - 0.2775) < 1e-3
    lo, hi = wilson(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert has_repetition("so the answer is " * 15) and has_repetition("Step: add 2 and 3.\n" * 6)
    assert not has_repetition("16 - 3 - 4 = 9 eggs. 9 * 2 = $18.\n#### 18")
    # reference solutions are not loops (derivations repeat a little)
    sols = [r["solution"] for r in _rows(shared_data / "math500" / "test.jsonl")]
    assert sum(map(has_repetition, sols)) <= 2


# ----------------------------------------------------------------------------- resumable eval, honest outputs
def _eval_cmd(server, out, extra=()):
    return [sys.executable, "-m", "mlx_distill", "eval", "--backend", "api", "--base-url", server, "--model",
            "fake-model", "--dataset", "gsm8k", "--limit", "8", "--concurrency", "1", "--no-plot", "--out", str(out),
            *extra]


def _comparable(path):
    return [{k: v for k, v in r.items() if k != "latency_s"} for r in _rows(path)]


def test_eval_killed_mid_run_resumes_to_the_same_result(tmp_path, fake_server, shared_data):
    """SIGKILL an eval after a few records, re-run the same command: finished problems are not
    asked again, and the result equals an uninterrupted run's."""
    import signal
    import time

    probs = load_eval_problems("gsm8k", limit=8)
    _FakeOpenAI.replies = {p["question"][:60]: (f"Thinking.\n#### {p['answer'] if i % 3 else 0}", "stop")
                           for i, p in enumerate(probs)}
    _FakeOpenAI.delay = 0.3
    _FakeOpenAI.asked = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        full = tmp_path / "full"
        subprocess.run(_eval_cmd(fake_server, full), cwd=REPO, env=env, check=True, capture_output=True)
        _FakeOpenAI.asked = []
        part = tmp_path / "part"
        proc = subprocess.Popen(_eval_cmd(fake_server, part), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            if (part / "records.jsonl").is_file() and len((part / "records.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = len(_rows(part / "records.jsonl"))
        assert 3 <= before < 8 and not (part / "summary.json").exists()
        asked_before = len(_FakeOpenAI.asked)
        r = subprocess.run(_eval_cmd(fake_server, part), cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert f"{before} of 8 problems already done" in r.stderr
        assert len(_FakeOpenAI.asked) - asked_before == 8 - before  # nothing asked twice
        assert _comparable(part / "records.jsonl") == _comparable(full / "records.jsonl")
        a, b = (json.loads((d / "summary.json").read_text()) for d in (part, full))
        assert (a["n"], a["correct"], a["wrong"]) == (b["n"], b["correct"], b["wrong"]) == (8, 5, 3)
        # the same command on a finished folder does nothing, and says so
        r = subprocess.run(_eval_cmd(fake_server, part), cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 0 and "already complete" in r.stdout
        assert len(_FakeOpenAI.asked) - asked_before == 8 - before
    finally:
        _FakeOpenAI.delay = 0.0


def test_eval_out_with_other_settings_is_refused(tmp_path, fake_server, shared_data):
    _FakeOpenAI.replies = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "e"
    r = subprocess.run(_eval_cmd(fake_server, out), cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    wrote = r.stdout.strip().splitlines()[-1]
    for f in ("records.jsonl", "summary.json", "report.md", "manifest.json"):  # every file written is named
        assert str(out / f) in wrote
    r = subprocess.run(_eval_cmd(fake_server, out, ["--max-tokens", "7"]), cwd=REPO, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "max_tokens: 1024 -> 7" in r.stderr and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(_eval_cmd(fake_server, out, ["--max-tokens", "7", "--overwrite"]), cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["max_tokens"] == 7


def test_eval_without_data_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLX_DISTILL_DATA"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "eval", "--dataset", "gsm8k", "--out",
                        str(tmp_path / "e")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load gsm8k (test)")
    assert "MLX_DISTILL_DATA" in lines[0] and "openai/gsm8k" in lines[0] and "--data" in lines[0]
    assert not (tmp_path / "e").exists()


def test_overlap_checked_by_hash_after_the_corpus_is_gone(tmp_path, tiny_model, shared_data):
    """An adapter remembers its training questions: eval refuses a test problem it was trained on,
    from another directory, after the corpus folder has been deleted, and through convert-adapter."""
    import shutil

    from mlx_distill.training import train

    test = load_eval_problems("gsm8k", limit=3)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write(corpus / "train.jsonl", [{"id": f"t{i}", "question": f"What is {i} + {i}?", "reasoning": "", "answer": 2 * i}
                                    for i in range(6)] + [{"id": "leak", "question": test[1]["question"],
                                                            "reasoning": "", "answer": test[1]["answer"]}])
    _write(corpus / "valid.jsonl", [{"id": "v", "question": "What is 9 + 1?", "reasoning": "", "answer": "10"}])
    run = tmp_path / "run"
    train.run(TrainConfig(model=str(tiny_model), data=str(corpus), out=str(run), iters=1, batch_size=2, val_every=1,
                          lora_layers=-1), quiet=True)
    prov = json.loads((run / "train_questions.json").read_text())
    assert prov["questions"] == 8 and prov["files"][0]["path"].startswith("/")
    shutil.rmtree(corpus)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "mlx_distill", "eval", "--model", str(tiny_model), "--adapter", str(run),
                        "--dataset", "gsm8k", "--limit", "3", "--max-tokens", "2", "--out", str(tmp_path / "e")],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "1 of 3 evaluation problems also occur in the training data" in r.stderr
    peft = tmp_path / "peft"
    subprocess.run([sys.executable, "-m", "mlx_distill", "convert-adapter", "--input", str(run), "--output", str(peft)],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    assert (peft / "train_questions.json").read_text() == (run / "train_questions.json").read_text()
    # a check that cannot run is an error under --overlap refuse, a warning under warn
    (run / "train_questions.json").unlink()
    cfg = EvalConfig(model=str(tiny_model), adapter=str(run), dataset="gsm8k", limit=2, max_tokens=2,
                     out=str(tmp_path / "e2"), plot=False)
    with pytest.raises(InputError, match="cannot check train/eval overlap"):
        evaluate(cfg, quiet=True)
    s = evaluate(dataclasses.replace(cfg, overlap="warn"), quiet=True)
    assert s["overlap"]["checked"] is False and s["n"] == 2


def test_manifests_hold_no_credentials(tmp_path, fake_server, shared_data):
    from mlx_distill.io import public_url, scrub

    assert public_url("https://user:pw@api.example.com:8443/v1?key=s3cret#frag") == "https://api.example.com:8443/v1"
    assert scrub({"a": ["http://u:p@h/x?token=1", 3], "b": "plain"}) == {"a": ["http://h/x", 3], "b": "plain"}
    _FakeOpenAI.replies = {}
    secret_url = fake_server.replace("http://", "http://alice:hunter2@") + "?api_key=zzz"
    cfg = EvalConfig(backend="api", base_url=secret_url, model="fake-model", dataset="gsm8k", limit=1,
                     out=str(tmp_path / "m"), plot=False)
    try:
        evaluate(cfg, quiet=True)
    except Exception:
        pass  # whether the client accepts such a URL is not the point: what was written is
    for f in (tmp_path / "m").glob("*.json"):
        text = f.read_text()
        assert "hunter2" not in text and "zzz" not in text and "alice" not in text, f
