"""`python -m mlx_distill train`: one training loop; the loss (SFT, or SFT + top-K KD) is an argument.

    python -m mlx_distill train --model smollm2 --data corpora/demo --out runs/demo --iters 40

Validation loss every --val-every steps (and at step 0) on a fixed subset spread over the
lengths of the validation split (`data.spread_subset`; the whole split by default up to 256
examples), early stopping after --patience validations without an improvement of at least
--min-delta, the best adapter kept as ``adapters.safetensors``. With ``--select-by accuracy``
the model being trained also generates greedily on --val-accuracy-n validation problems every
--val-accuracy-every steps and the adapter with the best task accuracy is kept (ties: lower
validation loss; see `mlx_distill.training.selection`).

``--resume`` continues from ``checkpoints/last`` (or ``last.old``, when a crash fell inside the
folder swap) with the optimizer state, schedule position, RNG and data position, so the curve
continues as if the run had never stopped. It refuses, naming it, every option that would
change the curve (all but `RESUME_MAY_CHANGE`) and data files whose sha256 differs from the
manifest written when the run started. ``--iters`` may only be raised, with ``--extend``: the
learning-rate decay still ends at the original ``--iters`` (``decay_iters``) and the extra
steps run at the final rate. SIGINT (Ctrl-C) and SIGTERM (a job scheduler's stop), whatever
disposition the process inherited, finish the current optimizer step (never inside gradient
accumulation), write the checkpoint there, record the run as "interrupted" in manifest.json
and exit 130 / 143 (`mlx_distill.interrupts`); a second signal stops at once, and the run
resumes from its last checkpoint. A checkpoint file that cannot be read falls back to
``last.old`` when that folder is there, else one error line says how to start over. Off a
terminal a progress line is printed at least every 10 s (`progress.Heartbeat`), also while the
model loads, compiles or validates. Every file is written atomically.

Run folder::

    adapters.safetensors   best adapter (mlx-lm format; `mlx_lm generate --adapter-path RUN`)
    adapter_config.json    mlx-lm adapter config (+ the data it was trained on)
    config.yaml            the resolved TrainConfig
    metrics.jsonl          one row per report/validation (see README)
    manifest.json          versions, data hashes, counts, best iteration, stop reason
    checkpoints/last/      resumable state (adapter, optimizer, RNG, loop position)
"""

import dataclasses
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlx_distill import blas, config, data

from mlx_distill.backends.base import checkpoint_fix
from mlx_distill.training import preflight, selection, sources, trackers
from mlx_distill.config import TrainConfig
from mlx_distill.interrupts import Interrupted, Interrupts
from mlx_distill.io import (InputError, JsonlAppender, atomic_write_json, read_complete_dir, read_json, read_jsonl,
                            sha256_file, writable_dir, write_jsonl, write_manifest)
from mlx_distill.progress import Heartbeat
from mlx_distill.training.objectives import fold_step, kd_alpha_at, kd_objective, sft_objective, window_parts

# The only options --resume lets change: where and how often things are written, how the same
# numbers are computed, and a refusal threshold. Every other TrainConfig field (present or
# added later) shapes the curve or the kept adapter and must match the run's config.yaml.
# `data` is a path: the data is compared by the sha256 of its files instead (manifest.json).
# `iters` may only be raised, with --extend (see `check_resume`).
RESUME_MAY_CHANGE = ("out", "resume", "extend", "data", "backend", "compile", "grad_checkpoint", "report_every",
                     "save_every", "kd_min_coverage", "save_rollouts", "report_to", "preflight", "loss_chunk")


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches consumed (the data position)
    best_val: float = math.inf  # validation loss of the kept adapter
    best_iter: int = -1
    best_acc: float = -1.0  # --select-by accuracy: accuracy of the kept adapter
    bad_vals: int = 0
    trained_tokens: int = 0
    stopped: str = ""
    kd_dry_steps: int = 0  # consecutive steps whose batches carried no teacher target (see kd_dry_check)
    # the open report window, so a checkpoint mid-window resumes it exactly
    win_loss: float = 0.0
    win_tokens: int = 0
    win_time: float = 0.0
    win_parts: dict = None
    source: dict = None  # the batch source's open report window (`sources.CorpusSource.state_dict`)

    def __post_init__(self):
        self.win_parts = self.win_parts or {}
        self.source = self.source or {}


# ----------------------------------------------------------------------------- progress
class Reporter:
    """A rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, start: int, quiet: bool = False):
        self.quiet = quiet
        self.live = sys.stdout.isatty() and not quiet
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"))
            self.task = self.progress.add_task("", total=total, completed=start)

    def __enter__(self):
        if self.live:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.progress.__exit__(*exc)

    def advance(self, text: str = ""):
        if self.live:
            self.progress.update(self.task, advance=1, description=text)

    def line(self, text: str):
        if self.quiet:
            return
        if self.live:
            self.progress.console.print(text)
        else:
            print(text, flush=True)


def fmt_row(row: dict) -> str:
    parts = [f"iter {row['iter']:>5}"]
    for k, f in (("train_loss", "{:.4f}"), ("val_loss", "{:.4f}"), ("val_accuracy", "{:.3f}"), ("sft_loss", "{:.4f}"),
                 ("kd_loss", "{:.4f}"), ("hidden_loss", "{:.4f}"),
                 ("kd_coverage", "{:.2f}"), ("on_policy", "{:.2f}"), ("rollout_tokens_per_sec", "{:.1f}"),
                 ("rollout_truncated", "{:.2f}"), ("learning_rate", "{:.2e}"), ("tokens_per_sec", "{:.1f}"), ("peak_memory_gb", "{:.2f}")):
        if row.get(k) is not None:
            parts.append(f"{k} " + f.format(row[k]))
    return " | ".join(parts)


# ----------------------------------------------------------------------------- the loop
def _check_options(cfg: TrainConfig) -> None:
    if cfg.val_every < 1:
        raise InputError(f"--val-every must be >= 1, got {cfg.val_every} (validation picks the kept adapter and "
                         "drives early stopping; to validate only at the end, pass --val-every equal to --iters)")
    if cfg.select_by == "accuracy" and cfg.val_accuracy_every > 0 and cfg.val_accuracy_every % cfg.val_every:
        raise InputError(f"--val-accuracy-every {cfg.val_accuracy_every} must be a multiple of --val-every "
                         f"{cfg.val_every} (accuracy is measured at loss validations)")
    if cfg.extend and not cfg.resume:
        raise InputError("--extend continues a finished run: pass it with --resume and a raised --iters")
    trackers.require(cfg.report_to)  # --report-to names an installed tracker, before any model is loaded


# Reverse KL on the student's own samples with no SFT term is mode-seeking with nothing to anchor
# it: with full fine-tuning of the tiny students of tests/test_onpolicy.py, lr 3e-3 spiked (the
# student learns to end its rollouts early, where the teacher agrees) while at 1e-3 every seed fell
# steadily and beat off-policy KD (README, on-policy distillation). Above this rate `train` warns.
REVERSE_KL_STABLE_LR = 1e-3


def _warn_unstable_rate(cfg: TrainConfig) -> None:
    reverse = cfg.kd_kind == "reverse" or (cfg.kd_kind == "jsd" and cfg.kd_beta >= 1.0)
    if (cfg.kd_dir or cfg.kd_teacher) and reverse and cfg.sft_weight == 0 and cfg.learning_rate > REVERSE_KL_STABLE_LR:
        print(f"warning: reverse KL with no SFT term (--sft-weight 0) at --learning-rate {cfg.learning_rate:g}: above "
              f"{REVERSE_KL_STABLE_LR:g} such runs were seen to spike (README, on-policy distillation); use a rate "
              f"<= {REVERSE_KL_STABLE_LR:g} or keep an SFT term", file=sys.stderr, flush=True)


def check_resume(cfg: TrainConfig, saved: dict, state: dict, where: Path) -> None:
    """Refuse a --resume that would not continue the same curve, naming each changed option;
    with --extend, set ``cfg.decay_iters`` so the schedule stays the run's own."""
    defaults = config.to_dict(TrainConfig())
    saved = {**defaults, **saved}  # a field added after the run was written had its default
    saved_decay = saved["decay_iters"] or saved["iters"]
    diff = [k for k in config.to_dict(cfg) if k not in RESUME_MAY_CHANGE + ("iters", "decay_iters")
            and saved.get(k) != getattr(cfg, k)]
    hint = ""
    if cfg.extend:
        if cfg.iters <= saved["iters"]:
            raise InputError(f"{where}: --extend needs --iters above the run's {saved['iters']} (got {cfg.iters})")
        cfg.decay_iters = cfg.decay_iters or saved_decay
    elif cfg.iters != saved["iters"]:
        diff.insert(0, "iters")
        hint = " (the learning-rate decay spans --iters: to train a run further, pass --extend as well)"
    if (cfg.decay_iters or cfg.iters) != saved_decay and "iters" not in diff:
        diff.append("decay_iters")
    if diff:
        raise InputError(f"{where}: --resume with changed option(s) "
                         + ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in diff)
                         + f"; these change the curve: resume with the run's values or start a new --out{hint}")
    stopped = state.get("stopped") or ""
    if stopped and stopped.startswith("early stop") and cfg.extend:
        raise InputError(f"{where}: this run stopped early ({stopped}); --extend would stop again at its next "
                         "validation. Start a new --out (e.g. with a larger --patience)")
    if stopped and not cfg.extend:
        raise InputError(f"{where}: this run has already finished ({stopped}); --resume has nothing to do. "
                         f"To train it further pass --extend with --iters above {saved['iters']}")


def _check_run_folder(cfg: TrainConfig, out: Path) -> None:
    ckpt = out / "checkpoints" / "last"
    if cfg.resume:
        if not ckpt.is_dir() and not ckpt.with_name("last.old").is_dir():
            raise InputError(f"{out}: --resume given but there is no checkpoint in {ckpt} (the run stopped before "
                             f"its first one); {checkpoint_fix(ckpt).split(': ', 1)[1]}")
        # a damaged state.json: last.old when it is whole, else one error line (`io.read_complete_dir`)
        state = read_complete_dir(ckpt, lambda found: read_json(found / "state.json"), "checkpoint",
                                  checkpoint_fix(ckpt))
        check_resume(cfg, config.load_yaml(out / "config.yaml"), state, out / "config.yaml")
    elif (out / "metrics.jsonl").exists():
        raise InputError(f"{out}: this run folder already holds a run; pass --resume to continue it "
                         "or choose another --out")


def _check_resume_data(out: Path, manifest_extra: dict) -> None:
    """The data (and prompt template) must be the bytes the run started with, wherever they now are."""
    path = out / "manifest.json"
    if not path.is_file():  # a run written before start manifests existed, killed before its end
        print(f"warning: {path} is missing: cannot check that the data is unchanged", file=sys.stderr)
        return
    man = read_json(path)
    for split, now in manifest_extra["data_files"].items():
        then = man.get("data_files", {}).get(split)
        if then and then.get("sha256") != now["sha256"]:
            raise InputError(f"{now['path']}: the {split} data changed since the run started (sha256 "
                             f"{then['sha256'][:12]}... -> {now['sha256'][:12]}...; it was {then.get('path')}); "
                             "resume needs the same data: restore it or start a new --out")
    then = man.get("prompt_template_sha256")
    if then and then != manifest_extra.get("prompt_template_sha256"):
        raise InputError(f"{manifest_extra.get('prompt_template')}: the prompt template changed since the run "
                         "started; resume needs the same template: restore it or start a new --out")


class _NoMetrics:
    """The metrics writer of a rank other than 0: rank 0 alone writes the run folder."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- set-up
@dataclass
class _Run:
    """What the loop works with: set up once (`_open`, `_load`, `_open_run_folder`)."""

    cfg: TrainConfig
    out: Path
    backend: Any
    quiet: bool
    beat: Any = None  # progress.Heartbeat: a line at least every ~10 s off a terminal
    tokenizer: Any = None
    train_ex: list = None
    val_ex: list = None
    reports: dict = None
    counts: dict = None
    kd_store: Any = None
    train_objective: Any = None
    val_objective: Any = None
    stream: Any = None
    val_collated: list = None
    val_batches: list = None
    accuracy: Any = None  # --select-by accuracy: one call = one accuracy validation (`selection.AccuracyValidator`)
    manifest_extra: dict = None
    source: Any = None
    metrics: Any = None
    st: LoopState = None
    kd_warned: bool = False

    @property
    def dist(self):
        return self.backend.dist

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints" / "last"

    def phase(self, what: str) -> None:
        if self.beat is not None:
            self.beat.update(phase=what)


def _open(cfg: TrainConfig) -> Any:
    """Check the options and the run folder, join the ranks; the backend, nothing loaded yet."""
    from mlx_distill.backends import get_backend

    out = Path(cfg.out)
    _check_options(cfg)
    backend = get_backend(cfg)  # under torchrun / mlx.launch: joins the group of ranks
    if cfg.kd_hidden > 0:  # before any model is loaded: --kd-hidden needs a local MLX --kd-teacher
        from mlx_distill.training.hidden import check_options as check_hidden_options

        check_hidden_options(cfg, backend.name)
    # rank 0 alone reads and writes the run folder (`mlx_distill.backends.distributed`): the other ranks,
    # maybe on other machines, get the resumed state from it and write nothing
    if backend.dist.is_main:
        _check_run_folder(cfg, out)
        writable_dir(out)  # a read-only or full --out: one error line before any work
    cfg.decay_iters = backend.dist.broadcast_json(cfg.decay_iters)  # --extend: set by rank 0's resume check
    sources.check_on_policy_options(cfg, backend.name)
    _warn_unstable_rate(cfg)
    return backend


def _load(r: _Run) -> None:
    """The model, the data, the preflight, the teacher and the objectives."""
    cfg, backend = r.cfg, r.backend
    r.phase("loading the model")
    model, r.tokenizer = backend.load()
    r.phase("loading the data")
    r.reports = {s: data.LoadReport(path="") for s in ("train", "valid")}
    r.train_ex = data.load_examples(cfg, r.tokenizer, "train", r.reports["train"])
    r.val_ex = data.load_examples(cfg, r.tokenizer, "valid", r.reports["valid"])
    for split, rep in r.reports.items():
        if rep.skipped_long:
            print(f"{split}: skipped {rep.skipped_long} example(s) longer than --max-seq-length {cfg.max_seq_length} "
                  f"(longest {rep.longest} tokens); they are never truncated", file=sys.stderr)
    r.phase("preparing the model")
    backend.prepare()
    backend.init_optimizer()
    r.counts = backend.parameter_counts()
    preflight.run(cfg, backend, r.train_ex, quiet=r.quiet)  # the memory estimate vs the device: refuses when above
    if cfg.kd_dir or cfg.kd_teacher:
        from mlx_distill.training.kd import kd_setup

        r.phase("loading the teacher")
        r.kd_store = kd_setup(cfg, {"train": r.train_ex, "valid": r.val_ex}, r.tokenizer)
        hidden_kd = None
        if cfg.kd_hidden > 0:  # feature KD: the teacher's block outputs join the batches (`training.hidden`)
            from mlx_distill.training import hidden

            r.kd_store, hidden_kd = hidden.setup(cfg, backend, r.kd_store)
        r.train_objective = kd_objective(backend.forward, cfg, tail=getattr(r.kd_store, "cross", False), split=True,
                                         hidden=hidden_kd)
    else:
        r.train_objective = sft_objective(backend.forward, split=True)  # split: --loss-chunk (backend's choice)
    r.val_objective = sft_objective(backend.forward, split=True)  # early stopping watches the data's own cross-entropy
    pad = data.pad_id_of(r.tokenizer)
    r.stream = data.BatchStream(r.train_ex, cfg.batch_size, cfg.seed, pad)
    r.val_collated = list(data.eval_batches(r.val_ex, cfg.batch_size, pad, cfg.val_batches))
    r.val_batches = [data.trim_prompt(data.batch_arrays(b), b) for b in r.val_collated]
    if cfg.select_by == "accuracy":
        if not hasattr(backend, "generate"):
            raise InputError(f"--select-by accuracy: the {backend.name} backend cannot generate; use --select-by loss")
        r.accuracy = selection.AccuracyValidator(
            selection.load_problems(cfg, r.tokenizer, r.reports["valid"].path, r.val_ex, cfg.val_accuracy_n),
            cfg.val_max_tokens, grade_timeout=cfg.grade_timeout, grade_memory_mb=cfg.grade_memory_mb)


def _manifest_extra(r: _Run) -> dict:
    """What manifest.json records of the run beside its config: model, data hashes, validation, KD alignment."""
    cfg, backend = r.cfg, r.backend
    extra = {
        "model_path": backend.model_path, "backend": backend.name, "parameters": r.counts,
        "data_files": {s: {"path": rep.path, "sha256": sha256_file(rep.path)} for s, rep in r.reports.items()},
        "examples": {s: {"records": rep.records, "kept": rep.kept, "skipped_long": rep.skipped_long,
                         "longest": rep.longest} for s, rep in r.reports.items()},
        "validation": {"val_batches": cfg.val_batches, "examples": sum(len(b.ids) for b in r.val_collated),
                       "of": len(r.val_ex), "ids": [i for b in r.val_collated for i in b.ids],
                       **({"accuracy_ids": r.accuracy.ids, "accuracy_max_tokens": cfg.val_max_tokens}
                          if r.accuracy else {})},
        "blas": blas.status(),
    }
    if r.kd_store is not None:  # per split: the resolved --kd-align and the positions of each alignment class
        extra["kd_alignment"] = r.kd_store.alignment_summary()
        if cfg.kd_hidden > 0:  # --kd-hidden: layer pairs, loss, widths, position share (`training.hidden`)
            extra["kd_hidden"] = r.kd_store.summary
    if cfg.prompt_template:
        from mlx_distill.paths import prompt_path

        extra.update(prompt_template=cfg.prompt_template,
                     prompt_template_sha256=sha256_file(prompt_path(cfg.prompt_template)))
    return extra


def _open_run_folder(r: _Run) -> None:
    """A new run writes its config, adapter config and start manifest; a resumed one restores the
    loop state from its checkpoint and drops the rows written after it."""
    cfg, out, dist, main = r.cfg, r.out, r.dist, r.dist.is_main
    r.manifest_extra = _manifest_extra(r)
    r.st = LoopState()
    dist.main_only(out.mkdir, parents=True, exist_ok=True)
    if cfg.resume:
        r.phase("reading the checkpoint")
        dist.main_only(_check_resume_data, out, r.manifest_extra)
        r.st = LoopState(**r.backend.load_checkpoint(r.ckpt_dir))
        if cfg.extend:  # a finished run trained further
            r.st.stopped = ""
    if cfg.resume and main:
        # drop rows written after the checkpoint (the run died before its next checkpoint)
        step = r.st.step
        write_jsonl(out / "metrics.jsonl", [x for x in read_jsonl(out / "metrics.jsonl", tolerate_torn_tail=True)
                                            if x["iter"] <= step])
        if (out / "rollouts.jsonl").exists():  # --save-rollouts: the same cut (the resumed run writes them again)
            write_jsonl(out / "rollouts.jsonl", [x for x in read_jsonl(out / "rollouts.jsonl", tolerate_torn_tail=True)
                                                 if x["iter"] <= step])
        if cfg.extend:  # config.yaml now holds the raised --iters
            config.dump_yaml(dataclasses.replace(cfg, resume=False, extend=False), out / "config.yaml")
    elif main:
        config.dump_yaml(cfg, out / "config.yaml")
        atomic_write_json(out / "adapter_config.json", r.backend.adapter_config())
        # what eval's overlap check compares against, from any directory, even after the corpus is gone
        from mlx_distill.tasks.overlap import record_training_questions

        record_training_questions(out, [rep.path for rep in r.reports.values()])
    # written at the start (a run that dies still says what it trained on); rewritten with the result
    dist.main_only(write_manifest, out / "manifest.json", "train", config.to_dict(cfg), **r.manifest_extra,
                   status="running")
    r.backend.build_step(r.train_objective)
    r.metrics = trackers.attach(JsonlAppender(out / "metrics.jsonl"), cfg, out, dist) if main else _NoMetrics()
    # the batch source (corpus, KD store / online teacher, on-policy rollouts): an argument of this loop
    r.source = sources.make_source(cfg, r.backend, r.stream, r.kd_store, r.tokenizer,
                                   dry_check=lambda step, nk: _kd_dry_check(r, step, nk))
    r.source.load_state_dict(r.st.source)


def _kd_dry_check(r: _Run, step: int, kd_positions: float) -> None:
    """A KD run must not train on without a teacher signal: refuse when a whole validation
    interval of steps carried no teacher target (the report warns at the first dry window)."""
    cfg, st = r.cfg, r.st
    st.kd_dry_steps = 0 if kd_positions else st.kd_dry_steps + 1
    if st.kd_dry_steps >= max(cfg.val_every, 1):
        raise InputError(
            f"KD run without a teacher signal: no position of the last {st.kd_dry_steps} training steps (up to "
            f"iteration {step}, a whole --val-every interval) has teacher logits in {cfg.kd_dir or cfg.kd_teacher}, "
            "so only SFT would be trained. Extract logits for the training examples (`python -m mlx_distill "
            "logits --resume ...` without --limit; the `kd train:` line above gives the coverage) or train "
            "without --kd.")


# ----------------------------------------------------------------------------- the step, validation, checkpoint
def _train_step(r: _Run) -> int:
    """One optimizer step: --grad-accumulation micro-batches from the source, the update at the
    last; its loss, tokens and objective parts go into the open report window."""
    cfg, st = r.cfg, r.st
    tic = time.perf_counter()
    step = st.step + 1
    loss, ntokens, parts = 0.0, 0, {}
    for a in range(cfg.grad_accumulation):
        arrays, _ = r.source.batch(st.micro, step)
        utic = time.perf_counter()
        res = r.backend.train_step(arrays, update=a == cfg.grad_accumulation - 1, micro=st.micro)
        r.source.note_update(time.perf_counter() - utic)
        st.micro += 1
        loss, ntokens = loss + res["loss_sum"], ntokens + int(res["ntokens"])
        for k, v in res.items():
            if k not in ("loss_sum", "ntokens"):
                parts[k] = parts.get(k, 0.0) + v
    st.step = step
    st.win_loss += loss
    st.win_tokens += ntokens
    fold_step(st.win_parts, parts, ntokens)  # each term over its own tokens of the step (`objectives.fold_step`)
    st.win_time += time.perf_counter() - tic
    return step


def _report_fields(r: _Run, step: int) -> dict:
    """The report window's row fields (train_loss = the window's objective per token); starts a new window."""
    cfg, st = r.cfg, r.st
    st.trained_tokens += st.win_tokens
    row = dict(train_loss=st.win_loss / max(st.win_tokens, 1), **window_parts(st.win_parts, st.win_tokens),
               learning_rate=r.backend.learning_rate(), tokens_per_sec=st.win_tokens / max(st.win_time, 1e-9),
               trained_tokens=st.trained_tokens, peak_memory_gb=r.backend.peak_memory_gb(),
               epoch=round(r.stream.epoch_of(st.micro), 3), **r.source.report())
    if r.kd_store is not None:
        row["kd_alpha"] = kd_alpha_at(cfg, step)
        if not row.get("kd_coverage") and not r.kd_warned:
            r.kd_warned = True
            r.dist.main_only(print, f"warning: iter {step}: no training position of the last {cfg.report_every} "
                             f"step(s) had teacher logits (kd_coverage 0): the KD term is inert; the run stops "
                             f"if a whole --val-every interval ({cfg.val_every} steps) stays so",
                             file=sys.stderr, flush=True)
    st.win_loss, st.win_tokens, st.win_time, st.win_parts = 0.0, 0, 0.0, {}
    return row


def _val_loss(r: _Run) -> float:
    r.backend.train_mode(False)
    tot, n = 0.0, 0.0
    for arrays in r.val_batches:
        res = r.backend.eval_step(r.val_objective, arrays)
        tot, n = tot + res["loss_sum"], n + res["ntokens"]
    r.backend.train_mode(True)
    return tot / max(n, 1.0)


def _validate(r: _Run, row: dict) -> None:
    """Validation loss (and, at accuracy validations, accuracy) into `row`; keep the adapter when
    it improved, count patience otherwise."""
    cfg, st, backend = r.cfg, r.st, r.backend
    r.phase("validating")
    tic = time.perf_counter()
    val = _val_loss(r)
    row.update(val_loss=val, val_loss_seconds=round(time.perf_counter() - tic, 3))
    acc_every = cfg.val_accuracy_every or cfg.val_every
    if r.accuracy is None:
        improved = val < st.best_val - cfg.min_delta
    elif st.step == 0 or st.step % acc_every == 0 or st.step == cfg.iters:
        backend.train_mode(False)  # greedy generation with the live model: no dropout
        row.update(r.accuracy(backend, st.step))
        backend.train_mode(True)
        improved = selection.better(row["val_accuracy"], val, st.best_acc, st.best_val, cfg.min_delta)
    else:
        return  # a loss-only validation: selection and patience count accuracy validations
    if improved:
        st.best_val, st.best_iter, st.bad_vals = val, st.step, 0
        st.best_acc = row.get("val_accuracy", st.best_acc)
        r.dist.main_only(backend.save_adapter, r.out)
    else:
        st.bad_vals += 1
        if cfg.patience > 0 and st.bad_vals >= cfg.patience:
            best = (f"val accuracy {st.best_acc:.4f}" if r.accuracy else f"val loss {st.best_val:.4f}")
            st.stopped = (f"early stop: no {cfg.select_by} improvement for {st.bad_vals} validations "
                          f"(best {best} at iter {st.best_iter})")


def _checkpoint(r: _Run) -> None:
    """The resumable state at an optimizer-step boundary -> RUN/checkpoints/last (atomic folder swap)."""
    r.phase("writing the checkpoint")
    r.st.source = r.source.state_dict()
    r.dist.main_only(r.backend.save_checkpoint, r.ckpt_dir, asdict(r.st))


def _write_row(r: _Run, row: dict, ui: Reporter) -> None:
    r.metrics.write(row)
    ui.line(fmt_row(row))
    if "val_loss" in row and row["iter"] > 0:  # RUN/training.png (from the first trained validation on),
        # rewritten atomically; never raises (mlx_distill.plots)
        from mlx_distill.plots import refresh as refresh_plot

        r.dist.main_only(refresh_plot, r.out, r.st.best_iter)


def _after_step(r: _Run, step: int, ui: Reporter) -> None:
    """The step's report row, validation and checkpoint, each when its interval falls."""
    cfg = r.cfg
    row = {"iter": step}
    if step % cfg.report_every == 0 or step == cfg.iters:
        row.update(_report_fields(r, step))
    if step % cfg.val_every == 0 or step == cfg.iters:
        _validate(r, row)
        r.dist.main_only(r.source.after_validation, r.out, step)  # --save-rollouts
    if len(row) > 1:
        _write_row(r, row, ui)
    ui.advance(f"loss {row['train_loss']:.3f}" if "train_loss" in row else "")
    if step % cfg.save_every == 0:
        _checkpoint(r)


def _interrupted(r: _Run, stop: Interrupts) -> None:
    """A signal on any rank, agreed after a whole optimizer step: checkpoint there, record the
    run as interrupted, exit 130 (SIGINT) / 143 (SIGTERM) through the CLI."""
    _checkpoint(r)
    r.dist.main_only(write_manifest, r.out / "manifest.json", "train", config.to_dict(r.cfg), **r.manifest_extra,
                     status="interrupted", result={"last_iter": r.st.step, "best_iter": r.st.best_iter})
    r.dist.barrier()  # no rank exits (stopping the launch) before rank 0 has written
    raise Interrupted(stop.signum or signal.SIGINT,
                      f"interrupted at iteration {r.st.step}: checkpoint written; continue with --resume")


def _finish(r: _Run, wall: float) -> dict:
    """The last checkpoint, the finished manifest, the final plot; the run summary."""
    cfg, st, out, dist = r.cfg, r.st, r.out, r.dist
    if not st.stopped:
        st.stopped = f"finished {cfg.iters} iterations"
    _checkpoint(r)
    best_value = st.best_acc if r.accuracy else st.best_val
    summary = {"best_iter": st.best_iter, "best_val_loss": st.best_val, "last_iter": st.step,
               "stop_reason": st.stopped, "trained_tokens": st.trained_tokens,
               "select_by": cfg.select_by, "best_value": best_value,
               **({"best_val_accuracy": st.best_acc} if r.accuracy else {}),
               "wall_seconds": round(wall, 1), "run": str(out)}
    selected = {"criterion": cfg.select_by, "metric": "val_accuracy" if r.accuracy else "val_loss",
                "best_value": best_value, "best_iter": st.best_iter,
                **({"tie_break": "val_loss", "best_val_loss": st.best_val} if r.accuracy else {})}
    dist.main_only(write_manifest, out / "manifest.json", "train", config.to_dict(cfg), **r.manifest_extra,
                   status="finished", selection=selected, result=summary)
    from mlx_distill.plots import refresh as refresh_plot

    dist.main_only(refresh_plot, out, st.best_iter, final=True)  # the finished run's training.png, whatever was skipped
    if not r.quiet:
        best = (f"val accuracy {st.best_acc:.4f}, val loss {st.best_val:.4f}" if r.accuracy
                else f"val loss {st.best_val:.4f}")
        print(f"{st.stopped}. Best adapter (iter {st.best_iter}, {best}) -> {out / 'adapters.safetensors'}")
    return summary


# ----------------------------------------------------------------------------- the loop
def run(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Train and return the run summary (also written to manifest.json): set up, then optimizer
    steps (each followed by its report row, validation and checkpoint when they fall) until
    --iters, early stopping or a signal, then the result.

    SIGINT and SIGTERM (`mlx_distill.interrupts`) finish the optimizer step under way (never
    inside gradient accumulation); every rank agrees on the same step (`dist.any`), writes the
    checkpoint there and the run exits 130 / 143; a second signal stops at once."""
    t0 = time.perf_counter()
    backend = _open(cfg)
    quiet = quiet or not backend.dist.is_main
    r = _Run(cfg, Path(cfg.out), backend, quiet)
    with Interrupts("finishing this optimizer step, then writing the checkpoint", quiet=quiet) as stop, \
            Heartbeat("train", unit="steps", stream=sys.stdout,
                      enabled=not quiet and not sys.stdout.isatty()) as r.beat:
        _load(r)
        _open_run_folder(r)
        st, start = r.st, r.st.step
        r.beat.update(done=0, total=cfg.iters - start)
        if not quiet:
            print(f"model {backend.model_path} | {r.counts['trainable'] / 1e6:.3f}M trainable / "
                  f"{r.counts['total'] / 1e6:.1f}M | train {len(r.train_ex)} valid {len(r.val_ex)} examples | "
                  f"{len(r.stream)} batches/epoch | {r.source.kind} | backend {backend.name}", flush=True)
        backend.train_mode(True)
        agreed = False  # a signal, agreed by every rank after a whole step
        try:
            with Reporter(cfg.iters, st.step, quiet) as ui:
                if st.step == 0 and st.best_iter < 0:
                    row = {"iter": 0}
                    _validate(r, row)
                    _write_row(r, row, ui)
                # a signal on any rank stops every rank after the same step (one tiny all-reduce a step)
                while st.step < cfg.iters and not st.stopped and not (agreed := r.dist.any(stop.requested)):
                    r.phase("training")
                    step = _train_step(r)
                    _after_step(r, step, ui)
                    r.beat.update(done=step - start, iter=step)
            if agreed and not st.stopped and st.step < cfg.iters:  # a run that just ended ends normally
                _interrupted(r, stop)
        finally:
            # a second signal (Interrupted raised at once) writes no checkpoint: the state may be mid-step
            r.metrics.close() if r.metrics is not None else None
        return _finish(r, time.perf_counter() - t0)


def main(argv=None) -> None:
    run(config.from_cli(TrainConfig, argv, "python -m mlx_distill train", __doc__))
