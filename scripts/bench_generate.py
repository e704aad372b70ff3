"""Generation throughput: batched vs one-at-a-time decoding, same model, same prompts, one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python scripts/bench_generate.py
    python scripts/bench_generate.py --model smollm2 --prompts 16 --max-tokens 128 --batch-size 8

Prompts: the first N GSM8K test questions through the evaluator's zero-shot template and the
model's chat template. Greedy decoding with a fixed token budget (``--ignore-eos`` is not
available in mlx-lm's batch generator, so sequences may stop early; every figure below counts
the tokens actually generated). Three ways, side by side:

1. ``mlx_lm.stream_generate``, one prompt after another (what a plain script does);
2. ``MLXClient(batch_size=1)``, one request at a time (the toolkit's client, no batching);
3. ``MLXClient(batch_size=B)``, all requests in flight (continuous batching: the evaluator's path).

Prints generated tokens/s of each and the ratio batched / one-at-a-time, and how many greedy
outputs are identical between the batched and one-at-a-time client runs.
"""

import argparse
import asyncio
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_distill import blas  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model folder, hub id, 'smollm2', or 'tiny' (random)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    blas.ensure_fast_blas([__file__, *sys.argv[1:]])

    import mlx.core as mx
    from mlx_lm import stream_generate

    from mlx_distill.config import EvalConfig
    from mlx_distill.evaluation.evaluate import build_messages, load_eval_problems, template_for
    from mlx_distill.generation import mlx_client

    model = args.model
    if model == "tiny":
        import tempfile

        from mlx_distill.tiny import build_model

        model = str(build_model(Path(tempfile.mkdtemp()) / "tiny"))
    problems = load_eval_problems("gsm8k", limit=args.prompts)
    _, template = template_for(EvalConfig(dataset="gsm8k"))
    messages = [build_messages(p["question"], template, "####") for p in problems]

    batched = mlx_client(model, batch_size=args.batch_size)
    single = mlx_client(model, batch_size=1)
    single.model, single.tokenizer = batched.model, batched.tokenizer  # the very same weights
    tok = batched.tokenizer

    async def one_at_a_time():
        return [await single.complete(m, temperature=0.0, max_tokens=args.max_tokens) for m in messages]

    async def all_in_flight():
        return await asyncio.gather(*(batched.complete(m, temperature=0.0, max_tokens=args.max_tokens)
                                      for m in messages))

    # warm-up (kernels, thread start)
    asyncio.run(batched.complete(messages[0], max_tokens=4))
    asyncio.run(single.complete(messages[0], max_tokens=4))

    rows = []
    t = time.perf_counter()
    n_tok = 0
    for m in messages:
        prompt = tok.apply_chat_template(m, add_generation_prompt=True)
        last = None
        for last in stream_generate(batched.model, tok, prompt, max_tokens=args.max_tokens):
            pass
        n_tok += last.generation_tokens
    rows.append(("mlx_lm.stream_generate, one at a time", n_tok, time.perf_counter() - t))

    t = time.perf_counter()
    seq = asyncio.run(one_at_a_time())
    rows.append(("MLXClient batch 1, one at a time", sum(c.completion_tokens for c in seq), time.perf_counter() - t))

    t = time.perf_counter()
    bat = asyncio.run(all_in_flight())
    rows.append((f"MLXClient batch {args.batch_size}, all in flight", sum(c.completion_tokens for c in bat),
                 time.perf_counter() - t))
    asyncio.run(batched.aclose())
    asyncio.run(single.aclose())

    print(f"model {args.model}, {len(messages)} GSM8K prompts, greedy, max {args.max_tokens} tokens; "
          f"{platform.machine()} {platform.system()}, BLAS preloaded: {blas.preloaded()}, mlx {mx.__version__}")
    for name, n, s in rows:
        print(f"{name:<36} {n:>6} tokens  {s:7.2f} s  {n / s:8.1f} tokens/s")
    base = rows[1][1] / rows[1][2]
    print(f"ratio batched / one-at-a-time (same client): {rows[2][1] / rows[2][2] / base:.2f}x")
    print(f"ratio batched / mlx_lm.stream_generate:      {rows[2][1] / rows[2][2] / (rows[0][1] / rows[0][2]):.2f}x")
    same = sum(a.text == b.text for a, b in zip(seq, bat))
    print(f"identical greedy outputs batched vs one-at-a-time: {same}/{len(messages)}")


if __name__ == "__main__":
    main()
