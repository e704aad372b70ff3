"""Ranks for data-parallel training: ``torchrun`` (torch backend) and ``mlx.launch`` (MLX backend).

A `Group` says how many processes train together (``world``), which one this is (``rank``),
and how to sum an array over all of them (``all_reduce``). Every rank runs the same loop
(`mlx_distill.training.train.run`) on the same micro-batch stream and takes its rows ``rank::world``
(`Group.shard`); the backend sums gradients, token counts and loss sums over the ranks and
divides by the *global* token count, so a step equals the single-process step on the whole
batch and every rank logs the same numbers.

Writes: rank 0 (`Group.is_main`) alone writes the run folder (metrics, checkpoints, adapters,
manifest); the other ranks write nothing, so a run on several machines needs no shared run
folder (each machine still reads the model, the data and a ``--kd`` store at the same paths).
Side effects that should happen once go through `Group.main_only`. On ``--resume`` rank 0
reads the checkpoint and the backend hands its arrays and loop state to the other ranks
(`Group.broadcast`, `Group.broadcast_json`), so every rank resumes the same state. A Ctrl-C
on any rank stops them all at the same optimizer step (`Group.any`).

The torch backend builds its group with `torch_group`, the MLX backend with `mlx_group`.
``all_reduce`` returns the sum (torch also writes it into its argument; MLX arrays are
immutable): callers always use the return value.
"""

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np


def _no_reduce(x):
    return x


@dataclass(frozen=True)
class Group:
    world: int = 1
    rank: int = 0
    local_rank: int = 0  # the device index on this machine
    all_reduce: Callable[[Any], Any] = _no_reduce  # the sum over the ranks (use the return value)
    kind: str = "single"  # "single", "torch" (torch.distributed) or "mlx" (mx.distributed)
    to_array: Callable[[np.ndarray], Any] = np.asarray  # NumPy -> an array `all_reduce` takes
    to_numpy: Callable[[Any], np.ndarray] = np.asarray  # and back

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, x):
        """This rank's rows ``rank::world`` of a batch-major array; 0-d arrays (a scalar like
        ``kd_alpha``) and single-process groups get `x` whole."""
        if self.world > 1 and getattr(x, "ndim", 0) >= 1:
            return x[self.rank:: self.world]
        return x

    def main_only(self, fn: Callable, *args, **kwargs) -> Optional[Any]:
        """``fn(*args, **kwargs)`` on rank 0 only (None on the other ranks)."""
        return fn(*args, **kwargs) if self.is_main else None

    # ---------------------------------------------------------------- collectives (every rank calls them)
    def broadcast(self, x):
        """Rank 0's `x` on every rank (an all-reduce to which the other ranks add zeros); `x`
        must have the same shape and dtype on every rank."""
        if self.world == 1:
            return x
        return self.all_reduce(x if self.is_main else x * 0)

    def broadcast_json(self, obj):
        """Rank 0's JSON-serialisable `obj` on every rank (what the others pass is ignored)."""
        if self.world == 1:
            return obj
        raw = np.frombuffer(json.dumps(obj).encode(), np.uint8) if self.is_main else np.zeros(0, np.uint8)
        n = int(self.sum_numpy(np.array([raw.size], np.int32))[0])
        buf = raw.astype(np.int32) if self.is_main else np.zeros(n, np.int32)
        return json.loads(self.sum_numpy(buf).astype(np.uint8).tobytes())

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on at least one (a stop request)."""
        if self.world == 1:
            return bool(flag)
        return bool(self.sum_numpy(np.array([1 if flag else 0], np.int32))[0] > 0)

    def barrier(self) -> None:
        """Wait until every rank is here: the other ranks leave only after rank 0's writes (a
        launcher stops every rank as soon as one exits with an error, a Ctrl-C included)."""
        self.any(False)

    def gather_rows(self, rows: dict, n: int) -> list:
        """`n` rows of integers spread over the ranks (row i held by exactly one rank, as
        ``{i: [ints]}``) -> all `n` rows, in order, on every rank."""
        if self.world == 1:
            return [list(rows[i]) for i in range(n)]
        lens = np.zeros(n, np.int64)
        for i, r in rows.items():
            lens[i] = len(r)
        lens = self.sum_numpy(lens)
        buf = np.zeros((n, max(int(lens.max(initial=0)), 1)), np.int32)
        for i, r in rows.items():
            buf[i, : len(r)] = r
        buf = self.sum_numpy(buf)
        return [buf[i, : lens[i]].tolist() for i in range(n)]

    def sum_numpy(self, a: np.ndarray) -> np.ndarray:
        """The NumPy array `a` summed over the ranks."""
        return np.asarray(self.to_numpy(self.all_reduce(self.to_array(a))))


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

    return Group(world, rank, local, all_reduce, "torch",
                 to_array=lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device),
                 to_numpy=lambda t: t.cpu().numpy())


def mlx_group() -> Group:
    """The ``mx.distributed`` group of an ``mlx.launch`` run (ring over TCP, or JACCL/MPI as the
    launcher set it up), or `SINGLE` (one process, or an MLX build without a distributed
    backend)."""
    import mlx.core as mx

    if not mx.distributed.is_available():
        return SINGLE
    g = mx.distributed.init()
    if g.size() == 1:
        return SINGLE

    def all_reduce(x):
        return mx.distributed.all_sum(x, group=g)

    return Group(g.size(), g.rank(), g.rank(), all_reduce, "mlx", to_array=mx.array,
                 to_numpy=lambda x: np.array(x))
