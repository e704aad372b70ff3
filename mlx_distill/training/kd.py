"""Training's KD hook: open the offline top-M store (`--kd`) or load the online teacher
(`--kd-teacher`, local or a vLLM server), and check it against the student's examples. The
result is the batch source's teacher (`training.sources.KDSource`)."""

import json
import sys
from pathlib import Path

from mlx_distill import data
from mlx_distill.config import TrainConfig
from mlx_distill.io import InputError
from mlx_distill.teacher import align
from mlx_distill.teacher.base import tokenizer_fingerprint, vocab_strings
from mlx_distill.teacher.cross import OnlineCrossTeacher
from mlx_distill.teacher.local import LocalTeacher, OnlineTeacher
from mlx_distill.teacher.store import TopMStore


def student_vocab_size(cfg: TrainConfig, tokenizer) -> int:
    """Embedding rows of the student (config.json), else its tokenizer size."""
    try:
        from mlx_distill.models import resolve_model

        c = json.loads((Path(resolve_model(cfg.model)) / "config.json").read_text())
        v = c.get("vocab_size") or c.get("text_config", {}).get("vocab_size")
        if v:
            return int(v)
    except (OSError, ValueError, InputError):
        pass
    return len(vocab_strings(tokenizer))


def _online(cfg: TrainConfig, examples_by_split: dict, tokenizer, v: int):
    """The online teacher (`--kd-teacher`): same tokenizer -> `OnlineTeacher` (checked here, returned
    with done=True), another -> `OnlineCrossTeacher` (checked by the caller like a store)."""
    if cfg.kd_teacher == "api":
        from mlx_distill.teacher.remote import RemoteTeacher

        teacher = RemoteTeacher.for_training(cfg)
    else:
        teacher = LocalTeacher(cfg.kd_teacher, backend=cfg.backend, flag="--kd-teacher")
    same = tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(teacher.tokenizer)
    if cfg.kd_align == "exact" and not same:
        raise InputError(f"--kd-align exact: the tokenizer of --kd-teacher {cfg.kd_teacher} differs from the "
                         "student's; use --kd-align auto (aligns the two on the shared completion text)")
    if same and cfg.kd_align in ("auto", "exact"):
        print(f"kd: online teacher {cfg.kd_teacher} (K={cfg.kd_top_k}, same tokenizer)", file=sys.stderr)
        src = OnlineTeacher(tokenizer, v, teacher)
        for split, exs in examples_by_split.items():
            src.check(exs, split)
        return src, True
    t_ex = {}
    for split, exs in examples_by_split.items():
        if exs:
            t_ex.update({e.id: e for e in data.load_examples(cfg, teacher.tokenizer, split)})
    src = OnlineCrossTeacher(teacher, t_ex, cfg.kd_top_k, data_label=cfg.data)
    src.vocab_size = v
    print(f"kd: online teacher {cfg.kd_teacher} (K={cfg.kd_top_k}, another tokenizer: the corpus rendered in "
          f"its chat template too, aligned on the completion text)", file=sys.stderr)
    return src, False


def _check_sampled(cfg: TrainConfig, src: TopMStore, tokenizer) -> None:
    """A sampled store (`logits --sampled-k`) trains with `losses.sampled_kd_loss` only: forward KL at
    the temperature it was drawn at, with the teacher's own tokenizer, off-policy."""
    s = src.sampled
    if cfg.kd_kind != "forward":
        raise InputError(f"--kd-kind {cfg.kd_kind} with the sampled store {cfg.kd_dir}: its draws estimate "
                         "E_teacher[...] (forward KL) without bias, but reverse KL and JSD weigh the student's own "
                         "mass on ids the teacher never drew; use --kd-kind forward, or a top-M store")
    if abs(cfg.kd_temperature - float(s["temperature"])) > 1e-9:
        raise InputError(f"--kd-temperature {cfg.kd_temperature}: the sampled store {cfg.kd_dir} was drawn at "
                         f"T={s['temperature']}, and the estimator is unbiased only at that temperature; pass "
                         f"--kd-temperature {s['temperature']} (or re-extract with --sampled-temperature)")
    if cfg.on_policy_fraction > 0:
        raise InputError(f"--on-policy-fraction with the sampled store {cfg.kd_dir}: rollouts need a teacher that "
                         "scores them (--kd-teacher); a store only holds the corpus")
    if src.resolve_mode(tokenizer, cfg.kd_align) != "exact":
        raise InputError(f"the sampled store {cfg.kd_dir} needs the student's tokenizer: across tokenizers the "
                         "draws the student cannot spell would be dropped and the estimate biased; use a top-M "
                         "store (`logits` without --sampled-k) for cross-family KD")


def kd_setup(cfg: TrainConfig, examples_by_split: dict, tokenizer, vocab_size: int | None = None):
    """Open cfg.kd_dir and check it against the student's examples (called by `train`), or
    load the online teacher (cfg.kd_teacher). Coverage is enforced on the train split; other
    splits are planned and reported. The returned source's `alignment_summary()` is the
    train manifest's ``kd_alignment``."""
    if cfg.kd_dir and cfg.kd_teacher:
        raise InputError("give either --kd (offline top-M logits) or --kd-teacher (online), not both")
    if cfg.kd_top_k < 1:
        raise InputError(f"--kd-top-k must be >= 1, got {cfg.kd_top_k}")
    if cfg.kd_align not in align.MODES:
        raise InputError(f"--kd-align must be one of {', '.join(align.MODES)}, got {cfg.kd_align!r}")
    v = vocab_size or student_vocab_size(cfg, tokenizer)
    if cfg.kd_teacher:
        src, done = _online(cfg, examples_by_split, tokenizer, v)
        if done:
            return src
    else:
        src = TopMStore(cfg.kd_dir)
        if src.sampled:
            _check_sampled(cfg, src, tokenizer)
        elif cfg.kd_top_k > src.m:
            raise InputError(f"--kd-top-k {cfg.kd_top_k} > M={src.m} stored in {cfg.kd_dir}; lower --kd-top-k "
                             f"or re-extract with --top-m >= {cfg.kd_top_k}")
    for split, exs in examples_by_split.items():
        rep = src.check(exs, v, tokenizer, cfg.kd_min_coverage if split == "train" else 0.0, where=split,
                        mode=cfg.kd_align)
        print(f"kd {split}: {rep['mode']} alignment, coverage {rep['coverage']:.1%} of {rep['positions']} positions ("
              + ", ".join(f"{c} {n / max(rep['positions'], 1):.1%}" for c, n in rep["classes"].items())
              + f"), {rep['missing_examples']} example(s) without logits"
              + (f", {rep['text_differs']} with another completion text" if rep["text_differs"] else "")
              + (", teacher ids the student cannot spell counted per batch" if isinstance(src, OnlineCrossTeacher) else
                 f", {rep['dropped_teacher_ids']} teacher id(s) dropped ({rep['dropped_fraction']:.3%} of slots)")
              + f" | M={src.m} K={cfg.kd_top_k}", file=sys.stderr)
    return src
