"""Student rollouts inside training: sampled completions of corpus prompts by the model being
trained, with its current adapter (the live model object: no second copy of the weights).

Generation is mlx-lm's continuous batching (`mlx_lm.generate.BatchGenerator`, as
`backends.mlx.MLXBackend.generate` and `generation.clients.MLXClient` use it) with mlx-lm's
sampler (temperature, top-p). The sampling key is set from an integer the caller derives from
(seed, micro-batch index) (`rollout_key`): the same prompts, weights and key give the same
rollouts, so a resumed run regenerates exactly the rollouts it would have made.

A rollout that reaches its token cap without EOS is kept, marked ``finished=False``
(truncated); one that samples EOS keeps the EOS token (the student chose to stop: the
teacher scores that choice too).
"""

import hashlib
from dataclasses import dataclass, field


@dataclass
class Rollout:
    tokens: list = field(default_factory=list)  # completion token ids (EOS included when finished)
    finished: bool = False  # ended by EOS (else truncated at its cap)


def rollout_key(seed: int, micro: int) -> int:
    """The sampling key of micro-batch `micro`: a pure function of (seed, micro), apart from
    the dropout keys (`seed * 1_000_003 + micro`) the backend uses."""
    h = hashlib.sha256(f"rollout:{seed}:{micro}".encode()).digest()
    return int.from_bytes(h[:4], "big")


def eos_ids(tokenizer) -> list[int]:
    ids = getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id]
    return sorted(int(t) for t in ids)


def sample(model, tokenizer, prompts: list, max_tokens, temperature: float = 1.0, top_p: float = 1.0,
           key: int = 0, batch_size: int | None = None) -> list[Rollout]:
    """Sample one completion per prompt (token-id lists) with `model` as it is now.

    `max_tokens`: one cap for all, or one per prompt. The caller puts the model in eval mode
    (no dropout). Returns the rollouts in prompt order."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    caps = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else [int(max_tokens)] * len(prompts)
    n = batch_size or len(prompts)
    gen = BatchGenerator(model, stop_tokens=[[t] for t in eos_ids(tokenizer)],
                         sampler=make_sampler(temp=float(temperature), top_p=float(top_p)),
                         completion_batch_size=n, prefill_batch_size=min(n, 8))
    mx.random.seed(key)
    try:
        uids = gen.insert([list(p) for p in prompts], caps)
        out = {u: Rollout() for u in uids}
        todo = set(uids)
        while todo:
            responses = gen.next_generated()
            if not responses:
                break
            for r in responses:
                out[r.uid].tokens.append(int(r.token))
                if r.finish_reason is not None:
                    out[r.uid].finished = r.finish_reason == "stop"
                    todo.discard(r.uid)
    finally:
        gen.close()
    return [out[u] for u in uids]
