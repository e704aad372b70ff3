"""Files: atomic writes, JSONL with errors that name file and line, manifests.

Every stage writes its outputs through these helpers so that a crash never leaves a
half-written file behind (write to a temporary file in the same folder, fsync, rename).
"""

import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """Bad user input: the message names the file (and line) and what to do."""


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; rename it over `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:  # from here on every failure (ENOSPC, EACCES, an exception in the block) removes the .tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs are ordinary files
        yield Path(tmp)
        # again: a writer may have replaced the file (safetensors' save_file writes a new 0600 one)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # name the file the user asked for, not the temporary one (removed below)
        if e.filename is not None and str(e.filename) == str(tmp):
            e.filename = str(path)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(folder: str | Path):
    """Yield a temporary folder next to `folder`; if the block succeeds, swap it into place,
    so readers see the old or the new folder whole, never a half-written one.

    The swap is two renames (``folder -> folder.old``, ``tmp -> folder``), then ``folder.old``
    is removed. A crash between the renames leaves only ``folder.old`` (complete): readers go
    through `complete_dir`, which falls back to it, and the next swap here replaces it."""
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            # a leftover .old beside a whole `folder` (a crash after the second rename) is stale
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # name the folder the user asked for, not the temporary one (removed below)
        if e.filename is not None and str(e.filename).startswith(str(tmp)):
            e.filename = str(folder) + str(e.filename)[len(str(tmp)):]
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def writable_dir(folder: str | Path, label: str | None = None) -> Path:
    """Create `folder` (and its parents) and check that a file can be written in it, before any
    work: an output folder that cannot be made or written (a regular file in the path, no
    permission, a read-only or full disk) is one InputError naming it, with nothing left behind."""
    folder = Path(folder)
    label = label or f"--out {folder}"
    for p in (folder, *folder.parents):  # the nearest part of the path that exists must be a folder
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise InputError(f"{label}: {p} is a file, not a folder; choose another --out")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise InputError(f"{label}: cannot write there ({describe_os_error(e)}); choose a "
                         "folder you can write to") from None
    return folder


def describe_os_error(e: OSError) -> str:
    """'No space left on device: runs/x/.a.tmp' -- an OSError as a reason, without the errno tuple."""
    if isinstance(e, (FileExistsError, NotADirectoryError)) and e.filename:
        path = Path(e.filename)  # mkdir/open through a regular file: say which part of the path it is
        for p in (path, *path.parents):
            if p.exists() and not p.is_dir():
                return f"{p} is a file, not a folder" + (f" (in {path})" if p != path else "")
    what = e.strerror or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what


def complete_dir(folder: str | Path) -> Path | None:
    """The whole folder `atomic_dir` last wrote: `folder`, else ``folder.old`` when a crash
    fell between its two renames; None when neither exists."""
    folder = Path(folder)
    for p in (folder, folder.with_name(folder.name + ".old")):
        if p.is_dir():
            return p
    return None


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


def read_complete_dir(folder: str | Path, read, what: str = "checkpoint", fix: str = ""):
    """``read(found)`` of the whole folder `atomic_dir` last wrote (`complete_dir`); when a file
    in it cannot be read (truncated or damaged after it was written), ``read(folder.old)`` if
    that folder is there, with a warning. Otherwise one InputError naming the folder, the
    reason and `fix` (what to do). `read` raises on a damaged file (any Exception)."""
    folder = Path(folder)
    found = complete_dir(folder)
    if found is None:
        raise InputError(f"{folder}: no {what} (nor {folder.name}.old){'; ' + fix if fix else ''}")
    tried = []
    for p in dict.fromkeys((found, folder.with_name(folder.name + ".old"))):
        if not p.is_dir():
            continue
        try:
            value = read(p)
        except Exception as e:  # noqa: BLE001 -- any failure to read a file (InputError too) is a damaged folder
            tried.append(f"{p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}")
            continue
        if tried:
            print(f"warning: {tried[0]}; using the {what} in {p}", file=sys.stderr, flush=True)
        return value
    raise InputError(f"cannot read the {what}: " + "; ".join(tried) + (f"; {fix}" if fix else ""))


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


class JsonlAppender:
    """Append-only JSONL: one line per record, flushed (and fsynced) as it is written,
    so a SIGKILL loses at most the record being written. A torn last line (from a kill
    mid-write) is detected by `read_jsonl(..., tolerate_torn_tail=True)`."""

    def __init__(self, path: str | Path, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self.f = open(self.path, "a")
        self.fsync = fsync

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        if self.fsync:
            os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _truncate_torn_tail(path: Path) -> None:
    """Drop an incomplete final line (no trailing newline) left by a killed writer."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)


# ----------------------------------------------------------------------------- reading
def iter_jsonl(path: str | Path, tolerate_torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record). Malformed lines raise InputError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with open(path, "rb") as f:
        raw = f.readlines()
    lines = []
    for i, b in enumerate(raw, 1):
        try:
            lines.append(b.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{i}: not UTF-8 (byte 0x{b[e.start]:02x} at column {e.start + 1}); "
                             "save the file as UTF-8") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and i == len(lines) and not line.endswith("\n"):
                return
            raise InputError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno}); "
                             "each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        yield i, rec


def read_jsonl(path: str | Path, tolerate_torn_tail: bool = False) -> list[dict]:
    return [r for _, r in iter_jsonl(path, tolerate_torn_tail)]


# ----------------------------------------------------------------------------- manifests
def sha256_file(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def versions() -> dict:
    """Versions of the packages that decide a stage's numbers."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("mlx_distill", "mlx", "mlx-lm", "transformers", "tokenizers", "numpy",
                 "math-verify", "openai", "torch", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def public_url(url: str) -> str:
    """A URL fit for a file or a log: no ``user:password@``, no query string, no fragment (keys and
    tokens travel there). Anything that is not an http(s) URL is returned unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        p = urlsplit(url.strip())
    except ValueError:
        return url
    if p.scheme not in ("http", "https") or not p.hostname:
        return url
    host = p.hostname if ":" not in p.hostname else f"[{p.hostname}]"
    return urlunsplit((p.scheme, host + (f":{p.port}" if p.port else ""), p.path, "", ""))


def scrub(obj: Any) -> Any:
    """`obj` with every URL inside it made public (``public_url``): the one redaction every
    manifest goes through."""
    if isinstance(obj, str):
        return public_url(obj) if "://" in obj else obj
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def write_manifest(path: str | Path, stage: str, config: dict, **extra) -> dict:
    """A manifest records what produced an output: stage, config, versions, hashes (URLs scrubbed)."""
    man = scrub({"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "config": config, "versions": versions(), **extra})
    atomic_write_json(path, man)
    return man


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_text(path: str | Path) -> str:
    """A user's text file as UTF-8; a byte that is not is an InputError naming FILE:LINE."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
