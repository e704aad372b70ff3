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
steps run at the final rate. Ctrl-C (SIGINT) finishes the current optimizer step (never
inside gradient accumulation) and writes the checkpoint there; a second Ctrl-C stops at once,
and the run resumes from its last checkpoint. Every file is written atomically.

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
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_distill import blas, config, data

from mlx_distill.training import preflight, selection, sources, trackers
from mlx_distill.config import TrainConfig
from mlx_distill.io import (InputError, JsonlAppender, atomic_write_json, complete_dir, read_json, read_jsonl, sha256_file,
                 write_manifest)
from mlx_distill.training.objectives import kd_alpha_at, kd_objective, sft_objective, window_parts

# The only options --resume lets change: where and how often things are written, how the same
# numbers are computed, and a refusal threshold. Every other TrainConfig field (present or
# added later) shapes the curve or the kept adapter and must match the run's config.yaml.
# `data` is a path: the data is compared by the sha256 of its files instead (manifest.json).
# `iters` may only be raised, with --extend (see `check_resume`).
RESUME_MAY_CHANGE = ("out", "resume", "extend", "data", "backend", "compile", "grad_checkpoint", "report_every",
                     "save_every", "kd_min_coverage", "save_rollouts", "report_to", "preflight")


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
                 ("kd_loss", "{:.4f}"),
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
        found = complete_dir(ckpt)
        if found is None:
            raise InputError(f"{out}: --resume given but there is no checkpoint in {ckpt}")
        state = read_json(found / "state.json")
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


def run(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Train and return the run summary (also written to manifest.json)."""
    from mlx_distill.backends import get_backend

    out = Path(cfg.out)
    _check_options(cfg)
    backend = get_backend(cfg)  # under torchrun / mlx.launch: joins the group of ranks
    # rank 0 alone reads and writes the run folder (`mlx_distill.backends.distributed`): the other ranks,
    # maybe on other machines, get the resumed state from it and write nothing
    dist = backend.dist
    main = dist.is_main
    if main:
        _check_run_folder(cfg, out)
    else:
        quiet = True
    cfg.decay_iters = dist.broadcast_json(cfg.decay_iters)  # --extend: set by rank 0's resume check
    sources.check_on_policy_options(cfg, backend.name)
    t0 = time.perf_counter()
    model, tokenizer = backend.load()
    reports = {s: data.LoadReport(path="") for s in ("train", "valid")}
    train_ex = data.load_examples(cfg, tokenizer, "train", reports["train"])
    val_ex = data.load_examples(cfg, tokenizer, "valid", reports["valid"])
    for split, rep in reports.items():
        if rep.skipped_long:
            print(f"{split}: skipped {rep.skipped_long} example(s) longer than --max-seq-length {cfg.max_seq_length} "
                  f"(longest {rep.longest} tokens); they are never truncated", file=sys.stderr)
    backend.prepare()
    backend.init_optimizer()
    counts = backend.parameter_counts()
    preflight.run(cfg, backend, train_ex, quiet=quiet)  # the memory estimate vs the device: refuses when above

    kd_store = None
    if cfg.kd_dir or cfg.kd_teacher:
        from mlx_distill.training.kd import kd_setup

        kd_store = kd_setup(cfg, {"train": train_ex, "valid": val_ex}, tokenizer)
        train_objective = kd_objective(backend.forward, cfg, tail=getattr(kd_store, "cross", False))
    else:
        train_objective = sft_objective(backend.forward)
    val_objective = sft_objective(backend.forward)  # early stopping watches the data's own cross-entropy

    pad = data.pad_id_of(tokenizer)
    stream = data.BatchStream(train_ex, cfg.batch_size, cfg.seed, pad)
    val_collated = list(data.eval_batches(val_ex, cfg.batch_size, pad, cfg.val_batches))
    val_batches = [data.trim_prompt(data.batch_arrays(b), b) for b in val_collated]
    accuracy = None  # --select-by accuracy: one call = one accuracy validation (`selection.AccuracyValidator`)
    if cfg.select_by == "accuracy":
        if not hasattr(backend, "generate"):
            raise InputError(f"--select-by accuracy: the {backend.name} backend cannot generate; use --select-by loss")
        accuracy = selection.AccuracyValidator(
            selection.load_problems(cfg, tokenizer, reports["valid"].path, val_ex, cfg.val_accuracy_n),
            cfg.val_max_tokens)
    acc_every = cfg.val_accuracy_every or cfg.val_every

    data_files = {s: r.path for s, r in reports.items()}
    manifest_extra = {
        "model_path": backend.model_path, "backend": backend.name, "parameters": counts,
        "data_files": {s: {"path": p, "sha256": sha256_file(p)} for s, p in data_files.items()},
        "examples": {s: {"records": r.records, "kept": r.kept, "skipped_long": r.skipped_long, "longest": r.longest}
                     for s, r in reports.items()},
        "validation": {"val_batches": cfg.val_batches, "examples": sum(len(b.ids) for b in val_collated),
                       "of": len(val_ex), "ids": [i for b in val_collated for i in b.ids],
                       **({"accuracy_ids": accuracy.ids, "accuracy_max_tokens": cfg.val_max_tokens} if accuracy else {})},
        "blas": blas.status(),
    }
    if kd_store is not None:  # per split: the resolved --kd-align and the positions of each alignment class
        manifest_extra["kd_alignment"] = kd_store.alignment_summary()
    if cfg.prompt_template:
        from mlx_distill.paths import prompt_path

        manifest_extra.update(prompt_template=cfg.prompt_template,
                              prompt_template_sha256=sha256_file(prompt_path(cfg.prompt_template)))

    st = LoopState()
    dist.main_only(out.mkdir, parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints" / "last"
    if cfg.resume:
        dist.main_only(_check_resume_data, out, manifest_extra)
        st = LoopState(**backend.load_checkpoint(ckpt_dir))
        if cfg.extend:  # a finished run trained further
            st.stopped = ""
    if cfg.resume and main:
        # drop rows written after the checkpoint (the run died before its next checkpoint)
        rows = [r for r in read_jsonl(out / "metrics.jsonl", tolerate_torn_tail=True) if r["iter"] <= st.step]
        from mlx_distill.io import write_jsonl

        write_jsonl(out / "metrics.jsonl", rows)
        if (out / "rollouts.jsonl").exists():  # --save-rollouts: the same cut (the resumed run writes them again)
            write_jsonl(out / "rollouts.jsonl", [r for r in read_jsonl(out / "rollouts.jsonl", tolerate_torn_tail=True)
                                                 if r["iter"] <= st.step])
        if cfg.extend:  # config.yaml now holds the raised --iters
            config.dump_yaml(dataclasses.replace(cfg, resume=False, extend=False), out / "config.yaml")
    elif main:
        config.dump_yaml(cfg, out / "config.yaml")
        atomic_write_json(out / "adapter_config.json", backend.adapter_config())
        # what eval's overlap check compares against, from any directory, even after the corpus is gone
        from mlx_distill.tasks.overlap import record_training_questions

        record_training_questions(out, [r.path for r in reports.values()])
    # written at the start (a run that dies still says what it trained on); rewritten with the result
    dist.main_only(write_manifest, out / "manifest.json", "train", config.to_dict(cfg), **manifest_extra,
                   status="running")
    backend.build_step(train_objective)
    metrics = trackers.attach(JsonlAppender(out / "metrics.jsonl"), cfg, out, dist) if main else _NoMetrics()

    kd_warned = False
    # the batch source (corpus, KD store / online teacher, on-policy rollouts): an argument of this loop
    source = sources.make_source(cfg, backend, stream, kd_store, tokenizer,
                                 dry_check=lambda step, nk: kd_dry_check(step, nk))
    source.load_state_dict(st.source)

    def kd_dry_check(step: int, kd_positions: float) -> None:
        """A KD run must not train on without a teacher signal: refuse when a whole validation
        interval of steps carried no teacher target (the report warns at the first dry window)."""
        st.kd_dry_steps = 0 if kd_positions else st.kd_dry_steps + 1
        if st.kd_dry_steps >= max(cfg.val_every, 1):
            raise InputError(
                f"KD run without a teacher signal: no position of the last {st.kd_dry_steps} training steps (up to "
                f"iteration {step}, a whole --val-every interval) has teacher logits in {cfg.kd_dir or cfg.kd_teacher}, "
                "so only SFT would be trained. Extract logits for the training examples (`python -m mlx_distill "
                "logits --resume ...` without --limit; the `kd train:` line above gives the coverage) or train "
                "without --kd.")

    def validate() -> float:
        backend.train_mode(False)
        tot, n = 0.0, 0.0
        for arrays in val_batches:
            r = backend.eval_step(val_objective, arrays)
            tot, n = tot + r["loss_sum"], n + r["ntokens"]
        backend.train_mode(True)
        return tot / max(n, 1.0)

    def checkpoint():
        st.source = source.state_dict()
        dist.main_only(backend.save_checkpoint, ckpt_dir, asdict(st))

    def on_validation(row: dict) -> None:
        tic = time.perf_counter()
        val = validate()
        row.update(val_loss=val, val_loss_seconds=round(time.perf_counter() - tic, 3))
        if accuracy is None:
            improved = val < st.best_val - cfg.min_delta
        elif st.step == 0 or st.step % acc_every == 0 or st.step == cfg.iters:
            backend.train_mode(False)  # greedy generation with the live model: no dropout
            row.update(accuracy(backend, st.step))
            backend.train_mode(True)
            improved = selection.better(row["val_accuracy"], val, st.best_acc, st.best_val, cfg.min_delta)
        else:
            return  # a loss-only validation: selection and patience count accuracy validations
        if improved:
            st.best_val, st.best_iter, st.bad_vals = val, st.step, 0
            st.best_acc = row.get("val_accuracy", st.best_acc)
            dist.main_only(backend.save_adapter, out)
        else:
            st.bad_vals += 1
            if cfg.patience > 0 and st.bad_vals >= cfg.patience:
                best = (f"val accuracy {st.best_acc:.4f}" if accuracy else f"val loss {st.best_val:.4f}")
                st.stopped = (f"early stop: no {cfg.select_by} improvement for {st.bad_vals} validations "
                              f"(best {best} at iter {st.best_iter})")

    # Ctrl-C: finish the optimizer step under way, checkpoint at its boundary, then stop
    interrupt = {"signal": None}

    def on_sigint(signum, frame):
        if interrupt["signal"] is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now; the last checkpoint stays
        interrupt["signal"] = signum
        print("\ninterrupted: finishing this optimizer step, then writing the checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    main_thread = threading.current_thread() is threading.main_thread()
    prev_sigint = signal.signal(signal.SIGINT, on_sigint) if main_thread else None

    def stop_requested() -> bool:
        """A Ctrl-C on any rank stops every rank after the same step (one tiny all-reduce a step)."""
        interrupt["agreed"] = dist.any(interrupt["signal"] is not None)
        return interrupt["agreed"]

    if not quiet:
        print(f"model {backend.model_path} | {counts['trainable'] / 1e6:.3f}M trainable / {counts['total'] / 1e6:.1f}M "
              f"| train {len(train_ex)} valid {len(val_ex)} examples | {len(stream)} batches/epoch | "
              f"{source.kind} | backend {backend.name}", flush=True)
    backend.train_mode(True)
    with Reporter(cfg.iters, st.step, quiet) as ui:
        try:
            if st.step == 0 and st.best_iter < 0:
                row = {"iter": 0}
                on_validation(row)
                metrics.write(row)
                ui.line(fmt_row(row))
            while st.step < cfg.iters and not st.stopped and not stop_requested():
                tic = time.perf_counter()
                step = st.step + 1
                for a in range(cfg.grad_accumulation):
                    arrays, _ = source.batch(st.micro, step)
                    utic = time.perf_counter()
                    r = backend.train_step(arrays, update=a == cfg.grad_accumulation - 1, micro=st.micro)
                    source.note_update(time.perf_counter() - utic)
                    st.micro += 1
                    st.win_loss += r["loss_sum"]
                    st.win_tokens += int(r["ntokens"])
                    for k in ("sft_loss", "sft_tokens", "kd_loss", "kd_positions"):
                        if k in r:
                            st.win_parts[k] = st.win_parts.get(k, 0.0) + r[k]
                st.step = step
                st.win_time += time.perf_counter() - tic
                row = {"iter": step}
                if step % cfg.report_every == 0 or step == cfg.iters:
                    st.trained_tokens += st.win_tokens
                    row.update(train_loss=st.win_loss / max(st.win_tokens, 1),
                               **window_parts(st.win_parts, st.win_tokens),
                               learning_rate=backend.learning_rate(),
                               tokens_per_sec=st.win_tokens / max(st.win_time, 1e-9),
                               trained_tokens=st.trained_tokens, peak_memory_gb=backend.peak_memory_gb(),
                               epoch=round(stream.epoch_of(st.micro), 3), **source.report())
                    if kd_store is not None:
                        row["kd_alpha"] = kd_alpha_at(cfg, step)
                        if not row.get("kd_coverage") and not kd_warned:
                            kd_warned = True
                            backend.dist.main_only(
                                print, f"warning: iter {step}: no training position of the last {cfg.report_every} "
                                f"step(s) had teacher logits (kd_coverage 0): the KD term is inert; the run stops "
                                f"if a whole --val-every interval ({cfg.val_every} steps) stays so",
                                file=sys.stderr, flush=True)
                    st.win_loss, st.win_tokens, st.win_time, st.win_parts = 0.0, 0, 0.0, {}
                if step % cfg.val_every == 0 or step == cfg.iters:
                    on_validation(row)
                    backend.dist.main_only(source.after_validation, out, step)  # --save-rollouts
                if len(row) > 1:
                    metrics.write(row)
                    ui.line(fmt_row(row))
                    if "val_loss" in row:  # RUN/training.png, rewritten atomically; never raises (mlx_distill.plots)
                        from mlx_distill.plots import refresh as refresh_plot

                        dist.main_only(refresh_plot, out, st.best_iter)
                ui.advance(f"loss {row.get('train_loss', float('nan')):.3f}" if "train_loss" in row else "")
                if step % cfg.save_every == 0:
                    checkpoint()
            if interrupt.get("agreed") and not st.stopped and st.step < cfg.iters:
                # at an optimizer-step boundary: nothing in flight (a run that just ended ends normally)
                checkpoint()
                dist.main_only(write_manifest, out / "manifest.json", "train", config.to_dict(cfg), **manifest_extra,
                               status="interrupted", result={"last_iter": st.step, "best_iter": st.best_iter})
                dist.barrier()  # no rank exits (stopping the launch) before rank 0 has written
                raise KeyboardInterrupt
        finally:
            # a KeyboardInterrupt from a second Ctrl-C writes no checkpoint: the state may be mid-step
            metrics.close()
            if main_thread:
                signal.signal(signal.SIGINT, prev_sigint)
    if not st.stopped:
        st.stopped = f"finished {cfg.iters} iterations"
    checkpoint()
    best_value = st.best_acc if accuracy else st.best_val
    summary = {"best_iter": st.best_iter, "best_val_loss": st.best_val, "last_iter": st.step,
               "stop_reason": st.stopped, "trained_tokens": st.trained_tokens,
               "select_by": cfg.select_by, "best_value": best_value,
               **({"best_val_accuracy": st.best_acc} if accuracy else {}),
               "wall_seconds": round(time.perf_counter() - t0, 1), "run": str(out)}
    selected = {"criterion": cfg.select_by, "metric": "val_accuracy" if accuracy else "val_loss",
                "best_value": best_value, "best_iter": st.best_iter,
                **({"tie_break": "val_loss", "best_val_loss": st.best_val} if accuracy else {})}
    dist.main_only(write_manifest, out / "manifest.json", "train", config.to_dict(cfg), **manifest_extra,
                   status="finished", selection=selected, result=summary)
    from mlx_distill.plots import refresh as refresh_plot

    # the finished run's training.png, whatever was skipped
    dist.main_only(refresh_plot, out, st.best_iter, final=True)
    if not quiet:
        best = f"val accuracy {st.best_acc:.4f}, val loss {st.best_val:.4f}" if accuracy else f"val loss {st.best_val:.4f}"
        print(f"{st.stopped}. Best adapter (iter {st.best_iter}, {best}) -> {out / 'adapters.safetensors'}")
    return summary


def main(argv=None) -> None:
    run(config.from_cli(TrainConfig, argv, "python -m mlx_distill train", __doc__))
