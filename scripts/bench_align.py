"""Cross-tokenizer KD cost (issue 12): the alignment's time per 1k completion tokens, and one
SFT+KD training step whose teacher has another tokenizer against one whose teacher shares the
student's, on the same student and the same batch, side by side in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python scripts/bench_align.py --model smollm2 --n 48 --batch-size 4 --steps 8 --out runs/bench_align

    # the other way round: SmolLM2 (49152 tokens) teaches a random tiny Metaspace student (the
    # alignment and its vocabulary map for a real teacher vocabulary; a tiny model's step)
    python scripts/bench_align.py --model tiny-metaspace --cross-teacher smollm2 --n 48 --batch-size 4 \
        --steps 8 --out runs/bench_align_rev

    # smoke test (random 2-block models; the step numbers are meaningless):
    python scripts/bench_align.py --model tiny --n 8 --batch-size 2 --steps 2 --reps 2 --out runs/bench_align_smoke

Teachers: the same-tokenizer teacher is --teacher (default: the student model itself); the
cross-tokenizer one is --cross-teacher, by default a random tiny model of the other tokenizer
family (``tiny-metaspace``: `mlx_distill.tiny`, SentencePiece-style BPE with byte fallback and a
Gemma-like template; ``tiny-bytelevel`` is a byte-level BPE of another vocabulary). Its weights
matter to neither cost: the alignment depends only on the two tokenisations, the step only on
the student, K and the span arrays. Any model folder of another family can be named instead.
Both re-score the first --n records of --data (a corpus folder or JSONL file; default
corpora/demo) with `mlx_distill logits` (M = --top-m).

Alignment, timed on the store the cross teacher wrote, over the train examples:
(a) ``offsets + align``: per example the student's completion offsets (`align.completion_text`)
    and `align.align` against the stored teacher offsets: median of --reps passes, per 1k
    student completion tokens;
(b) ``planning``: what `train` does at start-up, `TopMStore.check` (alignment, the per-position
    plan, coverage by class): its cost per 1k completion positions (the slope between checking
    all the examples and half of them) and its fixed part (tokenizer fingerprints, the
    vocabulary map `align.vocab_map`, teacher id -> student id by bytes, timed alone too).

Step: the trainer's own path for both stores: `sources.KDSource` builds the batch (store gather,
span arrays, kd_alpha/kd_scale, `data.trim_prompt`) and the backend's compiled step runs
`objectives.kd_objective` (across tokenizers with the tail bucket and the span term, as `train`
sets it). An SFT step on the same batch is timed beside them for scale. The three alternate
step by step, their order rotated each repetition, so any drift in machine load hits all.
Prints medians and the ratio cross / same tokenizer (target <= 1.3x), for the compiled step
alone and with the batch preparation.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEMO = REPO / "corpora" / "demo"


def first_records(arg: str, n: int, out: Path) -> Path:
    """The first `n` records of a corpus folder's train.jsonl (or a JSONL file), as one file."""
    from mlx_distill.io import read_jsonl, write_jsonl

    src = Path(arg)
    path = src / "train.jsonl" if src.is_dir() else src
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data (a corpus folder or JSONL file); the demo corpus is "
                         "written by `python -m mlx_distill corpus synth --out corpora/demo`")
    rows = read_jsonl(path)[:n]
    if len(rows) < n:
        raise SystemExit(f"{path} has {len(rows)} records, --n asks for {n}")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "corpus.jsonl", rows)
    return out / "corpus.jsonl"


def tiny(name: str, out: Path) -> str:
    """A random 2-block model: 'tiny' (byte-level BPE, the tests' `tiny_model`), 'tiny-metaspace'
    (the other family) or 'tiny-bytelevel' (byte-level BPE trained on other text: same family,
    another vocabulary)."""
    from mlx_distill.tiny import build_model, synthetic_texts_alt

    folder = out / name
    if not (folder / "config.json").is_file():
        kw = {"tiny": {}, "tiny-metaspace": dict(kind="metaspace", seed=3),
              "tiny-bytelevel": dict(texts=synthetic_texts_alt(), seed=3)}[name]
        build_model(folder, **kw)
    return str(folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="student: model folder, hub id, 'smollm2', or a random "
                    "'tiny', 'tiny-metaspace', 'tiny-bytelevel'")
    ap.add_argument("--teacher", default="", help="same-tokenizer teacher (default: the student model)")
    ap.add_argument("--cross-teacher", default="tiny-metaspace",
                    help="teacher of another tokenizer: a model folder, 'tiny-metaspace' or 'tiny-bytelevel'")
    ap.add_argument("--data", default=str(DEMO), help="corpus folder or JSONL file (default: %(default)s)")
    ap.add_argument("--n", type=int, default=48, help="training records to score and batch")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top-m", type=int, default=25)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each kind (after 2 warm-up steps each)")
    ap.add_argument("--reps", type=int, default=5, help="passes over the examples for the alignment timing")
    ap.add_argument("--out", default="runs/bench_align")
    args = ap.parse_args()
    from mlx_distill import blas

    blas.ensure_fast_blas([__file__, *sys.argv[1:]])

    import mlx.core as mx
    import numpy as np

    from mlx_distill.teacher import align

    from mlx_distill import data

    from mlx_distill.training import sources
    from mlx_distill.backends import get_backend
    from mlx_distill.config import LogitsConfig, TrainConfig, build
    from mlx_distill.teacher.logits import extract
    from mlx_distill.teacher.store import TopMStore
    from mlx_distill.training.kd import kd_setup, student_vocab_size
    from mlx_distill.training.objectives import kd_objective, sft_objective

    out = Path(args.out)
    corpus = first_records(args.data, args.n, out)
    if args.model in ("tiny", "tiny-metaspace", "tiny-bytelevel"):
        args.model = tiny(args.model, out)
    teacher = args.teacher or args.model
    cross_teacher = tiny(args.cross_teacher, out) if args.cross_teacher.startswith("tiny-") else args.cross_teacher
    print(f"blas: {blas.status()}")

    stores = {}
    for name, t in (("same", teacher), ("cross", cross_teacher)):
        lcfg = build(LogitsConfig, dict(teacher=t, data=str(corpus), out=str(out / f"logits-{name}-{time.time_ns()}"),
                                        top_m=args.top_m, batch_size=args.batch_size, max_seq_length=1024))
        ex = extract(lcfg, quiet=True)
        stores[name] = lcfg.out
        print(f"extraction  {name:5s} teacher {t}: {ex['examples']} examples, {ex['positions']} completion tokens")

    cfgs = {name: build(TrainConfig, dict(model=args.model, data=str(corpus), out=str(out / "run"),
                                          batch_size=args.batch_size, max_seq_length=1024, kd_dir=d,
                                          kd_top_k=args.top_k, lora_layers=16, warmup=0, val_fraction=0.0))
            for name, d in stores.items()}
    cfg = cfgs["same"]
    backend = get_backend(cfg)
    _, tok = backend.load()
    examples = data.load_examples(cfg, tok, "train")
    vocab = student_vocab_size(cfg, tok)

    # ---------------------------------------------------------------- alignment
    cross = TopMStore(stores["cross"])
    ntok = sum(len(ex.tokens) - ex.prompt_len for ex in examples)
    passes = []
    for _ in range(args.reps + 1):  # the first pass (shard reads, token-piece tables) is not counted
        tic = time.perf_counter()
        for ex in examples:
            ent = cross.entries[ex.id]
            _, s_ends = align.completion_text(tok, ex.tokens[ex.prompt_len:])
            align.align(cross.teacher_ends(ex.id)[int(ent["prompt_len"]):], s_ends)
        passes.append(time.perf_counter() - tic)
    passes = passes[1:]
    # the start-up planning has a fixed part (the tokenizer fingerprint, the vocabulary map) and a
    # part per example: checking all examples and half of them separates the two
    half = examples[: len(examples) // 2]
    maps, plans, halves = [], [], []
    for _ in range(args.reps):
        tic = time.perf_counter()
        vmap = align.vocab_map(cross.teacher_pieces(), tok)
        maps.append(time.perf_counter() - tic)
        for part, into in ((half, halves), (examples, plans)):
            store = TopMStore(stores["cross"])  # a fresh store each time, as `train` opens it
            tic = time.perf_counter()
            rep = store.check(part, vocab, tok, min_coverage=0.0)
            into.append(time.perf_counter() - tic)
    t_vocab, t_all, t_half = (statistics.median(v) for v in (maps, plans, halves))
    n_half = sum(len(ex.tokens) - ex.prompt_len for ex in half)
    per_pos = (t_all - t_half) / max(ntok - n_half, 1)
    fixed = t_all - per_pos * ntok
    shares = ", ".join(f"{k} {v / max(rep['positions'], 1):.1%}" for k, v in rep["classes"].items())
    print(f"alignment  student {args.model} <- teacher {cross_teacher}: {len(examples)} examples, {ntok} student "
          f"completion tokens ({rep['mode']}: {shares}; {rep['dropped_fraction']:.1%} of matched teacher slots to "
          f"the tail bucket)")
    print(f"  offsets + align     {statistics.median(passes) / ntok * 1e6:8.1f} ms per 1k tokens "
          f"(median of {args.reps} passes)")
    print(f"  planning (check)    {per_pos * 1e6:8.1f} ms per 1k positions + {fixed * 1e3:.0f} ms once (tokenizer "
          f"fingerprints, the vocabulary map: {t_vocab * 1e3:.0f} ms for {len(vmap)} teacher ids); whole check "
          f"{t_all * 1e3:.0f} ms, half the examples {t_half * 1e3:.0f} ms (medians of {args.reps})")

    # ---------------------------------------------------------------- step timing
    backend.prepare()
    backend.init_optimizer()
    src, steps = {}, {}
    stream = data.BatchStream(examples, cfg.batch_size, cfg.seed, data.pad_id_of(tok))
    k = len(stream) // 2  # a mid-length batch, the same for every kind
    for name in ("same", "cross"):
        st = kd_setup(cfgs[name], {"train": examples}, tok, vocab)
        src[name] = lambda c=cfgs[name], s=st: sources.KDSource(stream, c, s).batch(k, 0)[0]
        backend.build_step(kd_objective(backend.forward, cfgs[name], tail=st.cross))
        steps[name] = backend._step
    src["sft"] = lambda: sources.CorpusSource(stream).batch(k, 0)[0]
    backend.build_step(sft_objective(backend.forward))
    steps["sft"] = backend._step

    def run(name, arrays):
        backend._step = steps[name]
        tic = time.perf_counter()
        r = backend.train_step(arrays, update=True)
        return time.perf_counter() - tic, r

    arrays = {name: make() for name, make in src.items()}
    kinds = ["same", "cross", "sft"]
    for _ in range(2):  # compile + warm caches
        for name in kinds:
            run(name, arrays[name])
    times = {f"{n}{p}": [] for n in kinds for p in ("", "_prep")}
    last = {}
    for i in range(args.steps):
        for name in kinds[i % 3:] + kinds[: i % 3]:  # rotate the order each repetition
            tic = time.perf_counter()
            a = src[name]()
            times[f"{name}_prep"].append(time.perf_counter() - tic)
            dt, last[name] = run(name, a)
            times[name].append(dt)
    med = {n: statistics.median(v) for n, v in times.items()}
    prep = {n: statistics.median(s + p for s, p in zip(times[n], times[f"{n}_prep"])) for n in kinds}
    b = stream.at(k)
    a = arrays["cross"]
    print(f"step timing  student {args.model}, batch {b.tokens.shape[0]}x{b.tokens.shape[1]} ({b.ntokens} completion "
          f"tokens; logits for the last {a['targets'].shape[1]} positions), K={args.top_k}, {args.steps} rotating "
          f"repetitions, median:")
    print(f"  SFT step                  {med['sft'] * 1e3:8.1f} ms")
    print(f"  KD step, same tokenizer   {med['same'] * 1e3:8.1f} ms   ({med['same'] / med['sft']:.3f}x SFT)")
    print(f"  KD step, across           {med['cross'] * 1e3:8.1f} ms   ratio {med['cross'] / med['same']:.3f}x the "
          f"same-tokenizer KD step (target <= 1.3x; {med['cross'] / med['sft']:.3f}x SFT)")
    print(f"  with batch prep           same {prep['same'] * 1e3:.1f} ms vs across {prep['cross'] * 1e3:.1f} ms   "
          f"ratio {prep['cross'] / prep['same']:.3f}x (prep: same {med['same_prep'] * 1e3:.2f} ms, across "
          f"{med['cross_prep'] * 1e3:.2f} ms)")
    for name in ("same", "cross"):
        r = last[name]
        nk = r.get("kd_positions") or r["ntokens"]
        print(f"  last {name:5s} KD step: kd_loss {r['kd_loss'] / max(nk, 1):.4f} per teacher-covered position "
              f"({nk:.0f} of {r['ntokens']:.0f})")
    print(f"  peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
