"""`python -m mlx_distill export`: a run's adapter fused into its base model, ready to ship.

    python -m mlx_distill export runs/sft --out exports/sft                # mlx-lm / HF model folder
    python -m mlx_distill export runs/sft --out exports/sft --gguf         # + model.gguf (llama family)
    python -m mlx_distill export runs/qlora --out exports/q --dequantize   # float weights from a QLoRA run
    python -m mlx_distill export runs/sft --out exports/sft --upload-repo me/sft-model

The fusing is mlx-lm's own (the steps of ``mlx_lm fuse``): the base model is loaded with the
run's adapter (`mlx_lm.utils.load(..., adapter_path=RUN)`), every LoRA / DoRA layer is replaced
by its ``fuse()`` result, optionally dequantized (`mlx_lm.utils.dequantize_model`), and the model
folder is written with `mlx_lm.utils.save` (weights, config.json, tokenizer, model card). The
base model is the run's ``model`` (config.yaml, else adapter_config.json) unless --model names
another, resolved like ``train --model`` (`mlx_distill.models.resolve_model`).

``--gguf`` writes ``model.gguf`` with mlx-lm's `convert_to_gguf`, which handles the llama
architecture family only (`GGUF_ARCHS`, the list mlx-lm's fuse command checks); any other
architecture is refused before the model is loaded. ``--upload-repo`` hands the finished folder
to mlx-lm's `upload_to_hub` (needs network and a Hugging Face token; not exercised by the tests).

The output folder is written whole or not at all (`io.atomic_dir`); its ``manifest.json`` records
the run (its manifest's sha256 and kept iteration), the base model (config sha256 and a cheap
weights fingerprint) and the sha256 of the adapter files.
"""

import argparse
import contextlib
import io
import sys
from pathlib import Path

from mlx_distill import config
from mlx_distill.config import ExportConfig
from mlx_distill.io import InputError, atomic_dir, read_json, sha256_file, write_manifest

# mlx_lm/fuse.py: the model types its GGUF export accepts (mlx_lm.gguf writes llama metadata)
GGUF_ARCHS = ("llama", "mistral", "mixtral")
GGUF_NAME = "model.gguf"
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


def check_run(run: Path) -> None:
    missing = [f for f in ADAPTER_FILES if not (run / f).is_file()]
    if not run.is_dir():
        raise InputError(f"{run}: no such folder; pass a `python -m mlx_distill train` run folder")
    if missing:
        raise InputError(f"{run}: no {' / '.join(missing)}; pass a `python -m mlx_distill train` run folder that "
                         "has kept an adapter")


def base_model_of(run: Path, override: str = "") -> str:
    """The base model name the run trained on (its config.yaml, else adapter_config.json)."""
    if override:
        return override
    if (run / "config.yaml").is_file():
        name = (config.load_yaml(run / "config.yaml") or {}).get("model")
        if name:
            return str(name)
    name = read_json(run / "adapter_config.json").get("model")
    if name:
        return str(name)
    raise InputError(f"{run}: neither config.yaml nor adapter_config.json names the base model; pass --model")


def _quantized(model_cfg: dict) -> bool:
    return bool(model_cfg.get("quantization") or model_cfg.get("quantization_config"))


def export(cfg: ExportConfig, quiet: bool = False) -> dict:
    """Fuse, save (and convert / upload); returns the manifest written to <out>/manifest.json."""
    from mlx_distill.teacher.base import teacher_fingerprint
    from mlx_distill.models import resolve_model

    if not cfg.run:
        raise InputError("export: pass the run folder: python -m mlx_distill export RUN --out DIR")
    if not cfg.out:
        raise InputError("export: --out DIR is required (the folder for the fused model)")
    run, out = Path(cfg.run), Path(cfg.out)
    check_run(run)
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise InputError(f"--out {out}: must not be the run folder or inside it; choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise InputError(f"--out {out}: already exists and is not empty; pass --overwrite or choose another folder")
    name = base_model_of(run, cfg.model)
    path = resolve_model(name)
    base_cfg = read_json(Path(path) / "config.json")
    model_type = base_cfg.get("model_type", "?")
    if cfg.gguf and model_type not in GGUF_ARCHS:
        raise InputError(f"--gguf: mlx-lm's GGUF export supports {', '.join(GGUF_ARCHS)} models only; {name} is "
                         f"{model_type!r}. Export without --gguf (the folder loads in mlx-lm and transformers) and "
                         "convert it with llama.cpp's convert_hf_to_gguf.py")
    if cfg.gguf and _quantized(base_cfg) and not cfg.dequantize:
        raise InputError(f"--gguf: {name} is quantized and mlx-lm's GGUF export takes float weights only; "
                         "add --dequantize")

    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import dequantize_model, load, save

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    model, tokenizer, model_cfg = load(path, adapter_path=str(run), return_config=True)
    fused = [(n, m.fuse(dequantize=cfg.dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if cfg.dequantize:
        model = dequantize_model(model)
        model_cfg.pop("quantization", None)
        model_cfg.pop("quantization_config", None)

    adapter_cfg = read_json(run / "adapter_config.json")
    run_man = read_json(run / "manifest.json") if (run / "manifest.json").is_file() else {}
    result = run_man.get("result") or {}
    with atomic_dir(out) as tmp:
        save(tmp, path, model, tokenizer, model_cfg, donate_model=False)
        gguf = None
        if cfg.gguf:
            from mlx_lm.gguf import convert_to_gguf

            with contextlib.redirect_stdout(io.StringIO()):  # it prints the temporary folder's path
                convert_to_gguf(tmp, dict(tree_flatten(model.parameters())), model_cfg, str(tmp / GGUF_NAME))
            gguf = {"file": GGUF_NAME, "bytes": (tmp / GGUF_NAME).stat().st_size}
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        man = write_manifest(
            tmp / "manifest.json", "export", config.to_dict(cfg),
            run={"path": str(run.resolve()), "status": run_man.get("status"), "best_iter": result.get("best_iter"),
                 "select_by": result.get("select_by"),
                 "manifest_sha256": sha256_file(run / "manifest.json") if run_man else None},
            base_model={"name": name, "model_type": model_type, **teacher_fingerprint(path)},
            adapter={"fine_tune_type": adapter_cfg.get("fine_tune_type", "lora"),
                     "lora_parameters": adapter_cfg.get("lora_parameters"), "num_layers": adapter_cfg.get("num_layers"),
                     "sha256": {f: sha256_file(run / f) for f in ADAPTER_FILES}},
            fused_modules=len(fused), dequantized=bool(cfg.dequantize), quantized=_quantized(model_cfg),
            gguf=gguf, files=files)
    say(f"fused {len(fused)} adapter layer(s) of {run} into {name} -> {out} "
        f"({sum(files.values()) / 1e6:.1f} MB{', + ' + GGUF_NAME if gguf else ''}); "
        f"try: mlx_lm.generate --model {out} --prompt 'hello'")
    if cfg.upload_repo:
        from mlx_lm.utils import upload_to_hub

        upload_to_hub(str(out), cfg.upload_repo)
    return man


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_distill export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_folder", nargs="?", metavar="RUN", help="training run folder (same as --run)")
    config.add_arguments(parser, ExportConfig)
    args = parser.parse_args(argv)
    cfg = config.resolve(ExportConfig, args)
    if args.run_folder:
        if cfg.run and cfg.run != args.run_folder:
            print(f"error: two run folders given ({args.run_folder} and --run {cfg.run})", file=sys.stderr)
            raise SystemExit(2)
        cfg.run = args.run_folder
    export(cfg)
