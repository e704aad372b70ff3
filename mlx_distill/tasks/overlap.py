"""Honesty checks on questions: did the model see an evaluation problem while training?

Two checks share one notion of "the same question" (``problems.normalize_text``: case,
spacing, punctuation and ``$`` ignored):

* **training provenance.** ``train`` writes ``train_questions.json`` into every run folder: the
  absolute paths and sha256 of the files it trained and validated on, and a key (a short
  sha256 of the normalised text) for every training question. For records in chat or
  prompt/completion form the key is taken over the whole user turn and over each of its
  paragraphs, so a question inside a prompt template is still found. ``eval`` compares its
  problems against these keys, so the check works from any directory and after the corpus
  has been moved or deleted; ``convert-adapter`` copies the file along.
* **corpus leakage.** ``corpus build`` compares its problems against the evaluation split of
  every task marked ``leakage`` in the registry (``problems.leakage_index``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Optional

from mlx_distill import config
from mlx_distill.io import InputError, atomic_write_json, iter_jsonl, read_json, sha256_file
from mlx_distill.tasks.problems import normalize_text

PROVENANCE = "train_questions.json"


def question_key(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode()).hexdigest()[:16]


def _user_texts(rec: dict) -> list[str]:
    if isinstance(rec.get("messages"), list):
        return [str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    if rec.get("prompt"):
        return [str(rec["prompt"])]
    return []


def record_keys(rec: dict) -> set[str]:
    """Keys of one training record: its question, or its user turns and their paragraphs."""
    q = rec.get("question") or rec.get("problem")
    if q:
        return {question_key(str(q))}
    keys = set()
    for text in _user_texts(rec):
        keys.add(question_key(text))
        keys.update(question_key(part) for part in text.split("\n\n") if normalize_text(part))
    return keys


def corpus_files(path: str | Path) -> list[Path]:
    """The files a corpus path trains on: the file itself, or a folder's train/valid splits."""
    p = Path(path)
    if p.is_file():
        return [p]
    files = [f for f in (p / "train.jsonl", p / "valid.jsonl") if f.is_file()]
    return files or ([p / "verified.jsonl"] if (p / "verified.jsonl").is_file() else [])


def training_keys(files: list[Path]) -> set[str]:
    keys: set[str] = set()
    for f in files:
        for _, r in iter_jsonl(f):
            keys |= record_keys(r)
    return keys


def record_training_questions(out: str | Path, files: list[str | Path]) -> dict:
    """Write ``<out>/train_questions.json`` for the files a run trains and validates on."""
    files = sorted({Path(f).resolve() for f in files})
    keys = sorted(training_keys(files))
    prov = {"files": [{"path": str(f), "sha256": sha256_file(f)} for f in files], "questions": len(keys),
            "sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(), "keys": keys}
    atomic_write_json(Path(out) / PROVENANCE, prov)
    return prov


def adapter_train_config(adapter: str) -> dict:
    p = Path(adapter) / "config.yaml"
    if not adapter or not p.is_file():
        return {}
    try:
        return config.load_yaml(p)
    except config.ConfigError:
        return {}


def _adapter_keys(adapter: str) -> tuple[Optional[set], dict]:
    """(keys, info) from an adapter folder's provenance, else from the corpus its config names."""
    prov_path = Path(adapter) / PROVENANCE
    if prov_path.is_file():
        prov = read_json(prov_path)
        return set(prov.get("keys") or []), {"source": str(prov_path.resolve()), "files": prov.get("files"),
                                             "questions_sha256": prov.get("sha256")}
    corpus = adapter_train_config(adapter).get("data") or ""
    if not corpus:
        return None, {"error": f"{adapter} has no {PROVENANCE} and its config.yaml names no training data"}
    path = Path(corpus)
    if not path.is_absolute() and not path.exists():  # written relative to where train ran
        alt = Path(adapter).parent / corpus
        path = alt if alt.exists() else path
    files = corpus_files(path)
    if not files:
        return None, {"error": f"{adapter} has no {PROVENANCE}, and its training corpus {corpus} is not found"}
    return training_keys(files), {"source": str(path.resolve()), "files": [str(f.resolve()) for f in files]}


def check_overlap(policy: str, problems: list[dict], adapter: str = "", train_data: str = "",
                  log: Callable[[str], Any] = print) -> tuple[list[dict], dict]:
    """Apply ``--overlap refuse|drop|warn`` to the evaluation problems.

    Returns (problems kept, report for the manifest). With no adapter and no --train-data there
    is nothing to compare (a base model). A check that cannot run is an error under
    ``refuse`` and ``drop`` (they promise a clean set), and a loud warning under ``warn``.
    """
    info: dict[str, Any] = {"policy": policy, "checked": False, "overlapping": 0, "ids": []}
    if train_data:
        files = corpus_files(train_data)
        if not files:
            raise InputError(f"--train-data {train_data}: no training data found there (a JSONL file, or a corpus "
                             "folder with train.jsonl/valid.jsonl)")
        keys, src = training_keys(files), {"source": str(Path(train_data).resolve()),
                                           "files": [str(f.resolve()) for f in files]}
    elif adapter:
        keys, src = _adapter_keys(adapter)
    else:
        info["reason"] = "no adapter: nothing was trained here"
        return problems, info
    info.update(src)
    if keys is None:
        msg = f"cannot check train/eval overlap: {src['error']}"
        if policy in ("refuse", "drop"):
            raise InputError(f"{msg}. Pass --train-data CORPUS (the data the adapter was trained on), or "
                             "--overlap warn to evaluate without the check")
        log(f"WARNING: {msg}; evaluating WITHOUT the overlap check (--overlap warn)")
        return problems, info
    hits = [p["id"] for p in problems if question_key(p["question"]) in keys]
    info.update(checked=True, overlapping=len(hits), ids=hits[:50])
    if not hits:
        return problems, info
    msg = (f"{len(hits)} of {len(problems)} evaluation problems also occur in the training data "
           f"({info['source']}; e.g. {', '.join(hits[:3])})")
    if policy == "refuse":
        raise InputError(f"{msg}: their scores would measure memorisation, not skill. Evaluate on held-out "
                         "problems, or pass --overlap drop (score the rest) or --overlap warn (keep them, flagged)")
    if policy == "drop":
        log(f"OVERLAP: {msg}; dropped, {len(problems) - len(hits)} problems remain")
        drop = set(hits)
        return [p for p in problems if p["id"] not in drop], info
    log(f"WARNING OVERLAP: {msg}; kept and flagged in the records (`seen_in_training`)")
    info["flagged"] = True
    return problems, info
