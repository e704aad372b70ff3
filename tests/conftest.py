"""Shared fixtures: a tiny random qwen2 model + trained BPE tokenizer built once per session."""

import sys
import warnings
from pathlib import Path

import pytest

from mlx_distill import blas
from mlx_distill.paths import shared_data_dir

if sys.platform.startswith("linux") and not blas.preloaded():
    warnings.warn(blas.INSTALL_HINT + " Run the tests through `make test` (it preloads OpenBLAS).")

DATA = shared_data_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (DATA / "gsm8k" / "train.jsonl").is_file():
        pytest.fail(f"benchmark data not found at {DATA}: set MLX_DISTILL_DATA to the folder with gsm8k/, math500/, ...")
    return DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer qwen2 (hidden 64) with a 512-token BPE tokenizer and a ChatML chat template."""
    from mlx_distill.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_model) -> Path:
    """A llama-architecture tiny model sharing the tokenizer of `tiny_model`."""
    from mlx_distill.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny_llama") / "model", tokenizer_dir=tiny_model,
                       model_type="llama", seed=1, tie=False)
