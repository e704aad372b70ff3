"""Batch sources: where the training loop's micro-batches come from (the loop in `train.run`
is the only loop; the objective and the source are its arguments).

Every source yields, for micro-batch index k of optimizer step s, the NumPy arrays of the
`data.batch_arrays` contract (``inputs``, ``targets``, ``mask``; with a teacher also
``kd_ids``/``kd_logits`` (B, T, K), ``kd_alpha`` and ``kd_scale``; on-policy runs also
``gold``, 1 where the batch has a gold completion) and the batch's completion token count:

- `CorpusSource`: the corpus stream (`data.BatchStream`), SFT.
- `KDSource`: corpus batches + a teacher's top-K: the offline store (`teacher.store.TopMStore`,
  ``--kd``) or the online teacher (`teacher.local.OnlineTeacher`, ``--kd-teacher``; a teacher of
  another tokenizer family is `teacher.cross.OnlineCrossTeacher`, aligned as the store is: `align`).
- `OnPolicySource` (``--on-policy-fraction`` lambda > 0): a share lambda of the micro-batches
  are the student's own rollouts of the corpus prompts (`rollouts.sample`, the live model and
  its current adapter), scored by the teacher with teacher forcing (`Teacher.score`); the
  others are `KDSource` batches. Which micro-batches are rollouts is `on_policy_at(seed, k,
  lambda)`; the sampling key is `rollouts.rollout_key(seed, k)`. A teacher of another
  tokenizer family scores a rollout in its own tokens: the online cross-tokenizer teacher
  (`teacher.cross.OnlineCrossTeacher.rollout_arrays`) encodes the rollout's text after its own
  rendering of the prompt and aligns it like any example (`align`).

Resumable state: the data position is the loop's micro-batch count (a checkpoint is only
written at an optimizer-step boundary), and every random choice derives from (seed, k), so a
resumed run rebuilds exactly the batches (rollouts included) the uninterrupted run would
have. What a source adds of its own, its open report window (`stats`), is saved with the
loop state (`state_dict` / `load_state_dict`).

The teacher interface (`Teacher`) takes token ids and returns, at every position, the top-K
ids and log-probabilities, the log of the mass outside them (the tail bucket) and the
log-probability of the token actually there: `teacher.local.LocalTeacher` runs a local model;
`teacher.remote.RemoteTeacher` asks a vLLM server (``prompt_logprobs`` of the rollout's token
ids; the student's tokenizer must be the served model's) and fills the same `TeacherScores`.
"""

import math
import sys
import time

import numpy as np

from mlx_distill import data
from mlx_distill.io import InputError, JsonlAppender
from mlx_distill.backends.rollouts import rollout_key


from mlx_distill.teacher.base import Teacher, TeacherScores  # the teacher a source takes


# ----------------------------------------------------------------------------- which batches are on-policy
def on_policy_at(seed: int, k: int, fraction: float) -> bool:
    """Whether micro-batch k is a rollout batch: a pure function of (seed, k) with share
    `fraction` (exactly floor((k+1)f + u) - floor(k f + u) over any window, u a seeded offset in
    [0, 1): rollouts spread evenly, never clumped by chance)."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    u = (rollout_key(seed, -1) % 1_000_003) / 1_000_003
    return math.floor((k + 1) * fraction + u) > math.floor(k * fraction + u)


# ----------------------------------------------------------------------------- sources
class CorpusSource:
    """The corpus stream: SFT batches."""

    kind = "SFT"
    teacher_fields = False

    def __init__(self, stream: data.BatchStream):
        self.stream = stream
        self.stats: dict = {}

    def __len__(self):
        return len(self.stream)

    def epoch_of(self, k: int) -> float:
        return self.stream.epoch_of(k)

    def batch(self, k: int, step: int) -> tuple[dict, int]:
        b = self.stream.at(k)
        return data.trim_prompt(data.batch_arrays(b), b), b.ntokens

    def note_update(self, seconds: float) -> None:
        self.stats["update_seconds"] = self.stats.get("update_seconds", 0.0) + seconds

    def report(self) -> dict:
        """The open window's fields for metrics.jsonl; starts a new window."""
        self.stats = {}
        return {}

    def state_dict(self) -> dict:
        return dict(self.stats)

    def load_state_dict(self, state: dict | None) -> None:
        self.stats = dict(state or {})

    def after_validation(self, out, step: int) -> None:
        pass


class KDSource(CorpusSource):
    """Corpus batches + the teacher's top-K (offline store or online teacher). The KD
    normaliser of a step counts all its micro-batches (`objectives.kd_step_scale`), so the step's
    batches are built together at its first micro-batch. `dry_check(step, n_kd)` is the
    loop's refusal of a run without a teacher signal."""

    kind = "SFT+KD"
    teacher_fields = True

    def __init__(self, stream, cfg, store, dry_check=None):
        super().__init__(stream)
        self.cfg, self.store, self.dry_check = cfg, store, dry_check
        self._step: dict[int, tuple[dict, int]] = {}

    def _corpus_batch(self, j: int) -> tuple[dict, data.Batch]:
        b = self.stream.at(j)
        tic = time.perf_counter()
        kd = self.store.batch_arrays(b, self.cfg.kd_top_k)
        self.stats["teacher_seconds"] = self.stats.get("teacher_seconds", 0.0) + time.perf_counter() - tic
        return {**data.batch_arrays(b), **kd}, b

    def _build(self, j: int) -> tuple[dict, data.Batch]:
        return self._corpus_batch(j)

    def batch(self, k: int, step: int) -> tuple[dict, int]:
        from mlx_distill.training.objectives import kd_alpha_at, kd_step_scale, sft_step_scale

        if k not in self._step:  # the step's first micro-batch: its KD normaliser needs all of them
            self._step.clear()
            group = [(j, *self._build(j)) for j in range(k, k + self.cfg.grad_accumulation)]
            scale, n, nk = kd_step_scale([a for _, a, _ in group])
            # on-policy: the SFT term is averaged over the step's gold tokens, not all its tokens
            sft_scale = sft_step_scale([a for _, a, _ in group]) if "gold" in group[0][1] else None
            if self.dry_check is not None:
                self.dry_check(step, nk)
            for j, a, b in group:
                a["kd_alpha"] = np.array(kd_alpha_at(self.cfg, step), dtype=np.float32)
                a["kd_scale"] = np.array(scale, dtype=np.float32)
                if sft_scale is not None:
                    a["sft_scale"] = np.array(sft_scale, dtype=np.float32)
                self._step[j] = data.trim_prompt(a, b), b.ntokens
        return self._step[k]

    def report(self) -> dict:
        s, self.stats = self.stats, {}
        return {"teacher_seconds": round(s.get("teacher_seconds", 0.0), 4),
                "update_seconds": round(s.get("update_seconds", 0.0), 4)}


class OnPolicySource(KDSource):
    """GKD: a share lambda of micro-batches are the student's rollouts scored by the teacher;
    the rest are `KDSource` batches of the same teacher. `backend.sample` generates with the
    live model; `teacher` is a `Teacher`."""

    kind = "on-policy KD"

    def __init__(self, stream, cfg, store, teacher: Teacher, backend, tokenizer, dry_check=None):
        super().__init__(stream, cfg, store, dry_check)
        self.teacher, self.backend, self.tokenizer = teacher, backend, tokenizer
        self.pad = data.pad_id_of(tokenizer)
        self.recent: list[dict] = []  # the latest rollouts, for --save-rollouts

    def _build(self, j: int) -> tuple[dict, data.Batch]:
        on = on_policy_at(self.cfg.seed, j, self.cfg.on_policy_fraction)
        self.stats["batches"] = self.stats.get("batches", 0) + 1
        if not on:
            a, b = self._corpus_batch(j)
            a["gold"] = np.array(1.0, dtype=np.float32)
            return a, b
        self.stats["on_policy_batches"] = self.stats.get("on_policy_batches", 0) + 1
        return self.rollout_batch(j)

    def rollout_batch(self, j: int) -> tuple[dict, data.Batch]:
        """Micro-batch j's prompts, completed by the student (key from (seed, j)) and scored by
        the teacher at every completion position."""
        cfg, src = self.cfg, self.stream.at(j)
        prompts = [src.tokens[r, : src.prompt_lens[r]].tolist() for r in range(len(src.ids))]
        caps = [max(1, min(cfg.rollout_max_tokens, cfg.max_seq_length - len(p))) for p in prompts]
        tic = time.perf_counter()
        self.backend.train_mode(False)  # sampling from the policy itself: no dropout
        try:
            rolls = self.backend.sample(prompts, caps, cfg.rollout_temperature, cfg.rollout_top_p,
                                        rollout_key(cfg.seed, j))
        finally:
            self.backend.train_mode(True)
        gen_s = time.perf_counter() - tic
        exs = [data.Example(eid, np.asarray(p + r.tokens, np.int32), len(p)) for eid, p, r in zip(src.ids, prompts, rolls)]
        b = data.collate(exs, list(range(len(exs))), self.pad)
        tic = time.perf_counter()
        if getattr(self.store, "cross", False):  # another tokenizer: re-rendered and aligned (`cross.OnlineCrossTeacher`)
            a = {**data.batch_arrays(b), **self.store.rollout_arrays(b, cfg.kd_top_k),
                 "gold": np.array(0.0, dtype=np.float32)}
            self.stats["teacher_seconds"] = self.stats.get("teacher_seconds", 0.0) + time.perf_counter() - tic
            self._count_rollouts(rolls, gen_s)
            if cfg.save_rollouts > 0:
                self._keep(j, prompts, rolls, None)
            return a, b
        sc = self.teacher.score(b.tokens, cfg.kd_top_k, lengths=b.lengths)  # no padding sent to a server
        self.stats["teacher_seconds"] = self.stats.get("teacher_seconds", 0.0) + time.perf_counter() - tic
        self._count_rollouts(rolls, gen_s)
        if cfg.save_rollouts > 0:
            self._keep(j, prompts, rolls, sc)
        a = {**data.batch_arrays(b), "kd_ids": sc.ids, "kd_logits": sc.logprobs,
             "gold": np.array(0.0, dtype=np.float32)}
        return a, b

    def _count_rollouts(self, rolls, gen_s: float) -> None:
        ntok = sum(len(r.tokens) for r in rolls)
        for key, v in (("rollout_seconds", gen_s), ("rollout_tokens", ntok), ("rollouts", len(rolls)),
                       ("rollout_truncated", sum(not r.finished for r in rolls))):
            self.stats[key] = self.stats.get(key, 0) + v

    def _keep(self, j, prompts, rolls, sc: TeacherScores | None) -> None:
        """`sc` None: a teacher of another tokenizer (its token log-probabilities are in its own tokens)."""
        for r, (p, roll) in enumerate(zip(prompts, rolls)):
            lp = sc.token_logprobs[r, len(p) - 1: len(p) - 1 + len(roll.tokens)] if sc is not None else np.zeros(0)
            self.recent.append({"micro": j, "prompt": self.tokenizer.decode(p),
                                "completion": self.tokenizer.decode(roll.tokens), "tokens": len(roll.tokens),
                                "truncated": not roll.finished,
                                "teacher_logprob_mean": round(float(lp.mean()), 4) if len(lp) else None,
                                "teacher_logprob_min": round(float(lp.min()), 4) if len(lp) else None,
                                "teacher_token_logprobs": [round(float(v), 3) for v in lp]})
        self.recent = self.recent[-self.cfg.save_rollouts:]

    def after_validation(self, out, step: int) -> None:
        """--save-rollouts N: the N latest rollouts -> RUN/rollouts.jsonl (one row each, with the iteration)."""
        if self.cfg.save_rollouts <= 0 or not self.recent:
            return
        w = JsonlAppender(out / "rollouts.jsonl")
        try:
            for rec in self.recent[-self.cfg.save_rollouts:]:
                w.write({"iter": step, **rec})
        finally:
            w.close()

    def report(self) -> dict:
        s = self.stats
        row = super().report()
        n, toks, secs = s.get("rollouts", 0), s.get("rollout_tokens", 0), s.get("rollout_seconds", 0.0)
        row.update(on_policy=round(s.get("on_policy_batches", 0) / max(s.get("batches", 0), 1), 4),
                   rollout_tokens=int(toks), rollout_seconds=round(secs, 4),
                   rollout_tokens_per_sec=round(toks / secs, 2) if secs > 0 else None,
                   rollout_mean_len=round(toks / n, 2) if n else None,
                   rollout_truncated=round(s.get("rollout_truncated", 0) / n, 4) if n else None)
        return row


# ----------------------------------------------------------------------------- building one
def check_on_policy_options(cfg, backend_name: str) -> None:
    """One-line refusals of settings on-policy distillation cannot honour."""
    lam = cfg.on_policy_fraction
    if not 0.0 <= lam <= 1.0:
        raise InputError(f"--on-policy-fraction must be in [0, 1], got {lam}")
    if not 0.0 <= cfg.kd_beta <= 1.0:
        raise InputError(f"--kd-beta must be in [0, 1], got {cfg.kd_beta}")
    if cfg.sft_weight < 0:
        raise InputError(f"--sft-weight must be >= 0, got {cfg.sft_weight}")
    if lam == 0.0:
        return
    if backend_name != "mlx":
        raise InputError(f"--on-policy-fraction {lam}: the {backend_name} backend does not generate rollouts inside "
                         "training (only the MLX backend does); use --backend mlx, or --on-policy-fraction 0 for "
                         "off-policy KD")
    if not cfg.kd_teacher:
        raise InputError(f"--on-policy-fraction {lam} needs --kd-teacher MODEL (a teacher that scores the student's "
                         "rollouts as they are made; an offline --kd store only holds the corpus' own tokens)")
    if not cfg.mask_prompt:
        raise InputError("--on-policy-fraction > 0 needs --mask-prompt (rollouts are completions of the prompts)")
    if cfg.rollout_max_tokens < 1:
        raise InputError(f"--rollout-max-tokens must be >= 1, got {cfg.rollout_max_tokens}")
    if cfg.rollout_temperature < 0:
        raise InputError(f"--rollout-temperature must be >= 0, got {cfg.rollout_temperature}")
    if not 0.0 < cfg.rollout_top_p <= 1.0:
        raise InputError(f"--rollout-top-p must be in (0, 1], got {cfg.rollout_top_p}")


def make_source(cfg, backend, stream: data.BatchStream, store, tokenizer, dry_check=None):
    """The run's batch source: SFT, KD (offline/online) or on-policy KD."""
    if store is None:
        return CorpusSource(stream)
    if cfg.on_policy_fraction <= 0.0:
        return KDSource(stream, cfg, store, dry_check)
    teacher = getattr(store, "teacher", None)
    cross = getattr(store, "cross", False)  # another tokenizer: the store scores rollouts itself (rollout_arrays)
    if teacher is None or getattr(teacher, "backend", "mlx") not in ("mlx", "api"):
        raise InputError(f"--on-policy-fraction: the teacher {cfg.kd_teacher} must run on MLX or a vLLM server")
    print(f"on-policy: {cfg.on_policy_fraction:.0%} of micro-batches are student rollouts (<= {cfg.rollout_max_tokens} "
          f"tokens, temperature {cfg.rollout_temperature}, top-p {cfg.rollout_top_p}) scored by {cfg.kd_teacher}; "
          f"KD {cfg.kd_kind}{f' beta {cfg.kd_beta}' if cfg.kd_kind == 'jsd' else ''} with the tail bucket"
          + (f"; another tokenizer: each rollout re-rendered in the teacher's template, {store.mode} alignment"
             if cross else ""), file=sys.stderr)
    if cross:
        return OnPolicySource(stream, cfg, store, None, backend, tokenizer, dry_check)
    teacher.score_vocab = store.vocab_size  # ids beyond the student's rows become empty slots (local or a server)
    return OnPolicySource(stream, cfg, store, teacher, backend, tokenizer, dry_check)
