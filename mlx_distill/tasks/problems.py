"""Problem sources -> one record shape ``{id, question, answer, source, meta}``.

What a named benchmark is (its files, Hub datasets, splits, answer kind) is defined once,
in the task registry (``mlx_distill.tasks``). This module resolves where its data comes
from and turns rows into records with *stable* ids, so that a corpus, its splits, its
teacher logits and its evaluations can be joined by id and re-runs can skip work:

===========  ============================  ======================================
reader       gold answer                   id
===========  ============================  ======================================
gsm8k        text after ``####``, commas   ``gsm8k-test-00042``
             stripped (official grader)
math         ``answer`` field, else the    ``math-train/algebra/0``,
             last ``\\boxed{}`` of the      ``math500-test/precalculus/807``
             solution
competition  ``answer`` (27.0 -> "27")     ``aime24-60``, ``amc23-0``
user         ``answer`` (or last boxed of  ``id`` field, else ``<stem>-<year>-<n>``
(jsonl/csv)  ``solution``)                 or a hash of the question
===========  ============================  ======================================

Data resolution, in order (``resolve``): the file given with ``--data``; the data folder
named by the ``MLX_DISTILL_DATA`` environment variable (``<folder>/gsm8k/test.jsonl``, ...);
the Hugging Face Hub through ``datasets``. When none can be read, one ``InputError`` line
names the dataset, what was tried, and what to pass.

User competition sets (JSONL or CSV; e.g. the John O'Bryan Mathematics Competition,
2011-2025) have ``problem`` (or ``question``), ``answer``, optional ``year``/``number``
and an optional figure flag (``figure``, ``has_figure``, ``needs_figure``,
``requires_figure``, ``diagram``, ``image``). A problem whose flag is true, or that has no
answer, cannot be solved or graded from text alone: it is skipped, and when the caller
passes ``skipped=[]`` each skip is appended there with its ``reason``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from mlx_distill import tasks
from mlx_distill.tasks.answers import boxed_content, gsm8k_gold
from mlx_distill.io import InputError, iter_jsonl, read_text

DATA_ENV = "MLX_DISTILL_DATA"
FIGURE_FIELDS = ("figure", "has_figure", "needs_figure", "requires_figure", "diagram", "image")


def data_dir() -> Optional[Path]:
    """The user's benchmark data folder (``$MLX_DISTILL_DATA``), or None when it is not set."""
    d = os.environ.get(DATA_ENV, "").strip()
    return Path(d).expanduser() if d else None


def answer_kind(source: str) -> str:
    """How a source's answers are graded: "gsm8k" (numeric) or "math" (LaTeX via math-verify)."""
    return tasks.answer_kind(source)


def format_number(v) -> str:
    """JSON numbers as answers: 27.0 -> "27", 0.5 -> "0.5" (never "27.0" vs "27" mismatches)."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def normalize_text(text: str) -> str:
    """Loose form of a question for duplicate / leakage checks: case, spacing, punctuation, $."""
    t = text.lower().replace("\\$", "").replace("$", "")
    t = re.sub(r"[^\w]+", " ", t)
    return " ".join(t.split())


def _hash_id(text: str, n: int = 10) -> str:
    return hashlib.sha1(normalize_text(text).encode()).hexdigest()[:n]


# ----------------------------------------------------------------------------- per-source record builders
def _gsm8k(rows: Iterable[tuple[str, dict]], split: str) -> list[dict]:
    out = []
    for i, (where, r) in enumerate(rows):
        try:
            gold = gsm8k_gold(r["answer"], strict=True)
            r["question"]
        except (KeyError, ValueError, TypeError):
            raise InputError(f"{where}: a gsm8k record needs 'question' and an 'answer' with '####'") from None
        out.append({"id": f"gsm8k-{split}-{i:05d}", "question": r["question"], "answer": gold,
                    "source": "gsm8k", "meta": {"split": split, "index": i, "solution": r["answer"]}})
    return out


def _math(rows: Iterable[tuple[str, dict]], split: str, source: str = "math") -> list[dict]:
    out = []
    for i, (where, r) in enumerate(rows):
        if "problem" not in r or "solution" not in r and "answer" not in r:
            raise InputError(f"{where}: a {source} record needs 'problem' and 'solution' (or 'answer')")
        gold = r.get("answer") if source != "math" else None
        if gold is None or gold == "":
            gold = boxed_content(r.get("solution", ""))
        if gold is None:
            raise InputError(f"{where}: no \\boxed{{}} answer in its solution")
        uid = r.get("unique_id") or f"{split}/{i}"
        uid = uid[:-5] if uid.endswith(".json") else uid
        level = r.get("level")
        meta = {"split": split, "index": i, "unique_id": r.get("unique_id"),
                "subject": r.get("subject") or r.get("type"),
                "level": _level(level), "solution": r.get("solution")}
        out.append({"id": f"{source}-{uid}", "question": r["problem"], "answer": format_number(gold),
                    "source": source, "meta": meta})
    return out


def _level(v):
    if isinstance(v, str):
        m = re.search(r"\d+", v)
        return int(m.group()) if m else None
    return v


def _competition(rows: Iterable[tuple[str, dict]], source: str, split: str) -> list[dict]:
    out = []
    for i, (where, r) in enumerate(rows):
        q = r.get("problem") or r.get("question")
        if q is None or r.get("answer") is None:
            raise InputError(f"{where}: a {source} record needs 'problem' and 'answer'")
        meta = {"split": split, "index": i, **{k: r[k] for k in ("url", "solution", "year") if r.get(k)}}
        out.append({"id": f"{source}-{r.get('id', i)}", "question": q, "answer": format_number(r["answer"]),
                    "source": source, "meta": meta})
    return out


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y", "x", "t")
    return bool(v)


def _user(rows: Iterable[tuple[str, dict]], source: str, path: Path,
          skipped: Optional[list]) -> list[dict]:
    """User competition sets: problem/question, answer (or solution with \\boxed), year, figure flag."""
    out, seen = [], {}
    for where, r in rows:
        q = r.get("problem") or r.get("question")
        if not q or not str(q).strip():
            raise InputError(f"{where}: no 'problem' (or 'question') text; columns are {sorted(r)}")
        q = str(q).strip()
        ans = r.get("answer")
        if ans is None or str(ans).strip() == "":
            ans = boxed_content(str(r.get("solution") or ""))
        year = r.get("year")
        number = r.get("number") or r.get("problem_number") or r.get("no")
        if r.get("id") not in (None, ""):
            rid = f"{path.stem}-{r['id']}"
        elif year not in (None, "") and number not in (None, ""):
            rid = f"{path.stem}-{year}-{number}"
        else:
            rid = f"{path.stem}-{_hash_id(q)}"
        if rid in seen:  # two identical questions (or repeated ids) still get distinct, stable ids
            seen[rid] += 1
            rid = f"{rid}-{seen[rid]}"
        else:
            seen[rid] = 1
        meta = {k: v for k, v in r.items() if k not in ("problem", "question", "answer") and v not in (None, "")}
        meta["file"] = str(path)
        meta["where"] = where
        rec = {"id": rid, "question": q, "answer": None if ans is None else format_number(ans).strip(),
               "source": source, "meta": meta}
        flag = next((f for f in FIGURE_FIELDS if f in r and _truthy(r[f])), None)
        reason = (f"needs a figure ({flag}={r[flag]!r})" if flag else
                  "no answer" if rec["answer"] in (None, "") else None)
        if reason:
            if skipped is not None:
                skipped.append({**rec, "reason": reason})
            continue
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- readers
def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(file:line, row) pairs from a .jsonl/.json or .csv file."""
    if not path.is_file():
        raise InputError(f"{path}: problems file not found")
    if path.suffix.lower() == ".csv":
        text = read_text(path)  # a byte that is not UTF-8: FILE:LINE: not UTF-8
        with io.StringIO(text[1:] if text.startswith("\ufeff") else text, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise InputError(f"{path}: empty CSV (expected a header with problem,answer[,year,figure])")
            rows = []
            for row in reader:
                if None in row:
                    raise InputError(f"{path}:{reader.line_num}: more fields than the header has")
                rows.append((f"{path}:{reader.line_num}", {k.strip().lower(): (v.strip() if isinstance(v, str) else v)
                                                           for k, v in row.items() if k}))
            return rows
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of problems (or use JSONL)")
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    return [(f"{path}:{i}", r) for i, r in iter_jsonl(path)]


# ----------------------------------------------------------------------------- resolution
def _hub_rows(hub: tasks.Hub, split: str) -> list[dict]:
    import logging

    import datasets

    # a failed attempt is reported once, by the caller, in one line: not as the libraries' warnings
    for name in ("datasets", "huggingface_hub", "fsspec"):
        logging.getLogger(name).setLevel(logging.ERROR)

    theirs = hub.splits.get(split, split)
    if hub.subsets:
        rows = []
        for sub in hub.subsets:
            rows += list(datasets.load_dataset(hub.name, sub, split=theirs))
        return rows
    return list(datasets.load_dataset(hub.name, hub.config, split=theirs) if hub.config
                else datasets.load_dataset(hub.name, split=theirs))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def resolve(task: tasks.Task, split: str, path: str | Path | None = None,
            hubs: tuple = (), local: bool = True) -> tuple[list[tuple[str, dict]], dict]:
    """Rows of `task`'s `split` and where they came from: ``(rows, {"kind": file|hub, ...})``.

    Order: `path` (--data); ``$MLX_DISTILL_DATA/<task.local[split]>`` (unless `local` is False:
    the user named a Hub dataset); each Hub source (`hubs`, else the task's).
    """
    if path:
        p = Path(path)
        if p.is_dir() and task.local.get(split):  # a data folder laid out like MLX_DISTILL_DATA
            p = p / task.local[split]
        return _read_rows(p), {"kind": "file", "path": str(p.resolve())}
    tried = []
    folder = data_dir()
    rel = task.local.get(split) if local else None
    if rel and folder is not None:
        p = folder / rel
        if p.is_file():
            return _read_rows(p), {"kind": "file", "path": str(p.resolve())}
        tried.append(f"{p} (not found)")
    elif rel:
        tried.append(f"${DATA_ENV} (not set)")
    for hub in hubs or task.hub:
        if split not in hub.splits:
            continue
        try:
            rows = _hub_rows(hub, split)
        except ImportError:
            tried.append(f"Hugging Face {hub.name} (the `datasets` package is not installed)")
            continue
        except Exception as e:  # offline, not found, gated: one line, not a traceback
            tried.append(f"Hugging Face {hub.name} ({_first_line(e)})")
            continue
        return [(f"{hub.name}[{i}]", r) for i, r in enumerate(rows)], {
            "kind": "hub", "name": hub.name, "config": hub.config, "split": hub.splits[split]}
    if not tried:
        raise InputError(f"{task.name} has no {split!r} split; it has {task.splits}")
    what = f"{task.local[split]} " if rel else ""
    raise InputError(f"cannot load {task.name} ({split}): tried " + "; ".join(tried)
                     + f". Pass --data FILE, set {DATA_ENV} to a folder holding {what or 'its files '}"
                       "(see README 'Data'), or allow Hugging Face Hub access")


def _build(task: tasks.Task, rows: list[tuple[str, dict]], split: str, path: Optional[Path],
           skipped: Optional[list]) -> list[dict]:
    if task.reader == "gsm8k":
        return _gsm8k(rows, split)
    if task.reader == "math":
        return _math(rows, split, task.name)
    if task.reader == "competition":
        return _competition(rows, task.name, split)
    if task.reader == "corpus":
        recs = _user(rows, "jsonl", path, skipped)
        for r in recs:  # keep the corpus's own ids: they join with its traces
            own = r["meta"].get("id")
            if own not in (None, ""):
                r["id"] = str(own)
        return recs
    return _user(rows, task.name, path, skipped)


def load_problems(source: str, path: str | Path | None = None, limit: int | None = None,
                  split: str | None = None, skipped: list | None = None, provenance: dict | None = None) -> list[dict]:
    """Load problems as ``[{id, question, answer, source, meta}]`` (see the module docstring).

    source: a task name (``tasks.NAMES``), a Hugging Face dataset name a task knows
    (``openai/gsm8k``), or any other ``org/name`` (read like a user set). path: a local file
    (required for jsonl/csv/corpus; a corpus folder for ``corpus``). limit: the first N records
    (after skipping). split: train/test (named tasks; default ``task.default_split``).
    skipped: if a list, skipped user problems are appended with their ``reason``.
    provenance: if a dict, filled with where the rows came from (file path or Hub name).
    """
    src_info: dict
    known = tasks.find(source)
    if known is not None and known.needs_data:
        if not path:
            what = "a corpus folder (with test.jsonl)" if known.reader == "corpus" else f"a .{source} file"
            raise InputError(f"{source} needs --data PATH ({what}; `corpus build` takes it as --problems PATH)")
        p = Path(path)
        if known.reader == "corpus" and p.is_dir():
            p = p / f"{split or 'test'}.jsonl"
            if not p.is_file():
                raise InputError(f"{p}: corpus split not found (build the corpus with splits, or pass a JSONL file)")
        rows = _read_rows(p)
        src_info = {"kind": "file", "path": str(p.resolve())}
        recs = _build(known, rows, split or "test", p, skipped)
    elif known is not None:
        hubs, local = (), True
        if source not in tasks.TASKS:  # the user named a Hub dataset: that one, from the Hub
            hub = tasks.hub_source(source)[1]
            hubs, local = (hub,), False
            split = split or next(iter(hub.splits))
        split = split or known.default_split
        rows, src_info = resolve(known, split, path, hubs, local)
        recs = _build(known, rows, split, Path(src_info.get("path", source)), skipped)
    elif "/" in source:  # an unknown Hub dataset: read like a user competition set
        split = split or "train"
        adhoc = tasks.Task(source, source, reader="user", answer_kind="math", answer_format="boxed",
                           hub=(tasks.Hub(source, None, {split: split}),))
        rows, src_info = resolve(adhoc, split, path)
        name = source.replace("/", "_")
        recs = _user(rows, name, Path(name), skipped)
    else:
        raise InputError(f"unknown problem source {source!r}: use one of {tasks.NAMES} or a Hugging Face dataset name")
    ids = [r["id"] for r in recs]
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise InputError(f"{path or source}: duplicate problem id {dup!r}; ids must be unique")
    if provenance is not None:
        provenance.update(src_info, split=split)
    return recs[:limit] if limit else recs


def leakage_index(sets: list[str] | None = None) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """Normalised question text -> evaluation id over the eval split of every leakage task.

    Returns ``(index, loaded, missing)``: the names of the sets actually loaded, and for each
    set that could not be loaded, why. Callers report exactly ``loaded`` as checked.
    """
    index, loaded, missing = {}, [], {}
    for t in tasks.leakage_tasks():
        if sets is not None and t.name not in sets:
            continue
        try:
            recs = load_problems(t.name, split=t.eval_split)
        except InputError as e:
            missing[t.name] = str(e)
            continue
        loaded.append(f"{t.name}-{t.eval_split}")
        for r in recs:
            index.setdefault(normalize_text(r["question"]), r["id"])
    return index, loaded, missing
