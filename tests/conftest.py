"""Shared fixtures: a tiny random qwen2 model + trained BPE tokenizer built once per session.

Real benchmark data (GSM8K, MATH-500, ...) comes only through the project's data setting,
``MLX_DISTILL_DATA`` (``make test`` sets it when ``../shared/data`` exists). Tests that need it
use the ``shared_data`` fixture: without the data they are skipped with that reason on a
user's machine, and fail under CI (``CI=true``), where the data must be present.
"""

import os
import signal
import sys
import warnings
from pathlib import Path

import pytest

from mlx_distill import blas
from mlx_distill.tasks.problems import DATA_ENV, data_dir

# Test modules live in one folder per wing of the package (tests/teacher/, tests/training/, ...); a
# few share builders across wings (`from test_kd_train import toy_problems`), so every wing folder
# is importable whichever file pytest is asked to run.
_HERE = Path(__file__).resolve().parent
for _wing in sorted(d for d in _HERE.iterdir() if d.is_dir() and any(d.glob("test_*.py"))):
    if str(_wing) not in sys.path:
        sys.path.append(str(_wing))

# Nothing in the suite may reach the Hugging Face Hub (there is no network here, and a test
# must not depend on one): the loaders' Hub fallback fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

if sys.platform.startswith("linux") and not blas.preloaded():
    warnings.warn(blas.INSTALL_HINT + " Run the tests through `make test` (it preloads OpenBLAS).")

DATA = data_dir()


@pytest.fixture(autouse=True)
def _signal_dispositions_are_left_as_found():
    """Whatever the launcher left (a terminal's default handler, or SIGINT ignored under
    `setsid ... < /dev/null` and in CI: see .ci/run), every test must leave SIGINT and SIGTERM as it
    found them: a command run in-process restores the handlers it replaced (mlx_distill.interrupts).
    A test that leaks one fails here, and the next test still starts from the launcher's state."""
    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    after = {s: signal.getsignal(s) for s in found}
    for s, h in found.items():
        signal.signal(s, h)
    leaked = {signal.Signals(s).name: (found[s], h) for s, h in after.items() if h != found[s]}
    if leaked:
        pytest.fail(f"the test left signal handlers changed (found -> left): {leaked}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if DATA is None or not (DATA / "gsm8k" / "train.jsonl").is_file():
        msg = (f"benchmark data not found ({DATA_ENV}={os.environ.get(DATA_ENV, '')!r}): set {DATA_ENV} to the "
               "folder with gsm8k/, math500/, math/, aime24/, amc23/")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
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


@pytest.fixture(scope="session")
def tiny_metaspace(tmp_path_factory) -> Path:
    """A 2-layer llama (hidden 64) of the *other* tokenizer family: BPE + Metaspace with byte
    fallback (576 tokens, whole-number pieces) and a Gemma-like `<start_of_turn>` template, trained
    on other text than `tiny_model`'s byte-level BPE: a cross-tokenizer student for it."""
    from mlx_distill.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny_metaspace") / "model", kind="metaspace", seed=2)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The embedded SmolLM2-135M-Instruct as an mlx-lm folder (byte-level BPE, 49152 tokens, ChatML),
    converted once into the cache (see tests/test_embedded.py); `--model smollm2` resolves to it."""
    from mlx_distill.embedded import ensure_smollm2

    return Path(ensure_smollm2())


def _skip_or_fail(msg: str):
    """Optional things a test needs: skipped with the reason on a user's machine, a failure under CI."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """Gemma-3-270M (base) as a float32 mlx-lm folder, converted once from the optional `gemma` extra
    (tests/test_gemma.py); `--model gemma3-270m` resolves to it. Skipped without the package
    (`pip install -e ".[gemma]"`), a failure under CI=true, where `make test` installs it."""
    from mlx_distill import gemma

    if gemma.package_version() is None:
        _skip_or_fail(f"Gemma-3-270M needs the {gemma.PACKAGE} package: {gemma.INSTALL_HINT}")
    return Path(gemma.ensure_gemma())


@pytest.fixture(scope="session")
def gemma3_4bit(gemma3) -> Path:
    """The same model quantized by MLX (4 bits): the QLoRA base, `--model gemma3-270m-4bit`."""
    from mlx_distill import gemma

    return Path(gemma.ensure_gemma(bits4=True))
