"""MLX backend: mlx-lm models, LoRA/DoRA layers, AdamW, a compiled step.

Implements the small interface the training loop (`mlx_distill.train`) drives; the torch
backend (`backends/torch.py`) implements the same methods.
"""

import json
import os
from functools import partial
from pathlib import Path

import numpy as np

from ..models import resolve_model
from .base import BackendBase


def save_arrays_atomic(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    import mlx.core as mx

    from ..io import atomic_path

    with atomic_path(path) as tmp:
        # mx.save_safetensors appends .safetensors when missing
        target = str(tmp) + ".safetensors"
        mx.save_safetensors(target, arrays, metadata=metadata or {})
        os.replace(target, tmp)


class MLXBackend(BackendBase):
    name = "mlx"

    def __init__(self, cfg):
        import mlx.core as mx

        self.cfg = cfg
        self.mx = mx
        self.model = None
        self._head = None
        self.optimizer = None
        self._step = None

    # ------------------------------------------------------------------ model
    def load(self):
        from mlx_lm import load

        self.model_path = resolve_model(self.cfg.model)
        self.model, self.tokenizer = load(self.model_path)
        return self.model, self.tokenizer

    def prepare(self):
        """Freeze the base, add LoRA/DoRA layers (or unfreeze blocks for full fine-tuning)."""
        from mlx_lm.tuner.trainer import grad_checkpoint
        from mlx_lm.tuner.utils import linear_to_lora_layers

        cfg, mx, model = self.cfg, self.mx, self.model
        mx.random.seed(cfg.seed)
        n_layers = len(model.layers)
        self.num_layers = n_layers if cfg.lora_layers < 0 else min(cfg.lora_layers, n_layers)
        model.freeze()
        if cfg.fine_tune_type == "full":
            for layer in model.layers[-self.num_layers:]:
                layer.unfreeze()
        else:
            linear_to_lora_layers(model, self.num_layers, self.lora_parameters(), use_dora=cfg.fine_tune_type == "dora")
        if cfg.grad_checkpoint:
            grad_checkpoint(model.layers[0])
        self._head = self._find_head()
        return model

    def _find_head(self):
        """The output projection, when the model's logits are exactly head(model.model(x)).

        Then `forward(..., keep=n)` projects only the last n positions: the vocabulary
        projection is a large share of a small model's FLOPs, and the masked prompt
        positions need no logits. Checked numerically once, so an architecture with extra
        output processing (soft-capping, scaling) silently keeps the full path."""
        mx, model = self.mx, self.model
        inner = getattr(model, "model", None)
        head = getattr(model, "lm_head", None)
        if head is None and inner is not None and hasattr(getattr(inner, "embed_tokens", None), "as_linear"):
            head = inner.embed_tokens.as_linear
        if inner is None or head is None:
            return None
        was_training = model.training
        model.eval()
        try:
            x = mx.array([[1, 2, 3, 4]])
            ok = mx.allclose(model(x)[:, -2:], head(inner(x)[:, -2:]), rtol=1e-4, atol=1e-4).item()
        except Exception:  # noqa: BLE001 - any mismatch in structure means "use the full path"
            ok = False
        model.train(was_training)
        return head if ok else None

    def parameter_counts(self) -> dict:
        from mlx.utils import tree_flatten

        total = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        return {"total": int(total), "trainable": int(trainable)}

    def forward(self, model, inputs, keep: int | None = None):
        """Logits for the last `keep` positions (all when None)."""
        if keep is None or keep >= inputs.shape[1]:
            return model(inputs)
        if self._head is not None:
            return self._head(model.model(inputs)[:, -keep:])
        return model(inputs)[:, -keep:]

    def to_arrays(self, arrays: dict) -> dict:
        mx = self.mx
        return {k: (mx.array(v) if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}

    # ------------------------------------------------------------------ optimisation
    def schedule(self):
        import mlx.optimizers as optim

        cfg = self.cfg
        lr, warm = cfg.learning_rate, max(cfg.warmup, 0)
        decay_steps = max((cfg.decay_iters or cfg.iters) - warm, 1)  # constant at the end rate after it
        if cfg.lr_schedule == "cosine":
            main = optim.cosine_decay(lr, decay_steps, end=lr * cfg.min_lr_ratio)
        elif cfg.lr_schedule == "linear":
            main = optim.linear_schedule(lr, lr * cfg.min_lr_ratio, decay_steps)
        else:
            main = optim.linear_schedule(lr, lr, 1)  # constant, as an array-valued schedule
        if warm == 0:
            return main
        # step s (0-based) of the warm-up gets lr*(s+1)/warm: no wasted step at lr=0
        # (max(.., 1): mlx refuses a 0-step schedule; with warmup 1 it is only read at step 0 = lr)
        return optim.join_schedules([optim.linear_schedule(lr / warm, lr, max(warm - 1, 1)), main], [warm])

    def init_optimizer(self):
        import mlx.optimizers as optim

        self.optimizer = optim.AdamW(learning_rate=self.schedule(), weight_decay=self.cfg.weight_decay)
        self.optimizer.init(self.model.trainable_parameters())

    def build_step(self, objective):
        """Compile one micro-step: loss, grads; on `update`, divide the accumulated grads by
        the accumulated token count once, clip, and apply AdamW."""
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx.utils import tree_map

        cfg, model = self.cfg, self.model
        if self.optimizer is None:
            self.init_optimizer()

        def step(batch, acc, acc_n, update: bool):
            def f(m, b):
                s, n, parts = objective(m, b)
                return s, (n, parts)

            (s, (n, parts)), grads = nn.value_and_grad(model, f)(model, batch)
            if acc is not None:
                grads = tree_map(lambda a, g: a + g, acc, grads)
                n_tot = acc_n + n
            else:
                n_tot = n
            if update:
                grads = tree_map(lambda g: g / mx.maximum(n_tot, 1.0), grads)
                if cfg.max_grad_norm > 0:
                    grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
                self.optimizer.update(model, grads)
                grads, n_tot = None, None
            return s, n, parts, grads, n_tot

        if cfg.compile:
            state = [model.state, self.optimizer.state, mx.random.state]
            step = partial(mx.compile, inputs=state, outputs=state)(step)
        self._step = step
        self._acc, self._acc_n = None, None
        self._state = [model.state, self.optimizer.state, mx.random.state]

    def train_step(self, arrays: dict, update: bool, micro: int = 0) -> dict:
        # Dropout's RNG is a pure function of (seed, micro-batch index): a resumed run draws
        # exactly the masks the uninterrupted run would have (MLX cannot restore a saved key).
        self.mx.random.seed(self.cfg.seed * 1_000_003 + micro)
        s, n, parts, self._acc, self._acc_n = self._step(self.to_arrays(arrays), self._acc, self._acc_n, update)
        self.mx.eval(self._state, s, n, parts, self._acc, self._acc_n)
        return {"loss_sum": s.item(), "ntokens": n.item(), **{k: v.item() for k, v in parts.items()}}

    def eval_step(self, objective, arrays: dict) -> dict:
        s, n, parts = objective(self.model, self.to_arrays(arrays))
        self.mx.eval(s, n, parts)
        return {"loss_sum": s.item(), "ntokens": n.item(), **{k: v.item() for k, v in parts.items()}}

    def train_mode(self, on: bool) -> None:
        self.model.train(on)

    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate.item())

    def generate(self, prompts: list, max_tokens: int, batch_size: int = 32) -> list:
        """Greedy continuations (token ids, EOS excluded) of `prompts` by the live model and its
        current adapter, batched by mlx-lm's BatchGenerator (as `generation.clients.MLXClient`), in
        this thread. The caller puts the model in eval mode (no dropout)."""
        from mlx_lm.generate import BatchGenerator

        eos = getattr(self.tokenizer, "eos_token_ids", None) or [self.tokenizer.eos_token_id]
        gen = BatchGenerator(self.model, stop_tokens=[[t] for t in eos], completion_batch_size=batch_size,
                             prefill_batch_size=min(batch_size, 8))
        try:
            uids = gen.insert([list(p) for p in prompts], [max_tokens] * len(prompts))
            out, todo = {u: [] for u in uids}, set(uids)
            while todo:
                responses = gen.next_generated()
                if not responses:
                    break
                for r in responses:
                    if r.finish_reason != "stop":  # the stop token itself is not part of the text
                        out[r.uid].append(r.token)
                    if r.finish_reason is not None:
                        todo.discard(r.uid)
        finally:
            gen.close()
        return [out[u] for u in uids]

    def sample(self, prompts: list, max_tokens: list, temperature: float, top_p: float, key: int) -> list:
        """On-policy rollouts by the live model (`mlx_distill.rollouts.sample`); the caller sets eval mode."""
        from ..rollouts import sample

        return sample(self.model, self.tokenizer, prompts, max_tokens, temperature, top_p, key)

    def peak_memory_gb(self) -> float:
        return self.mx.get_peak_memory() / 1e9

    # ------------------------------------------------------------------ persistence
    def adapter_weights(self) -> dict:
        from mlx.utils import tree_flatten

        return dict(tree_flatten(self.model.trainable_parameters()))

    def save_adapter(self, folder: Path, name: str = "adapters.safetensors") -> None:
        save_arrays_atomic(Path(folder) / name, self.adapter_weights())

    def save_checkpoint(self, folder: Path, state: dict) -> None:
        """Adapter + optimizer + loop state (RNG is derived from it), written to a temp folder and renamed."""
        from mlx.utils import tree_flatten

        from ..io import atomic_dir

        with atomic_dir(folder) as tmp:
            save_arrays_atomic(tmp / "adapters.safetensors", self.adapter_weights())
            save_arrays_atomic(tmp / "optimizer.safetensors", dict(tree_flatten(self.optimizer.state)))
            (tmp / "state.json").write_text(json.dumps(state, indent=2))

    def load_checkpoint(self, folder: Path) -> dict:
        from mlx.utils import tree_unflatten

        from ..io import InputError, complete_dir

        mx = self.mx
        found = complete_dir(folder)
        if found is None:
            raise InputError(f"{folder}: no checkpoint (nor {Path(folder).name}.old)")
        folder = found
        self.model.load_weights(list(mx.load(str(folder / "adapters.safetensors")).items()), strict=False)
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
        mx.eval(self.model.parameters(), self.optimizer.state)
        return json.loads((folder / "state.json").read_text())
