"""What a pipeline stage reads besides its config's text (issue 18 item 6): the sha256 of every
input file its options name, and a sha256 of every URL in full. `pipeline.decide` re-runs a stage
whose fingerprint changed since it ran (pipeline.json keeps it), or whose own manifest records a
``{path, sha256}`` that no longer matches the file: an input edited in place (same path, same
flags) is never skipped as up to date. Only hashes are kept: a URL's query string (a key) is
never written anywhere."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlx_distill import config as C
from mlx_distill.io import InputError, read_json, sha256_file
from mlx_distill.paths import prompt_path

HASH_LIMIT = 64 << 20  # files of a named folder above this are compared by size and mtime, not read


def _strings(v, key: str = ""):
    """(key path, string) of every string inside a config value (lists and mappings walked)."""
    if isinstance(v, str):
        yield key, v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _strings(x, f"{key}.{k}" if key else str(k))
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            yield from _strings(x, f"{key}[{i}]")


def _file_digest(p: Path, whole: bool = True) -> str:
    if whole or p.stat().st_size <= HASH_LIMIT:
        return sha256_file(p)
    st = p.stat()
    return f"size {st.st_size} mtime {st.st_mtime_ns}"


def fingerprint(cfg, outputs: set[Path] = frozenset(), ignored: set[str] = frozenset()) -> dict:
    """What the stage reads besides its config's text: the sha256 of every input file its options
    name (a named folder: its files, not recursing; files over HASH_LIMIT by size and mtime), and
    a sha256 of every URL in full. Folders written by the recipe's stages (`outputs`) are left
    to the stage stamps. Only hashes are kept: a URL's query string (a key) is never stored."""
    files, urls = {}, {}
    outs = {Path(o).resolve() for o in outputs}
    for key, v in _strings({k: x for k, x in C.to_dict(cfg).items() if k not in set(ignored) | {"out"}}):
        if "://" in v:
            urls[key] = hashlib.sha256(v.encode()).hexdigest()
            continue
        if not v or len(v) > 4096 or "\n" in v:
            continue
        p = prompt_path(v) if "prompt" in key or "template" in key else Path(v)
        try:
            if not p.exists():
                continue
            rp = p.resolve()
            if any(rp == o or o in rp.parents for o in outs):
                continue
            if p.is_file():
                files[str(p)] = _file_digest(p)
            elif p.is_dir():
                for f in sorted(p.iterdir()):
                    if f.is_file() and not f.name.startswith("."):
                        files[str(f)] = _file_digest(f, whole=False)
        except OSError:  # unreadable: the stage itself will say so
            continue
    return {"files": files, "urls": urls}


def fingerprint_diff(old: dict, now: dict) -> list[str]:
    """What changed between two fingerprints: input files (edited, added, removed) and URLs."""
    changed = [f for f in sorted(set(old.get("files") or {}) | set(now["files"]))
               if (old.get("files") or {}).get(f) != now["files"].get(f)]
    changed += [f"URL {k}" for k in sorted(set(old.get("urls") or {}) | set(now["urls"]))
                if (old.get("urls") or {}).get(k) != now["urls"].get(k)]
    return changed


def manifest_inputs_changed(out: Path) -> list[str]:
    """Input files the stage's own manifest records as ``{path, sha256}`` whose content differs now
    (train's data_files, eval's data, corpus build's problem_source): an in-place edit is seen even
    when pipeline.json does not know the stage."""
    mpath = Path(out) / "manifest.json"
    try:
        man = read_json(mpath) if mpath.is_file() else {}
    except InputError:
        return []
    changed, todo = [], [man]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            path, h = x.get("path"), x.get("sha256")
            if isinstance(path, str) and isinstance(h, str) and len(h) == 64 and Path(path).is_file():
                if sha256_file(path) != h:
                    changed.append(path)
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
    return sorted(set(changed))
