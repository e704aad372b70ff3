"""`python -m mlx_distill pipeline variant`: answer-only / CoT / mixed copies of a corpus folder
(seed 001's comparison of training on reasoning against training on the answer alone); a recipe
stage (`command: variant`) or a command of its own."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlx_distill import config as C
from mlx_distill.io import InputError, atomic_write_json, read_json


def write_variant(cfg: C.VariantConfig) -> Path:
    """Answer-only / CoT / mixed copies of a corpus (seed 001's comparison). The test split is
    copied unchanged: every variant is evaluated on the same problems."""
    from mlx_distill.io import atomic_dir, iter_jsonl, sha256_file, write_jsonl

    src, out = Path(cfg.data), Path(cfg.out)
    if not cfg.data or not cfg.out:
        raise InputError("pipeline variant: --data (a corpus folder) and --out are required")
    if not (src / "train.jsonl").is_file():
        raise InputError(f"{src}: no train.jsonl; --data must be a corpus folder (corpus build / corpus synth)")
    if not 0.0 <= cfg.answer_only_fraction <= 1.0:
        raise InputError(f"--answer-only-fraction must be within [0, 1], got {cfg.answer_only_fraction}")
    if out.exists() and any(out.iterdir()):
        man = out / "manifest.json"
        if not (man.is_file() and read_json(man).get("stage") == "corpus-variant"):
            raise InputError(f"{out}: folder exists and is not a corpus variant; choose another --out")

    def answer_only(rec: dict) -> bool:
        if cfg.mode == "cot":
            return False
        if cfg.mode == "answer-only":
            return True
        h = hashlib.sha256(f"{cfg.seed}:{rec.get('id')}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2 ** 64 < cfg.answer_only_fraction

    counts = {}
    with atomic_dir(out) as tmp:
        for split in ("train", "valid", "test"):
            f = src / f"{split}.jsonl"
            if not f.is_file():
                continue
            rows, n_ao = [], 0
            for line, rec in iter_jsonl(f):
                if "reasoning" not in rec or "answer" not in rec:
                    raise InputError(f"{f}:{line}: a corpus record needs `reasoning` and `answer`")
                if split != "test" and answer_only(rec):
                    rec = {k: v for k, v in rec.items() if k != "thinking"} | {"reasoning": ""}
                    n_ao += 1
                rows.append(rec)
            write_jsonl(tmp / f.name, rows)
            counts[split] = {"records": len(rows), "answer_only": n_ao}
        atomic_write_json(tmp / "manifest.json", {
            "stage": "corpus-variant", "config": C.to_dict(cfg), "counts": counts,
            "source_sha256": {f.name: sha256_file(f) for f in sorted(src.glob("*.jsonl"))
                              if f.stem in ("train", "valid", "test")}})
    return out


def variant_main(argv) -> None:
    cfg = C.from_cli(C.VariantConfig, argv, "python -m mlx_distill pipeline variant", write_variant.__doc__)
    out = write_variant(cfg)
    c = read_json(out / "manifest.json")["counts"]
    print(f"wrote {out} ({cfg.mode}: " + ", ".join(f"{s} {v['records']} ({v['answer_only']} answer-only)"
                                                 for s, v in c.items()) + ")")
