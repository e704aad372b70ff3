"""`python -m mlx_distill eval` (generate + grade) and `python -m mlx_distill grade` (re-grade saved predictions).

    python -m mlx_distill eval --model smollm2 --adapter runs/demo --dataset gsm8k --limit 5 \\
        --max-tokens 200 --out runs/demo/eval --show 2
    python -m mlx_distill eval --backend api --base-url http://127.0.0.1:8080/v1 --model default_model \\
        --dataset math500 --out runs/teacher-math500
    python -m mlx_distill grade --dataset gsm8k --data ../shared/data/gsm8k/test.jsonl \\
        --predictions preds.jsonl --out summary.json

Flow: problems (``problems.load_problems``) -> honesty check against the adapter's training
corpus -> chat messages from a prompt template in prompts/ -> generation (``corpus.clients``:
a local MLX model with continuous batching, or any OpenAI-compatible server) -> grading
(``answers.grade``: numeric for GSM8K, math-verify for LaTeX; "invalid" apart from "wrong")
-> per-item records + summary.

Output folder (``--out``)::

    records.jsonl    one line per problem: prompt, response, extracted answer, gold, verdict,
                     tokens, words (with and without <think>), finish reason, latency, ...
    summary.json     accuracy with a 95% Wilson interval and its standard error, invalid and
                     truncation rates, words/tokens mean and median, arithmetic error rate,
                     MATH subject/level breakdown, throughput, peak memory, parameter count,
                     failure kinds, LLM-judge agreement (when --judge is set)
    report.md        the summary, the most frequent failure kinds, sampled problems with the
                     teacher's trace (--compare) beside the student's
    lengths.png      response words of correct / wrong / invalid answers
    manifest.json    config, versions, data and prompt hashes, overlap check
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

from . import answers, config
from .config import EvalConfig, GradeConfig
from .io import InputError, atomic_write_json, atomic_write_text, iter_jsonl, read_jsonl, save_figure, sha256_file, \
    sha256_text, write_jsonl, write_manifest
from .paths import prompt_path, shared_data_dir

# ============================================================================= datasets
NAMED = {"gsm8k", "math500", "aime24", "amc23", "math"}


def load_eval_problems(dataset: str, data: str = "", split: str = "test", limit: int = 0) -> list[dict]:
    """Problems ``{id, question, answer, source, meta}`` of an evaluation set.

    ``dataset``: gsm8k / math500 / aime24 / amc23 / math (local file in ../shared/data, or
    `data`), jsonl / csv (`data` required: problem + answer), corpus (`data` = a corpus folder:
    its ``test.jsonl``), or a Hugging Face dataset name (``openai/gsm8k``, ``HuggingFaceH4/MATH-500``).
    """
    from .problems import load_problems

    if dataset == "corpus":
        if not data:
            raise InputError("--dataset corpus needs --data CORPUS_FOLDER (with a test.jsonl split)")
        p = Path(data)
        p = p / "test.jsonl" if p.is_dir() else p
        if not p.is_file():
            raise InputError(f"{p}: corpus test split not found (build the corpus with splits, or pass a JSONL file)")
        probs = load_problems("jsonl", path=p)
        for r in probs:  # keep the corpus's own ids: they join with its traces
            own = r["meta"].get("id")
            if own not in (None, ""):
                r["id"] = str(own)
    elif dataset in ("jsonl", "csv"):
        if not data:
            raise InputError(f"--dataset {dataset} needs --data PATH (a .{dataset} file with problem and answer)")
        probs = load_problems(dataset, path=data)
    elif dataset in NAMED:
        probs = load_problems(dataset, path=data or None, split=split)
    elif "/" in dataset:
        probs = load_problems(dataset, split=split)
    else:
        raise InputError(f"unknown --dataset {dataset!r}: use one of {config.EVAL_DATASETS} "
                         "or a Hugging Face dataset name such as openai/gsm8k")
    if not probs:
        raise InputError(f"--dataset {dataset}: no problems loaded from {data or dataset}")
    return probs[:limit] if limit and limit > 0 else probs


def answer_kind_for(dataset: str, problems: list[dict], wanted: str = "auto") -> str:
    """gsm8k (numeric) or math (math-verify). auto: from the records' source, else the dataset."""
    if wanted != "auto":
        return wanted
    from .problems import answer_kind

    src = problems[0]["meta"].get("source") if problems and dataset in ("jsonl", "csv", "corpus") else None
    return answer_kind(str(src or problems[0]["source"] if problems else dataset))


def problem_index(p: dict, position: int) -> int:
    """0-based line of the problem in its data file (for predictions that carry `index`)."""
    meta = p.get("meta") or {}
    if isinstance(meta.get("index"), int):
        return meta["index"]
    m = re.search(r":(\d+)$", str(meta.get("where", "")))
    if m:  # file:line (1-based); a CSV's first line is its header
        return int(m.group(1)) - (2 if str(meta.get("file", "")).lower().endswith(".csv") else 1)
    return position


# ============================================================================= prompts
def template_for(cfg: EvalConfig, kind: str) -> tuple[str, str]:
    """(name, text) of the user-turn template: --prompt-file, else prompts/eval_<style>.txt."""
    if cfg.prompt_file:
        p = prompt_path(cfg.prompt_file)
    else:
        style = cfg.prompt_style if cfg.prompt_style != "auto" else ("cot_hash" if kind == "gsm8k" else "cot_boxed")
        p = prompt_path(f"eval_{style}.txt")
    if not Path(p).is_file():
        raise InputError(f"{p}: prompt template not found")
    text = Path(p).read_text()
    if "{question}" not in text:
        raise InputError(f"{p}: a prompt template must contain {{question}}")
    return str(p), text


def fewshot_examples(kind: str, n: int) -> list[dict]:
    if n <= 0:
        return []
    p = prompt_path(f"eval_fewshot_{kind}.jsonl")
    shots = read_jsonl(p)
    if n > len(shots):
        raise InputError(f"{p}: --fewshot {n} but the file holds {len(shots)} examples")
    return shots[:n]


def render_user(template: str, question: str, budget: str = "") -> str:
    # str.replace, not str.format: templates contain LaTeX braces such as \boxed{}.
    text = template.replace("{question}", question.strip()).rstrip("\n")
    return f"{text}\n{budget}" if budget else text


def build_messages(question: str, template: str, shots: list[dict] = (), system: str = "",
                   budget: str = "") -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for s in shots:
        msgs += [{"role": "user", "content": render_user(template, s["question"], budget)},
                 {"role": "assistant", "content": s["solution"]}]
    return msgs + [{"role": "user", "content": render_user(template, question, budget)}]


def budget_text(words: int) -> str:
    if words <= 0:
        return ""
    return prompt_path("eval_budget.txt").read_text().strip().replace("{words}", str(int(words)))


# ============================================================================= honesty: overlap with training data
def adapter_train_config(adapter: str) -> dict:
    p = Path(adapter) / "config.yaml"
    if not adapter or not p.is_file():
        return {}
    try:
        return config.load_yaml(p)
    except config.ConfigError:
        return {}


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = [path / f"{s}.jsonl" for s in ("train", "valid")]
    files = [f for f in files if f.is_file()]
    return files or ([path / "verified.jsonl"] if (path / "verified.jsonl").is_file() else [])


def _training_texts(files: list[Path]) -> tuple[set, list]:
    """(normalised questions, normalised user turns) of every training record."""
    from .problems import normalize_text

    exact, blobs = set(), []
    for f in files:
        for _, r in iter_jsonl(f):
            q = r.get("question") or r.get("problem")
            if q:
                exact.add(normalize_text(str(q)))
            elif isinstance(r.get("messages"), list):
                blobs.append(normalize_text(" ".join(str(m.get("content", "")) for m in r["messages"]
                                                     if m.get("role") == "user")))
            elif r.get("prompt"):
                blobs.append(normalize_text(str(r["prompt"])))
    return exact, blobs


def find_overlap(problems: list[dict], corpus: str | Path) -> list[str]:
    """Ids of evaluation problems whose normalised text occurs in the training corpus (train +
    valid: validation data steered early stopping, so it was seen too)."""
    from .problems import normalize_text

    files = _corpus_files(Path(corpus))
    exact, blobs = _training_texts(files)
    hits = []
    for p in problems:
        q = normalize_text(p["question"])
        if q in exact or (q and any(q in b for b in blobs)):
            hits.append(p["id"])
    return hits


def check_overlap(cfg: EvalConfig, problems: list[dict], log) -> tuple[list[dict], dict]:
    """Apply --overlap to the problems; return (problems kept, report for the manifest)."""
    corpus = cfg.train_data or adapter_train_config(cfg.adapter).get("data") or ""
    info: dict[str, Any] = {"policy": cfg.overlap, "corpus": corpus or None, "checked": False,
                            "overlapping": 0, "ids": []}
    if not corpus:
        if cfg.adapter:
            log(f"warning: cannot check train/eval overlap: {cfg.adapter}/config.yaml names no training data")
        return problems, info
    path = Path(corpus)
    if not path.exists() and cfg.adapter:
        alt = Path(cfg.adapter).parent / corpus
        path = alt if alt.exists() else path
    if not path.exists() or not _corpus_files(path):
        log(f"warning: cannot check train/eval overlap: training corpus {corpus} not found")
        info["error"] = "corpus not found"
        return problems, info
    hits = find_overlap(problems, path)
    info.update(checked=True, corpus=str(path), overlapping=len(hits), ids=hits[:50])
    if not hits:
        return problems, info
    msg = (f"{len(hits)} of {len(problems)} evaluation problems also occur in the training corpus {path} "
           f"(e.g. {', '.join(hits[:3])})")
    if cfg.overlap == "refuse":
        raise InputError(f"{msg}: their scores would measure memorisation, not skill. Evaluate on held-out "
                         "problems, or pass --overlap drop (score the rest) or --overlap warn (keep them, flagged)")
    if cfg.overlap == "drop":
        log(f"OVERLAP: {msg}; dropped, {len(problems) - len(hits)} problems remain")
        drop = set(hits)
        return [p for p in problems if p["id"] not in drop], info
    log(f"WARNING OVERLAP: {msg}; kept and flagged in the records (`seen_in_training`)")
    info["flagged"] = True
    return problems, info


# ============================================================================= generation
def problem_seed(seed: int, pid: str) -> int:
    """A per-problem sampling seed: independent of batch size and order."""
    return int(hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()[:8], 16)


def mlx_client(model: str, adapter: str = "", batch_size: int = 8):
    from .corpus.clients import make_client
    from .models import resolve_model

    if adapter and not (Path(adapter) / "adapters.safetensors").is_file():
        raise InputError(f"{adapter}: no adapters.safetensors (is it a finished `mlx_distill train` run folder?)")
    return make_client("mlx", model=resolve_model(model), adapter_path=adapter or None, batch_size=batch_size)


def make_eval_client(cfg: EvalConfig):
    from .corpus.clients import make_client

    if cfg.backend == "mlx":
        return mlx_client(cfg.model, cfg.adapter, cfg.batch_size)
    if cfg.backend == "torch":  # transformers (+ peft); an mlx-lm or PEFT adapter folder
        from .backends.torch import TorchClient

        if cfg.adapter and not any((Path(cfg.adapter) / f).is_file()
                                   for f in ("adapters.safetensors", "adapter_model.safetensors")):
            raise InputError(f"{cfg.adapter}: no adapters.safetensors (mlx-lm) or adapter_model.safetensors (PEFT)")
        return TorchClient(cfg.model, adapter_path=cfg.adapter or None, batch_size=cfg.batch_size)
    if cfg.adapter:
        raise InputError("--adapter applies to --backend mlx or torch; a server applies its own adapters")
    return make_client("api", base_url=cfg.base_url, model=cfg.model or None, api_key_env=cfg.api_key_env,
                       concurrency=cfg.concurrency)


def _progress(total: int, label: str, quiet: bool):
    """(advance(), close()) for a rich progress bar on a terminal, periodic lines otherwise."""
    if quiet:
        return (lambda: None), (lambda: None)
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
        prog.start()
        task = prog.add_task(label, total=total)
        return (lambda: prog.advance(task)), prog.stop
    state = {"n": 0, "t": time.time()}

    def advance():
        state["n"] += 1
        if state["n"] == total or time.time() - state["t"] > 30:
            state["t"] = time.time()
            print(f"{label}: {state['n']}/{total}", file=sys.stderr, flush=True)

    return advance, (lambda: None)


async def _gather(coros: list, label: str, quiet: bool) -> list:
    advance, close = _progress(len(coros), label, quiet)

    async def one(c):
        try:
            return await c
        except Exception as e:  # a failed request is recorded, not fatal to the run
            return e
        finally:
            advance()

    try:
        return await asyncio.gather(*(one(c) for c in coros))
    finally:
        close()


def generate(client, messages: list[list[dict]], seeds: list[int], cfg: EvalConfig, quiet: bool = False) -> tuple[list, float]:
    """Completions (or the exception of a failed request) in order, and the wall seconds."""
    kw = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
    if cfg.temperature > 0 and cfg.top_p < 1:
        kw["top_p"] = cfg.top_p

    async def run():
        return await _gather([client.complete(m, seed=s, **kw) for m, s in zip(messages, seeds)],
                             "generating", quiet)

    t0 = time.perf_counter()
    out = asyncio.run(run())
    return out, time.perf_counter() - t0


# ============================================================================= records
def has_repetition(text: str, n: int = 10, times: int = 5) -> bool:
    """A repetition loop: some run of `n` words occurs `times`+ times, or one non-trivial line
    does (linear time: responses that hit the token cap can be long)."""
    words = text.split()
    grams = collections.Counter(tuple(words[i:i + n]) for i in range(max(0, len(words) - n + 1)))
    if grams and grams.most_common(1)[0][1] >= times:
        return True
    lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 4]
    return bool(lines) and collections.Counter(lines).most_common(1)[0][1] >= times


def full_response(c) -> str:
    """The generated text as graded: a separate reasoning field goes back inside <think>."""
    if c.reasoning:
        if c.finish_reason == "length" and not c.text:
            return f"<think>\n{c.reasoning}"  # cut off inside its thinking: no final answer
        return f"<think>\n{c.reasoning}\n</think>\n\n{c.text}"
    return c.text


def failure_kind(rec: dict) -> Optional[str]:
    if rec["status"] == "correct":
        return None
    if rec.get("finish_reason") == "error":
        return "generation failed"
    if has_repetition(rec.get("response") or ""):  # a loop that ran into the cap is a loop first
        return "repetition loop"
    if rec.get("finish_reason") == "length":
        return "truncated at max tokens"
    if rec["status"] == "invalid":
        return {"no answer": "no final answer", "unparsable": "unparsable final answer",
                "timeout": "grading timed out"}.get(rec.get("reason", ""), "invalid")
    if rec.get("arithmetic_wrong"):
        return "arithmetic slip"
    return "wrong answer"


def grade_fields(response: str, gold, kind: str, timeout: float) -> dict:
    v = answers.grade(response, gold, kind, timeout=timeout)
    final = answers.final_text(response) or ""
    arith = answers.check_arithmetic(response)
    return {"extracted": v.extracted, "gold": v.gold, "correct": v.correct, "status": v.status,
            "reason": v.reason, "method": v.method, "words": answers.word_count(response),
            "words_final": answers.word_count(final), "arithmetic_checked": arith["checked"],
            "arithmetic_wrong": arith["wrong"], "arithmetic_errors": arith["errors"][:5]}


def make_record(p: dict, index: int, prompt: str, result, seed: Optional[int], kind: str, timeout: float) -> dict:
    meta = p.get("meta") or {}
    rec = {"id": p["id"], "index": index, "source": p.get("source"), "subject": meta.get("subject"),
           "level": meta.get("level"), "prompt": prompt, "seed": seed}
    if isinstance(result, BaseException):
        rec.update(response="", reasoning=None, final="", tokens=0, prompt_tokens=None, finish_reason="error",
                   latency_s=None, model=None, error=f"{type(result).__name__}: {result}"[:500])
    else:
        rec.update(response=full_response(result), reasoning=result.reasoning, final=result.text,
                   tokens=result.completion_tokens, prompt_tokens=result.prompt_tokens,
                   finish_reason=result.finish_reason, latency_s=round(result.latency_s, 4), model=result.model)
    rec.update(grade_fields(rec["response"], p["answer"], kind, timeout))
    if rec["finish_reason"] == "error":
        rec.update(status="invalid", correct=False, reason="generation failed")
    rec["truncated"] = rec["finish_reason"] == "length"
    rec["failure_kind"] = failure_kind(rec)
    return rec


# ============================================================================= summary
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials (good at small n and near 0/1)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _stats(xs: list) -> dict:
    xs = [x for x in xs if isinstance(x, (int, float))]
    if not xs:
        return {"mean": None, "median": None}
    return {"mean": round(statistics.fmean(xs), 2), "median": statistics.median(xs)}


def _breakdown(records: list[dict], key: str) -> dict:
    groups = collections.defaultdict(list)
    for r in records:
        if r.get(key) is not None:
            groups[r[key]].append(r)
    out = {}
    for k in sorted(groups, key=str):
        rs = groups[k]
        c = sum(r["correct"] for r in rs)
        out[str(k)] = {"n": len(rs), "correct": c, "accuracy": round(c / len(rs), 4)}
    return out


def summarise(records: list[dict], **extra) -> dict:
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    invalid = sum(r["status"] == "invalid" for r in records)
    acc = correct / n if n else 0.0
    lo, hi = wilson(correct, n)
    truncated = sum(bool(r.get("truncated")) for r in records)
    steps = sum(r.get("arithmetic_checked") or 0 for r in records)
    bad = sum(r.get("arithmetic_wrong") or 0 for r in records)
    s = {
        "n": n, "correct": correct, "wrong": n - correct - invalid, "invalid": invalid,
        "accuracy": round(acc, 4), "accuracy_ci95": [round(lo, 4), round(hi, 4)],
        "accuracy_stderr": round(math.sqrt(acc * (1 - acc) / (n - 1)), 4) if n > 1 else None,
        "invalid_rate": round(invalid / n, 4) if n else 0.0,
        "invalid_reasons": dict(collections.Counter(r.get("reason") or "?" for r in records if r["status"] == "invalid")),
        "truncated": truncated, "truncation_rate": round(truncated / n, 4) if n else 0.0,
        "words": _stats([r.get("words") for r in records]),
        "words_without_think": _stats([r.get("words_final") for r in records]),
        "tokens": _stats([r.get("tokens") for r in records]),
        "arithmetic": {"steps_checked": steps, "steps_wrong": bad,
                       "error_rate": round(bad / steps, 4) if steps else None,
                       "responses_with_error": sum(bool(r.get("arithmetic_wrong")) for r in records)},
        "failure_kinds": dict(collections.Counter(r["failure_kind"] for r in records if r.get("failure_kind"))
                              .most_common()),
    }
    if any(r.get("subject") is not None for r in records):
        s["by_subject"] = _breakdown(records, "subject")
    if any(r.get("level") is not None for r in records):
        s["by_level"] = _breakdown(records, "level")
    judged = [r for r in records if r.get("judge") in (True, False)]
    if any("judge" in r for r in records):
        s["judge"] = {"judged": len(judged), "undecided": sum("judge" in r for r in records) - len(judged),
                      "accuracy": round(sum(r["judge"] for r in judged) / len(judged), 4) if judged else None,
                      "agreement": round(sum(r["judge"] == r["correct"] for r in judged) / len(judged), 4)
                      if judged else None}
    if any(r.get("seen_in_training") for r in records):
        s["seen_in_training"] = sum(bool(r.get("seen_in_training")) for r in records)
    s.update(extra)
    return s


def parameter_counts(client) -> Optional[dict]:
    if hasattr(client, "parameter_counts"):  # TorchClient
        return client.parameter_counts()
    model = getattr(client, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    from mlx.utils import tree_flatten

    total = adapter = 0
    for name, v in tree_flatten(model.parameters()):
        total += v.size
        if "lora" in name:
            adapter += v.size
    return {"total": int(total), "adapter": int(adapter)}


# ============================================================================= judge
def parse_judgement(text: str) -> Optional[bool]:
    t = (answers.final_text(text) or "").upper()
    if "INCORRECT" in t or "NOT CORRECT" in t:
        return False
    if "CORRECT" in t:
        return True
    return None


def run_judge(judge_client, problems: list[dict], records: list[dict], quiet: bool = False) -> None:
    """Ask a second model whether each response is right; store `judge` (True/False/None) per record."""
    template = prompt_path("eval_judge.txt").read_text()
    msgs = []
    for p, r in zip(problems, records):
        resp = r.get("final") or r.get("response") or ""
        text = (template.replace("{question}", p["question"]).replace("{gold}", str(r["gold"]))
                .replace("{response}", resp[-3000:]))
        msgs.append([{"role": "user", "content": text}])

    async def go():
        return await _gather([judge_client.complete(m, temperature=0.0, max_tokens=512) for m in msgs],
                             "judging", quiet)

    for r, res in zip(records, asyncio.run(go())):
        if isinstance(res, BaseException):
            r["judge"], r["judge_raw"] = None, f"error: {res}"[:300]
        else:
            raw = full_response(res)
            r["judge"], r["judge_raw"] = parse_judgement(raw), raw[-300:]


def make_judge_client(cfg: EvalConfig):
    from .corpus.clients import make_client

    if cfg.judge == "api":
        return make_client("api", base_url=cfg.judge_base_url, model=cfg.judge_model or None,
                           api_key_env=cfg.judge_api_key_env, concurrency=cfg.concurrency)
    if not cfg.judge_model:
        raise InputError("--judge mlx needs --judge-model (an MLX model folder or Hugging Face id)")
    return mlx_client(cfg.judge_model, "", cfg.batch_size)


# ============================================================================= reports
def _html(s: str) -> str:
    return (s or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def load_traces(path: str) -> dict[str, dict]:
    """id -> {response, correct?} from another eval's records.jsonl or a corpus (verified/traces JSONL)."""
    p = Path(path)
    if p.is_dir():
        for name in ("records.jsonl", "verified.jsonl", "traces.jsonl", "train.jsonl"):
            if (p / name).is_file():
                p = p / name
                break
    out = {}
    for _, r in iter_jsonl(p):
        pid = r.get("id") or r.get("problem_id")
        if pid is None:
            continue
        text = r.get("response")
        if text is None:
            parts = [f"<think>\n{r['thinking']}\n</think>" if r.get("thinking") else "", r.get("reasoning") or "",
                     r.get("text") or r.get("content") or ""]
            text = "\n\n".join(x for x in parts if x)
            if r.get("answer") is not None and "####" not in text and "\\boxed" not in text:
                text += f"\n#### {r['answer']}"
        out.setdefault(str(pid), {"response": text, "correct": r.get("correct")})
    return out


def write_report(path: Path, summary: dict, records: list[dict], problems: list[dict], compare: str = "",
                 samples: int = 5, seed: int = 0, title: str = "Evaluation") -> None:
    teacher = load_traces(compare) if compare else {}
    L = [f"# {title}", ""]
    L.append(f"- model: `{summary.get('model')}`" + (f", adapter: `{summary['adapter']}`" if summary.get("adapter") else ""))
    L.append(f"- dataset: `{summary.get('dataset')}` ({summary['n']} problems), prompt `{summary.get('prompt')}`")
    lo, hi = summary["accuracy_ci95"]
    L.append(f"- accuracy **{summary['accuracy']:.1%}** (95% CI {lo:.1%} to {hi:.1%}); "
             f"correct {summary['correct']}, wrong {summary['wrong']}, invalid {summary['invalid']}")
    L.append(f"- words mean {summary['words']['mean']} / median {summary['words']['median']}; "
             f"tokens mean {summary['tokens']['mean']}; truncated {summary['truncation_rate']:.1%}")
    a = summary["arithmetic"]
    if a["steps_checked"]:
        L.append(f"- arithmetic steps checked {a['steps_checked']}, wrong {a['steps_wrong']} "
                 f"({a['error_rate']:.1%})")
    if summary.get("judge"):
        j = summary["judge"]
        L.append(f"- LLM judge: accuracy {j['accuracy']}, agreement with the grader {j['agreement']} "
                 f"({j['judged']} judged, {j['undecided']} undecided)")
    ov = summary.get("overlap") or {}
    if ov.get("overlapping"):
        L.append(f"- **overlap with the training corpus: {ov['overlapping']} problems** (policy `{ov['policy']}`)")
    L += ["", "## Most frequent failure kinds", ""]
    if summary["failure_kinds"]:
        L += ["| kind | count | share of failures |", "|---|---:|---:|"]
        nf = sum(summary["failure_kinds"].values())
        L += [f"| {k} | {v} | {v / nf:.0%} |" for k, v in summary["failure_kinds"].items()]
    else:
        L.append("none")
    for key, name in (("by_subject", "subject"), ("by_level", "level")):
        if summary.get(key):
            L += ["", f"## Accuracy by {name}", "", f"| {name} | n | accuracy |", "|---|---:|---:|"]
            L += [f"| {k} | {v['n']} | {v['accuracy']:.1%} |" for k, v in summary[key].items()]
    rng = random.Random(seed)
    idx = sorted(rng.sample(range(len(records)), min(samples, len(records))))
    qs = {p["id"]: p["question"] for p in problems}
    L += ["", "## Sampled problems" + (" (teacher beside student)" if teacher else ""), ""]
    for i in idx:
        r = records[i]
        L += [f"### {r['id']}: {r['status']}" + (f" ({r['failure_kind']})" if r.get("failure_kind") else ""), "",
              f"> {qs.get(r['id'], '').strip()[:1500]}".replace("\n", "\n> "), "",
              f"gold `{r['gold']}`, extracted `{r['extracted']}`, {r['words']} words, finish `{r['finish_reason']}`", ""]
        t = teacher.get(r["id"])
        if teacher:
            tr = t["response"] if t else "(no teacher trace for this id)"
            L += ["<table><tr><th>teacher</th><th>student</th></tr><tr>",
                  f"<td valign=\"top\"><pre>{_html(tr[:4000])}</pre></td>",
                  f"<td valign=\"top\"><pre>{_html(r['response'][:4000])}</pre></td>", "</tr></table>", ""]
        else:
            L += ["```", r["response"][:4000], "```", ""]
    atomic_write_text(path, "\n".join(L) + "\n")


def plot_lengths(records: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed (pip install 'mlx_distill[plots]'); no plot written", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    groups = [(s, [r["words"] for r in records if r["status"] == s]) for s in ("correct", "wrong", "invalid")]
    groups = [(s, w) for s, w in groups if w]
    if groups:
        ax.hist([w for _, w in groups], bins=20, label=[f"{s} ({len(w)})" for s, w in groups], stacked=True)
    ax.set_xlabel("response words")
    ax.set_ylabel("problems")
    ax.legend()
    ax.set_title("Response length by outcome")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def show_samples(records: list[dict], n: int) -> None:
    from rich.console import Console
    from rich.panel import Panel

    con = Console(stderr=False)
    mark = {"correct": "[green]correct[/]", "wrong": "[red]wrong[/]", "invalid": "[yellow]invalid[/]"}
    for r in records[:n]:
        head = (f"{r['id']}  {mark[r['status']]}  extracted={r['extracted']!r} gold={r['gold']!r}  "
                f"{r['words']} words, {r['tokens']} tokens, finish={r['finish_reason']}")
        con.print(Panel(r["response"].strip()[:2000] or "(empty)", title=head, title_align="left"))


def print_summary(s: dict) -> None:
    lo, hi = s["accuracy_ci95"]
    line = (f"accuracy {s['accuracy']:.1%} [{lo:.1%}, {hi:.1%}]  n={s['n']} correct={s['correct']} "
            f"wrong={s['wrong']} invalid={s['invalid']}  words mean={s['words']['mean']} "
            f"median={s['words']['median']}  truncated={s['truncation_rate']:.1%}")
    if s.get("throughput_tokens_per_s") is not None:
        line += f"  {s['throughput_tokens_per_s']} tok/s"
    print(line)


# ============================================================================= the eval stage
def evaluate(cfg: EvalConfig, client=None, quiet: bool = False, write: bool = True) -> dict:
    """Generate, grade and write records/summary/report to ``cfg.out``; return the summary.

    `client`: an already-built client (the length study reuses one model across levels);
    otherwise one is made from the config and closed at the end.
    """
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    out = Path(cfg.out)
    problems = load_eval_problems(cfg.dataset, cfg.data, cfg.split, cfg.limit)
    kind = answer_kind_for(cfg.dataset, problems, cfg.answer_kind)
    problems, overlap = check_overlap(cfg, problems, log)
    seen = set(overlap["ids"]) if overlap.get("flagged") else set()
    if not problems:
        raise InputError("no problems left to evaluate")
    tpl_name, template = template_for(cfg, kind)
    shots = fewshot_examples(kind, cfg.fewshot)
    system = cfg.system_prompt
    train_cfg = adapter_train_config(cfg.adapter)
    if not system and train_cfg.get("system_prompt"):
        system = train_cfg["system_prompt"]
        log(f"using the adapter's training system prompt: {system!r}")
    budget = budget_text(cfg.word_budget)
    messages = [build_messages(p["question"], template, shots, system, budget) for p in problems]
    prompts = [m[-1]["content"] for m in messages]
    seeds = [problem_seed(cfg.seed, p["id"]) for p in problems] if cfg.temperature > 0 else [None] * len(problems)

    own = client is None
    if own:
        log(f"loading {cfg.model}" + (f" + adapter {cfg.adapter}" if cfg.adapter else "") + f" ({cfg.backend})")
        client = make_eval_client(cfg)
    mx = None
    if getattr(client, "kind", "") == "mlx":
        import mlx.core as mx

        mx.reset_peak_memory()
    try:
        results, wall = generate(client, messages, seeds, cfg, quiet)
    finally:
        if own:
            asyncio.run(client.aclose())
    peak = round(mx.get_peak_memory() / 1e9, 3) if mx is not None else None
    indices = [problem_index(p, i) for i, p in enumerate(problems)]
    records = [make_record(p, i, pr, res, s, kind, cfg.grade_timeout)
               for p, i, pr, res, s in zip(problems, indices, prompts, results, seeds)]
    for r in records:
        if r["id"] in seen:
            r["seen_in_training"] = True
    failed = [r for r in records if r["finish_reason"] == "error"]
    if failed:
        log(f"warning: {len(failed)} request(s) failed (first: {failed[0]['error']}); counted as invalid")
    if cfg.judge:
        jc = make_judge_client(cfg)
        try:
            run_judge(jc, problems, records, quiet)
        finally:
            asyncio.run(jc.aclose())
    gen_tokens = sum(r["tokens"] or 0 for r in records)
    desc = client.describe() if hasattr(client, "describe") else {}
    summary = summarise(
        records, dataset=cfg.dataset, answer_kind=kind, model=desc.get("model", cfg.model),
        adapter=cfg.adapter or None, backend=cfg.backend, prompt=Path(tpl_name).name,
        fewshot=cfg.fewshot, word_budget=cfg.word_budget, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
        seed=cfg.seed, generated_tokens=gen_tokens, generation_s=round(wall, 3),
        throughput_tokens_per_s=round(gen_tokens / wall, 2) if wall > 0 else None,
        problems_per_s=round(len(records) / wall, 4) if wall > 0 else None,
        peak_memory_gb=peak, parameters=parameter_counts(client), overlap=overlap,
        served_models=sorted({r["model"] for r in records if r.get("model")}))
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "records.jsonl", records)
        atomic_write_json(out / "summary.json", summary)
        write_report(out / "report.md", summary, records, problems, cfg.compare, cfg.report_samples, cfg.seed)
        plotted = plot_lengths(records, out / "lengths.png") if cfg.plot else False
        data_file = _data_file(cfg)
        write_manifest(out / "manifest.json", "eval", config.to_dict(cfg), client=desc,
                       prompt_template={"path": tpl_name, "sha256": sha256_text(template)},
                       data={"path": str(data_file) if data_file else cfg.dataset,
                             "sha256": sha256_file(data_file) if data_file else None},
                       overlap=overlap, plot=plotted, counts={"n": summary["n"], "correct": summary["correct"]})
    if not quiet:
        if cfg.show:
            show_samples(records, cfg.show)
        print_summary(summary)
        if write:
            print(f"wrote {out}/records.jsonl, summary.json, report.md")
    return summary


def _data_file(cfg) -> Optional[Path]:
    from .problems import LOCAL_FILES

    if cfg.data:
        p = Path(cfg.data)
        p = p / "test.jsonl" if p.is_dir() else p
        return p if p.is_file() else None
    rel = LOCAL_FILES.get(cfg.dataset, {}).get(cfg.split)
    p = shared_data_dir() / rel if rel else None
    return p if p is not None and p.is_file() else None


def main(argv=None) -> None:
    evaluate(config.from_cli(EvalConfig, argv, "python -m mlx_distill eval", __doc__))


# ============================================================================= the grade stage
def grade_predictions(cfg: GradeConfig) -> dict:
    """Re-grade saved predictions against a dataset, without a model."""
    if not cfg.predictions or not cfg.out:
        raise InputError("grade needs --predictions PREDS.jsonl and --out SUMMARY.json")
    problems = load_eval_problems(cfg.dataset, cfg.data, cfg.split)
    kind = answer_kind_for(cfg.dataset, problems, cfg.answer_kind)
    by_id = {p["id"]: p for p in problems}
    by_index = {problem_index(p, i): p for i, p in enumerate(problems)}
    records, seen = [], set()
    for line, pred in iter_jsonl(cfg.predictions):
        where = f"{cfg.predictions}:{line}"
        if "response" not in pred or not isinstance(pred["response"], str):
            raise InputError(f"{where}: each prediction needs a string `response`")
        if pred.get("id") is not None:
            p = by_id.get(str(pred["id"]))
            if p is None:
                raise InputError(f"{where}: id {pred['id']!r} is not in {cfg.data or cfg.dataset} "
                                 f"(ids look like {problems[0]['id']!r}); or give `index` (0-based data line)")
        elif pred.get("index") is not None:
            if not isinstance(pred["index"], int) or pred["index"] not in by_index:
                raise InputError(f"{where}: index {pred['index']!r} is out of range 0..{len(problems) - 1}")
            p = by_index[pred["index"]]
        else:
            raise InputError(f"{where}: a prediction needs `id` or `index` (0-based line of the data file)")
        if p["id"] in seen:
            raise InputError(f"{where}: a second prediction for {p['id']}; give one per problem")
        seen.add(p["id"])
        meta = p.get("meta") or {}
        rec = {"id": p["id"], "index": pred.get("index"), "subject": meta.get("subject"), "level": meta.get("level"),
               "response": pred["response"], "tokens": pred.get("tokens"),
               "finish_reason": pred.get("finish_reason"), "latency_s": pred.get("latency_s")}
        rec.update(grade_fields(pred["response"], p["answer"], kind, cfg.grade_timeout))
        rec["truncated"] = rec["finish_reason"] == "length"
        rec["failure_kind"] = failure_kind(rec)
        records.append(rec)
    if not records:
        raise InputError(f"{cfg.predictions}: no predictions")
    summary = summarise(records, dataset=cfg.dataset, answer_kind=kind, predictions=str(cfg.predictions),
                        problems_in_dataset=len(problems), missing=len(problems) - len(records))
    out = Path(cfg.out)
    atomic_write_json(out, summary)
    write_jsonl(out.with_name(out.stem + ".records.jsonl"), records)
    return summary


def grade_main(argv=None) -> None:
    cfg = config.from_cli(GradeConfig, argv, "python -m mlx_distill grade", grade_predictions.__doc__)
    s = grade_predictions(cfg)
    print_summary(s)
    if s["missing"]:
        print(f"note: {s['missing']} problem(s) of the dataset have no prediction; accuracy is over the "
              f"{s['n']} predicted", file=sys.stderr)
    print(f"wrote {cfg.out}")
