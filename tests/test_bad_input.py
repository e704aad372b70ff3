"""Bad input tried as a new user would (issue 18 item 5): each case runs ``python -m mlx_distill ...``
in a subprocess and must end with one ``error:`` line on stderr, a non-zero exit, no traceback
and no temporary file left behind. The cases that are not errors (a problem eval cannot grade,
``eval --limit`` onto a finished evaluation) assert what the user must see instead. (Issue 18's
sixteenth case, `train` silent for 70 s when its output is not a terminal, is a timing question:
not here.)

A full disk and a folder without write permission are simulated by patching the one system
call (ENOSPC from ``os.replace`` / ``os.fsync``, EACCES from ``tempfile.mkstemp``): the tests run
as root in CI, and root ignores permissions, so a chmod'ed folder would prove nothing there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import arith_records, write_jsonl
from mlx_distill.blas import preload_env
from mlx_distill.paths import REPO

# a user's command with one system call made to fail: `python -c PATCH <command> <args>`
PATCH = """
import errno, os, sys, tempfile
what, target = sys.argv[1], os.path.abspath(sys.argv[2])
def inside(p):
    return os.path.abspath(str(p)).startswith(target)
if what == "enospc-replace":
    real = os.replace
    def replace(a, b, *k, **kw):
        if inside(b):
            raise OSError(errno.ENOSPC, "No space left on device", str(a))
        return real(a, b, *k, **kw)
    os.replace = replace
elif what == "enospc-fsync":
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    os.fsync = fsync
elif what == "eacces":
    real = tempfile.mkstemp
    def mkstemp(*a, dir=None, **kw):
        if dir is not None and inside(dir):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*a, dir=dir, **kw)
    tempfile.mkstemp = mkstemp
from mlx_distill.cli import main
main(sys.argv[3:])
"""


def run(cwd: Path, *argv, patch: tuple[str, Path] | None = None, timeout: int = 600):
    cmd = [sys.executable, "-m", "mlx_distill", *map(str, argv)]
    if patch:
        cmd = [sys.executable, "-c", PATCH, patch[0], str(patch[1]), *map(str, argv)]
    env = preload_env({**__import__("os").environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders the atomic writers would leave: *.tmp, .NAME-xxxx folders."""
    return sorted(str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or
                  (p.is_dir() and p.name.startswith(".") and "-" in p.name))


def assert_error(p, tmp_path: Path, *words) -> str:
    """Non-zero exit, an `error:` line naming `words`, no traceback, no temp file: the line."""
    assert p.returncode != 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert lines, p.stderr
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    assert not leftovers(tmp_path), leftovers(tmp_path)
    print(f"exit {p.returncode}: {lines[-1]}")  # pytest -s: what the user sees (the closing note lists them)
    return lines[-1]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "train.jsonl", arith_records(8, seed=0))
    write_jsonl(d / "valid.jsonl", arith_records(4, seed=1, start=100))
    return d


def train_args(tiny_model, corpus, out):
    return ["train", "--model", tiny_model, "--data", corpus, "--out", out, "--iters", "2", "--batch-size", "2",
            "--lora-layers", "1", "--val-every", "2", "--max-seq-length", "128"]


# ----------------------------------------------------------------------------- option checks
@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    (["--iters", "0"], ["--iters must be >= 1, got 0"]),
    (["--learning-rate=-1e-4"], ["--learning-rate must be > 0, got -0.0001"]),
    (["--learning-rate", "-1e-4"], ["--learning-rate must be > 0, got -0.0001"]),  # not "expected one argument"
], ids=["batch-size-0", "iters-0", "lr-negative-equals", "lr-negative-space"])
def test_train_option_out_of_range(tmp_path, corpus, tiny_model, flags, words):
    out = tmp_path / "run"
    p = run(tmp_path, *train_args(tiny_model, corpus, out), *flags)
    assert_error(p, tmp_path, *words)
    assert not out.exists()  # refused before any work: no untrained adapter, no run folder


def test_yaml_integer_option_given_a_fraction(tmp_path, corpus, tiny_model):
    (tmp_path / "c.yaml").write_text("batch_size: 2.5\n")
    argv = [a for a in train_args(tiny_model, corpus, tmp_path / "run")]
    del argv[argv.index("--batch-size"):argv.index("--batch-size") + 2]  # from the YAML file instead
    p = run(tmp_path, *argv, "-c", "c.yaml")
    assert_error(p, tmp_path, "c.yaml: batch_size must be a whole number, got 2.5")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- output folders
def test_synth_out_under_a_regular_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    p = run(tmp_path, "corpus", "synth", "--out", "afile/corpus", "--n-train", "4")
    assert_error(p, tmp_path, "--out afile/corpus", "afile is a file, not a folder")


def test_synth_out_on_a_full_disk_leaves_no_temp_file(tmp_path):
    p = run(tmp_path, "corpus", "synth", "--out", tmp_path / "c", "--n-train", "4", patch=("enospc-replace", tmp_path))
    assert_error(p, tmp_path, "No space left on device")
    assert not (tmp_path / "c").exists()


def test_eval_out_not_writable(tmp_path, tiny_model):
    write_jsonl(tmp_path / "p.jsonl", [{"id": "q1", "question": "What is 1+1?", "answer": "2"}])
    p = run(tmp_path, "eval", "--model", tiny_model, "--dataset", "jsonl", "--data", "p.jsonl", "--out",
            tmp_path / "ev", "--max-tokens", "2", patch=("eacces", tmp_path / "ev"))
    assert_error(p, tmp_path, f"--out {tmp_path / 'ev'}: cannot write there", "Permission denied")


def test_eval_out_on_a_full_disk(tmp_path, tiny_model):
    write_jsonl(tmp_path / "p.jsonl", [{"id": "q1", "question": "What is 1+1?", "answer": "2"}])
    p = run(tmp_path, "eval", "--model", tiny_model, "--dataset", "jsonl", "--data", "p.jsonl", "--out",
            tmp_path / "ev", "--max-tokens", "2", patch=("enospc-fsync", tmp_path / "ev"))
    assert_error(p, tmp_path, f"--out {tmp_path / 'ev'}", "No space left on device")


def test_train_out_under_a_regular_file(tmp_path, corpus, tiny_model):
    (tmp_path / "afile").write_text("x")
    p = run(tmp_path, *train_args(tiny_model, corpus, "afile/run"))
    assert_error(p, tmp_path, "afile/run", "afile")


def test_train_out_on_a_full_disk_leaves_no_temp_file(tmp_path, corpus, tiny_model):
    p = run(tmp_path, *train_args(tiny_model, corpus, tmp_path / "run"), patch=("enospc-replace", tmp_path / "run"))
    assert_error(p, tmp_path, "No space left on device")


def test_resume_after_a_truncated_checkpoint(tmp_path, corpus, tiny_model):
    """(The fallback to the checkpoint before it, when there is one, is tests/test_resume.py's.)"""
    out = tmp_path / "run"
    assert run(tmp_path, *train_args(tiny_model, corpus, out), "--save-every", "2").returncode == 0
    ckpt = out / "checkpoints" / "last" / "adapters.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # cut short after it was written
    p = run(tmp_path, *train_args(tiny_model, corpus, out), "--iters", "4", "--save-every", "2", "--resume", "--extend")
    assert_error(p, tmp_path, "cannot read the checkpoint", "checkpoints/last")


# ----------------------------------------------------------------------------- encodings, wrong kinds of input
def test_non_utf8_byte_in_a_corpus_line(tmp_path, corpus, tiny_model):
    rows = (corpus / "train.jsonl").read_bytes().splitlines(keepends=True)
    rows[2] = rows[2].replace(b"What", b"Wh\xffat")
    (corpus / "train.jsonl").write_bytes(b"".join(rows))
    p = run(tmp_path, *train_args(tiny_model, corpus, tmp_path / "run"))
    assert_error(p, tmp_path, f"{corpus / 'train.jsonl'}:3: not UTF-8")


def test_corpus_stats_on_a_training_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # what `train` writes: a manifest whose config is a TrainConfig
    (run_dir / "manifest.json").write_text(json.dumps({"config": {"model": "smollm2", "iters": 2}, "status": "done"}))
    p = run(tmp_path, "corpus", "stats", "run")
    line = assert_error(p, tmp_path, "run: not a corpus folder")
    assert "unknown option" not in p.stderr and "unknown option" not in line


def test_corpus_build_that_verified_nothing(tmp_path):
    from fault_server import FaultServer

    problems = tmp_path / "p.jsonl"
    rows = [{"question": f"[P{i}] Ann has {i} apples and buys 10 more. How many now?",
             "answer": f"{i} + 10 = {i + 10}\n#### {i + 10}"} for i in range(3)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = {"items": {"[P0]": {"solve": {"content": "#### 99"}}, "[P1]": {"solve": {"content": "#### 98"}},
                        "[P2]": {"solve": {"content": "Ann has 12 apples."}}}}
    with FaultServer(script) as srv:
        p = run(tmp_path, "corpus", "build", "--source", "gsm8k", "--problems", problems, "--base-url",
                srv.base_url, "--model", "m", "--out", "c", "--leakage", "warn", "--no-progress",
                "--max-retries", "0", "--timeout", "30")
    assert p.returncode == 1, p.stderr
    line = assert_error(p, tmp_path, "is empty: 0 of 3 attempt(s) verified", "wrong_answer (2)", "no_marker (1)")
    assert line.index("wrong_answer") < line.index("no_marker")  # most frequent first


# ----------------------------------------------------------------------------- eval: what it did not grade
def test_eval_says_and_records_the_problems_it_skipped(tmp_path, tiny_model):
    write_jsonl(tmp_path / "p.jsonl", [{"id": "q1", "question": "What is 1+1?", "answer": "2"},
                                       {"id": "q2", "question": "What is 2+2?"},
                                       {"id": "q3", "question": "What is 3+3?", "answer": "6", "figure": True}])
    p = run(tmp_path, "eval", "--model", tiny_model, "--dataset", "jsonl", "--data", "p.jsonl", "--out", "ev",
            "--max-tokens", "2", "--no-plot")
    assert p.returncode == 0, p.stderr
    assert "skipped 2 problem(s) that cannot be graded from text" in p.stderr and "p-q2, p-q3" in p.stderr
    man = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert [s["id"] for s in man["skipped"]] == ["p-q2", "p-q3"]  # ids as eval names them (file stem + id)
    assert man["skipped"][0]["reason"] == "no answer" and "figure" in man["skipped"][1]["reason"]
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["n"] == 1


def test_eval_limit_onto_a_finished_larger_eval_summarises_what_was_asked(tmp_path, tiny_model):
    write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "question": f"What is {i}+1?", "answer": str(i + 1)}
                                       for i in range(20)])
    common = ["eval", "--model", tiny_model, "--dataset", "jsonl", "--data", "p.jsonl", "--out", "ev",
              "--max-tokens", "2", "--no-plot", "--batch-size", "20"]
    assert run(tmp_path, *common).returncode == 0
    p = run(tmp_path, *common, "--limit", "10")
    assert p.returncode == 0, p.stderr
    assert "already complete (20 problems)" in p.stdout and "The summary below is of those 10 problems" in p.stdout
    assert " n=10 " in p.stdout and " n=20 " not in p.stdout  # the printed summary agrees with the line above
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["n"] == 20  # the folder is untouched


def test_non_utf8_byte_in_a_yaml_config(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"n_train: 4\n# caf\xe9\n")
    p = run(tmp_path, "corpus", "synth", "-c", "c.yaml", "--out", "c")
    assert_error(p, tmp_path, "c.yaml:2: not UTF-8 (byte 0xe9)")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["variant", "logits"])
def test_other_commands_out_under_a_regular_file(tmp_path, corpus, tiny_model, command):
    (tmp_path / "afile").write_text("x")
    argv = {"variant": ["pipeline", "variant", "--data", corpus, "--out", "afile/v"],
            "logits": ["logits", "--teacher", tiny_model, "--data", corpus, "--out", "afile/x"]}[command]
    p = run(tmp_path, *argv)
    assert_error(p, tmp_path, "afile is a file, not a folder")


def test_kd_store_made_from_another_corpus(tmp_path, corpus, tiny_model):
    """Says the store comes from another corpus (not: the prompt template)."""
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "train.jsonl", arith_records(4, seed=5, start=500))
    write_jsonl(other / "valid.jsonl", arith_records(2, seed=6, start=600))
    assert run(tmp_path, "logits", "--teacher", tiny_model, "--data", other, "--out", "store",
               "--max-seq-length", "128").returncode == 0
    p = run(tmp_path, *train_args(tiny_model, corpus, tmp_path / "run"), "--kd", "store")
    line = assert_error(p, tmp_path, "it was made from another corpus")
    assert "template" not in line
