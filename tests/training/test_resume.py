"""Resume that cannot drift: Ctrl-C lands on an optimizer-step boundary (never inside gradient
accumulation), the checkpoint swap survives a crash between its renames (`last.old`), and
--resume refuses every change that would alter the curve (options, data bytes), with --extend
the one documented way to raise --iters."""

import json
import os
import shutil
import signal

import pytest

from mlx_distill import io

from mlx_distill.training import train
from mlx_distill.backends.mlx import MLXBackend
from mlx_distill.config import TrainConfig, build
from mlx_distill.io import InputError, read_jsonl

from helpers import arith_corpus, arith_records

CURVE = ("train_loss", "val_loss", "learning_rate", "trained_tokens")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return arith_corpus(tmp_path_factory.mktemp("corpus"))


def cfg_for(model, corpus, out, **kw):
    base = dict(model=str(model), data=str(corpus), out=str(out), iters=8, batch_size=4, grad_accumulation=2,
                val_every=4, report_every=1, save_every=100, learning_rate=3e-3, warmup=2, max_seq_length=256,
                lora_layers=-1, lora_dropout=0.1, patience=0)
    base.update(kw)
    return build(TrainConfig, base)


@pytest.fixture(scope="module")
def reference(tiny_model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train.run(cfg_for(tiny_model, corpus, out), quiet=True)
    return read_jsonl(out / "metrics.jsonl")


def same_curve(a, b):
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for x, y in zip(a, b):
        for k in CURVE:
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["iter"], k)


def test_sigint_inside_accumulation_checkpoints_at_the_step_boundary(tiny_model, corpus, tmp_path, monkeypatch,
                                                                     reference):
    """A real SIGINT during the first micro-batch of step 3 (accumulation 2): the step is
    finished, the checkpoint holds step 3 / micro-batch 6, and the resumed curve is the
    uninterrupted one. The checkpoint is then moved to `last.old` (a crash between the two
    renames of the swap): resume falls back to it."""
    real_step = MLXBackend.train_step

    def sigint_at_micro_4(self, arrays, update, micro=0):
        if micro == 4:
            assert not update  # the first micro-batch of step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, arrays, update, micro=micro)

    out = tmp_path / "cut"
    # whatever the launcher left (the default handler, or SIG_IGN under `setsid ... < /dev/null`)
    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(MLXBackend, "train_step", sigint_at_micro_4)
    try:
        with pytest.raises(KeyboardInterrupt) as exc:
            train.run(cfg_for(tiny_model, corpus, out), quiet=True)
        assert getattr(exc.value, "code", None) == 130  # mlx_distill.interrupts.Interrupted: the CLI exits 130
    finally:
        after = {s: signal.getsignal(s) for s in found}
        for s, h in found.items():  # leave the process as it was found, whatever happened above
            signal.signal(s, h)
    monkeypatch.setattr(MLXBackend, "train_step", real_step)
    assert after == found  # the handlers it found are put back
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert (state["step"], state["micro"], state["stopped"]) == (3, 6, "")
    assert read_jsonl(out / "metrics.jsonl")[-1]["iter"] == 3
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"

    os.replace(out / "checkpoints" / "last", out / "checkpoints" / "last.old")
    s = train.run(cfg_for(tiny_model, corpus, out, resume=True), quiet=True)
    assert s["last_iter"] == 8
    same_curve(reference, read_jsonl(out / "metrics.jsonl"))
    assert (out / "checkpoints" / "last").is_dir() and not (out / "checkpoints" / "last.old").exists()


def test_atomic_dir_swap_and_last_old_fallback(tmp_path):
    last = tmp_path / "last"
    assert io.complete_dir(last) is None
    with io.atomic_dir(last) as d:
        (d / "x").write_text("1")
    # a crash between the renames leaves only last.old: readers fall back to it ...
    os.replace(last, tmp_path / "last.old")
    assert io.complete_dir(last) == tmp_path / "last.old"
    # ... and the next swap takes its place
    with io.atomic_dir(last) as d:
        (d / "x").write_text("2")
    assert io.complete_dir(last) == last and (last / "x").read_text() == "2"
    assert not (tmp_path / "last.old").exists()
    # a stale last.old beside a whole folder (crash after the second rename) does not block a swap
    shutil.copytree(last, tmp_path / "last.old")
    with io.atomic_dir(last) as d:
        (d / "x").write_text("3")
    assert (last / "x").read_text() == "3" and not (tmp_path / "last.old").exists()


def test_resume_refuses_curve_changes_and_extend_continues_the_schedule(tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    kw = dict(iters=4, grad_accumulation=1, val_every=2, lr_schedule="cosine", warmup=1, min_lr_ratio=0.1)
    train.run(cfg_for(tiny_model, corpus, out, **kw), quiet=True)
    rows = read_jsonl(out / "metrics.jsonl")

    with pytest.raises(InputError, match=r"changed option\(s\) iters: 4 -> 6;.*pass --extend"):
        train.run(cfg_for(tiny_model, corpus, out, resume=True, **{**kw, "iters": 6}), quiet=True)
    for field, value in (("min_lr_ratio", 0.2), ("weight_decay", 0.0), ("max_grad_norm", 0.5),
                         ("lora_dropout", 0.0), ("val_batches", 1), ("long_examples", "error"),
                         ("val_fraction", 0.2), ("select_by", "accuracy")):
        with pytest.raises(InputError, match=rf"changed option\(s\) {field}: "):
            train.run(cfg_for(tiny_model, corpus, out, resume=True, **{**kw, field: value}), quiet=True)
    with pytest.raises(InputError, match=r"already finished \(finished 4 iterations\).*--extend"):
        train.run(cfg_for(tiny_model, corpus, out, resume=True, **kw), quiet=True)
    with pytest.raises(InputError, match="--extend needs --iters above the run's 4"):
        train.run(cfg_for(tiny_model, corpus, out, resume=True, extend=True, **kw), quiet=True)

    # the data is compared by its bytes, not its path: a changed copy is refused, an exact copy is fine
    moved = tmp_path / "moved"
    shutil.copytree(corpus, moved)
    with open(moved / "valid.jsonl", "a") as f:
        f.write(json.dumps(arith_records(1, seed=5, start=5000)[0]) + "\n")
    with pytest.raises(InputError, match=r"valid\.jsonl: the valid data changed since the run started"):
        train.run(cfg_for(tiny_model, moved, out, resume=True, extend=True, **{**kw, "iters": 6}), quiet=True)
    shutil.copy(corpus / "valid.jsonl", moved / "valid.jsonl")

    s = train.run(cfg_for(tiny_model, moved, out, resume=True, extend=True, **{**kw, "iters": 6}), quiet=True)
    assert s["last_iter"] == 6 and s["stop_reason"] == "finished 6 iterations"
    ext = read_jsonl(out / "metrics.jsonl")
    assert ext[: len(rows)] == rows and [r["iter"] for r in ext[len(rows):]] == [5, 6]
    # the decay still ended at iteration 4: the extra steps run at the final rate
    assert [r["learning_rate"] for r in ext[-2:]] == pytest.approx([3e-3 * 0.1] * 2, rel=1e-5)
    saved = train.config.load_yaml(out / "config.yaml")
    assert (saved["iters"], saved["decay_iters"], saved["resume"]) == (6, 4, False)


def test_damaged_checkpoint_falls_back_to_last_old_or_says_how_to_start_over(tiny_model, corpus, tmp_path, capsys):
    """A checkpoint file truncated after it was written: --resume falls back to a whole
    `last.old` beside it (with a warning); without one, one error naming the file and how to
    start over. The same for a truncated state.json (read before the model is loaded)."""
    out = tmp_path / "run"
    kw = dict(iters=6, grad_accumulation=1, val_every=2, save_every=2)
    with pytest.raises(KeyboardInterrupt):  # stop after step 4 with a checkpoint there
        real_step = MLXBackend.train_step

        def stop_at_4(self, arrays, update, micro=0):
            if micro == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return real_step(self, arrays, update, micro=micro)

        found = signal.getsignal(signal.SIGINT)
        MLXBackend.train_step = stop_at_4
        try:
            train.run(cfg_for(tiny_model, corpus, out, **kw), quiet=True)
        finally:
            MLXBackend.train_step = real_step
            signal.signal(signal.SIGINT, found)
    last = out / "checkpoints" / "last"
    assert json.loads((last / "state.json").read_text())["step"] == 4
    whole = tmp_path / "whole"
    shutil.copytree(last, whole)
    for name in ("adapters.safetensors", "optimizer.safetensors", "state.json"):
        f = last / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        with pytest.raises(InputError, match=rf"cannot read the checkpoint: .*last: .*start over without --resume "
                                             rf"into a new --out \(or delete .*run first\)") as exc:
            train.run(cfg_for(tiny_model, corpus, out, resume=True, **kw), quiet=True)
        assert "\n" not in str(exc.value)
        shutil.copy(whole / name, f)
    # a damaged `last` beside a whole `last.old`: resumed from last.old, with a warning
    shutil.copytree(whole, out / "checkpoints" / "last.old")
    f = last / "adapters.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    capsys.readouterr()
    s = train.run(cfg_for(tiny_model, corpus, out, resume=True, **kw), quiet=True)
    assert s["last_iter"] == 6
    assert "using the checkpoint in" in capsys.readouterr().err
    assert [r["iter"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(7))  # none lost or repeated


def test_sigterm_with_sigint_ignored_checkpoints_exits_143_and_resumes(tiny_model, corpus, tmp_path):
    """`train` started as a background job is (SIGINT inherited as ignored) and stopped by a
    scheduler's SIGTERM after its first metrics rows: exit 143, the run saved and marked
    "interrupted"; the same command with --resume completes, no metrics row duplicated."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "mlx_distill", "train", "--model", str(tiny_model), "--data", str(corpus),
            "--out", str(out), "--iters", "30", "--batch-size", "4", "--grad-accumulation", "2", "--val-every", "10",
            "--report-every", "1", "--save-every", "1", "--learning-rate", "3e-3", "--lora-layers", "-1",
            "--max-seq-length", "256"]

    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                         preexec_fn=ignore_sigint, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        rows = read_jsonl(metrics, tolerate_torn_tail=True) if metrics.exists() else []
        if rows and rows[-1]["iter"] >= 2:  # a checkpoint is written after every step
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    text = p.communicate(timeout=600)[0]
    assert p.returncode == 143, text
    assert "Traceback" not in text and "interrupted (SIGTERM)" in text, text
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    cut = read_jsonl(metrics)[-1]["iter"]
    assert 2 <= cut < 30 and json.loads((out / "checkpoints" / "last" / "state.json").read_text())["step"] == cut

    r = subprocess.run(args + ["--resume"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       stdin=subprocess.DEVNULL, timeout=600)
    assert r.returncode == 0, r.stdout
    iters = [x["iter"] for x in read_jsonl(metrics)]
    assert iters == list(range(31)), iters  # every step once (report every step), none duplicated
    assert json.loads((out / "manifest.json").read_text())["result"]["last_iter"] == 30


def test_a_second_signal_stops_at_once(tiny_model, corpus, tmp_path):
    """Two signals inside one micro-batch: the second raises at once (no step finished, no
    checkpoint written, the handlers put back); --resume then says how to start over."""
    real_step = MLXBackend.train_step

    def two_signals_at_micro_4(self, arrays, update, micro=0):
        if micro == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, arrays, update, micro=micro)

    out = tmp_path / "run"
    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    MLXBackend.train_step = two_signals_at_micro_4
    try:
        with pytest.raises(KeyboardInterrupt) as exc:
            train.run(cfg_for(tiny_model, corpus, out), quiet=True)
        after = {s: signal.getsignal(s) for s in found}
    finally:
        MLXBackend.train_step = real_step
        for s, h in found.items():
            signal.signal(s, h)
    assert "stopped at once" in str(exc.value) and after == found
    assert not (out / "checkpoints" / "last").exists()  # save_every 100: none yet, and none written mid-step
    assert [r["iter"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(InputError, match=r"no checkpoint in .*stopped before its first one\); start over without "
                                         r"--resume into a new --out \(or delete .*run first\)"):
        train.run(cfg_for(tiny_model, corpus, out, resume=True), quiet=True)

