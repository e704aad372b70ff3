"""The builder against a real OpenAI-compatible server (`mlx_lm server` on loopback, tiny random
model) and with a local MLX teacher. A random model never writes a final-answer marker, so its
traces end rejected; the verified path is covered with the fault server (test_corpus_build.py)."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from mlx_distill.blas import preload_env
from mlx_distill.corpus import build as B
from mlx_distill.io import read_jsonl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlx_server(tiny_model):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(tiny_model),
                             "--host", "127.0.0.1", "--port", str(port)], env=preload_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlx_lm server did not start: {proc.stderr.read()[-2000:]}")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def problems_file(path, n=3):
    rows = [{"question": f"Ann has {i} apples and buys 2 more. How many now?", "answer": f"#### {i + 2}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_unverified(argv, capsys):
    """`corpus build` with a random model: every trace is rejected, so the build says the corpus is
    empty (with its top rejection reasons) and exits 1, after writing its traces and manifest."""
    with pytest.raises(SystemExit) as e:
        B.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "is empty: 0 of" in err and "Top rejection reasons:" in err, err


def check_corpus(out, n_problems, samples, model):
    traces = read_jsonl(out / "traces.jsonl")
    keys = [r["key"] for r in traces]
    assert len(keys) == len(set(keys)) == n_problems * samples  # none duplicated, none lost
    for r in traces:
        assert r["status"] in ("verified", "rejected", "failed")
        assert r["status"] != "rejected" or r["reason"] in ("truncated", "no_marker", "wrong_answer", "unparsable",
                                                          "repetition", "banned", "too_long")
        assert r["status"] != "failed" or r["reason"].startswith("request failed")
        if r["status"] != "failed":
            p = r["provenance"]
            assert p["model"] == model and p["finish_reason"] in ("stop", "length") and p["prompt_tokens"] > 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["attempts"]["final"] == n_problems * samples
    return traces, man


def test_build_against_mlx_lm_server(tmp_path, mlx_server, monkeypatch, capsys):
    monkeypatch.setenv("DEEPSEEK_API_KEY", "")  # a local server needs no key
    probs = problems_file(tmp_path / "p.jsonl")
    out = tmp_path / "c"
    argv = ["build", "--source", "gsm8k", "--problems", str(probs), "--base-url", mlx_server,
            "--model", "default_model", "--samples", "2", "--max-tokens", "12", "--concurrency", "4",
            "--temperature", "0.8", "--out", str(out), "--leakage", "warn"]
    build_unverified(argv, capsys)
    traces, man = check_corpus(out, 3, 2, "default_model")
    assert man["models_reported"] == {"default_model": 6} and man["tokens"]["solver"]["prompt_tokens"] > 0
    build_unverified(argv, capsys)  # re-run: nothing new asked, nothing duplicated
    assert read_jsonl(out / "traces.jsonl") == traces


def test_build_with_local_mlx_teacher(tmp_path, tiny_model, capsys):
    probs = problems_file(tmp_path / "p.jsonl", 4)
    out = tmp_path / "m"
    argv = ["build", "--teacher", "mlx", "--model", str(tiny_model), "--source", "gsm8k", "--problems", str(probs),
            "--samples", "2", "--max-tokens", "10", "--concurrency", "4", "--out", str(out), "--leakage", "warn"]
    build_unverified(argv, capsys)
    traces, man = check_corpus(out, 4, 2, str(tiny_model))
    assert man["this_run"]["new_traces"] == 8 and man["cost_usd"] == 0  # local: no API prices
    build_unverified(argv, capsys)
    assert read_jsonl(out / "traces.jsonl") == traces
