"""The backend contract in code: `backends.base.Backend` names everything the training loop uses
of a backend, and both backends implement all of it. Also `mlx_distill.backends.distributed`."""

import inspect
import re

import numpy as np
import pytest

from mlx_distill.backends import distributed
from mlx_distill.backends.base import Backend, backend_members
from mlx_distill.config import TrainConfig
from mlx_distill.paths import REPO

try:
    import torch
except ImportError:
    torch = None

# what the loop reaches through `backend.` (train.py) or `backend.` passed on (selection.py)
LOOP_FILES = ["mlx_distill/training/train.py", "mlx_distill/training/selection.py"]


def test_the_protocol_names_everything_the_loop_uses():
    used = set()
    for f in LOOP_FILES:
        used |= set(re.findall(r"\bbackend\.([A-Za-z_]\w*)", (REPO / f).read_text()))
    assert used, "no backend use found: the regex no longer matches the loop"
    missing = sorted(used - set(backend_members()))
    assert not missing, f"train/selection use backend.{missing} but base.Backend does not declare them"


def _check_implements(backend_cls, instance):
    for name in backend_members():
        declared = getattr(Backend, name, None)
        if callable(declared):
            impl = getattr(backend_cls, name, None)
            assert callable(impl), f"{backend_cls.__name__}.{name} is missing"
            want = [p for p in inspect.signature(declared).parameters.values() if p.name != "self"]
            got = inspect.signature(impl).parameters
            for p in want:  # every parameter the loop may pass, by the same name (defaults where declared)
                assert p.name in got, f"{backend_cls.__name__}.{name} lacks parameter {p.name!r}"
                if p.default is not inspect.Parameter.empty:
                    assert got[p.name].default is not inspect.Parameter.empty, f"{backend_cls.__name__}.{name}({p.name})"
        else:
            assert hasattr(instance, name), f"{backend_cls.__name__} instances have no {name!r}"
    assert isinstance(instance, Backend)


def test_mlx_backend_implements_the_contract():
    from mlx_distill.backends.mlx import MLXBackend

    b = MLXBackend(TrainConfig())
    _check_implements(MLXBackend, b)
    assert b.name == "mlx" and b.dist is distributed.SINGLE


@pytest.mark.skipif(torch is None, reason="torch not installed (the torch backend is an extra)")
def test_torch_backend_implements_the_contract(monkeypatch):
    from mlx_distill.backends.torch import TorchBackend

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    b = TorchBackend(TrainConfig(), device="cpu")
    _check_implements(TorchBackend, b)
    assert b.name == "torch" and b.dist.world == 1 and b.dist.is_main


def test_group_rows_and_main_only(tmp_path):
    g = distributed.Group(world=3, rank=1, all_reduce=lambda x: x * 3)
    x = np.arange(8).reshape(8, 1)
    np.testing.assert_array_equal(g.shard(x)[:, 0], [1, 4, 7])
    assert g.shard(np.array(0.5)) == 0.5  # a 0-d scalar (kd_alpha) stays whole
    assert not g.is_main and g.main_only(lambda: "ran") is None  # rank 0 alone writes
    main = distributed.Group(world=3, rank=0)
    assert main.main_only(lambda v: v, "ran") == "ran"
    assert distributed.SINGLE.shard(x) is x and distributed.SINGLE.all_reduce(x) is x


def test_env_ranks():
    assert distributed.env_ranks({}) == (1, 0, 0)
    assert distributed.env_ranks({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == (4, 2, 0)
    with pytest.raises(ValueError, match="not a valid rank"):
        distributed.env_ranks({"WORLD_SIZE": "2", "RANK": "2"})


def test_mlx_group_single_process():
    assert distributed.mlx_group().world == 1
