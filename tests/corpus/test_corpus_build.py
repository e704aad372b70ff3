"""The corpus builder end to end against the fault-injecting server: every problem ends verified,
rejected or failed-with-reason; nothing is duplicated or lost; re-runs, SIGKILL and Ctrl-C resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fault_server import FaultServer
from mlx_distill.blas import preload_env
from mlx_distill.corpus import build as B
from mlx_distill.corpus import filters
from mlx_distill.io import InputError, read_jsonl
from mlx_distill.paths import REPO

SECRET = "sk-test-secret-never-written-0451"


def gsm8k_file(path: Path, n: int, offset: int = 0) -> Path:
    """GSM8K-format problems '[Pi] ...' whose gold answer is i + 10."""
    rows = [{"question": f"[P{i}] Ann has {i} apples and buys 10 more. How many now?",
             "answer": f"{i} + 10 = {i + 10}\n#### {i + 10}"} for i in range(offset, offset + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good(i: int, **kw) -> dict:
    return {"solve": {"content": f"Ann has {i} + 10 = {i + 10} apples.\n#### {i + 10}",
                      "reasoning_content": f"{i} plus 10 is {i + 10}."},
            "rewrite": {"content": f"{i}+10={i + 10}\n#### {i + 10}"}, **kw}


SCENARIOS = {  # problem index -> (script item, expected status, expected reason)
    0: (good(0), "verified", None),
    1: (good(1, faults=["429", "500", "503"]), "verified", None),
    2: (good(2, faults=["empty", "empty_body", "drop"]), "verified", None),
    3: (good(3, faults=["slow"]), "verified", None),
    4: ({"solve": {"content": "#### 99"}}, "rejected", "wrong_answer"),
    5: ({"solve": {"content": "Ann has 5 + 10 = 15 apples and then", "finish_reason": "length"}}, "rejected", "truncated"),
    6: ({"solve": {"content": "Ann has 16 apples."}}, "rejected", "no_marker"),
    7: ({"solve": {"content": "wait let me check this again " * 12 + "\n#### 17"}}, "rejected", "repetition"),
    8: ({"solve": {"content": "As an AI language model I think it is 18.\n#### 18"}}, "rejected", "banned"),
    9: ({"solve": {"content": "#### 19", "reasoning_content": "inline", "echo_think": True},
         "rewrite": {"content": "#### 20"}}, "verified", None),  # its rewrite changes the answer: rejected
    10: ({"solve": {"content": "#### twenty", "reasoning_content": "r"}, "judge": {"content": "VERDICT: CORRECT"}},
         "verified", None),  # unparsable -> the judge decides
    11: ({"faults": ["500"] * 4}, "failed", "request failed: 500"),
}


def script() -> dict:
    return {"slow_s": 1.2, "items": {f"[P{i}]": item for i, (item, _, _) in SCENARIOS.items()}}


def args(srv, problems, out, *extra):
    return ["build", "--source", "gsm8k", "--problems", str(problems), "--base-url", srv.base_url,
            "--model", "asked-model", "--api-key-env", "CORPUS_TEST_KEY", "--out", str(out), "--leakage", "warn",
            "--backoff", "0.01", "--max-retries", "3", "--timeout", "0.8", "--concurrency", "4", *extra]


def finals(out: Path) -> dict:
    recs = read_jsonl(out / "traces.jsonl")
    last = {}
    for r in recs:
        last[r["key"]] = r
    return last


def test_fault_server_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CORPUS_TEST_KEY", SECRET)
    probs = gsm8k_file(tmp_path / "p.jsonl", len(SCENARIOS))
    out = tmp_path / "corpus"
    with FaultServer(script()) as srv:
        with pytest.raises(SystemExit) as exit_:  # problem 11 failed for good: incomplete, exit 3
            B.main(args(srv, probs, out, "--judge-model", "judge-m", "--rewrite-levels", "R1", "R4"))
        assert exit_.value.code == B.EXIT_INCOMPLETE
        served = sum(srv.counts.values())
        last = finals(out)
        # every problem ends verified, rejected or failed-with-reason; one line per key, none lost
        assert len(read_jsonl(out / "traces.jsonl")) == len(last) == len(SCENARIOS)
        for i, (_, status, reason) in SCENARIOS.items():
            r = last[f"gsm8k-train-{i:05d}#s0"]
            assert (r["status"], r["reason"]) == (status, reason), (i, r)
        assert last["gsm8k-train-00009#s0"]["thinking"] == "inline"          # <think> split from content
        assert last["gsm8k-train-00006#s0"]["thinking"] is None               # reasoning_content absent
        assert last["gsm8k-train-00010#s0"]["verdict"]["decided_by"] == "judge:fault-model-v1"
        assert last["gsm8k-train-00000#s0"]["verdict"]["decided_by"] == "programmatic"
        assert last["gsm8k-train-00001#s0"]["provenance"]["attempts"] == 4
        assert last["gsm8k-train-00000#s0"]["provenance"]["model"] == "fault-model-v1"  # what answered
        assert "500" in last["gsm8k-train-00011#s0"]["error"]

        man = json.loads((out / "manifest.json").read_text())
        assert man["status"] == "incomplete"
        assert man["failures"] == {"attempts": 1, "rewrites": 0, "by_kind": {"500": 1}}
        assert man["attempts"] == {"expected": 12, "final": 12, "log_lines": 12, "verified": 6, "rejected": 5, "failed": 1}
        assert man["rejected_by"] == {"wrong_answer": 1, "truncated": 1, "no_marker": 1, "repetition": 1, "banned": 1}
        assert man["filters"]["truncated"] == 1 and man["filters"]["too_long"] == 0
        assert man["verdicts_by"] == {"programmatic": 10, "judge": 1}
        assert set(man["prompts"]) == {"solver_gsm8k", "judge", "rewrite_R1", "rewrite_R4"}
        assert all(len(p["sha256"]) == 64 for p in man["prompts"].values())
        assert man["tokens"]["solver"]["completion_tokens"] > 0
        assert man["cost_usd"] is None  # a loopback server: no known price (not DeepSeek's)
        assert man["config"]["api_key_env"] == "CORPUS_TEST_KEY"

        # verified corpus and its splits (the trainer reads train/valid.jsonl)
        ver = read_jsonl(out / "verified.jsonl")
        assert [r["id"] for r in ver] == [f"gsm8k-train-{i:05d}" for i in (0, 1, 2, 3, 9, 10)]  # problem order
        assert all({"id", "question", "reasoning", "answer", "answer_format"} <= set(r) for r in ver)
        assert "thinking" not in ver[0]  # --thinking drop (default)
        split_ids = [r["id"] for s in ("train", "valid", "test") for r in read_jsonl(out / f"{s}.jsonl")]
        assert sorted(split_ids) == sorted(r["id"] for r in ver) and len(read_jsonl(out / "valid.jsonl")) >= 1

        # rewriter: each level re-verified, written as its own corpus
        r1 = read_jsonl(out / "R1" / "verified.jsonl")
        # 9's rewrite changes the answer, 10's gets the server's default "#### 0": both rejected
        assert [r["id"] for r in r1] == [f"gsm8k-train-{i:05d}" for i in (0, 1, 2, 3)]
        assert all(r["level"] == "R1" and r["reasoning"].endswith(r["answer"]) for r in r1)
        assert (out / "R4" / "train.jsonl").is_file() and man["levels"]["R4"]["records"] == 4
        rw = {r["key"]: r for r in read_jsonl(out / "rewrites.jsonl")}
        assert rw["gsm8k-train-00009#R1"]["reason"] == "wrong_answer"

        # the API key is in no file and no output
        for f in out.rglob("*"):
            if f.is_file():
                assert SECRET not in f.read_text(errors="ignore"), f
        assert SECRET not in capsys.readouterr().out

        # the same command again: nothing is asked twice, nothing duplicated, same corpus
        before = (out / "verified.jsonl").read_text()
        with pytest.raises(SystemExit):  # the failed attempt is left failed: still incomplete
            B.main(args(srv, probs, out, "--judge-model", "judge-m", "--rewrite-levels", "R1", "R4",
                        "--no-retry-failed"))
        assert sum(srv.counts.values()) == served
        assert (out / "verified.jsonl").read_text() == before
        assert len(read_jsonl(out / "traces.jsonl")) == 12
        # --retry-failed (the default): only the failed problem is asked again (its faults are used up now)
        B.main(args(srv, probs, out, "--judge-model", "judge-m", "--rewrite-levels", "R1", "R4"))
        last = finals(out)
        assert last["gsm8k-train-00011#s0"]["status"] == "rejected"  # the default reply "#### 0" is wrong
        assert len(read_jsonl(out / "traces.jsonl")) == 13 and len(last) == 12
        assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_refuses_other_settings_and_resume_flag(tmp_path):
    probs = gsm8k_file(tmp_path / "p.jsonl", 3)
    out = tmp_path / "c"
    with FaultServer({"items": {f"[P{i}]": good(i) for i in range(6)}}) as srv:
        B.main(args(srv, probs, out, "--limit", "2"))
        with pytest.raises(InputError, match="model: 'asked-model' -> 'other'"):
            B.main(args(srv, probs, out, "--model", "other"))
        # --resume takes the stored settings; flags typed now win (a larger --limit adds problems)
        n = sum(srv.counts.values())
        B.main(["build", "--resume", "--out", str(out), "--limit", "3", "--base-url", srv.base_url])
        assert sum(srv.counts.values()) == n + 1
        assert sorted(r["id"] for r in read_jsonl(out / "verified.jsonl")) == [f"gsm8k-train-{i:05d}" for i in range(3)]
        # a length level added later: only its rewrites are asked; a changed level is refused
        B.main(args(srv, probs, out, "--rewrite-levels", "R1"))
        n = sum(srv.counts.values())
        B.main(args(srv, probs, out, "--rewrite-levels", "R1", "R2"))
        assert sum(srv.counts.values()) == n + 3 and len(read_jsonl(out / "R2" / "verified.jsonl")) == 3
        with pytest.raises(InputError, match="rewrite level R1"):
            B.main(args(srv, probs, out, "--rewrite-levels", "R1", "--rewrite-ratios", "{R1: 0.9}"))
    with pytest.raises(InputError, match="nothing to resume"):
        B.main(["build", "--resume", "--out", str(tmp_path / "nothing")])


def test_keep_rules_samples_and_thinking(tmp_path):
    probs = gsm8k_file(tmp_path / "p.jsonl", 2)
    with FaultServer({"items": {"[P0]": good(0), "[P1]": good(1)}}) as srv:
        B.main(args(srv, probs, tmp_path / "all", "--samples", "3", "--keep", "all", "--thinking", "keep"))
        ver = read_jsonl(tmp_path / "all" / "verified.jsonl")
        assert len(ver) == 6 and len({r["id"] for r in ver}) == 6
        assert {r["problem_id"] for r in ver} == {"gsm8k-train-00000", "gsm8k-train-00001"}
        assert ver[0]["thinking"] == "0 plus 10 is 10."
        seeds = {r["provenance"]["seed"] for r in read_jsonl(tmp_path / "all" / "traces.jsonl")}
        assert len(seeds) == 6  # one seed per problem x sample
        # one problem's samples never straddle two splits
        split_of = {r["problem_id"]: s for s in ("train", "valid", "test")
                    for r in read_jsonl(tmp_path / "all" / f"{s}.jsonl")}
        assert len(split_of) == 2


def test_leakage_and_figure_skipping(tmp_path, shared_data):
    test_q = read_jsonl(shared_data / "gsm8k" / "test.jsonl")[3]["question"]
    csv = tmp_path / "comp.csv"
    csv.write_text('year,number,problem,answer,figure\n'
                   f'2020,1,"[P0] {test_q}",10,\n'
                   '2020,2,[P1] What is shaded?,11,yes\n'
                   '2021,1,[P2] Ann has 2 apples and buys 10 more.,12,\n')
    with FaultServer({"items": {"[P0]": good(0), "[P2]": good(2)}}) as srv:
        base = ["build", "--source", "csv", "--problems", str(csv), "--base-url", srv.base_url, "--model", "m",
                "--out", str(tmp_path / "c"), "--backoff", "0.01"]
        B.main(base + ["--leakage", "drop"])
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["problem_source"]["skipped_by"] == {"needs a figure": 1}
    assert read_jsonl(tmp_path / "c" / "skipped.jsonl")[0]["id"] == "comp-2020-2"
    # "[P0] " + a GSM8K test question still normalises differently; the leak check is on exact normalised text
    assert man["leakage"]["eval_problems"] == 1319 + 500 + 30 + 40
    leak = tmp_path / "leak.jsonl"
    leak.write_text(json.dumps({"problem": test_q, "answer": 10}) + "\n" +
                    json.dumps({"problem": "[P2] fresh", "answer": 12}) + "\n")
    with FaultServer({"default": {"content": "#### 10"}, "items": {"[P2]": good(2)}}) as srv:
        B.main(["build", "--source", "jsonl", "--problems", str(leak), "--base-url", srv.base_url, "--model", "m",
                "--out", str(tmp_path / "l"), "--leakage", "drop"])
    man = json.loads((tmp_path / "l" / "manifest.json").read_text())
    assert [m["eval_id"] for m in man["leakage"]["matches"]] == ["gsm8k-test-00003"]
    in_splits = [r["id"] for s in ("train", "valid", "test") for r in read_jsonl(tmp_path / "l" / f"{s}.jsonl")]
    assert man["leakage"]["matches"][0]["id"] not in in_splits and len(read_jsonl(tmp_path / "l" / "verified.jsonl")) == 2


def test_leakage_sets_unavailable_refuse_before_any_request(tmp_path, monkeypatch, shared_data):
    """A leakage check that cannot load an evaluation set refuses before the teacher is asked
    anything; with --leakage warn it warns loudly and the manifest names exactly what was checked."""
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    (tmp_path / "data" / "gsm8k" / "test.jsonl").write_text((shared_data / "gsm8k" / "test.jsonl").read_text())
    monkeypatch.setenv("MLX_DISTILL_DATA", str(tmp_path / "data"))
    probs = gsm8k_file(tmp_path / "p.jsonl", 2)
    with FaultServer({"items": {"[P0]": good(0), "[P1]": good(1)}}) as srv:
        base = ["build", "--source", "gsm8k", "--problems", str(probs), "--base-url", srv.base_url, "--model", "m",
                "--backoff", "0.01"]
        with pytest.raises(InputError, match=r"leakage check cannot load math500, aime24, amc23.*--leakage warn"):
            B.main(base + ["--out", str(tmp_path / "r")])
        assert sum(srv.counts.values()) == 0 and not (tmp_path / "r").exists()
        B.main(base + ["--out", str(tmp_path / "w"), "--leakage", "warn"])
    man = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert man["leakage"]["checked"] == ["gsm8k-test"] and man["leakage"]["eval_problems"] == 1319
    assert set(man["leakage"]["not_checked"]) == {"math500", "aime24", "amc23"}


def test_filters_and_splits_units():
    assert filters.final_marker("x \\boxed{3} then #### 4") == "####"
    assert filters.final_marker("#### 4 and \\boxed{3}") == "boxed" and filters.final_marker("4") is None
    assert filters.repetition("a b c " * 20, n=3, count=4) == "a b c"
    assert filters.repetition("one two three four five six", n=2, count=2) is None
    assert filters.check("#### 3", "stop", 2, max_words=1) == ["too_long"]
    assert filters.check("x", "length", 2) == ["truncated", "no_marker"]
    assert filters.check("#### 3", "stop", 2, banned_phrases=["#### 3"]) == ["banned"]
    cfg = B.C.CorpusConfig(seed=3)
    ids = [f"p{i}" for i in range(2000)]
    s = B.assign_splits(ids, cfg)
    assert 60 < sum(v == "valid" for v in s.values()) < 140 and 60 < sum(v == "test" for v in s.values()) < 140
    assert {k: v for k, v in B.assign_splits(ids[:1500], cfg).items()} == {k: s[k] for k in ids[:1500]}  # stable
    assert sorted(B.assign_splits(["a", "b", "c"], cfg).values()) == ["test", "train", "valid"]
    assert sorted(B.assign_splits(["a", "b"], cfg).values()) == ["train", "valid"]  # the trainer needs one
    assert B.public_url("https://user:pw@api.x.com:8443/v1") == "https://api.x.com:8443/v1"
    # a judge on the teacher's endpoint shares its requests/min budget
    cl = B.make_clients(B.C.CorpusConfig(base_url="http://127.0.0.1:9/v1", model="t", judge_model="j", rpm=60,
                                         api_key_env=""))
    assert cl["judge"] is not cl["teacher"] and cl["judge"].limiter is cl["teacher"].limiter


def _default_sigint():
    # A shell without job control starts background commands with SIGINT ignored, and
    # children inherit that (CI may run us so): give the builder the Ctrl-C a user's terminal sends.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(argv, env):
    return subprocess.Popen([sys.executable, "-m", "mlx_distill", "corpus", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigint)


def _comparable(out: Path) -> dict:
    keep = ("key", "status", "reason", "filters", "response", "thinking", "extracted", "words", "verdict")
    traces = {k: {f: r.get(f) for f in keep} for k, r in finals(out).items()}
    rewrites = {r["key"]: {f: r.get(f) for f in keep} for r in read_jsonl(out / "rewrites.jsonl")}
    files = {n: (out / n).read_text() for n in ("verified.jsonl", "train.jsonl", "valid.jsonl", "test.jsonl",
                                                  "R1/verified.jsonl", "R1/train.jsonl")}
    return {"traces": traces, "rewrites": rewrites, "files": files}


def test_sigkill_and_ctrl_c_then_resume_equal_uninterrupted(tmp_path):
    n = 24
    probs = gsm8k_file(tmp_path / "p.jsonl", n)
    items = {f"[P{i}]": good(i) if i % 3 else {"solve": {"content": f"#### {i}"}} for i in range(n)}
    env = preload_env({**os.environ, "PYTHONPATH": str(REPO)})
    with FaultServer({"delay": 0.08, "items": items}) as srv:
        common = ["--source", "gsm8k", "--problems", str(probs), "--base-url", srv.base_url, "--model", "m",
                  "--concurrency", "2", "--backoff", "0.01", "--rewrite-levels", "R1", "--leakage", "warn"]
        a = _spawn(["build", *common, "--out", str(tmp_path / "a")], env)
        assert a.wait(60) == 0, a.stdout.read()
        for sig, out in ((signal.SIGKILL, tmp_path / "k"), (signal.SIGINT, tmp_path / "i")):
            srv.script["delay"] = 0.3  # a wide window to stop in: the 18+ unfinished requests take >= 2.7 s
            p = _spawn(["build", *common, "--out", str(out)], env)
            deadline = time.time() + 30
            while time.time() < deadline:  # kill mid-run: some traces written, most not
                if (out / "traces.jsonl").is_file() and len((out / "traces.jsonl").read_text().splitlines()) >= 6:
                    break
                time.sleep(0.02)
            p.send_signal(sig)
            rc = p.wait(30)
            log = p.stdout.read()
            partial = len(read_jsonl(out / "traces.jsonl", tolerate_torn_tail=True))
            assert 6 <= partial < n, (sig, partial)
            if sig == signal.SIGINT:
                assert rc == 130 and "re-run with --resume" in log, log
                assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
            else:
                assert rc == -signal.SIGKILL
            srv.script["delay"] = 0.08
            r = _spawn(["build", *common, "--out", str(out)], env)
            assert r.wait(60) == 0, r.stdout.read()
            assert len(read_jsonl(out / "traces.jsonl")) == n  # each attempt logged once: none repeated, none lost
            assert _comparable(out) == _comparable(tmp_path / "a")
    st = subprocess.run([sys.executable, "-m", "mlx_distill", "corpus", "stats", str(tmp_path / "k")],
                        cwd=REPO, env=env, capture_output=True, text=True)
    assert st.returncode == 0 and "verified 16" in st.stdout and "R1" in st.stdout, st.stdout + st.stderr


def test_critic_score_and_missing_key_fails_before_writing(tmp_path, monkeypatch):
    probs = gsm8k_file(tmp_path / "p.jsonl", 2)
    items = {"[P0]": good(0), "[P1]": good(1)}
    items["[P0]"]["critic"] = {"content": "SCORE: 5"}
    items["[P1]"]["critic"] = {"content": "SCORE: 2"}
    with FaultServer({"items": items}) as srv:
        B.main(args(srv, probs, tmp_path / "c", "--judge-model", "j", "--critic", "--min-critic", "3"))
    last = finals(tmp_path / "c")
    assert last["gsm8k-train-00000#s0"]["critic"]["score"] == 5 and last["gsm8k-train-00000#s0"]["status"] == "verified"
    assert (last["gsm8k-train-00001#s0"]["status"], last["gsm8k-train-00001#s0"]["reason"]) == ("rejected", "critic_low")
    assert read_jsonl(tmp_path / "c" / "verified.jsonl")[0]["critic"] == 5
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    with pytest.raises(InputError, match="DEEPSEEK_API_KEY"):
        B.main(["build", "--preset", "deepseek", "--problems", str(probs), "--out", str(tmp_path / "none"),
                "--leakage", "warn"])
    assert not (tmp_path / "none").exists()


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    buf = io.StringIO()
    real = B._progress
    monkeypatch.setattr(B, "_progress", lambda enabled: real(enabled, Console(file=buf, force_terminal=True, width=150)))
    probs = gsm8k_file(tmp_path / "p.jsonl", 3)
    with FaultServer({"items": {"[P0]": good(0), "[P1]": {"faults": ["500"] * 9}}}) as srv:
        with pytest.raises(SystemExit):  # P1 failed for good
            B.main(args(srv, probs, tmp_path / "c", "--max-retries", "1"))
    shown = buf.getvalue()
    assert "3/3" in shown and "verified 1" in shown and "rejected 1" in shown and "failed 1" in shown and "—" in shown


def test_key_echoed_by_a_401_is_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("CORPUS_TEST_KEY", SECRET)
    probs = gsm8k_file(tmp_path / "p.jsonl", 2)
    with FaultServer({"items": {"[P0]": {"faults": ["401"]}, "[P1]": good(1)}}) as srv:
        with pytest.raises(SystemExit):  # P0 failed for good
            B.main(args(srv, probs, tmp_path / "c"))
        assert srv.counts["401"] == 1  # a client error is not retried
    last = finals(tmp_path / "c")
    assert last["gsm8k-train-00000#s0"]["reason"] == "request failed: 401"
    assert "Incorrect API key provided: ***" in last["gsm8k-train-00000#s0"]["error"]
    for f in (tmp_path / "c").rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text(errors="ignore") and "sk-test-secret" not in f.read_text(errors="ignore")


def test_shipped_length_levels_have_prompts_and_shrink():
    from mlx_distill.config import CorpusConfig
    from mlx_distill.paths import REPO

    cfg = CorpusConfig()
    levels = [f"R{i}" for i in range(1, 7)]
    assert set(levels) <= set(cfg.rewrite_ratios) and set(levels) <= set(cfg.rewrite_max_tokens)
    ratios = [cfg.rewrite_ratios[lv] for lv in levels]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == 6  # R1 longest ... R6 shortest
    for lv in levels:
        text = (REPO / "prompts" / f"rewrite_{lv.lower()}.txt").read_text()
        for field in ("{target_words}", "{solution}", "{question}", "{answer_instruction}"):
            assert field in text, (lv, field)
