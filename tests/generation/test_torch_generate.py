"""TorchClient: greedy generations identical to mlx-lm's (MLXClient), with and without an adapter;
seeded sampling reproducible; the ``complete()`` interface of the other clients."""

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import mlx.core as mx  # noqa: E402

from mlx_distill.generation.torch import TorchClient  # noqa: E402
from mlx_distill.generation.clients import MLXClient, complete_all  # noqa: E402

PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in ((3, 4), (12, 30), (7, 7))] + \
          ["Ann has 5 apples"]  # a raw prompt: no chat template


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    from test_adapters import mlx_adapter

    return mlx_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "mlx", num_layers=2, scale=20.0)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_greedy_generations_identical_to_mlx(tiny_model, adapter, with_adapter):
    path = str(adapter) if with_adapter else None
    tc = TorchClient(str(tiny_model), adapter_path=path, batch_size=4)
    mc = MLXClient(str(tiny_model), adapter_path=path, batch_size=1)
    mx.eval(mc.model.parameters())  # lazy adapter arrays must not first be evaluated in the worker thread (as evaluate.py does)

    async def both():
        t = await complete_all(tc, PROMPTS, temperature=0.0, max_tokens=24)
        m = [await mc.complete(p, temperature=0.0, max_tokens=24) for p in PROMPTS]
        await mc.aclose()
        return t, m

    t, m = run(both())
    for a, b in zip(t, m):
        assert (a.text, a.reasoning, a.finish_reason, a.prompt_tokens, a.completion_tokens) == \
               (b.text, b.reasoning, b.finish_reason, b.prompt_tokens, b.completion_tokens)
    assert sum(c.completion_tokens for c in t) > 20
    # one by one == batched (left padding does not change greedy tokens)
    one = [run(tc.complete(p, max_tokens=24)) for p in PROMPTS[:2]]
    assert [c.text for c in one] == [c.text for c in t[:2]]


def test_sampling_is_seeded_and_independent_of_batch(tiny_model):
    tc = TorchClient(str(tiny_model))
    p = PROMPTS[0]
    a = run(tc.complete(p, temperature=1.0, max_tokens=16, seed=1))
    b = run(complete_all(tc, [PROMPTS[1], p], temperature=1.0, max_tokens=16, seed=1))[1]
    c = run(tc.complete(p, temperature=1.0, max_tokens=16, seed=2))
    assert a.text == b.text
    assert a.text != c.text or a.completion_tokens != c.completion_tokens
    assert tc.describe()["kind"] == "torch" and tc.stats["requests"] == 4


def test_finish_reasons_and_eos(tiny_model):
    tc = TorchClient(str(tiny_model))
    toks, reason = tc.generate([tc.encode(PROMPTS[0])], [3])[0]
    assert reason == "length" and len(toks) == 3

    class EosFirst(torch.nn.Module):  # the model's head, with EOS made the argmax
        def __init__(self, head, eos):
            super().__init__()
            self.head, self.eos = head, eos

        def forward(self, h):
            z = self.head(h)
            z[..., self.eos] += 1e4
            return z

    tc.model.lm_head = EosFirst(tc.model.lm_head, tc.eos_ids[0])
    c = run(tc.complete(PROMPTS[0], max_tokens=5))
    assert (c.finish_reason, c.completion_tokens, c.text) == ("stop", 0, "")
