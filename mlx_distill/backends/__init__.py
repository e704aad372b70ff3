"""Backends: MLX (Apple Silicon, Linux CPU) and PyTorch (CUDA, CPU), one small interface.

`train.py` drives either through the contract `base.Backend` (a Protocol naming every method
and attribute the loop uses). Nothing in the MLX path imports torch.
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
