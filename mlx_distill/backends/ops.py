"""The array namespace shared by both backends: ``ops(x)`` gives the handful of operations
the losses and the teacher need, for an mlx.core.array or a torch.Tensor, so each formula is
written once (`training.losses`, the teacher's top-M scoring) and cannot drift between MLX and torch.

It sits with the backends because it is array plumbing, not an objective: the teacher wing and the
training wing both use it, and neither should import the other to get it."""

from types import SimpleNamespace


_LSE_CHUNK = 512


def _mlx_logsumexp(x, axis: int):
    """mx.logsumexp, in two levels over long axes. MLX's CPU reductions add sequentially: over
    a 151936-wide row the float32 error is ~4e-4 (torch: ~1e-6), which moved SmolLM2's LoRA
    gradients 7e-4 (relative) away from a float64 reference while torch's moved 4e-6.
    Chunks of 512 bring the error to ~2e-6 and ran 2x faster on CPU (1024 rows x 151936)."""
    import mlx.core as mx

    n = x.shape[axis]
    if n <= 8 * _LSE_CHUNK or axis not in (-1, x.ndim - 1):
        return mx.logsumexp(x, axis=axis, keepdims=True)
    pad = (-n) % _LSE_CHUNK
    if pad:  # -inf adds nothing to a sum of exponentials; every chunk keeps >= 1 real entry
        x = mx.concatenate([x, mx.full((*x.shape[:-1], pad), -mx.inf, dtype=x.dtype)], axis=-1)
    part = mx.logsumexp(x.reshape(*x.shape[:-1], -1, _LSE_CHUNK), axis=-1)
    return mx.logsumexp(part, axis=-1, keepdims=True)


def _mlx_ops():
    import mlx.core as mx

    return SimpleNamespace(
        name="mlx",
        f32=lambda x: x.astype(mx.float32),
        logsumexp=_mlx_logsumexp,
        take=lambda x, idx, axis: mx.take_along_axis(x, idx, axis=axis),
        sum=lambda x, axis=None: mx.sum(x, axis=axis),
        exp=mx.exp,
        log=mx.log,
        where=mx.where,
        maximum=mx.maximum,
        minimum=mx.minimum,
        expand=lambda x, axis: mx.expand_dims(x, axis),
        squeeze=lambda x, axis: mx.squeeze(x, axis),
        concat=lambda xs, axis: mx.concatenate(xs, axis=axis),
        log1p=mx.log1p,
        stop_gradient=mx.stop_gradient,
        as_index=lambda x: x.astype(mx.int32),
        full_like=lambda x, v: mx.full(x.shape, v, dtype=x.dtype),
        expm1=mx.expm1,
        logaddexp=mx.logaddexp,
        # indices of the k largest entries along the last axis (order among them unspecified)
        topk_idx=lambda x, k: mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k].astype(mx.int32),
        cumsum=lambda x, axis: mx.cumsum(x, axis=axis),
        sort_desc=lambda x: -mx.sort(-x, axis=-1),
        arange=lambda n, like: mx.arange(n),
        abs=mx.abs,
    )


def _torch_ops():
    import torch

    return SimpleNamespace(
        name="torch",
        f32=lambda x: x.float(),
        logsumexp=lambda x, axis: torch.logsumexp(x, dim=axis, keepdim=True),
        take=lambda x, idx, axis: torch.gather(x, axis, idx),
        sum=lambda x, axis=None: x.sum() if axis is None else x.sum(dim=axis),
        exp=torch.exp,
        log=torch.log,
        where=torch.where,
        maximum=torch.maximum,
        minimum=torch.minimum,
        expand=lambda x, axis: x.unsqueeze(axis),
        squeeze=lambda x, axis: x.squeeze(axis),
        concat=lambda xs, axis: torch.cat(xs, dim=axis),
        log1p=torch.log1p,
        stop_gradient=lambda x: x.detach(),
        as_index=lambda x: x.long(),
        full_like=lambda x, v: torch.full_like(x, v),
        expm1=torch.expm1,
        logaddexp=torch.logaddexp,
        topk_idx=lambda x, k: torch.topk(x, k, dim=-1).indices,
        cumsum=lambda x, axis: torch.cumsum(x, dim=axis),
        sort_desc=lambda x: torch.sort(x, dim=-1, descending=True).values,
        arange=lambda n, like: torch.arange(n, device=like.device),
        abs=torch.abs,
    )


_OPS = {}


def ops(x) -> SimpleNamespace:
    """The array namespace for `x` (an mlx.core.array or a torch.Tensor)."""
    kind = "torch" if type(x).__module__.startswith("torch") else "mlx"
    if kind not in _OPS:
        _OPS[kind] = _torch_ops() if kind == "torch" else _mlx_ops()
    return _OPS[kind]


def log_softmax(x, axis: int = -1):
    o = ops(x)
    return x - o.logsumexp(x, axis)
