"""config.py is the one home of option checks (issue 18 item 5): every numeric option of every
command has a range in `config.RANGES`, checked for flags and YAML alike; integers stay integers;
a negative number after a flag is its value."""

import dataclasses

import pytest

from mlx_distill import config as C


def stage_classes():
    return [c for c in vars(C).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]


def test_every_numeric_option_has_a_range_and_its_default_is_inside():
    missing = []
    for cls in stage_classes():
        for f in dataclasses.fields(cls):
            if C._type_of(cls, f) in (int, float) and f.name not in C.RANGES.get(cls.__name__, {}):
                missing.append(f"{cls.__name__}.{f.name}")
        C.build(cls)  # every default passes its own range
    assert not missing, f"give these a range in config.RANGES: {missing}"
    for name, ranges in C.RANGES.items():  # no range names an option that does not exist
        cls = getattr(C, name)
        assert set(ranges) <= {f.name for f in dataclasses.fields(cls)}, name


@pytest.mark.parametrize("argv, message", [
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--learning-rate", "-1e-4"], "--learning-rate must be > 0, got -0.0001"),
    (["--learning-rate=-1e-4"], "--learning-rate must be > 0, got -0.0001"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
    (["--lora-dropout", "1"], "--lora-dropout must be >= 0 and < 1, got 1.0"),
    (["--lora-layers", "0"], "--lora-layers must be -1 or >= 1, got 0"),
    (["--batch-size", "2.5"], "argument --batch-size: invalid int value: '2.5'"),
])
def test_flags_out_of_range_are_config_errors(argv, message):
    with pytest.raises(C.ConfigError) as e:
        C.from_cli(C.TrainConfig, argv, "train")
    assert message in str(e.value)


def test_negative_values_where_allowed():
    cfg = C.from_cli(C.TrainConfig, ["--lora-layers", "-1", "--learning-rate", "2e-4"], "train")
    assert cfg.lora_layers == -1 and cfg.learning_rate == 2e-4
    assert C.from_cli(C.LogitsConfig, ["--limit", "-1"], "logits").limit == -1


def test_yaml_values_are_checked_and_named_by_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("batch_size: 2.5\n")
    with pytest.raises(C.ConfigError, match=r"c.yaml: batch_size must be a whole number, got 2.5"):
        C.from_cli(C.TrainConfig, ["-c", str(f)], "train")
    f.write_text("kd:\n  alpha: -1\n")
    with pytest.raises(C.ConfigError, match=r"c.yaml: kd_alpha must be >= 0, got -1"):
        C.from_cli(C.TrainConfig, ["-c", str(f)], "train")
    f.write_text("batch_size: 2.0\nlearning_rate: '3e-4'\niters: true\n")
    with pytest.raises(C.ConfigError, match=r"c.yaml: iters must be an integer, got True"):
        C.from_cli(C.TrainConfig, ["-c", str(f)], "train")
    f.write_text("batch_size: 2.0\nlearning_rate: '3e-4'\n")
    cfg = C.from_cli(C.TrainConfig, ["-c", str(f)], "train")
    assert cfg.batch_size == 2 and isinstance(cfg.batch_size, int) and cfg.learning_rate == 3e-4
    # a flag beats the YAML, and its own value is what gets checked
    f.write_text("iters: 0\n")
    assert C.from_cli(C.TrainConfig, ["-c", str(f), "--iters", "3"], "train").iters == 3


def test_other_commands_are_checked_too():
    with pytest.raises(C.ConfigError, match="--top-p must be > 0 and <= 1, got 0.0"):
        C.from_cli(C.EvalConfig, ["--top-p", "0"], "eval")
    with pytest.raises(C.ConfigError, match="--samples must be >= 1, got 0"):
        C.from_cli(C.CorpusConfig, ["--samples", "0"], "corpus build")
    with pytest.raises(C.ConfigError, match="--shard-size must be >= 1, got 0"):
        C.from_cli(C.LogitsConfig, ["--shard-size", "0"], "logits")
    with pytest.raises(C.ConfigError, match="study.eval: max_tokens must be >= 1, got 0"):
        C.build(C.EvalConfig, {"max_tokens": 0}, source="study.eval")
