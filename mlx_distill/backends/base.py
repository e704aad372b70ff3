"""The backend contract (`Backend`) and what both backends share: the mlx-lm adapter
description. (Model names are resolved by `mlx_distill.models.resolve_model`, the one resolver
every command uses.)"""

from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, runtime_checkable

from mlx_distill.backends.distributed import SINGLE, Group


@dataclass
class SplitHead:
    """A student's output before its LM head, for losses that apply the head `chunk` positions at
    a time (`training.losses.lm_losses`). ``run(piece, x, bounds)`` evaluates ``piece(x[:, lo:hi], j)``
    (a tuple of arrays) for each chunk ``j = (lo, hi)`` of `bounds` and returns all their outputs in
    one flat list, so that each chunk's logits are made, reduced and dropped before the next chunk's,
    in the forward and in the backward pass (which recomputes them): `backends.mlx.run_chunks`,
    `backends.torch.run_chunks`."""

    hidden: Any  # (B, T, D) final hidden states (after the last norm) of the positions that get logits
    head: Callable  # (1, C, D) -> (1, C, V) logits, soft-capping included where the model has it
    chunk: int  # positions per chunk
    run: Callable  # (piece, x, bounds) -> flat list of every chunk's outputs


@runtime_checkable
class Backend(Protocol):
    """Everything the training loop (`mlx_distill.training.train.run`, and `mlx_distill.training.selection` for
    ``--select-by accuracy``) uses of a backend; `MLXBackend` and `TorchBackend` implement all
    of it (tests/test_backend_contract.py checks both, and that the loop uses nothing else).

    Arrays cross the contract as NumPy: a batch is ``data.batch_arrays`` (+ the KD source's
    ``kd_ids``/``kd_logits``, ``kd_alpha``, ``kd_scale``); the backend converts them
    (`to_arrays`). An *objective* is ``objective(model, arrays) -> (loss_sum, ntokens, parts)``
    in the backend's array type (`objectives.sft_objective`, `objectives.kd_objective`), built on the
    backend's `forward`; steps return plain floats: ``{"loss_sum", "ntokens", **parts}``,
    summed over ranks."""

    name: str  # "mlx" | "torch"
    model_path: str  # the resolved model folder (set by `load`)
    tokenizer: Any  # the model's tokenizer (set by `load`); `selection` decodes with it
    dist: Group  # ranks: world, rank, all-reduce, broadcast; rank 0 alone writes (`mlx_distill.backends.distributed`)

    # model
    def load(self) -> tuple[Any, Any]:
        """Load the base model and tokenizer -> (model, tokenizer)."""

    def prepare(self) -> Any:
        """Freeze the base, add LoRA/DoRA layers (or unfreeze blocks for full fine-tuning)."""

    def parameter_counts(self) -> dict:
        """{"total": int, "trainable": int}."""

    def adapter_config(self) -> dict:
        """mlx-lm's adapter_config.json for this run."""

    def forward(self, model, inputs, keep: Optional[int] = None, split: bool = False) -> Any:
        """Logits of the last `keep` positions (all when None). With `split` and a loss chunk
        (``--loss-chunk``), a `SplitHead` instead: the final hidden states and the output head, so
        the losses apply the head chunk by chunk (`training.losses.lm_losses`)."""

    def to_arrays(self, arrays: dict) -> dict:
        """NumPy batch -> the backend's arrays (under torchrun: this rank's rows)."""

    # optimisation
    def init_optimizer(self) -> None:
        """Fresh optimizer state (the schedule starts at step 0)."""

    def build_step(self, objective) -> None:
        """Prepare the training step (compile) for `objective`."""

    def train_step(self, arrays: dict, update: bool, micro: int = 0) -> dict:
        """One micro-batch: accumulate gradients; on `update`, divide by the step's token count once,
        clip, apply. `micro` (micro-batches consumed) seeds dropout, so a resumed run matches."""

    def eval_step(self, objective, arrays: dict) -> dict:
        """`objective` on one batch without gradients."""

    def train_mode(self, on: bool) -> None:
        """Dropout on (training) or off (validation, generation)."""

    def learning_rate(self) -> float:
        """The rate of the last update."""

    def peak_memory_gb(self) -> float:
        """Peak device (MLX, CUDA) or process (torch on CPU) memory so far, in GB."""

    def generate(self, prompts: list, max_tokens: int, batch_size: int = 32) -> list:
        """Greedy continuations (token ids, EOS excluded) of token-id `prompts` by the model being
        trained, with its current adapter (no second copy of the weights)."""

    def sample(self, prompts: list, max_tokens: list, temperature: float, top_p: float, key: int) -> list:
        """On-policy rollouts: one sampled completion per token-id prompt by the model being trained
        with its current adapter (`rollouts.Rollout`: tokens, EOS included when ``finished``), the
        sampling key set from `key`. A backend that cannot sample inside training raises InputError."""

    # persistence
    def save_adapter(self, folder: Path, name: str = "adapters.safetensors") -> None:
        """The trainable weights in mlx-lm's format, written atomically."""

    def save_checkpoint(self, folder: Path, state: dict) -> None:
        """Adapter + optimizer + the loop's `state`, swapped into `folder` whole (`io.atomic_dir`)."""

    def load_checkpoint(self, folder: Path) -> dict:
        """Restore adapter and optimizer from `folder` (or ``folder.old``); return the loop state."""


def backend_members() -> tuple[str, ...]:
    """The names `Backend` declares (attributes and methods)."""
    names = set(Backend.__annotations__)
    names.update(k for k, v in vars(Backend).items() if callable(v) and not k.startswith("_"))
    return tuple(sorted(names))


# --loss-chunk -1 (auto): chunk the LM head from this vocabulary size on (docs/BENCHMARKS.md, "Chunked LM-head loss")
AUTO_CHUNK_VOCAB = 100_000
AUTO_CHUNK = 128


def resolve_loss_chunk(setting: int, vocab_size: int) -> int:
    """Positions per loss chunk for ``--loss-chunk setting`` (-1 = auto) and a vocabulary; 0 = off."""
    if setting >= 0:
        return int(setting)
    return AUTO_CHUNK if vocab_size >= AUTO_CHUNK_VOCAB else 0


class BackendBase:
    """Subclasses set `cfg`, `model_path`, `tokenizer` and `num_layers` (LoRA blocks) while
    loading/preparing; a backend trains in one process (`SINGLE`) unless it sets `dist`."""

    model_path: str = ""
    tokenizer: Any = None
    dist: Group = SINGLE

    def lora_parameters(self) -> dict:
        p = {"rank": self.cfg.lora_rank, "scale": self.cfg.lora_scale, "dropout": self.cfg.lora_dropout}
        if self.cfg.lora_keys:
            p["keys"] = list(self.cfg.lora_keys)
        return p

    def adapter_config(self) -> dict:
        """mlx-lm's adapter_config.json (read by `mlx_lm generate --adapter-path`, `mlx_lm fuse`),
        so a run folder from either backend loads in mlx-lm as it is."""
        from mlx_distill.models import portable_name

        cfg = self.cfg
        return {"model": portable_name(cfg.model, self.model_path), "model_path": self.model_path,
                "fine_tune_type": cfg.fine_tune_type, "num_layers": self.num_layers,
                "lora_parameters": self.lora_parameters(), "data": cfg.data, "seed": cfg.seed,
                "max_seq_length": cfg.max_seq_length, "trained_by": "mlx_distill"}


def checkpoint_fix(folder: Path) -> str:
    """What to do when a run's checkpoint (RUN/checkpoints/last) cannot be read: both backends say the same."""
    run = Path(folder).parent.parent
    return (f"the run in {run} cannot be resumed: start over without --resume into a new --out "
            f"(or delete {run} first)")
