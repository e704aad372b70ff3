"""Where things live: the repository's prompts/, the model cache. (Benchmark data: ``problems.data_dir``.)"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def prompts_dir() -> Path:
    return Path(os.environ.get("MLX_DISTILL_PROMPTS", REPO / "prompts"))


def prompt_path(name: str | Path) -> Path:
    """A prompt template: an existing path as given, else a file under prompts/."""
    p = Path(name)
    if p.is_file():
        return p
    q = prompts_dir() / p.name if p.parent in (Path("."), Path("prompts")) else prompts_dir() / p
    return q if q.is_file() else p


def cache_dir() -> Path:
    base = os.environ.get("MLX_DISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlx_distill")
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p
