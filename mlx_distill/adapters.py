"""`python -m mlx_distill convert-adapter`: mlx-lm adapter folders <-> PEFT adapter folders.

    python -m mlx_distill convert-adapter --from mlx  --input runs/demo     --output runs/demo-peft
    python -m mlx_distill convert-adapter --from peft --input some-peft-dir --output runs/x-mlx --model PATH

A student trained on one backend then runs on the other (vLLM, transformers + peft,
`mlx_lm generate --adapter-path`). The two formats describe the same update
``y = W x + s * B A x`` differently:

=================  ==========================================  ==========================================
                   mlx-lm (``adapters.safetensors``)             PEFT (``adapter_model.safetensors``)
=================  ==========================================  ==========================================
A                  ``<module>.lora_a``  (in, r)                  ``base_model.model.<module>.lora_A.weight`` (r, in)
B                  ``<module>.lora_b``  (r, out)                 ``base_model.model.<module>.lora_B.weight`` (out, r)
DoRA magnitude     ``<module>.m``  (out,)                        ``<module>.lora_magnitude_vector`` (out,)
scale s            ``lora_parameters.scale``                     ``lora_alpha / r`` (``/ sqrt(r)`` with rslora)
where              top ``num_layers`` blocks, ``keys``           ``target_modules`` (+ ``layers_to_transform``)
=================  ==========================================  ==========================================

mlx -> PEFT lists the adapted modules by full name (``model.layers.7.self_attn.q_proj``), so
nothing depends on how a reader resolves short names. PEFT -> mlx needs the model's block
count (from ``--model`` or the PEFT config's ``base_model_name_or_path``) because mlx-lm
adapts the *top* ``num_layers`` blocks: blocks below the lowest adapted one are included
with B = 0 (no effect). Per-module alphas (``alpha_pattern``) are folded into B and smaller
per-module ranks (``rank_pattern``) are zero-padded, both exactly. What mlx-lm cannot
represent is refused: LoRA biases, ``modules_to_save``, embedding adapters, non-LoRA PEFT types.

The module names are the Hugging Face ones, which mlx-lm also uses for llama/qwen2/mistral
and most dense families; ``--model`` makes the PEFT -> mlx direction check every tensor
against mlx-lm's model (names and shapes) before writing.
"""

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from mlx_distill.io import InputError, atomic_path, atomic_write_json, read_json, sha256_file, write_manifest

MLX_WEIGHTS, MLX_CONFIG = "adapters.safetensors", "adapter_config.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_BLOCK = re.compile(r"^(?P<head>.*\.(?:layers|h|blocks)\.(?P<idx>\d+))\.(?P<rel>.+)$")


# ----------------------------------------------------------------------------- tensor IO (no torch needed)
def load_tensors(path: Path) -> dict:
    """safetensors -> NumPy (bfloat16 read through MLX and widened to float32: lossless)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    if any(d in ("BF16", "F8_E4M3", "F8_E5M2") for d in dtypes.values()):
        import mlx.core as mx

        return {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in mx.load(str(path)).items()}
    from safetensors.numpy import load_file

    return load_file(str(path))


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)


def detect_format(folder: Path) -> str:
    folder = Path(folder)
    if (folder / MLX_WEIGHTS).is_file():
        return "mlx"
    if (folder / PEFT_WEIGHTS).is_file():
        return "peft"
    raise InputError(f"{folder}: neither {MLX_WEIGHTS} (mlx-lm) nor {PEFT_WEIGHTS} (PEFT) found")


def _num_blocks(model_path) -> int | None:
    if not model_path:
        return None
    try:
        from mlx_distill.models import resolve_model

        model_path = resolve_model(str(model_path))
    except Exception:
        pass
    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():
        return None
    c = json.loads(cfg.read_text())
    c = c.get("text_config", c)
    return c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")


# ----------------------------------------------------------------------------- mlx -> peft
def mlx_to_peft(src: Path, dst: Path, model: str | None = None) -> dict:
    """Write a PEFT LoRA/DoRA folder from an mlx-lm adapter folder; returns the PEFT config."""
    src, dst = Path(src), Path(dst)
    cfg = read_json(src / MLX_CONFIG)
    ftype = cfg.get("fine_tune_type", "lora")
    if ftype == "full":
        raise InputError(f"{src / MLX_CONFIG}: a full fine-tune is not an adapter; its weights are model "
                         "weights (fuse them with `mlx_lm fuse` instead)")
    if ftype not in ("lora", "dora"):
        raise InputError(f"{src / MLX_CONFIG}: fine_tune_type {ftype!r} cannot be converted")
    lp = cfg.get("lora_parameters") or {}
    rank, scale = int(lp.get("rank", 8)), float(lp.get("scale", 20.0))
    weights = load_tensors(src / MLX_WEIGHTS)
    out, modules = {}, []
    for name, w in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "lora_a":
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = w.T
            modules.append(module)
        elif leaf == "lora_b":
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = w.T
        elif leaf == "m" and ftype == "dora":
            out[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"] = w
        else:
            raise InputError(f"{src / MLX_WEIGHTS}: tensor {name!r} is not a LoRA weight (lora_a, lora_b, m)")
        if leaf in ("lora_a", "lora_b") and rank not in w.shape:
            raise InputError(f"{src / MLX_WEIGHTS}: {name} has shape {w.shape} but the config says rank {rank}")
    if not modules:
        raise InputError(f"{src / MLX_WEIGHTS}: no lora_a tensors")
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model or cfg.get("model"),
        "r": rank, "lora_alpha": scale * rank, "lora_dropout": float(lp.get("dropout", 0.0)),
        "target_modules": sorted(set(modules), key=_module_order), "use_dora": ftype == "dora",
        "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    dst.mkdir(parents=True, exist_ok=True)
    save_tensors(dst / PEFT_WEIGHTS, out, metadata={"format": "pt"})
    atomic_write_json(dst / PEFT_CONFIG, peft_cfg)
    write_manifest(dst / "manifest.json", "convert-adapter", {"from": "mlx", "to": "peft", "model": model},
                   input={"path": str(src), "sha256": sha256_file(src / MLX_WEIGHTS)})
    return peft_cfg


def _module_order(name: str):
    m = _BLOCK.match(name)
    return (int(m["idx"]), m["rel"]) if m else (-1, name)


# ----------------------------------------------------------------------------- peft -> mlx
def _peft_module(key: str) -> tuple[str, str]:
    """PEFT tensor name -> (module name in the HF model, leaf: A | B | m)."""
    k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for pat, leaf in ((r"\.lora_A(?:\.[^.]+)?\.weight$", "A"), (r"\.lora_B(?:\.[^.]+)?\.weight$", "B"),
                      (r"\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$", "m")):
        m = re.search(pat, k)
        if m:
            return k[: m.start()], leaf
    return k, ""


def peft_to_mlx(src: Path, dst: Path, model: str | None = None) -> dict:
    """Write an mlx-lm adapter folder from a PEFT LoRA/DoRA folder; returns the mlx-lm config."""
    src, dst = Path(src), Path(dst)
    pc = read_json(src / PEFT_CONFIG)
    where = src / PEFT_CONFIG
    if pc.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{where}: peft_type {pc.get('peft_type')!r}; only LORA (incl. DoRA) converts to mlx-lm")
    if pc.get("bias", "none") != "none" or pc.get("lora_bias"):
        raise InputError(f"{where}: LoRA biases (bias={pc.get('bias')!r}) have no mlx-lm equivalent")
    if pc.get("modules_to_save"):
        raise InputError(f"{where}: modules_to_save {pc['modules_to_save']} (fully trained modules) "
                         "have no mlx-lm adapter equivalent")
    r, alpha = int(pc["r"]), float(pc["lora_alpha"])
    rslora = bool(pc.get("use_rslora"))

    def scale_of(r_, a_):
        return a_ / math.sqrt(r_) if rslora else a_ / r_

    weights = load_tensors(src / PEFT_WEIGHTS)
    mods: dict = {}
    for key, w in weights.items():
        module, leaf = _peft_module(key)
        if not leaf:
            raise InputError(f"{src / PEFT_WEIGHTS}: tensor {key!r} is not a LoRA A/B/magnitude weight "
                             "(embedding adapters and extra trained modules cannot be converted)")
        mods.setdefault(module, {})[leaf] = w
    # per-module rank / alpha: the longest pattern that matches the module name wins (as in peft)
    def pattern(pat: dict, module: str, default):
        hits = [k for k in pat if re.fullmatch(rf"(.*\.)?{k}", module)]
        return pat[max(hits, key=len)] if hits else default

    ranks = {mod: int(pattern(pc.get("rank_pattern") or {}, mod, r)) for mod in mods}
    r_max = max(ranks.values())
    base_scale = scale_of(r, alpha)
    out, blocks, rels = {}, set(), set()
    dora = bool(pc.get("use_dora"))
    for mod, parts in mods.items():
        if "A" not in parts or "B" not in parts:
            raise InputError(f"{src / PEFT_WEIGHTS}: module {mod} lacks lora_A or lora_B")
        m = _BLOCK.match(mod)
        if not m:
            raise InputError(f"{src / PEFT_WEIGHTS}: module {mod} is not inside a transformer block; "
                             "mlx-lm only adapts modules of model.layers")
        blocks.add(int(m["idx"]))
        rels.add(m["rel"])
        a, b = parts["A"].astype(np.float32), parts["B"].astype(np.float32)  # (r, in), (out, r)
        rm = ranks[mod]
        if a.shape[0] != rm or b.shape[1] != rm:
            raise InputError(f"{src / PEFT_WEIGHTS}: {mod}: A {a.shape} / B {b.shape} do not have rank {rm}")
        s = scale_of(rm, float(pattern(pc.get("alpha_pattern") or {}, mod, alpha)))
        b = b * (s / base_scale)
        if rm < r_max:  # zero rows/columns add nothing to B A
            a = np.concatenate([a, np.zeros((r_max - rm, a.shape[1]), a.dtype)], 0)
            b = np.concatenate([b, np.zeros((b.shape[0], r_max - rm), b.dtype)], 1)
        out[f"{mod}.lora_a"], out[f"{mod}.lora_b"] = a.T, b.T
        if dora:
            if "m" not in parts:
                raise InputError(f"{src / PEFT_WEIGHTS}: DoRA module {mod} lacks lora_magnitude_vector")
            out[f"{mod}.m"] = parts["m"].astype(np.float32)
    base = model or pc.get("base_model_name_or_path")
    n_blocks = _num_blocks(base)
    if n_blocks is None:
        raise InputError(f"{where}: cannot tell how many blocks the model has (mlx-lm adapts the top "
                         f"num_layers); pass --model PATH (base_model_name_or_path is {base!r})")
    if max(blocks) >= n_blocks:
        raise InputError(f"{where}: adapter has block {max(blocks)} but {base} has {n_blocks} blocks")
    mlx_cfg = {"model": base, "fine_tune_type": "dora" if dora else "lora", "num_layers": n_blocks - min(blocks),
               "lora_parameters": {"rank": r_max, "scale": base_scale, "dropout": float(pc.get("lora_dropout", 0.0)),
                                   "keys": sorted(rels)}}
    if model:
        _check_against_mlx_model(model, mlx_cfg, out)
    dst.mkdir(parents=True, exist_ok=True)
    save_tensors(dst / MLX_WEIGHTS, out, metadata={"format": "mlx"})
    atomic_write_json(dst / MLX_CONFIG, mlx_cfg)
    write_manifest(dst / "manifest.json", "convert-adapter", {"from": "peft", "to": "mlx", "model": model},
                   input={"path": str(src), "sha256": sha256_file(src / PEFT_WEIGHTS)})
    return mlx_cfg


def _check_against_mlx_model(model: str, mlx_cfg: dict, weights: dict) -> None:
    """Every tensor must name an adapter parameter of mlx-lm's model, with its shape."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from mlx_distill.models import resolve_model

    m, _ = load_model(Path(resolve_model(model)), lazy=True)
    m.freeze()
    linear_to_lora_layers(m, mlx_cfg["num_layers"], mlx_cfg["lora_parameters"],
                          use_dora=mlx_cfg["fine_tune_type"] == "dora")
    params = dict(tree_flatten(m.trainable_parameters()))
    bad = [f"{k}: {'not an adapter parameter of the mlx-lm model' if k not in params else f'shape {w.shape} != {params[k].shape}'}"
           for k, w in weights.items() if k not in params or tuple(params[k].shape) != tuple(w.shape)]
    if bad:
        raise InputError(f"{model}: the converted adapter does not fit mlx-lm's model:\n  " + "\n  ".join(bad[:10]))


# ----------------------------------------------------------------------------- helpers for loaders
def ensure_format(adapter: str | Path, fmt: str, model: str | None = None) -> Path:
    """An adapter folder in `fmt` ("mlx" or "peft"): `adapter` itself, or its conversion
    into a temporary folder."""
    adapter = Path(adapter)
    if detect_format(adapter) == fmt:
        return adapter
    out = Path(tempfile.mkdtemp(prefix=f"{fmt}-adapter-"))
    (mlx_to_peft if fmt == "peft" else peft_to_mlx)(adapter, out, model)
    return out


def _keep_provenance(src: Path, dst: Path) -> None:
    """A converted adapter keeps what it was trained on (eval's overlap check reads these)."""
    import shutil

    from mlx_distill.io import atomic_path
    from mlx_distill.tasks.overlap import PROVENANCE

    for name in (PROVENANCE, "config.yaml"):
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_distill convert-adapter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="src_format", choices=["mlx", "peft", "auto"], default="auto",
                        help="Format of --input (default: detected from the files).")
    parser.add_argument("--input", required=True, help="Adapter folder to convert.")
    parser.add_argument("--output", required=True, help="Folder to write (created; existing adapter files are replaced).")
    parser.add_argument("--model", default=None, help="Base model folder: block count for PEFT -> mlx, "
                        "base_model_name_or_path for mlx -> PEFT, and a name/shape check against mlx-lm's model.")
    args = parser.parse_args(argv)
    src, dst = Path(args.input), Path(args.output)
    fmt = detect_format(src) if args.src_format == "auto" else args.src_format
    if src.resolve() == dst.resolve():
        raise InputError(f"{dst}: --output must differ from --input")
    _keep_provenance(src, dst)
    if fmt == "mlx":
        c = mlx_to_peft(src, dst, args.model)
        print(f"mlx-lm -> PEFT: {len(c['target_modules'])} modules, r={c['r']}, lora_alpha={c['lora_alpha']:g}"
              f"{', DoRA' if c['use_dora'] else ''} -> {dst}")
    else:
        c = peft_to_mlx(src, dst, args.model)
        lp = c["lora_parameters"]
        print(f"PEFT -> mlx-lm: top {c['num_layers']} blocks, keys {lp['keys']}, rank {lp['rank']}, "
              f"scale {lp['scale']:g}{', DoRA' if c['fine_tune_type'] == 'dora' else ''} -> {dst}", file=sys.stdout)
