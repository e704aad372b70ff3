"""Which teacher row each student loss position reads: the coverage check and the KD batch arrays.

A `Planner` works over scored rows kept somewhere else (the `ScoredRows` protocol): the top-M
store on disk (`store.TopMStore`) or the rows an online teacher of another tokenizer has just
computed (`cross.OnlineCrossTeacher`). Both hold a planner; neither is the other's base class.

`check` plans, once per example, which teacher row (or span of rows) each student loss position
reads, so serving is array indexing. The alignment mode (``--kd-align``, `teacher.align` for the
classes):

- ``exact``: the student's tokenizer has the teacher's fingerprint (same id -> string table).
  The student's token ids of every scored example must equal the scored ones, else `check`
  refuses, naming the example, the first differing token and what moved (the prompt, the
  completion, or both: the rows were scored on another corpus).
- ``matched`` / ``spans`` / ``uld`` (``auto`` picks ``spans`` when the tokenizers differ):
  alignment on the completion text both sides share (the chat templates may differ). The
  student's completion text must hash to the teacher's (`align.completion_text`; else the
  example is ``text_differs``). Positions whose token spans the same text as a teacher token
  read that teacher row with its ids mapped by their bytes (`align.vocab_map`; ids the student
  cannot spell are dropped into the tail bucket, which cross-tokenizer KD always uses, and
  counted); the rest are spans (the teacher's sequence log-probability of the span's text) or,
  with ``uld``, position pairs compared by sorted probabilities.

In every mode teacher ids >= the student's vocabulary size are dropped and counted (a
152064-row teacher vs a 151936-row student), and `check` refuses when the share of the
student's completion positions with ANY teacher signal is below `min_coverage`.
"""

from typing import Any, Protocol

import numpy as np

from mlx_distill.io import InputError
from mlx_distill.teacher import align
from mlx_distill.teacher.base import first_target, tokenizer_fingerprint, tokens_sha


class ScoredRows(Protocol):
    """What a planner reads: per example id, the teacher's scored tokens, rows and offsets."""

    entries: dict  # id -> {first, n, prompt_len, length, text_sha256 (+ sha256 for exact alignment)}

    def rows(self, example_id: str) -> tuple[np.ndarray, np.ndarray]: ...  # (n, M) ids, (n, M) log-probs

    def token_logprobs(self, example_id: str) -> np.ndarray: ...  # (n,) actual tokens' log-probs

    def scored_tokens(self, example_id: str) -> np.ndarray: ...

    def teacher_ends(self, example_id: str) -> np.ndarray: ...  # byte end offset of every scored token

    def teacher_pieces(self) -> Any: ...  # align.Pieces

    def unknown_logprobs(self, example_id: str) -> np.ndarray | None: ...  # cumulative NaN count, or None


def empty_plan() -> dict:
    z = np.zeros(0, np.int64)
    return {"t": z, "rows": z, "span_end": z, "span_len": z, "span_r0": z, "span_r1": z, "uld_t": z, "uld_rows": z}


def last_in_text(ends: np.ndarray) -> int:
    """Index of the last token that spells part of the text (-1: none)."""
    w = np.nonzero(np.diff(np.concatenate([[0], ends])) > 0)[0]
    return int(w[-1]) if len(w) else -1


def alignment_summary(reports: dict) -> dict:
    """{split: {mode, positions, classes, coverage}} for the train run's manifest (`kd_alignment`)."""
    return {s: {"mode": r["mode"], "positions": r["positions"], "classes": dict(r["classes"]),
                "coverage": r["coverage"]} for s, r in reports.items()}


# the fix for each cause of low coverage, most positions lost first in the message
FIXES = {
    "not_extracted": "{n} example(s) of this split were never extracted (their ids are not in the store: "
                     "`logits --limit`, an interrupted run, or a corpus that grew); add them with "
                     "`python -m mlx_distill logits --resume --teacher {teacher} --data {data} --out {dir}`",
    "other_corpus": "none of the {n} example ids of this split is in the store, which holds {stored} other "
                    "example(s): it was made from another corpus (its --data: {data}); give the --kd store made "
                    "from this corpus, or extract one: `python -m mlx_distill logits --teacher {teacher} "
                    "--data THIS_CORPUS --out NEW_DIR`",
    "text_differs": "{n} example(s) have another completion text than the teacher scored (the tokenizers "
                    "differ, so the completions are compared as text, chat-template markers left out: the "
                    "record changed, or --think-in-content / the template rewrites the assistant turn on one "
                    "side only, or --no-mask-prompt on one side: across tokenizers the completion is what "
                    "--mask-prompt leaves in the loss); render them alike, or re-extract",
    "token_boundaries": "the tokenizers differ (--kd-align {mode}): positions whose tokens do not line up with "
                        "the teacher's get no teacher signal{hint}; use a student that shares the teacher's "
                        "tokenizer (same family) for full coverage",
    "unscored_range": "same tokenizer and tokens, but the student trains on positions the teacher did not "
                      "score (e.g. --no-mask-prompt here, not in `logits`); use the same --mask-prompt as "
                      "`logits`, or re-extract with it",
}
OTHER_TEXT = ("; as no example's completion text matches under the same id, the store was probably made from "
              "another corpus (its --data: {data}): give the --kd store made from this corpus")


class Planned:
    """What a KD source served through a `Planner` reports: the resolved alignment mode, the
    per-split reports and the manifest's summary. The store (`store.TopMStore`) and the online
    cross-family teacher (`cross.OnlineCrossTeacher`) each hold a planner; they share this small
    interface, not an ancestor that holds data."""

    planner: "Planner"

    @property
    def mode(self) -> str:
        return self.planner.mode

    @property
    def cross(self) -> bool:
        return self.planner.cross

    @property
    def report(self) -> dict:
        return self.planner.report

    @property
    def reports(self) -> dict:
        return self.planner.reports

    @property
    def student_vocab(self) -> int | None:
        return self.planner.student_vocab

    def resolve_mode(self, tokenizer, mode: str = "auto") -> str:
        return self.planner.resolve_mode(tokenizer, mode)

    def alignment_summary(self) -> dict:
        return alignment_summary(self.planner.reports)


class Planner:
    """Plans and serves KD arrays over `source` (a `ScoredRows`) holding top-`m` rows.

    `label` names the rows in messages (the store folder, or the online teacher); `fix` fills the
    messages' commands ({teacher, data, dir}); `tokenizer_fingerprint` is the teacher's."""

    def __init__(self, source: ScoredRows, m: int, tokenizer_fingerprint: str, label: str, fix: dict,
                 count_dropped: bool = True):
        self.source, self.m, self.fingerprint = source, int(m), tokenizer_fingerprint
        self.label, self.fix, self.count_dropped = str(label), fix, count_dropped
        self.plans: dict[str, dict] = {}  # id -> arrays (see check / plan_cross)
        self.remap: np.ndarray | None = None  # teacher id -> student id (-1: none); None = identity
        self.student_vocab: int | None = None
        self.mode = ""  # the resolved --kd-align of the last check
        self.cross = False  # a cross-tokenizer mode: the KD loss uses the tail bucket
        self.t_pieces = None
        self.report: dict = {}
        self.reports: dict = {}  # split -> report

    # -------------------------------------------------------------- checking
    def resolve_mode(self, tokenizer, mode: str = "auto") -> str:
        """--kd-align -> the mode used with this student tokenizer (refuses `exact` across tokenizers)."""
        if mode not in align.MODES:
            raise InputError(f"--kd-align must be one of {', '.join(align.MODES)}, got {mode!r}")
        same = tokenizer_fingerprint(tokenizer) == self.fingerprint
        if mode == "exact" and not same:
            raise InputError(f"--kd-align exact: the student's tokenizer differs from the teacher's ({self.label}); "
                             "use --kd-align auto (aligns the two tokenizers on the shared completion text)")
        return ("exact" if same else "spans") if mode == "auto" else mode

    def check(self, examples: list, student_vocab_size: int, tokenizer, min_coverage: float = 0.95,
              where: str = "train", mode: str = "auto") -> dict:
        """Plan how every example's loss positions read the rows; report and enforce coverage."""
        self.student_vocab = int(student_vocab_size)
        mode = self.mode = self.resolve_mode(tokenizer, mode)
        self.cross = mode != "exact"
        if self.cross and self.remap is None:
            self.t_pieces = self.source.teacher_pieces()
            self.remap = align.vocab_map(self.t_pieces, tokenizer)
        classes = dict.fromkeys(("exact", "matched", "spans", "uld", "none"), 0)
        if mode != "uld":
            classes.pop("uld")
        # completion positions left without a teacher, by cause (each cause has its own fix)
        lost = {"not_extracted": 0, "text_differs": 0, "unscored_range": 0, "token_boundaries": 0}
        n = {"total": 0, "missing": 0, "text_differs": 0}
        mismatched, eot_pairs = [], {}
        for ex in examples:
            self._plan_one(ex, tokenizer, mode, classes, lost, n, mismatched, eot_pairs)
        if mismatched:
            raise InputError(self._mismatch_message(mismatched, len(examples), where, tokenizer))
        if eot_pairs:  # the teacher's end-of-turn marker stands for the student's (another name, another id)
            for a, b in eot_pairs.items():
                if self.remap[a] < 0:
                    self.remap[a] = b
        if n["missing"] and n["missing"] == len(examples) and self.source.entries:  # not one id in common
            lost["other_corpus"] = lost.pop("not_extracted")
        total = n["total"]
        covered = sum(v for k, v in classes.items() if k != "none")
        classes["none"] = total - covered
        dropped, slots = self._count_dropped(examples) if self.count_dropped else (0, 0)
        cov = covered / total if total else 1.0
        self.report = rep = {
            "split": where, "mode": mode, "examples": len(examples),
            "missing_examples": n["missing"], "text_differs": n["text_differs"], "positions": total,
            "covered_positions": covered, "coverage": round(cov, 4), "classes": classes,
            "dropped_teacher_ids": dropped, "teacher_slots": slots,
            "dropped_fraction": round(dropped / slots, 6) if slots else 0.0, "uncovered_by_cause": lost}
        self.reports[where] = rep
        if cov < min_coverage:
            raise InputError(self._coverage_message(rep, lost, min_coverage, len(examples)))
        return rep

    def _plan_one(self, ex, tokenizer, mode, classes, lost, n, mismatched, eot_pairs) -> None:
        want = np.arange(first_target(ex.prompt_len), len(ex.tokens) - 1)
        n["total"] += len(want)
        ent = self.source.entries.get(ex.id)
        if ent is None:
            n["missing"] += 1
            lost["not_extracted"] += len(want)
            self.plans[ex.id] = empty_plan()
            return
        if not self.cross:
            if ent["sha256"] != tokens_sha(ex.tokens):
                mismatched.append(ex)
                return
            t = want[(want >= ent["first"]) & (want < ent["first"] + ent["n"])]
            lost["unscored_range"] += len(want) - len(t)
            self.plans[ex.id] = {**empty_plan(), "t": t.astype(np.int64), "rows": (t - ent["first"]).astype(np.int64)}
            classes["exact"] += len(t)
            return
        plan = self.plan_cross(ex, ent, want, tokenizer, mode, eot_pairs)
        if plan is None:
            n["text_differs"] += 1
            lost["text_differs"] += len(want)
            self.plans[ex.id] = empty_plan()
            return
        self.plans[ex.id] = plan
        n_sig = len(plan["t"]) + int(plan["span_len"].sum()) + len(plan["uld_t"])
        classes["matched"] += len(plan["t"])
        classes["spans"] += int(plan["span_len"].sum())
        if mode == "uld":
            classes["uld"] += len(plan["uld_t"])
        lost["token_boundaries"] += len(want) - n_sig

    def plan_cross(self, ex, ent, want, tokenizer, mode, eot_pairs, s_view=None):
        """Align one example on its completion text; None when the texts differ. `s_view`:
        the student's (text, ends) when already known (a rollout cut to valid UTF-8)."""
        if not len(want):
            return empty_plan()
        s_plen, t_plen = int(ex.prompt_len), int(ent["prompt_len"])
        s_text, s_ends = s_view or align.completion_text(tokenizer, ex.tokens[s_plen:])
        if align.text_sha(s_text) != ent.get("text_sha256"):
            return None
        t_ends = self.source.teacher_ends(ex.id)[t_plen:]
        al = align.align(t_ends, s_ends)
        first, n = int(ent["first"]), int(ent["n"])
        k = np.arange(len(al.cls))
        pos = s_plen + k - 1  # the student position predicting completion token k
        ok = (pos >= want[0]) & (pos < want[-1] + 1) if len(want) else np.zeros(len(k), bool)

        def row(i):  # teacher row predicting teacher completion token i (-1: not scored)
            r = t_plen + np.asarray(i, np.int64) - 1 - first
            return np.where((r >= 0) & (r < n), r, -1)

        m = ok & (al.cls == align.MATCHED)
        r = row(al.partner[m])
        t, rows = pos[m][r >= 0], r[r >= 0]
        # end-of-turn: matched pairs of special tokens (after the text) name each other's marker
        if not eot_pairs:
            ti = self.source.scored_tokens(ex.id)[t_plen + al.partner[m]]
            si = ex.tokens[s_plen + k[m]]
            both = self.t_pieces.special[ti] & align.special_mask(tokenizer)[si]
            eot_pairs.update(zip(ti[both].tolist(), si[both].tolist()))
        plan = {**empty_plan(), "t": t.astype(np.int64), "rows": rows.astype(np.int64)}
        if mode == "matched" or not len(al.s0):
            return plan
        s_first, s_last = s_plen + al.s0 - 1, s_plen + al.s1 - 1
        r0, r1 = row(al.t0), row(al.t1)
        keep = (s_first >= want[0]) & (s_last <= want[-1]) & (r0 >= 0) & (r1 >= 0)
        if mode == "spans":
            unknown = self.source.unknown_logprobs(ex.id)  # a teacher that gave no token log-probability there
            if unknown is not None:
                keep &= (unknown[np.maximum(r1, 0) + 1] - unknown[np.maximum(r0, 0)]) == 0
            s_first, s_last, r0, r1 = s_first[keep], s_last[keep], r0[keep], r1[keep]
            plan.update(span_end=s_last.astype(np.int64), span_len=(s_last - s_first + 1).astype(np.int64),
                        span_r0=r0.astype(np.int64), span_r1=r1.astype(np.int64))
            return plan
        # uld: the span's positions paired in order with the teacher's (ULD pairs by position)
        s_first, s_last, r0, r1 = s_first[keep], s_last[keep], r0[keep], r1[keep]
        npair = np.minimum(s_last - s_first, r1 - r0) + 1
        off = np.arange(npair.sum()) - np.repeat(np.cumsum(npair) - npair, npair)
        plan.update(uld_t=(np.repeat(s_first, npair) + off).astype(np.int64),
                    uld_rows=(np.repeat(r0, npair) + off).astype(np.int64))
        return plan

    # -------------------------------------------------------------- messages
    def _coverage_message(self, rep: dict, lost: dict, min_coverage: float, n_examples: int) -> str:
        causes = [c for c in sorted(lost, key=lost.get, reverse=True) if lost[c]]
        hint = {"matched": " (--kd-align spans gives the rest the span signal)",
                "uld": " (ULD pairs a span's positions in order; the extra ones on the longer side have none)"}
        fix = {"teacher": "TEACHER", "data": "CORPUS", "dir": self.label, **self.fix}
        fixes = []
        for c in causes:
            n = rep["missing_examples"] if c in ("not_extracted", "other_corpus") else rep["text_differs"]
            msg = FIXES[c].format(n=n, stored=len(self.source.entries), mode=rep["mode"],
                                  hint=hint.get(rep["mode"], ""), **fix)
            if c == "text_differs" and rep["text_differs"] == n_examples - rep["missing_examples"]:
                msg += OTHER_TEXT.format(**fix)
            fixes.append(f"[{lost[c]} positions] " + msg)
        by_class = ", ".join(f"{k} {v}" for k, v in rep["classes"].items())
        return (f"{self.label}: teacher logits cover {rep['coverage']:.1%} of the {rep['positions']} {rep['split']} "
                f"completion positions < --kd-min-coverage {min_coverage:.0%} ({rep['mode']} alignment: "
                f"{'same' if rep['mode'] == 'exact' else 'different'} tokenizer as the teacher; {by_class}). Why: "
                + "; ".join(fixes) + ". Or lower --kd-min-coverage to train with what is covered "
                "(the KD loss is averaged over the covered positions only).")

    def _moved(self, ex, tokenizer) -> tuple[bool, bool]:
        """(the prompt differs, the completion text differs) between `ex` and what the teacher scored."""
        ent = self.source.entries[ex.id]
        scored = self.source.scored_tokens(ex.id)
        plen = int(ent["prompt_len"])
        prompt = not np.array_equal(scored[:plen], ex.tokens[: ex.prompt_len])
        text, _ = align.completion_text(tokenizer, ex.tokens[ex.prompt_len:])
        return prompt, align.text_sha(text) != ent.get("text_sha256")

    def _mismatch_message(self, mismatched: list, n_examples: int, where: str, tokenizer) -> str:
        """Same tokenizer, different token ids: say whether the prompt, the completion or both moved
        (both, for most of them: the rows were scored on another corpus under the same ids)."""
        moved = [self._moved(e, tokenizer) for e in mismatched]
        other = [e for e, (p, c) in zip(mismatched, moved) if p and c]
        fix = {"teacher": "TEACHER", "data": "CORPUS", **self.fix}
        if len(other) * 2 >= len(mismatched):
            return (f"{self.label}: made from another corpus than the student's: {len(other)} of {n_examples} "
                    f"{where} example(s) (e.g. {other[0].id!r}) share an id with the store but neither their prompt "
                    f"nor their completion text (the store's --data: {fix['data']}); give the --kd store made from "
                    f"this corpus, or extract one: `python -m mlx_distill logits --teacher {fix['teacher']} "
                    "--data THIS_CORPUS --out NEW_DIR`")
        ex = mismatched[0]
        scored = self.source.scored_tokens(ex.id)
        n = min(len(scored), len(ex.tokens))
        diff = next((i for i in range(n) if scored[i] != ex.tokens[i]), n)
        a = int(ex.tokens[diff]) if diff < len(ex.tokens) else "end"
        b = int(scored[diff]) if diff < len(scored) else "end"
        if moved[0][0] and not moved[0][1]:
            why = ("the prompt differs: render with the same --prompt-template, --system-prompt and chat template "
                   "as `logits` did")
        else:
            why = ("the completion differs: the record's text, or how it is rendered (--think-in-content, the "
                   "chat template), changed since `logits` scored it")
        return (f"{self.label}: example {ex.id!r}: same tokenizer as the teacher, but the student's token ids "
                f"differ from the ones the teacher scored (first difference at token {diff}: student {a}, scored "
                f"{b}; {len(mismatched)} of {n_examples} {where} example(s) differ); {why}, or re-extract into a "
                "new --out.")

    # -------------------------------------------------------------- serving
    def map_ids(self, ids: np.ndarray) -> np.ndarray:
        """Teacher ids -> student ids; -1 where the student has no such token."""
        ids = ids.astype(np.int64)
        if self.remap is not None:
            ok = ids < len(self.remap)
            ids = np.where(ok, self.remap[np.minimum(ids, len(self.remap) - 1)], -1)
        return np.where(ids < self.student_vocab, ids, -1)

    def _count_dropped(self, examples) -> tuple[int, int]:
        dropped = slots = 0
        for ex in examples:
            p = self.plans.get(ex.id)
            if p is None or not len(p["t"]):
                continue
            ids, _ = self.source.rows(ex.id)
            mapped = self.map_ids(ids[p["rows"]])
            dropped += int(np.sum(mapped < 0))
            slots += mapped.size
        return dropped, slots

    def batch_arrays(self, batch, top_k: int | None = None) -> dict:
        """kd_ids (B, L-1, K) int32 and kd_logits (B, L-1, K) float32 aligned with
        `data.loss_mask(batch)`: position t of row b is the teacher's top-K (after dropping
        ids the student lacks) for predicting token t+1; slots without a teacher token hold
        id 0 and logit -inf (an empty slot for `kd_loss`). Across tokenizers also, as
        `losses.kd_loss` reads them: ``spans``: kd_span_logp, kd_span_len (at each span's last
        position) and kd_span_in (B, L-1); ``uld``: kd_uld (B, L-1), its positions holding the
        teacher's sorted top-K log-probabilities with id -1."""
        sampled = bool(getattr(self.source, "sampled", None))  # a sampled store: every drawn id, with counts
        k = self.m if top_k is None or sampled else int(top_k)
        if k > self.m:
            raise InputError(f"--kd-top-k {k} > M={self.m} stored in {self.label}; lower --kd-top-k or re-extract "
                             f"with --top-m >= {k}")
        if self.student_vocab is None:
            raise RuntimeError("check(...) must run before batch_arrays")
        B, L = batch.tokens.shape
        out = {"kd_ids": np.zeros((B, L - 1, k), np.int32), "kd_logits": np.full((B, L - 1, k), -np.inf, np.float32)}
        if sampled:  # `losses.sampled_kd_loss`: kd_logits hold log p_T of each drawn id
            out["kd_counts"] = np.zeros((B, L - 1, k), np.float32)
        if self.mode == "spans":
            out.update(kd_span_logp=np.zeros((B, L - 1), np.float32), kd_span_len=np.zeros((B, L - 1), np.int32),
                       kd_span_in=np.zeros((B, L - 1), np.float32))
        if self.mode == "uld":
            out["kd_uld"] = np.zeros((B, L - 1), np.float32)
        for r, eid in enumerate(batch.ids):
            if eid not in self.plans:
                raise RuntimeError(f"example {eid!r} was not passed to check")
            self._serve_row(out, r, eid, self.plans[eid], batch.lengths[r] - 1, k)
        return out

    def _serve_row(self, out: dict, r: int, eid: str, p: dict, lim: int, k: int) -> None:
        t, rows = p["t"], p["rows"]
        t_ok = t < lim
        t, rows = t[t_ok], rows[t_ok]
        if len(t):
            ids, lps = self.source.rows(eid)
            ids, lps = self.map_ids(ids[rows]), lps[rows].astype(np.float32)
            lps = np.where(ids >= 0, lps, -np.inf)
            order = np.argsort(-lps, axis=-1, kind="stable")[:, :k]  # slots are sorted; re-sort after drops
            out["kd_ids"][r, t] = np.maximum(np.take_along_axis(ids, order, -1), 0)
            out["kd_logits"][r, t] = np.take_along_axis(lps, order, -1)
            if "kd_counts" in out:
                c = np.where(ids >= 0, self.source.counts(eid)[rows], 0)
                out["kd_counts"][r, t] = np.take_along_axis(c, order, -1)
        if self.mode == "spans" and len(p["span_end"]):
            # the teacher's sequence log-probability of each span's text: its tokens' sum
            act = self.source.token_logprobs(eid).astype(np.float64)
            cs = np.concatenate([[0.0], np.cumsum(act)])
            keep = p["span_end"] < lim
            e, n = p["span_end"][keep], p["span_len"][keep]
            lp = (cs[p["span_r1"][keep] + 1] - cs[p["span_r0"][keep]]).astype(np.float32)
            keep = np.isfinite(lp)
            e, n, lp = e[keep], n[keep], lp[keep]
            out["kd_span_logp"][r, e], out["kd_span_len"][r, e] = lp, n
            inside = np.repeat(e - n + 1, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
            out["kd_span_in"][r, inside] = 1.0
        if self.mode == "uld" and len(p["uld_t"]):
            keep = p["uld_t"] < lim
            ut, ur = p["uld_t"][keep], p["uld_rows"][keep]
            _, lps = self.source.rows(eid)
            out["kd_ids"][r, ut] = -1
            out["kd_logits"][r, ut] = lps[ur, :k].astype(np.float32)  # stored sorted: the top-K as they are
            out["kd_uld"][r, ut] = 1.0
