"""Backends: MLX (Apple Silicon, Linux CPU) and PyTorch (CUDA, CPU), one small interface.

`training/train.py` drives either through the contract `base.Backend` (a Protocol naming every
method and attribute the loop uses). Nothing in the MLX path imports torch.

The wing also holds what the backends themselves call: ``ops.py`` (the array namespace the losses
and the teacher use for MLX and torch arrays alike), ``distributed.py`` (ranks, all-reduce) and
``rollouts.py`` (MLX sampling for on-policy rollouts). It may import models and the shared ground
(config, io, paths, progress); training, teacher, generation (torch model loading) and parity
import it.
"""

import importlib.util
import sys


def auto_backend() -> str:
    """MLX on Apple Silicon; torch where CUDA is present; MLX otherwise (Linux CPU build)."""
    if sys.platform == "darwin":
        return "mlx"
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return "torch"
    return "mlx"


def get_backend(cfg):
    name = cfg.backend if cfg.backend != "auto" else auto_backend()
    if name == "mlx":
        from mlx_distill.backends.mlx import MLXBackend

        return MLXBackend(cfg)
    if name == "torch":
        try:
            from mlx_distill.backends.torch import TorchBackend
        except ImportError as e:
            raise SystemExit(f"--backend torch needs the torch extra: pip install 'mlx_distill[torch]' ({e})")
        return TorchBackend(cfg)
    raise ValueError(f"unknown backend {name!r}")
