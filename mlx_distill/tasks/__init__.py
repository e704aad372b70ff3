"""The task registry: one declarative definition per benchmark.

Everything that needs to know what a benchmark *is* reads it from here: where its data
comes from (a local file under the data folder, a Hugging Face dataset), how its gold
answers are graded, which prompt asks for an answer in which format, where few-shot
exemplars are drawn from, the metric, and whether the leakage check compares training
problems against it. Adding a benchmark means adding one ``Task`` below (after the
pattern of lm-evaluation-harness's task YAML files, where prompt, extraction and metric
live together).

Data resolution (``problems.load_problems``) tries, in order: ``--data FILE``; the data
folder named by ``MLX_DISTILL_DATA`` (``<folder>/<task.local[split]>``); the Hugging Face
Hub via ``datasets`` (every ``Hub`` source of the task, first one first). The package
never names a workspace path: a user's data lives wherever the user says.

User sets (``jsonl``, ``csv``) and a corpus's held-out split (``corpus``) are tasks too;
they need ``--data`` and take their answer kind from the records.

The wing: this registry, problem loading (``problems.py``), answer extraction and grading
(``answers.py`` and the modules beside it) and the leakage keys (``overlap.py``). Grading sits
this low because the corpus verifier, training's accuracy selection and evaluation all use it.
It may import only config, io, paths and progress; corpus, training, evaluation, generation and
data import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Hub:
    """A Hugging Face dataset holding a task's problems."""

    name: str                                   # e.g. "openai/gsm8k"
    config: Optional[str] = None                # e.g. "main"
    splits: dict = field(default_factory=dict)  # our split -> the dataset's split name
    subsets: tuple = ()                         # configs loaded one by one and concatenated


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    reader: str                  # record builder in problems.py: gsm8k | math | competition | user | corpus
    answer_kind: str             # answers.grade kind: "gsm8k" (numeric) | "math" (math-verify)
    answer_format: str           # the format the prompt asks for: "####" | "boxed"
    local: dict = field(default_factory=dict)  # split -> file under the data folder
    hub: tuple = ()              # Hub sources, tried in order
    default_split: str = "test"  # split for `corpus build --source NAME` when none is given
    eval_split: str = "test"     # split evaluated (and compared by the leakage check)
    # user-turn template in prompts/ ({question}, {format_instruction}); the default is the one
    # `train` renders corpus records with, so a model is evaluated with the prompt it learnt
    prompt: str = "train_user.txt"
    fewshot: Optional[tuple] = None    # (task, split) few-shot exemplars are drawn from; None: not offered
    metric: str = "accuracy"     # exact-match accuracy of the graded final answer (Wilson CI, stderr)
    leakage: bool = False        # training corpora are checked against its eval split
    needs_data: bool = False     # a user set: --data is required

    @property
    def splits(self) -> list[str]:
        names = set(self.local)
        for h in self.hub:
            names |= set(h.splits)
        return sorted(names)


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")

_DEFS = [
    Task("gsm8k", "GSM8K (grade-school math word problems)", reader="gsm8k", answer_kind="gsm8k",
         answer_format="####", local={"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
         hub=(Hub("openai/gsm8k", "main", {"train": "train", "test": "test"}),),
         default_split="train", fewshot=("gsm8k", "train"), leakage=True),
    Task("math", "MATH (Hendrycks et al., competition mathematics)", reader="math", answer_kind="math",
         answer_format="boxed", local={"train": "math/train.jsonl"},
         hub=(Hub("EleutherAI/hendrycks_math", None, {"train": "train", "test": "test"}, MATH_SUBJECTS),
              Hub("hendrycks/competition_math", None, {"train": "train", "test": "test"})),
         default_split="train", fewshot=("math", "train")),
    Task("math500", "MATH-500 (the held-out 500 of 'Let's Verify Step by Step')", reader="math", answer_kind="math",
         answer_format="boxed", local={"test": "math500/test.jsonl"},
         hub=(Hub("HuggingFaceH4/MATH-500", None, {"test": "test"}),), fewshot=("math", "train"), leakage=True),
    Task("aime24", "AIME 2024", reader="competition", answer_kind="math", answer_format="boxed",
         local={"test": "aime24/test.jsonl"},
         hub=(Hub("HuggingFaceH4/aime_2024", None, {"test": "train"}), Hub("math-ai/aime24", None, {"test": "test"})), fewshot=("math", "train"), leakage=True),
    Task("amc23", "AMC 2023", reader="competition", answer_kind="math", answer_format="boxed",
         local={"test": "amc23/test.jsonl"},
         hub=(Hub("math-ai/amc23", None, {"test": "test"}), Hub("AI-MO/aimo-validation-amc", None, {"test": "train"})), fewshot=("math", "train"), leakage=True),
    # user sets: problem/question + answer (or a solution with \boxed{}); kind from --answer-kind (default math)
    Task("jsonl", "a JSONL file of problems (--data)", reader="user", answer_kind="math", answer_format="boxed", needs_data=True),
    Task("csv", "a CSV file of problems (--data)", reader="user", answer_kind="math", answer_format="boxed", needs_data=True),
    # a corpus folder's held-out test.jsonl; answer kind from the records' answer_format
    Task("corpus", "a corpus's held-out test split (--data CORPUS)", reader="corpus", answer_kind="gsm8k",
         answer_format="####", needs_data=True),
]
TASKS: dict[str, Task] = {t.name: t for t in _DEFS}
NAMES = list(TASKS)


def get(name: str) -> Task:
    """The task called `name`, or the task one of whose Hub datasets is `name`."""
    task = find(name)
    if task is not None:
        return task
    from mlx_distill.io import InputError

    raise InputError(f"unknown dataset {name!r}: use one of {NAMES}, a Hugging Face dataset name "
                     "(e.g. openai/gsm8k), or --dataset jsonl/csv with --data FILE")


def hub_source(name: str) -> Optional[tuple[Task, Hub]]:
    """(task, hub source) for a Hugging Face dataset name a task knows (case-sensitive), else None."""
    for t in TASKS.values():
        for h in t.hub:
            if h.name == name:
                return t, h
    return None


def find(name: str) -> Optional[Task]:
    """The task called `name` (or whose Hub dataset is `name`), else None."""
    if name in TASKS:
        return TASKS[name]
    hit = hub_source(name)
    return hit[0] if hit else None


def answer_kind(name: str, default: str = "math") -> str:
    """How a task's (or a record source's) answers are graded; `default` for unknown names."""
    t = find(name)
    return t.answer_kind if t else default


def leakage_tasks() -> list[Task]:
    return [t for t in TASKS.values() if t.leakage]
