"""Build the shipped sample corpus corpora/gsm8k-sample/ from GSM8K's reference solutions.

    python scripts/make_sample_corpus.py            # = --source ../shared/data/gsm8k/train.jsonl
                                                    #   --out corpora/gsm8k-sample --seed 0
                                                    #   --train 240 --valid 40 --test 40

A seeded sample of GSM8K *train* lines (never the test set, which evaluation uses), split into
train/valid/test JSONL. Each record:

    {"id": "gsm8k-train-00042", "question": ..., "reasoning": ..., "answer": "72",
     "answer_format": "####", "source": "gsm8k"}

- id: the 0-based line index in train.jsonl, spelled as mlx_distill.problems spells it, so the
  sample joins with problems / traces / logits keyed by id.
- reasoning: the solution before its ``####`` line, with the calculator annotations
  (``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``) removed: they are an artefact of how GSM8K was
  written, not text a model should learn to produce.
- answer: the official gold (text after ``####``, commas removed: ``problems.gsm8k_gold``).

The trainer renders the assistant turn as ``reasoning + "\\n#### " + answer``, which gives back
GSM8K's own format. manifest.json records the source file's sha256, the seed and the counts.
"""

import argparse
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlx_distill.io import InputError, iter_jsonl, sha256_file, write_jsonl, write_manifest  # noqa: E402
from mlx_distill.paths import shared_data_dir  # noqa: E402
from mlx_distill.problems import gsm8k_gold  # noqa: E402

CALCULATOR = re.compile(r"<<[^<>]*>>")


def to_record(index: int, row: dict, where: str) -> dict:
    solution = row.get("answer")
    if not isinstance(solution, str) or "####" not in solution or not row.get("question"):
        raise InputError(f"{where}: expected 'question' and an 'answer' with a '####' line")
    reasoning = CALCULATOR.sub("", solution.rsplit("####", 1)[0]).strip()
    if "<<" in reasoning or ">>" in reasoning:
        raise InputError(f"{where}: unbalanced calculator annotation in the solution")
    return {"id": f"gsm8k-train-{index:05d}", "question": row["question"].strip(), "reasoning": reasoning,
            "answer": gsm8k_gold(solution), "answer_format": "####", "source": "gsm8k"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=shared_data_dir() / "gsm8k" / "train.jsonl")
    p.add_argument("--out", type=Path, default=REPO / "corpora" / "gsm8k-sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=240)
    p.add_argument("--valid", type=int, default=40)
    p.add_argument("--test", type=int, default=40)
    a = p.parse_args(argv)

    rows = list(iter_jsonl(a.source))
    counts = {"train": a.train, "valid": a.valid, "test": a.test}
    if sum(counts.values()) > len(rows):
        raise InputError(f"{a.source}: {len(rows)} records, fewer than the {sum(counts.values())} asked for")
    # line numbers are 1-based in iter_jsonl; ids use the 0-based index like mlx_distill.problems
    picked = random.Random(a.seed).sample(range(len(rows)), sum(counts.values()))
    start, splits = 0, {}
    for name, n in counts.items():
        chosen = sorted(picked[start:start + n], key=lambda k: rows[k][0])
        splits[name] = [to_record(rows[k][0] - 1, rows[k][1], f"{a.source}:{rows[k][0]}") for k in chosen]
        start += n
    for name, recs in splits.items():
        write_jsonl(a.out / f"{name}.jsonl", recs)
    try:
        script = str(Path(__file__).resolve().relative_to(REPO))
    except ValueError:
        script = str(Path(__file__))
    try:
        source = str(a.source.resolve().relative_to(REPO.parent))
    except ValueError:
        source = str(a.source)
    write_manifest(a.out / "manifest.json", "sample-corpus",
                   {"source": source, "seed": a.seed, **{f"n_{k}": v for k, v in counts.items()}},
                   script=script, command="python scripts/make_sample_corpus.py",
                   source_sha256=sha256_file(a.source), source_records=len(rows),
                   counts={k: len(v) for k, v in splits.items()},
                   record_format="assistant turn = reasoning + '\\n#### ' + answer")
    size = sum((a.out / f"{k}.jsonl").stat().st_size for k in splits)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f" ({size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
