"""Small data builders shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

import json

import numpy as np


def arith_records(n, seed=0, start=0):
    """Short corpus records `What is a + b?` with ids a<start>..., one-line reasoning and the sum."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        out.append({"id": f"a{start + i}", "question": f"What is {a} + {b}?",
                    "reasoning": f"{a} + {b} = {a + b}.", "answer": str(a + b)})
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
