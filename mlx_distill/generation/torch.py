"""`TorchClient`: a transformers model (+ an mlx-lm or PEFT adapter) behind the ``complete()``
interface every generation client shares (`mlx_distill.generation`): greedy requests are
batched, sampled requests run one at a time with their own seed."""

import asyncio
import threading
import time
from typing import Optional

from mlx_distill.backends.torch import eos_ids as _eos_ids, hf_generate, load_model
from mlx_distill.models import resolve_model


class TorchClient:
    """A transformers model (optionally with an mlx-lm or PEFT adapter) behind the
    ``complete()`` interface of `mlx_distill.generation.clients.MLXClient`.

    ``temperature=0`` is greedy (argmax, like mlx-lm); greedy requests that arrive together
    are decoded as one left-padded batch of up to ``batch_size``. A sampled request runs
    alone with ``torch.manual_seed(seed)`` so its sample does not depend on the others.
    Generation stops at the tokenizer's / config's EOS tokens (not included in the text).
    """

    kind = "torch"

    def __init__(self, model: str, adapter_path: Optional[str] = None, batch_size: int = 8,
                 device: Optional[str] = None, dtype: Optional[str] = None, model_obj: Optional[tuple] = None,
                 chat_template_kwargs: Optional[dict] = None):
        import torch

        self.torch = torch
        self.model_path, self.adapter_path = str(model), adapter_path
        self.batch_size = max(1, int(batch_size))
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        if model_obj is not None:
            self.model, self.tokenizer = model_obj
        else:
            self.model, self.tokenizer = load_model(resolve_model(self.model_path), adapter_path, self.device, dtype)
        self.model.eval()
        self.model_id = self.model_path + (f"+{adapter_path}" if adapter_path else "")
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._lock = threading.Lock()
        self._pending: list = []
        import collections

        self.stats = collections.Counter()

    def __repr__(self) -> str:
        return f"TorchClient(model={self.model_id!r}, device={self.device}, batch_size={self.batch_size})"

    def describe(self) -> dict:
        return {"kind": "torch", "model": self.model_path, "adapter_path": self.adapter_path,
                "batch_size": self.batch_size, "device": str(self.device)}

    def parameter_counts(self) -> dict:
        """As `evaluate.parameter_counts` reports an MLX model: all parameters, and the LoRA ones."""
        total = adapter = 0
        for name, p in self.model.named_parameters():
            total += p.numel()
            adapter += p.numel() if "lora" in name else 0
        return {"total": int(total), "adapter": int(adapter)}

    def encode(self, messages) -> list[int]:
        if isinstance(messages, str):  # a raw prompt, tokenised as MLXClient does (with the tokenizer's BOS)
            return self.tokenizer.encode(messages)
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False, **self.chat_template_kwargs))

    async def complete(self, messages, *, temperature: float = 0.0, max_tokens: int = 1024,
                       seed: Optional[int] = None, top_p: Optional[float] = None, stop: Optional[list] = None,
                       logprobs: bool = False, top_logprobs: Optional[int] = None, **extra):
        from mlx_distill.generation.clients import Completion, think_fields

        if stop:
            raise ValueError("TorchClient: stop strings are not supported; the model stops at its EOS tokens")
        prompt = self.encode(messages)
        if not prompt:
            raise ValueError("TorchClient: empty prompt")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        req = {"prompt": prompt, "max_tokens": int(max_tokens), "temperature": float(temperature or 0.0),
               "seed": seed, "top_p": top_p, "future": fut, "loop": loop, "t": time.perf_counter()}
        with self._lock:
            self._pending.append(req)
        # the worker thread drains everything queued so far: concurrent greedy calls share a batch
        await asyncio.sleep(0)
        await asyncio.to_thread(self._drain)
        tokens, finish = await fut
        text = self.tokenizer.decode(tokens)
        reasoning, answer = think_fields(text)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(prompt)
        self.stats["completion_tokens"] += len(tokens)
        return Completion(text=answer, reasoning=reasoning, finish_reason=finish, model=self.model_id,
                          prompt_tokens=len(prompt), completion_tokens=len(tokens),
                          latency_s=time.perf_counter() - req["t"])

    def _drain(self) -> None:
        with self._lock:  # one generation at a time; whoever holds the lock serves everyone queued
            while self._pending:
                greedy = [r for r in self._pending if r["temperature"] == 0][: self.batch_size]
                batch = greedy or [self._pending[0]]
                for r in batch:
                    self._pending.remove(r)
                try:
                    results = self.generate([r["prompt"] for r in batch], [r["max_tokens"] for r in batch],
                                            batch[0]["temperature"], batch[0]["seed"], batch[0]["top_p"])
                    for r, res in zip(batch, results):
                        r["loop"].call_soon_threadsafe(_set_result, r["future"], res, None)
                except BaseException as e:
                    for r in batch:
                        r["loop"].call_soon_threadsafe(_set_result, r["future"], None, e)

    def generate(self, prompts: list[list[int]], max_tokens: list[int], temperature: float = 0.0,
                 seed: Optional[int] = None, top_p: Optional[float] = None) -> list[tuple[list[int], str]]:
        """Token ids after each prompt and the finish reason ("stop" at EOS, else "length")."""
        return hf_generate(self.model, self.device, prompts, max_tokens, self.eos_ids, self.pad_id,
                           temperature, seed, top_p)

    async def aclose(self) -> None:
        return None


def _set_result(fut, result, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
