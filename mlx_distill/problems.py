"""Problem sources -> one record shape ``{id, question, answer, source, meta}``.

Every loader returns records with *stable* ids, so that a corpus, its splits, its
teacher logits and its evaluations can be joined by id and re-runs can skip work:

===========  =======================================  ============================  ======================
source       default local file (paths.shared_data_dir) gold answer                   id
===========  =======================================  ============================  ======================
gsm8k        gsm8k/{train,test}.jsonl                 text after ``####``, commas    ``gsm8k-test-00042``
                                                      stripped (official grader)
math         math/train.jsonl                         last ``\\boxed{}`` of solution ``math-train/algebra/0``
math500      math500/test.jsonl                       ``answer`` field               ``math500-test/precalculus/807``
aime24       aime24/test.jsonl                        ``answer`` field               ``aime24-60``
amc23        amc23/test.jsonl                         ``answer`` (27.0 -> "27")      ``amc23-0``
jsonl / csv  ``path`` (required)                      ``answer`` (or last boxed of   ``id`` field, else
                                                      ``solution``)                  ``<stem>-<year>-<n>`` or a
                                                                                     hash of the question
===========  =======================================  ============================  ======================

Hugging Face names (``openai/gsm8k``, ``EleutherAI/hendrycks_math``,
``HuggingFaceH4/MATH-500``, ``HuggingFaceH4/aime_2024``, ``math-ai/amc23``, or any
``org/name`` with problem/question + answer/solution columns) are loaded with
``datasets`` when given as ``source``; they produce the same records as the local files.

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
import json
import re
from pathlib import Path
from typing import Iterable, Optional

from .io import InputError, iter_jsonl
from .paths import shared_data_dir

LOCAL_FILES = {  # source -> {split: relative path under shared_data_dir()}
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "math": {"train": "math/train.jsonl"},
    "math500": {"test": "math500/test.jsonl"},
    "aime24": {"test": "aime24/test.jsonl"},
    "amc23": {"test": "amc23/test.jsonl"},
}
DEFAULT_SPLIT = {"gsm8k": "train", "math": "train", "math500": "test", "aime24": "test", "amc23": "test"}
HF_NAMES = {  # Hugging Face dataset -> (our source, config, default split)
    "openai/gsm8k": ("gsm8k", "main", "train"),
    "gsm8k": ("gsm8k", "main", "train"),
    "EleutherAI/hendrycks_math": ("math", None, "train"),
    "hendrycks/competition_math": ("math", None, "train"),
    "HuggingFaceH4/MATH-500": ("math500", None, "test"),
    "HuggingFaceH4/aime_2024": ("aime24", None, "train"),
    "math-ai/aime24": ("aime24", None, "test"),
    "math-ai/amc23": ("amc23", None, "test"),
    "AI-MO/aimo-validation-amc": ("amc23", None, "train"),
}
HENDRYCKS_SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                      "number_theory", "prealgebra", "precalculus"]
SOURCES = ["gsm8k", "math", "math500", "aime24", "amc23", "jsonl", "csv"]
EVAL_SOURCES = ["gsm8k-test", "math500", "aime24", "amc23"]  # what the leakage check compares against
FIGURE_FIELDS = ("figure", "has_figure", "needs_figure", "requires_figure", "diagram", "image")


def answer_kind(source: str) -> str:
    """How a source's answers are graded: "gsm8k" (numeric) or "math" (LaTeX via math-verify)."""
    s = HF_NAMES.get(source, (source,))[0]
    return "gsm8k" if s.split("-")[0] == "gsm8k" else "math"


# ----------------------------------------------------------------------------- answers
def last_boxed(text: str) -> Optional[str]:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent.

    MATH also has a few ``\\boxed 2`` without braces (train/algebra 1655, 1707): the next token."""
    if not text:
        return None
    hits = list(re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*", text))
    if not hits:
        return None
    i = hits[-1].end()
    if text[i:i + 1] != "{":
        m = re.match(r"[^\s$]+", text[i:])
        return m.group().rstrip(".") if m else None
    i += 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def gsm8k_gold(solution: str) -> str:
    """GSM8K's official gold answer: the text after the last ``####``, commas removed."""
    if "####" not in solution:
        raise ValueError("no '####' in GSM8K answer")
    return solution.split("####")[-1].strip().replace(",", "")


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
def _gsm8k(rows: Iterable[dict], split: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        try:
            gold = gsm8k_gold(r["answer"])
        except (KeyError, ValueError):
            raise InputError(f"gsm8k record {i}: expected 'question' and an 'answer' with '####'") from None
        out.append({"id": f"gsm8k-{split}-{i:05d}", "question": r["question"], "answer": gold,
                    "source": "gsm8k", "meta": {"split": split, "index": i, "solution": r["answer"]}})
    return out


def _math(rows: Iterable[dict], split: str, source: str = "math") -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        if "problem" not in r or "solution" not in r and "answer" not in r:
            raise InputError(f"{source} record {i}: expected 'problem' and 'solution' (or 'answer')")
        gold = r.get("answer") if source != "math" else None
        if gold is None or gold == "":
            gold = last_boxed(r.get("solution", ""))
        if gold is None:
            raise InputError(f"{source} record {i}: no \\boxed{{}} answer in its solution")
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


def _competition(rows: Iterable[dict], source: str, split: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        q = r.get("problem") or r.get("question")
        if q is None or r.get("answer") is None:
            raise InputError(f"{source} record {i}: expected 'problem' and 'answer'")
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
            ans = last_boxed(str(r.get("solution") or ""))
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
        with open(path, newline="", encoding="utf-8-sig") as f:
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


def _hf_rows(name: str, config: Optional[str], split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise InputError(f"loading {name!r} needs the `datasets` package") from e
    if name in ("EleutherAI/hendrycks_math",):
        rows = []
        for sub in HENDRYCKS_SUBJECTS:
            rows += list(datasets.load_dataset(name, sub, split=split))
        return rows
    return list(datasets.load_dataset(name, config, split=split) if config else datasets.load_dataset(name, split=split))


def _build(source: str, rows: list[dict], split: str) -> list[dict]:
    if source == "gsm8k":
        return _gsm8k(rows, split)
    if source in ("math", "math500"):
        return _math(rows, split, source)
    return _competition(rows, source, split)


def load_problems(source: str, path: str | Path | None = None, limit: int | None = None,
                  split: str | None = None, skipped: list | None = None) -> list[dict]:
    """Load problems as ``[{id, question, answer, source, meta}]`` (see the module docstring).

    source: one of ``SOURCES`` or a Hugging Face dataset name. path: a local file (required
    for jsonl/csv; optional for the named sources, which default to ../shared/data).
    limit: the first N records (after skipping). split: train/test (named sources only).
    skipped: if a list, skipped user problems are appended with their ``reason``.
    """
    if source in ("jsonl", "csv"):
        if not path:
            raise InputError(f"--source {source} needs --problems PATH (a .{source} file)")
        p = Path(path)
        recs = _user(_read_rows(p), source, p, skipped)
    elif source in LOCAL_FILES:
        split = split or DEFAULT_SPLIT[source]
        if path:
            rows = [r for _, r in _read_rows(Path(path))]
        else:
            rel = LOCAL_FILES[source].get(split)
            if rel is None:
                raise InputError(f"source {source!r} has no local {split!r} split; have {sorted(LOCAL_FILES[source])}")
            p = shared_data_dir() / rel
            if p.is_file():
                rows = [r for _, r in _read_rows(p)]
            else:  # no local copy: fall back to the Hugging Face dataset
                name = next(n for n, v in HF_NAMES.items() if v[0] == source and "/" in n)
                rows = _hf_rows(name, HF_NAMES[name][1], HF_NAMES[name][2] if source != "gsm8k" else split)
        recs = _build(source, rows, split)
    elif source in HF_NAMES or "/" in source:
        ours, config, default_split = HF_NAMES.get(source, (None, None, "train"))
        split = split or default_split
        rows = _hf_rows(source, config, split)
        if ours is None:  # an unknown dataset: treat it like a user competition set
            recs = _user(((f"{source}[{i}]", r) for i, r in enumerate(rows)), source.replace("/", "_"),
                         Path(source.replace("/", "_")), skipped)
        else:
            recs = _build(ours, rows, split)
    else:
        raise InputError(f"unknown problem source {source!r}: use one of {SOURCES} or a Hugging Face dataset name")
    ids = [r["id"] for r in recs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{path or source}: duplicate problem id {dup!r}; ids must be unique")
    return recs[:limit] if limit else recs


def eval_question_index() -> dict[str, str]:
    """Normalised question text -> evaluation-set id, for GSM8K test, MATH-500, AIME 2024, AMC 2023.

    Sets whose local file is missing are left out (the caller reports which ones were checked).
    """
    index = {}
    for source, split in (("gsm8k", "test"), ("math500", "test"), ("aime24", "test"), ("amc23", "test")):
        p = shared_data_dir() / LOCAL_FILES[source][split]
        if not p.is_file():
            continue
        for r in load_problems(source, split=split):
            index.setdefault(normalize_text(r["question"]), r["id"])
    return index
