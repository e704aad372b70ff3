"""Trace filters: pure checks on one solution, each with a name counted in the manifest.

The loop detector is ``answers.repetition`` (the one eval's failure kinds use too), re-exported here.

A trace is kept only if no filter fires. The names (and the order in which the first
firing one becomes the trace's ``reason``) are:

============  ===========================================================================
truncated     the server stopped it at the token cap (finish reason ``length``)
no_marker     no final-answer marker (``#### x`` or ``\\boxed{x}``) in the answer text
unparsable    a marker, but its answer cannot be read (and no judge decided it)
wrong_answer  the final answer differs from the gold one (programmatic check or judge)
repetition    a loop: some n-gram of ``repeat_ngram`` words (or a line) occurs ``repeat_count``+ times
banned        a banned phrase (refusals, "as an AI language model", ...)
too_long      more than ``max_words`` words / ``max_solution_tokens`` tokens
critic_low    the critic rated the reasoning below ``min_critic``
============  ===========================================================================
"""

from __future__ import annotations

import re
from typing import Optional

from mlx_distill.tasks.answers import last_boxed, last_hashes, repetition, word_count
from mlx_distill.config import CorpusConfig

ORDER = ["truncated", "no_marker", "unparsable", "wrong_answer", "repetition", "banned", "too_long", "critic_low"]


def final_marker(text: str) -> Optional[str]:
    """Which final-answer marker the text ends with: "####", "boxed" (whichever comes last), or None."""
    marks = [(m[0], name) for name, m in (("boxed", last_boxed(text or "")), ("####", last_hashes(text or "")))
             if m is not None and m[1]]
    return max(marks)[1] if marks else None


def banned(text: str, phrases) -> Optional[str]:
    low = (text or "").lower()
    return next((p for p in phrases or () if p and p.lower() in low), None)


def normalise_ws(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def check(text: str, finish_reason: str, completion_tokens: int, *, thinking: Optional[str] = None,
          max_words: int = 0, max_tokens: int = 0, repeat_ngram: int = CorpusConfig.repeat_ngram,
          repeat_count: int = CorpusConfig.repeat_count,
          banned_phrases=()) -> list[str]:
    """Filters that fire on a solution before its answer is checked (the verifier adds
    unparsable / wrong_answer / critic_low). `thinking`: the separate reasoning when it is
    kept for training, so loops, banned phrases and length are checked in it too.
    Returns the names in ``ORDER``."""
    trained = f"{thinking}\n{text}" if thinking else (text or "")
    fired = []
    if finish_reason == "length":
        fired.append("truncated")
    if final_marker(text) is None:
        fired.append("no_marker")
    if repetition(text, repeat_ngram, repeat_count) or (thinking and repetition(thinking, repeat_ngram, repeat_count)):
        fired.append("repetition")
    if banned(trained, banned_phrases):
        fired.append("banned")
    if (max_words and word_count(trained) > max_words) or (max_tokens and completion_tokens > max_tokens):
        fired.append("too_long")
    return fired


def primary(reasons: list[str]) -> Optional[str]:
    """The reason a trace is reported under: the first firing filter in ``ORDER``."""
    return min(reasons, key=ORDER.index) if reasons else None
