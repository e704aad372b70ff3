"""Online KD across tokenizers: `OnlineCrossTeacher`, a teacher of another family scoring each batch.

The corpus is rendered a second time with the teacher's tokenizer and chat template (the same
records, ids and options), so every example has the teacher's tokens and completion offsets up
front: `check` plans the alignment once, exactly as for a stored teacher (the same `Planner`,
`teacher.plan`); each `batch_arrays` call runs the teacher (`Teacher.score`, local or remote) on
the batch's examples in the teacher's tokens (top-K and the actual tokens' log-probabilities) and
serves them through the plans. Teacher ids the student cannot spell are counted per batch in
`dropped`/`slots`.

On-policy KD (`training.sources.OnPolicySource`): `rollout_arrays` scores the student's rollouts.
A rollout exists only in the student's tokens: its completion text (`align.completion_text`) is
encoded with the teacher's tokenizer after the teacher's rendering of the same prompt (its chat
template's generation prompt), followed by the teacher's end-of-turn tokens when the rollout
ended with one, then planned and served like any example.
"""

import dataclasses

import numpy as np

from mlx_distill import data
from mlx_distill.teacher import align
from mlx_distill.teacher.base import first_target, tokenizer_fingerprint
from mlx_distill.teacher.plan import Planned, Planner, empty_plan, last_in_text


class OnlineCrossTeacher(Planned):
    """The rows of `teacher` (a `Teacher` of another tokenizer) for each batch, planned by a `Planner`
    over this object (a `plan.ScoredRows`: the teacher's renderings and this batch's scores)."""

    cross = True

    def __init__(self, teacher, teacher_examples: dict, top_k: int, data_label: str = ""):
        self.teacher = teacher
        self.m = int(top_k)
        self.vocab_size = None  # the student's rows (kd_setup sets it)
        self._t_pieces = align.pieces_of(teacher.tokenizer)
        self._ex = teacher_examples
        self.entries, self._ends = {}, {}
        for e in teacher_examples.values():
            self._add_entry(e)
        self.planner = Planner(self, self.m, tokenizer_fingerprint(teacher.tokenizer), teacher.name,
                               {"teacher": teacher.name, "data": data_label or "CORPUS", "dir": teacher.name},
                               count_dropped=False)  # nothing scored yet: counted per batch
        self._scores: dict = {}
        self.dropped = self.slots = 0
        self._pad = data.pad_id_of(teacher.tokenizer)
        self._student_tok = None

    def _add_entry(self, e) -> None:
        text, ends = align.completion_text(self.teacher.tokenizer, e.tokens[e.prompt_len:])
        first = first_target(e.prompt_len)
        self.entries[e.id] = {"first": first, "n": len(e.tokens) - 1 - first, "prompt_len": int(e.prompt_len),
                              "length": len(e.tokens), "text_sha256": align.text_sha(text)}
        self._ends[e.id] = np.concatenate([np.zeros(e.prompt_len, np.int64), ends])

    # -------------------------------------------------------------- plan.ScoredRows
    def teacher_pieces(self):
        return self._t_pieces

    def scored_tokens(self, example_id: str) -> np.ndarray:
        return self._ex[example_id].tokens

    def teacher_ends(self, example_id: str) -> np.ndarray:
        return self._ends[example_id]

    def rows(self, example_id: str):
        return self._scores[example_id][:2]

    def token_logprobs(self, example_id: str) -> np.ndarray:
        return self._scores[example_id][2]

    def unknown_logprobs(self, example_id: str):
        return None  # scored per batch, always with the actual tokens' log-probabilities

    # -------------------------------------------------------------- the KD source's teacher
    def check(self, examples: list, student_vocab_size: int, tokenizer, min_coverage: float = 0.95,
              where: str = "train", mode: str = "auto") -> dict:
        self._student_tok = tokenizer
        return self.planner.check(examples, student_vocab_size, tokenizer, min_coverage, where, mode)

    def batch_arrays(self, batch, top_k: int | None = None) -> dict:
        ids = [i for i in batch.ids if i in self._ex]
        self._scores = {}
        if ids:
            exs = [self._ex[i] for i in ids]
            b = data.collate(exs, list(range(len(exs))), self._pad)
            start = min(first_target(e.prompt_len) for e in exs)
            sc = self.teacher.score(b.tokens, self.m, start, lengths=b.lengths)
            for r, e in enumerate(exs):
                lo, hi = first_target(e.prompt_len) - start, len(e.tokens) - 1 - start
                self._scores[e.id] = (sc.ids[r, lo:hi], sc.logprobs[r, lo:hi], sc.token_logprobs[r, lo:hi])
                p = self.planner.plans.get(e.id)
                if p is not None and len(p["t"]):
                    mapped = self.planner.map_ids(sc.ids[r, lo:hi][p["rows"]])
                    self.dropped += int(np.sum(mapped < 0))
                    self.slots += mapped.size
        for i in batch.ids:  # not rendered for the teacher (e.g. longer than --max-seq-length in its tokens)
            if i not in self._ex:
                self.planner.plans.setdefault(i, empty_plan())
        return self.planner.batch_arrays(batch, top_k)

    def rollout_arrays(self, batch, top_k: int) -> dict:
        """The student's rollouts `batch` (rows: prompt + sampled completion, ids: the source
        examples) scored by the teacher in its own tokens: `batch_arrays`' contract."""
        keys = [f"{eid}\x00rollout{r}" for r, eid in enumerate(batch.ids)]
        for r, (eid, key) in enumerate(zip(batch.ids, keys)):
            self._plan_rollout(key, self._ex.get(eid), batch.tokens[r, : batch.lengths[r]],
                               int(batch.prompt_lens[r]))
        try:
            return self.batch_arrays(dataclasses.replace(batch, ids=keys), top_k)
        finally:
            for key in keys:
                for d in (self._ex, self.entries, self._ends, self.planner.plans):
                    d.pop(key, None)

    def _plan_rollout(self, key: str, src, toks: np.ndarray, plen: int) -> None:
        """Render one rollout (student tokens `toks`, prompt `plen`) in the teacher's tokens and plan it."""
        if src is None:
            self.planner.plans[key] = empty_plan()
            return
        s_tok, t_tok = self._student_tok, self.teacher.tokenizer
        text, s_ends = align.completion_text(s_tok, toks[plen:])
        try:
            text.decode("utf-8")
            cut = False
        except UnicodeDecodeError as err:  # sampled byte pieces that spell no character: align the
            # text before them, up to the last whole student token (the rest of the rollout gets none)
            whole = s_ends[s_ends <= err.start]
            text = text[: int(whole.max()) if len(whole) else 0].rstrip()
            s_ends, cut = np.clip(s_ends, 0, len(text)), True
        t_body = [int(i) for i in t_tok.encode(text.decode("utf-8"), add_special_tokens=False)]
        tail = []
        s_tail = toks[plen + last_in_text(s_ends) + 1:]
        s_special = align.special_mask(s_tok)
        if not cut and s_special[np.minimum(s_tail, len(s_special) - 1)].any():  # the rollout ended its turn
            _, t_ends = align.completion_text(t_tok, src.tokens[src.prompt_len:])
            tail = src.tokens[src.prompt_len + last_in_text(t_ends) + 1:].tolist()  # the teacher's end of turn
        t_ex = data.Example(key, np.asarray(src.tokens[: src.prompt_len].tolist() + t_body + tail, np.int32),
                            src.prompt_len)
        self._ex[key] = t_ex
        self._add_entry(t_ex)
        want = np.arange(first_target(plen), len(toks) - 1)
        plan = self.planner.plan_cross(data.Example(key, toks, plen), self.entries[key], want, s_tok,
                                       self.planner.mode, {}, s_view=(text, s_ends))
        self.planner.plans[key] = plan if plan is not None else empty_plan()
