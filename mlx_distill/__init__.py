"""mlx_distill: distil mathematical reasoning from a large teacher into a small student (MLX, with a PyTorch path)."""

__version__ = "0.1.0"
