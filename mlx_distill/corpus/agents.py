"""The three agents of the corpus builder, each a thin layer over a client from ``clients.py``.

* ``Solver``: the teacher writes a step-by-step solution (prompts/solver_<kind>.txt).
* ``Verifier``: the programmatic check first (``answers.grade``: numbers for GSM8K,
  math-verify with the gold answer first for LaTeX); only when it cannot parse the final
  answer, an optional LLM judge (prompts/judge_correct.txt) ends with ``VERDICT: CORRECT`` /
  ``VERDICT: INCORRECT`` (``answers.parse_verdict``; any other reply is "judge unparsable" and
  leaves the trace unverified). Every verdict says who decided. Optionally the judge also
  rates the reasoning 1-5 (prompts/judge_critic.txt).
* ``Rewriter``: shortens a verified solution to a length level (prompts/rewrite_<level>.txt);
  the builder re-verifies every rewrite.

Prompt templates are plain text with ``{name}`` slots filled by ``Prompt.fill`` (a plain
replacement, so LaTeX braces such as ``\\boxed{}`` need no escaping); their sha256 goes into
the manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlx_distill.config import CorpusConfig
from mlx_distill.tasks.answers import grade, parse_verdict, word_count
from mlx_distill.io import InputError
from mlx_distill.paths import prompt_path
from mlx_distill.generation.clients import ClientError, Completion

ANSWER_INSTRUCTIONS = {"####": "a last line '#### <answer>'.", "boxed": "the final answer within \\boxed{}."}


@dataclass
class Prompt:
    name: str
    path: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def fill(self, **slots) -> str:
        out = self.text
        for k, v in slots.items():
            out = out.replace("{" + k + "}", str(v))
        return out.strip()

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}


def load_prompt(name: str, required_slots=("question",)) -> Prompt:
    """A template from prompts/ (``solver_math`` or ``prompts/solver_math.txt``) or any path."""
    p = prompt_path(name if name.endswith(".txt") else f"{name}.txt")
    if not p.is_file():
        raise InputError(f"{p}: prompt template not found (looked in prompts/)")
    text = p.read_text()
    missing = [s for s in required_slots if "{" + s + "}" not in text]
    if missing:
        raise InputError(f"{p}: template lacks the slot(s) {['{' + s + '}' for s in missing]}")
    return Prompt(Path(p).stem, str(p), text)


def text_or_file(value: str) -> Optional[Prompt]:
    """--system-prompt: a prompt file if one exists by that name, else the literal text; '' = none."""
    if not value:
        return None
    p = prompt_path(value)
    if p.is_file():
        return Prompt(p.stem, str(p), p.read_text())
    return Prompt("inline", "", value)


def request_seed(seed: int, *parts) -> int:
    """A per-request seed from the run seed and the request's identity (stable across runs and orders)."""
    h = hashlib.sha256(("\x1f".join(map(str, (seed, *parts)))).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def usage_of(c: Completion, role: str) -> dict:
    return {"role": role, "model": c.model, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens, "latency_s": round(c.latency_s, 4), "attempts": c.attempts}


# ----------------------------------------------------------------------------- solver
class Solver:
    def __init__(self, client, template: Prompt, system: Optional[Prompt] = None, temperature: float = 0.6,
                 max_tokens: int = 4096, seed: int = 0):
        self.client, self.template, self.system = client, template, system
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed

    def messages(self, problem: dict) -> list[dict]:
        msgs = [{"role": "system", "content": self.system.text.strip()}] if self.system else []
        return msgs + [{"role": "user", "content": self.template.fill(question=problem["question"].strip())}]

    async def solve(self, problem: dict, sample: int) -> tuple[Completion, int]:
        seed = request_seed(self.seed, problem["id"], sample)
        c = await self.client.complete(self.messages(problem), temperature=self.temperature,
                                       max_tokens=self.max_tokens, seed=seed)
        return c, seed


# ----------------------------------------------------------------------------- verifier
def parse_score(text: str) -> Optional[int]:
    m = re.findall(r"SCORE\s*[:=]?\s*\**\s*([1-5])\b", (text or "").upper())
    if m:
        return int(m[-1])
    m = re.findall(r"\b([1-5])\b", text or "")
    return int(m[-1]) if m else None


class Verifier:
    def __init__(self, judge=None, judge_prompt: Optional[Prompt] = None, critic_prompt: Optional[Prompt] = None,
                 grade_timeout: float = CorpusConfig.grade_timeout, judge_max_tokens: int = 1024,
                 grade_memory_mb: int = CorpusConfig.grade_memory_mb):
        self.judge, self.judge_prompt, self.critic_prompt = judge, judge_prompt, critic_prompt
        self.grade_timeout, self.judge_max_tokens = grade_timeout, judge_max_tokens
        self.grade_memory_mb = grade_memory_mb

    async def verify(self, problem: dict, text: str, kind: str, allow_judge: bool = True) -> dict:
        """{status: correct|wrong|invalid, extracted, method, decided_by, reason, judge?: {...}}.

        The judge only decides what the program could not read (it never overrules it), and
        only when `allow_judge` (the builder skips it for traces another filter rejects). A
        judge request that fails for good leaves the verdict "invalid" with the error noted:
        the paid solution is kept, not lost with the judge call."""
        # a MATH comparison waits for a grading worker (up to --grade-timeout): keep the event loop free
        v = await asyncio.to_thread(grade, text or "", problem["answer"], kind, self.grade_timeout,
                                    self.grade_memory_mb)
        out = {"status": v.status, "extracted": v.extracted, "method": v.method, "decided_by": "programmatic",
               "reason": v.reason}
        if v.status == "invalid" and v.extracted is not None and self.judge is not None and allow_judge:
            prompt = self.judge_prompt.fill(question=problem["question"], gold=problem["answer"], response=text)
            try:
                c = await self.judge.complete([{"role": "user", "content": prompt}], temperature=0.0,
                                              max_tokens=self.judge_max_tokens)
            except ClientError as e:
                out["judge"] = {"role": "judge", "error": str(e)[:300]}
                return out
            ok = parse_verdict(c.text)
            out["judge"] = {"raw": c.text[-200:], "verdict": ok, **usage_of(c, "judge")}
            if ok is None:  # no explicit final verdict line: the trace stays unverified, counted apart
                out["reason"] = "judge unparsable"
            else:
                out.update(status="correct" if ok else "wrong", decided_by=f"judge:{c.model}", method="llm-judge")
        return out

    async def critic(self, problem: dict, text: str) -> dict:
        """{score: 1-5 or None, raw, usage...}: the judge's rating of the reasoning."""
        prompt = self.critic_prompt.fill(question=problem["question"], response=text)
        try:
            c = await self.judge.complete([{"role": "user", "content": prompt}], temperature=0.0,
                                          max_tokens=self.judge_max_tokens)
        except ClientError as e:
            return {"score": None, "role": "critic", "error": str(e)[:300]}
        return {"score": parse_score(c.text), "raw": c.text[-200:], **usage_of(c, "critic")}


# ----------------------------------------------------------------------------- rewriter
class Rewriter:
    def __init__(self, client, prompts: dict[str, Prompt], max_tokens: dict[str, int], ratios: dict[str, float],
                 default_max_tokens: int = 1024, temperature: float = 0.0, seed: int = 0):
        self.client, self.prompts, self.max_tokens, self.ratios = client, prompts, max_tokens, ratios
        self.default_max_tokens, self.temperature, self.seed = default_max_tokens, temperature, seed

    def messages(self, problem: dict, solution: str, marker: str, level: str) -> list[dict]:
        words = word_count(solution)
        target = max(5, round(words * float(self.ratios.get(level, 0.5))))
        prompt = self.prompts[level].fill(question=problem["question"].strip(), solution=solution.strip(),
                                          words=words, target_words=target,
                                          answer_instruction=ANSWER_INSTRUCTIONS.get(marker, ANSWER_INSTRUCTIONS["####"]),
                                          answer=problem["answer"])
        return [{"role": "user", "content": prompt}]

    async def rewrite(self, problem: dict, solution: str, marker: str, level: str) -> tuple[Completion, int]:
        seed = request_seed(self.seed, problem["id"], level)
        c = await self.client.complete(self.messages(problem, solution, marker, level), temperature=self.temperature,
                                       max_tokens=int(self.max_tokens.get(level, self.default_max_tokens)), seed=seed)
        return c, seed
