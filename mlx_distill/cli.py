"""`python -m mlx_distill <command>`: each command is one stage module's ``main(argv)``; nothing else."""

import importlib
import sys

# command -> (module, function, one-line help)
COMMANDS = {
    "train": ("mlx_distill.training.train", "main", "LoRA/DoRA/full SFT (+ top-K logit KD) with validation early stopping"),
    "corpus": ("mlx_distill.corpus.build", "main", "build / inspect a verified chain-of-thought corpus (`corpus build`, `corpus stats`); "
               "the generated demo corpus (`corpus synth`)"),
    "logits": ("mlx_distill.teacher.logits", "main", "re-score verified traces with a local or remote (vLLM) teacher and store its top-M logits"),
    "eval": ("mlx_distill.evaluation.evaluate", "main", "generate answers for a benchmark and grade them"),
    "compare": ("mlx_distill.evaluation.compare", "main", "two evals of the same problems side by side (accuracy, paired test, responses)"),
    "grade": ("mlx_distill.evaluation.evaluate", "grade_main", "re-grade saved predictions without a model"),
    "study": ("mlx_distill.evaluation.study", "main", "response-length studies (`study length -c study.yaml`)"),
    "pipeline": ("mlx_distill.pipeline", "main", "run a recipe's stages in order, skipping those whose output "
                 "matches (recipes/*.yaml)"),
    "parity": ("mlx_distill.parity", "main", "compare MLX and PyTorch on the same weights and batch"),
    "plot": ("mlx_distill.plots", "main", "training curves of run folders (RUN/training.png, or several runs overlaid)"),
    "export": ("mlx_distill.export", "main", "fuse a run's adapter into its base model (mlx-lm folder, optional GGUF)"),
    "convert-adapter": ("mlx_distill.adapters", "main", "convert adapters between mlx-lm and PEFT folders"),
    "model": ("mlx_distill.models", "model_main",
              "prepare the offline models (`model prepare [smollm2|gemma3-270m]`, `model info ...`)"),
}


def usage() -> str:
    lines = ["usage: python -m mlx_distill <command> [options]   (`<command> -h` for its options)", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        from mlx_distill import __version__

        print(__version__)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    from mlx_distill.blas import ensure_fast_blas

    ensure_fast_blas(["-m", "mlx_distill", *argv])
    module, func, _ = COMMANDS[cmd]
    from mlx_distill.io import InputError
    from mlx_distill.config import ConfigError

    try:
        getattr(importlib.import_module(module), func)(rest)
    except (InputError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as e:  # a file or folder the system refused (full disk, no permission, a file in the path)
        from mlx_distill.io import describe_os_error

        if e.filename:
            print(f"error: {describe_os_error(e)} (check the path, its permissions and the free disk space)",
                  file=sys.stderr)
        else:  # no file named: a socket or connection error, said as it is
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt as e:  # mlx_distill.interrupts.Interrupted carries 130 (SIGINT) or 143 (SIGTERM)
        from mlx_distill.interrupts import exit_code

        print("interrupted; everything finished so far is saved (re-run with --resume, or the same command, "
              "to continue)", file=sys.stderr)
        raise SystemExit(exit_code(e))
