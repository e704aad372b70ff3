"""Experiment trackers (issue 14 item 3): `train --report-to wandb,tensorboard` logs every
metrics.jsonl field at its iter and the resolved config; read back from the TensorBoard event
file and from the W&B offline run folder."""

import json
import struct
import sys

import pytest

from mlx_distill import config

from mlx_distill.training import trackers, train
from mlx_distill.config import TrainConfig
from mlx_distill.io import InputError, read_jsonl

from helpers import arith_records, write_jsonl


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "train.jsonl", arith_records(24, seed=0))
    write_jsonl(d / "valid.jsonl", arith_records(8, seed=1, start=100))
    return d


# ----------------------------------------------------------------------------- --report-to as typed
@pytest.mark.parametrize("argv", [["--report-to", "wandb,tensorboard"], ["--report-to", "wandb", "tensorboard"],
                                  ["--report-to", "wandb, tensorboard"], ["--report-to", "wandb,tensorboard,wandb"]])
def test_report_to_flag_forms(argv):
    cfg = config.from_cli(TrainConfig, argv, "t")
    assert trackers.parse(cfg.report_to) == ["wandb", "tensorboard"]


def test_report_to_yaml_and_none(tmp_path):
    (tmp_path / "a.yaml").write_text("report_to: tensorboard,wandb\n")
    cfg = config.from_cli(TrainConfig, ["-c", str(tmp_path / "a.yaml")], "t")
    assert trackers.parse(cfg.report_to) == ["tensorboard", "wandb"]
    assert trackers.parse([]) == trackers.parse("none") == trackers.parse(TrainConfig().report_to) == []
    with pytest.raises(InputError, match="unknown tracker; choose from wandb, tensorboard"):
        trackers.parse("mlflow")


def test_missing_package_is_one_error_line_before_loading(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    from mlx_distill import cli

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", str(tmp_path / "no-model"), "--out", str(out), "--report-to", "wandb,tensorboard"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --report-to wandb: the 'wandb' package is not installed; pip install 'mlx_distill[wandb]' "
                   "(or drop wandb from --report-to)"]
    assert not out.exists()  # refused before the model (here a missing folder) was even looked at


# ----------------------------------------------------------------------------- read-back helpers
def read_wandb_records(path):
    """Records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic,
    version), then LevelDB-log style 32 KiB blocks of chunks (crc32c, length, type), each a
    `wandb_internal_pb2.Record`. Types: 1 full, 2 first, 3 middle, 4 last."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:8]
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        chunk, pos = raw[pos:pos + n], pos + n
        if kind == 0 and n == 0:
            pos += left - 7
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def wandb_log(folder):
    """The transaction log of the one offline run under `folder`, read only after W&B has written
    it out: ``run.finish()`` returns before wandb-core's writer has flushed the file (measured: 7
    bytes, the header alone, right after finish), so wait for the service to shut down
    (``wandb.teardown()``: it flushes every stream), never for time."""
    import wandb

    wandb.teardown()
    logs = list(folder.glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, f"expected one offline run log under {folder}, found {logs}"
    return read_wandb_records(logs[0])


def numeric_fields(row):
    return {k: v for k, v in trackers.flatten(row).items() if k != "iter" and trackers.is_scalar(v)}


# ----------------------------------------------------------------------------- end to end
def test_train_reports_to_tensorboard_and_wandb_offline(tiny_model, corpus, tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb-dir"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "mlx-distill-test")
    out = tmp_path / "run"
    train.main(["--model", str(tiny_model), "--data", str(corpus), "--out", str(out), "--iters", "6",
                "--batch-size", "4", "--val-every", "3", "--report-every", "2", "--save-every", "100",
                "--lora-layers", "2", "--max-seq-length", "256", "--report-to", "wandb,tensorboard"])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [0, 2, 3, 4, 6]
    where = json.loads((out / "trackers.json").read_text())
    assert set(where) == {"wandb", "tensorboard"}

    # TensorBoard: every numeric field of every row, at its iter, read back with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    want = {}
    for r in rows:
        for k, v in numeric_fields(r).items():
            want.setdefault(k, {})[r["iter"]] = v
    assert {"train_loss", "val_loss", "learning_rate", "peak_memory_gb"} <= set(want)
    assert set(acc.Tags()["scalars"]) == set(want)
    for k, steps in want.items():
        got = {e.step: e.value for e in acc.Scalars(k)}
        assert got == pytest.approx(steps, rel=1e-6), k
    assert "config/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "learning_rate: 0.0001" in text and f"out: {out}" in text

    # W&B offline: the run folder, its config (the resolved TrainConfig) and its history
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_dir()
    assert runs[0].name.endswith(where["wandb"]["id"]) and where["wandb"]["offline"] is True
    records = wandb_log(wandb_dir / "wandb")
    kinds = [r.WhichOneof("record_type") for r in records]
    assert {"run", "history", "summary", "exit"} <= set(kinds)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "mlx-distill-test" and run.display_name == "run"
    cfg = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert cfg == json.loads(json.dumps(config.to_dict(config.build(TrainConfig, {}, {
        "model": str(tiny_model), "data": str(corpus), "out": str(out), "iters": 6, "batch_size": 4, "val_every": 3,
        "report_every": 2, "save_every": 100, "lora_layers": 2, "max_seq_length": 256,
        "report_to": ["wandb,tensorboard"]}))))
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
    assert sorted(history) == [r["iter"] for r in rows]
    for r in rows:
        assert history[r["iter"]] == pytest.approx(numeric_fields(r)), r["iter"]


def test_eval_reports_its_summary(tiny_model, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mlx_distill.config import EvalConfig
    from mlx_distill.evaluation.evaluate import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = tmp_path / "corp"
    data.mkdir()
    write_jsonl(data / "test.jsonl", [{"id": f"t{i}", "question": f"What is {i}+1?", "answer": str(i + 1)}
                                      for i in range(3)])
    out = tmp_path / "eval"
    s = evaluate(EvalConfig(model=str(tiny_model), dataset="corpus", data=str(data), max_tokens=2, out=str(out),
                            report_to="tensorboard,wandb"), quiet=True)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    want = {trackers.tb_tag(k): float(v) for k, v in numeric_fields(s).items()}
    assert {"accuracy", "n", "correct", "failure_kinds/truncated_at_max_tokens"} <= set(want) and set(acc.Tags()["scalars"]) == set(want)
    assert {k: acc.Scalars(k)[0].value for k in want} == pytest.approx(want)
    records = wandb_log(tmp_path / "wb" / "wandb")
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert {u.key: json.loads(u.value_json) for u in run.config.update}["dataset"] == "corpus"
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in r.summary.update})
    assert summary["accuracy"] == s["accuracy"] and summary["n"] == 3


def test_only_rank_zero_reports(tmp_path):
    from mlx_distill.backends.distributed import Group
    from mlx_distill.io import JsonlAppender

    cfg = TrainConfig(out=str(tmp_path), report_to=["tensorboard"])
    app = JsonlAppender(tmp_path / "m.jsonl")
    assert trackers.attach(app, cfg, tmp_path, Group(world=2, rank=1)) is app
    wrapped = trackers.attach(app, cfg, tmp_path, Group(world=2, rank=0))
    assert isinstance(wrapped, trackers.ReportingAppender)
    wrapped.write({"iter": 1, "train_loss": 1.5, "note": "x", "source": {"kept": 3}})
    wrapped.close()
    assert (tmp_path / "tensorboard").is_dir() and read_jsonl(tmp_path / "m.jsonl")[0]["train_loss"] == 1.5


def test_a_failing_tracker_is_dropped_and_the_row_kept(tmp_path, capsys):
    from mlx_distill.io import JsonlAppender

    class Broken:
        name = "tensorboard"

        def log(self, values, step):
            raise OSError("disk full")

        def close(self):
            pass

    app = trackers.ReportingAppender(JsonlAppender(tmp_path / "m.jsonl"), [Broken()])
    app.write({"iter": 1, "train_loss": 2.0})
    app.write({"iter": 2, "train_loss": 1.0})
    app.close()
    assert [r["iter"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]
    assert capsys.readouterr().err.count("--report-to tensorboard failed (OSError: disk full)") == 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
