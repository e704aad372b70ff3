"""Checkpoint selection by task accuracy (`train --select-by accuracy`).

Validation loss measures how well the model predicts the reference traces; users publish
the accuracy of the adapter they keep. With ``--select-by accuracy`` the trainer, at
validation time, generates greedily with the model being trained and its *current* adapter
(the same model object: no second copy of the weights, the backend's own generation, see
`MLXBackend.generate` / `TorchBackend.generate`), on a fixed subset of the validation split,
from exactly the prompt the training data used (the record rendered through the chat
template without its assistant turn, ``add_generation_prompt=True``, as
`data.tokenize_messages` masks it), and grades each response with `answers.grade`:

- corpus records ``{question, answer, answer_format}``: the gold is ``answer``, graded as
  ``gsm8k`` (numbers) for ``answer_format "####"`` (the default) and ``math``
  (math-verify) for ``"boxed"``;
- ``{prompt, completion}`` and ``{messages}`` records: the gold is the completion's last
  ``#### x`` (``gsm8k``) or last ``\\boxed{x}`` (``math``), whichever comes last; a record with
  neither cannot be graded and --select-by accuracy is refused.

The subset is `data.spread_subset` of the kept validation examples (spread over lengths,
fixed by the ids), so every accuracy validation of a run sees the same problems.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from mlx_distill.tasks import answers

from mlx_distill import data
from mlx_distill.config import GradeConfig
from mlx_distill.io import InputError, iter_jsonl


@dataclass
class Problem:
    id: str
    prompt: list  # token ids of the generation prompt
    gold: str
    kind: str  # "gsm8k" | "math"


def gold_of(rec: dict) -> tuple[str, str] | None:
    """(gold answer, answer kind) of one training record, or None when it has none."""
    if "messages" in rec or ("prompt" in rec and "completion" in rec):
        text = rec["messages"][-1]["content"] if "messages" in rec else rec["completion"]
        text = answers.final_text(str(text)) or ""
        marks = [(m[0], m[1], kind) for m, kind in ((answers.last_hashes(text), "gsm8k"),
                                                     (answers.last_boxed(text), "math")) if m and m[1]]
        if not marks:
            return None
        _, gold, kind = max(marks)
        return gold, kind
    if "answer" not in rec:
        return None
    return str(rec["answer"]).strip(), "math" if (rec.get("answer_format") or "####") == "boxed" else "gsm8k"


def load_problems(cfg, tokenizer, path: str | Path, examples: list, n: int) -> list[Problem]:
    """The fixed accuracy subset: `n` of the validation `examples` (spread over lengths),
    read back from their file `path` to render the prompt and find the gold answer."""
    from mlx_distill.paths import prompt_path

    wanted = [examples[i].id for i in data.spread_subset(examples, n)]
    want = set(wanted)
    template = prompt_path(cfg.prompt_template).read_text() if cfg.prompt_template else "{question}"
    path = Path(path)
    found = {}
    for line, rec in iter_jsonl(path):
        rid = data.record_id(rec, path, line)
        if rid not in want:
            continue
        g = gold_of(rec)
        if g is None:
            raise InputError(f"{path}:{line}: --select-by accuracy needs a gold answer, and record {rid!r} has "
                             "none (no `answer` field, no `#### x` line or \\boxed{} in its completion); "
                             "use --select-by loss for this data")
        messages = data.record_to_messages(rec, template, cfg.system_prompt)
        prompt = data._apply(tokenizer, messages[:-1], add_generation_prompt=True)
        found[rid] = Problem(rid, list(prompt), *g)
    return [found[i] for i in wanted if i in found]


class AccuracyValidator:
    """Generate on the fixed problems with the live model and grade; one call = one validation."""

    def __init__(self, problems: list[Problem], max_tokens: int, grade_timeout: float = GradeConfig.grade_timeout,
                 grade_memory_mb: int = GradeConfig.grade_memory_mb):
        if not problems:
            raise InputError("--select-by accuracy: the validation split has no problems to generate on")
        self.problems, self.max_tokens, self.grade_timeout = problems, max_tokens, grade_timeout
        self.grade_memory_mb = grade_memory_mb  # each MATH comparison runs in a bounded worker (tasks.grading)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.problems]

    def __call__(self, backend, step: int) -> dict:
        """Metrics of one accuracy validation at optimizer step `step` (the backend must be in eval mode)."""
        t0 = time.perf_counter()
        outs = backend.generate([p.prompt for p in self.problems], self.max_tokens)
        texts = [backend.tokenizer.decode(o) for o in outs]
        verdicts = [answers.grade(t, p.gold, p.kind, timeout=self.grade_timeout, memory_mb=self.grade_memory_mb)
                    for t, p in zip(texts, self.problems)]
        n = len(verdicts)
        return {"val_accuracy": sum(v.correct for v in verdicts) / n, "val_accuracy_n": n,
                "val_invalid": sum(v.status == "invalid" for v in verdicts) / n,
                "val_mean_words": sum(answers.word_count(t) for t in texts) / n,
                "val_accuracy_seconds": round(time.perf_counter() - t0, 3)}


def better(acc: float, loss: float, best_acc: float, best_loss: float, min_delta: float = 0.0) -> bool:
    """Is (acc, loss) a better checkpoint than the best so far? Higher accuracy (by more than
    `min_delta`) wins; equal accuracy is decided by the lower validation loss."""
    if acc > best_acc + min_delta:
        return True
    return acc == best_acc and loss < best_loss
