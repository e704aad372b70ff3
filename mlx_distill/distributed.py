"""Ranks for data-parallel training: torchrun today, mlx.launch (``mx.distributed``) later.

A `Group` says how many processes train together (``world``), which one this is (``rank``),
and how to sum an array over all of them (``all_reduce``, in place). Every rank runs the same
loop (`mlx_distill.train.run`) on the same micro-batch stream and takes its rows
``rank::world`` (`Group.shard`); the backend sums gradients, token counts and loss sums over
the ranks, so a step equals the single-process step on the whole batch.

Writes: rank 0 (`Group.is_main`) writes the run folder; every other rank writes the same
files under ``<out>/ranks/<rank>/`` (`Group.run_folder`), so the loop needs no rank test
around each write and a crash on one rank never tears rank 0's files. Side effects that
should happen once (a warning on the console) go through `Group.main_only`.

The torch backend builds its group with `torch_group`; `mlx_group` is the same contract
over ``mx.distributed`` for an MLX data-parallel backend (not used by `MLXBackend` yet,
which trains in one process: `SINGLE`).
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional


def _no_reduce(x):
    return x


@dataclass(frozen=True)
class Group:
    world: int = 1
    rank: int = 0
    local_rank: int = 0  # the device index on this machine
    all_reduce: Callable[[Any], Any] = _no_reduce  # sum over the ranks, in place; returns its argument
    kind: str = "single"  # "single", "torch" (torch.distributed) or "mlx" (mx.distributed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, x):
        """This rank's rows ``rank::world`` of a batch-major array; 0-d arrays (a scalar like
        ``kd_alpha``) and single-process groups get `x` whole."""
        if self.world > 1 and getattr(x, "ndim", 0) >= 1:
            return x[self.rank:: self.world]
        return x

    def run_folder(self, out: str | Path) -> Path:
        """Where this rank writes: `out` on rank 0, ``out/ranks/<rank>`` elsewhere."""
        return Path(out) if self.is_main else Path(out) / "ranks" / str(self.rank)

    def main_only(self, fn: Callable, *args, **kwargs) -> Optional[Any]:
        """``fn(*args, **kwargs)`` on rank 0 only (None on the other ranks)."""
        return fn(*args, **kwargs) if self.is_main else None


SINGLE = Group()


def env_ranks(environ: Optional[dict] = None) -> tuple[int, int, int]:
    """(world, rank, local_rank) from the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK);
    (1, 0, 0) outside a launcher."""
    env = os.environ if environ is None else environ
    world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"WORLD_SIZE={world} RANK={rank}: not a valid rank of the group")
    return world, rank, int(env.get("LOCAL_RANK", str(rank)))


def torch_group(device) -> Group:
    """The torchrun process group (joined here: NCCL on CUDA, gloo on CPU), or `SINGLE`."""
    world, rank, local = env_ranks()
    if world == 1:
        return SINGLE
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    return Group(world, rank, local, all_reduce, "torch")


def mlx_group() -> Group:
    """The ``mx.distributed`` group of an ``mlx.launch`` run, or `SINGLE` (one process, or an
    MLX build without a distributed backend). MLX arrays are immutable, so its all-reduce
    returns the sum rather than writing it in place: callers use the return value."""
    import mlx.core as mx

    if not mx.distributed.is_available():
        return SINGLE
    g = mx.distributed.init()
    if g.size() == 1:
        return SINGLE
    return Group(g.size(), g.rank(), g.rank(), lambda x: mx.distributed.all_sum(x, group=g), "mlx")
