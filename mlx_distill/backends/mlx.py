"""MLX backend: mlx-lm models, LoRA/DoRA layers, AdamW, a compiled step.

Implements the small interface the training loop (`mlx_distill.training.train`) drives; the torch
backend (`backends/torch.py`) implements the same methods.

Several processes or Macs (``mlx.launch``; `mlx_distill.backends.distributed.mlx_group`): every rank
sees the same micro-batch stream and takes the rows ``rank::world`` of each micro-batch; the
loss sums and token counts of every micro-batch and, at the update, the summed gradients are
added up over the ranks with ``mx.distributed.all_sum`` (inside the compiled step) and divided
by the global token count, so the step is the single-process step on the whole batch. Rank 0
alone writes the run folder; on resume it reads the checkpoint and hands it to the others::

    mlx.launch -n 2 -- python -m mlx_distill train --model smollm2 --data corpora/demo --out runs/x
    mlx.launch --hostfile hosts.json -- python -m mlx_distill train ...
"""

import json
import os
from functools import partial
from pathlib import Path

import numpy as np

from mlx_distill.models import resolve_model
from mlx_distill.backends.base import BackendBase, SplitHead, checkpoint_fix, resolve_loss_chunk

# gradients travel in flat buffers of at most this many bytes (one all_sum each): few large
# messages instead of one per LoRA matrix, without a full second copy of a large model's grads
BUCKET_BYTES = 64 << 20
# --kd-hidden: the model's child module holding the learned projection (`training.hidden`), trained
# with the adapter and written beside it as hidden_projection.safetensors
PROJECTION = "hidden_projection"


def sum_over_ranks(grads, all_reduce, bucket_bytes: int = BUCKET_BYTES):
    """The gradient tree summed over the ranks: leaves of one dtype are concatenated into flat
    buckets of at most `bucket_bytes`, each all-reduced once, and split back."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    leaves = tree_flatten(grads)
    out, bucket, size = {}, [], 0

    def flush():
        nonlocal bucket, size
        if bucket:
            flat = all_reduce(mx.concatenate([g.reshape(-1) for _, g in bucket]))
            offsets = np.cumsum([g.size for _, g in bucket])[:-1].tolist()
            for (k, g), part in zip(bucket, mx.split(flat, offsets)):
                out[k] = part.reshape(g.shape)
        bucket, size = [], 0

    for dtype in dict.fromkeys(g.dtype for _, g in leaves):
        for k, g in leaves:
            if g.dtype != dtype:
                continue
            if size and size + g.nbytes > bucket_bytes:
                flush()
            bucket.append((k, g))
            size += g.nbytes
        flush()
    return tree_unflatten([(k, out[k]) for k, _ in leaves])


def run_chunks(piece, x, bounds):
    """`SplitHead.run` on MLX: every chunk's ``piece(x[:, lo:hi], j)`` outputs, in one flat list.

    MLX evaluates a graph lazily and as a whole: chunks written one after the other in Python are
    still scheduled together (measured: 8 chunks of 64 x 262,144 logits took as much memory as the
    unchunked loss, even under mx.checkpoint). So each chunk's input is made to depend on the
    previous chunk's outputs (``mx.depends``), forward, and in a custom backward that recomputes
    each chunk's forward and backward (``mx.vjp``) in turn, on the previous chunk's gradient. The
    head's weights are constants here (no gradient: the backend refuses chunks when they train).
    Measured (CPU, 512 positions x 262,144 x width 64, SFT): peak above the inputs 1612 MB
    unchunked, 151 MB in chunks of 16, 604 MB in chunks of 64; a few chunks stay in flight."""
    import mlx.core as mx

    def sequenced(j, arr, prev):
        lo, hi = bounds[j]
        part = arr[:, lo:hi]
        return part if prev is None else mx.depends(part, prev)

    @mx.custom_function
    def fwd(arr):
        outs, prev = [], None
        for j in range(len(bounds)):
            o = list(piece(sequenced(j, arr, prev), j))
            outs.extend(o)
            prev = o
        return outs

    @fwd.vjp
    def bwd(primals, cotangents, outputs):
        arr = primals[0] if isinstance(primals, (list, tuple)) else primals
        per = len(outputs) // len(bounds)
        grads, prev = [], None
        for j in range(len(bounds)):
            _, (g,) = mx.vjp(lambda p, j=j: list(piece(p, j)), [sequenced(j, arr, prev)],
                             list(cotangents[j * per:(j + 1) * per]))
            grads.append(g)
            prev = g
        return mx.concatenate(grads, axis=1)

    return fwd(x)


def _broadcast_tree(dist, tree):
    """Rank 0's arrays of `tree` on every rank, matched by name (the ranks may hold the same
    names in another order: one loaded them from a file, the other built them)."""
    from mlx.utils import tree_flatten, tree_unflatten

    flat = dict(tree_flatten(tree))
    return tree_unflatten([(k, dist.broadcast(flat[k])) for k in sorted(flat)])


def save_arrays_atomic(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    import mlx.core as mx

    from mlx_distill.io import atomic_path

    with atomic_path(path) as tmp:
        # mx.save_safetensors appends .safetensors when missing
        target = str(tmp) + ".safetensors"
        mx.save_safetensors(target, arrays, metadata=metadata or {})
        os.replace(target, tmp)


class MLXBackend(BackendBase):
    name = "mlx"

    def __init__(self, cfg):
        import mlx.core as mx

        from mlx_distill.backends.distributed import mlx_group

        self.cfg = cfg
        self.mx = mx
        self.dist = mlx_group()  # under mlx.launch: this rank of the group; else SINGLE
        self.model = None
        self._head = None
        self.optimizer = None
        self._step = None

    # ------------------------------------------------------------------ model
    def load(self):
        from mlx_distill.models import load_mlx

        self.model_path = resolve_model(self.cfg.model)
        self.model, self.tokenizer = load_mlx(self.model_path)
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
        self.loss_chunk = self._resolve_loss_chunk()
        return model

    def _resolve_loss_chunk(self) -> int:
        """Positions per loss chunk (0 = off) for --loss-chunk (-1 = auto by vocabulary size)."""
        from mlx_distill.io import InputError

        chunk = resolve_loss_chunk(self.cfg.loss_chunk, getattr(self, "_vocab", 0))
        why = ""
        if self._head is None:
            why = "its logits are not its output head applied to its final hidden states"
        elif self._head_module.trainable_parameters():
            why = "its output head is trained (lm_head in --lora-keys, or unfrozen)"  # `run_chunks` passes no grads to it
        if chunk and why:
            if self.cfg.loss_chunk > 0:
                raise InputError(f"--loss-chunk {self.cfg.loss_chunk}: {self.cfg.model} cannot be computed chunk by "
                                 f"chunk: {why}; use --loss-chunk 0")
            return 0
        return chunk

    def _find_head(self):
        """The output projection, when the model's logits are exactly head(model.model(x)).

        Then `forward(..., keep=n)` projects only the last n positions: the vocabulary
        projection is a large share of a small model's FLOPs, and the masked prompt
        positions need no logits; and ``--loss-chunk`` applies it chunk by chunk. The head is
        ``lm_head``, or the tied embedding's ``as_linear`` (quantized embeddings included),
        followed by ``c * tanh(z / c)`` when the model's args name a final logit soft-cap (Gemma 2).
        Checked numerically once, so an architecture with other output processing silently
        keeps the full path (and ``--loss-chunk N`` is refused)."""
        mx, model = self.mx, self.model
        inner = getattr(model, "model", None)
        head = getattr(model, "lm_head", None)
        self._head_module = head
        if head is None and inner is not None and hasattr(getattr(inner, "embed_tokens", None), "as_linear"):
            head, self._head_module = inner.embed_tokens.as_linear, inner.embed_tokens
        if inner is None or head is None:
            return None
        cap = getattr(model, "final_logit_softcapping", None) or getattr(getattr(model, "args", None),
                                                                          "final_logit_softcapping", None)
        if cap:
            linear = head

            def head(h):
                return mx.tanh(linear(h) / cap) * cap
        was_training = model.training
        model.eval()
        try:
            x = mx.array([[1, 2, 3, 4]])
            full = model(x)
            ok = mx.allclose(full[:, -2:], head(inner(x)[:, -2:]), rtol=1e-4, atol=1e-4).item()
            self._vocab = int(full.shape[-1])
        except Exception:  # noqa: BLE001 - any mismatch in structure means "use the full path"
            ok = False
        model.train(was_training)
        return head if ok else None

    def parameter_counts(self) -> dict:
        from mlx.utils import tree_flatten

        total = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        return {"total": int(total), "trainable": int(trainable)}

    def forward(self, model, inputs, keep: int | None = None, split: bool = False):
        """Logits for the last `keep` positions (all when None); with `split` and a loss chunk
        (``--loss-chunk``), a `SplitHead` (hidden states + head) for `training.losses.lm_losses`."""
        if split and getattr(self, "loss_chunk", 0):
            h = model.model(inputs)
            return SplitHead(h if keep is None or keep >= inputs.shape[1] else h[:, -keep:], self._head,
                             self.loss_chunk, run_chunks)
        if keep is None or keep >= inputs.shape[1]:
            return model(inputs)
        if self._head is not None:
            return self._head(model.model(inputs)[:, -keep:])
        return model(inputs)[:, -keep:]

    def to_arrays(self, arrays: dict) -> dict:
        """NumPy -> MLX arrays; under mlx.launch, this rank's rows of batch-major arrays."""
        mx, dist = self.mx, self.dist
        mine = {k: (dist.shard(v) if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}
        if dist.world > 1 and "mask" in mine and mine["mask"].shape[0] == 0:
            # more ranks than rows: this rank runs row 0 with every position masked, adding zeros
            # to the sums while it joins the all-reduces (the model takes no empty batch)
            mine = {k: (v[:1] if isinstance(v, np.ndarray) and v.ndim else v) for k, v in arrays.items()}
            mine["mask"] = np.zeros_like(mine["mask"])
        return {k: (mx.array(v) if isinstance(v, np.ndarray) else v) for k, v in mine.items()}

    def grad_bytes(self) -> int:
        """Bytes of the gradients one update sums over the ranks."""
        from mlx.utils import tree_flatten

        return int(sum(v.nbytes for _, v in tree_flatten(self.model.trainable_parameters())))

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
        the accumulated token count once, clip, and apply AdamW. Under mlx.launch the loss sums
        and token counts are summed over the ranks at every micro-step, the gradients at the
        update (before the division, so it is by the global token count)."""
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx.utils import tree_map

        cfg, model, dist = self.cfg, self.model, self.dist
        if self.optimizer is None:
            self.init_optimizer()

        def step(batch, acc, acc_n, update: bool):
            def f(m, b):
                s, n, parts = objective(m, b)
                return s, (n, parts)

            (s, (n, parts)), grads = nn.value_and_grad(model, f)(model, batch)
            if dist.world > 1:  # every rank's loss sums and token counts: the logged numbers, the divisor
                tot = dist.all_reduce(mx.stack([v.astype(mx.float32) for v in (s, n, *parts.values())]))
                s, n, parts = tot[0], tot[1], dict(zip(parts, tot[2:]))
            if acc is not None:
                grads = tree_map(lambda a, g: a + g, acc, grads)
                n_tot = acc_n + n
            else:
                n_tot = n
            if update:
                if dist.world > 1:
                    grads = sum_over_ranks(grads, dist.all_reduce)
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
        # Dropout's RNG is a pure function of (seed, micro-batch index[, rank]): a resumed run draws
        # exactly the masks the uninterrupted run would have (MLX cannot restore a saved key).
        self.mx.random.seed((self.cfg.seed * 1_000_003 + micro) * self.dist.world + self.dist.rank)
        s, n, parts, self._acc, self._acc_n = self._step(self.to_arrays(arrays), self._acc, self._acc_n, update)
        self.mx.eval(self._state, s, n, parts, self._acc, self._acc_n)
        return {"loss_sum": s.item(), "ntokens": n.item(), **{k: v.item() for k, v in parts.items()}}

    def eval_step(self, objective, arrays: dict) -> dict:
        mx = self.mx
        s, n, parts = objective(self.model, self.to_arrays(arrays))
        if self.dist.world > 1:  # summed over the ranks, as in `train_step`
            tot = self.dist.all_reduce(mx.stack([v.astype(mx.float32) for v in (s, n, *parts.values())]))
            s, n, parts = tot[0], tot[1], dict(zip(parts, tot[2:]))
        mx.eval(s, n, parts)
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
        """On-policy rollouts by the live model (`mlx_distill.backends.rollouts.sample`); the caller sets eval mode.

        Under mlx.launch each rank samples its rows ``rank::world`` of the prompts (with its own
        key) and the ranks exchange them, so every rank returns the same rollouts of all the
        prompts (and then takes its rows of the batch built from them, `to_arrays`)."""
        from mlx_distill.backends.rollouts import Rollout, sample

        dist = self.dist
        if dist.world == 1:
            return sample(self.model, self.tokenizer, prompts, max_tokens, temperature, top_p, key)
        caps = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else [int(max_tokens)] * len(prompts)
        mine = list(range(dist.rank, len(prompts), dist.world))
        rolls = sample(self.model, self.tokenizer, [prompts[i] for i in mine], [caps[i] for i in mine], temperature,
                       top_p, key * dist.world + dist.rank) if mine else []
        # the finished flag travels as one more integer at the end of each row
        rows = dist.gather_rows({i: [*r.tokens, int(r.finished)] for i, r in zip(mine, rolls)}, len(prompts))
        return [Rollout(tokens=row[:-1], finished=bool(row[-1])) for row in rows]

    def peak_memory_gb(self) -> float:
        return self.mx.get_peak_memory() / 1e9

    # ------------------------------------------------------------------ persistence
    def adapter_weights(self) -> dict:
        """The trainable weights mlx-lm loads as an adapter (the feature-KD projection, a training aid
        the adapter never needs, apart: `projection_weights`)."""
        from mlx.utils import tree_flatten

        return {k: v for k, v in tree_flatten(self.model.trainable_parameters()) if not k.startswith(PROJECTION + ".")}

    def projection_weights(self) -> dict:
        """--kd-hidden: the learned student -> teacher width projection (`training.hidden`), {} without it."""
        from mlx.utils import tree_flatten

        if PROJECTION not in self.model:
            return {}
        return {k: v for k, v in tree_flatten(self.model.trainable_parameters()) if k.startswith(PROJECTION + ".")}

    def save_adapter(self, folder: Path, name: str = "adapters.safetensors") -> None:
        save_arrays_atomic(Path(folder) / name, self.adapter_weights())
        proj = self.projection_weights()
        if proj and name == "adapters.safetensors":
            save_arrays_atomic(Path(folder) / f"{PROJECTION}.safetensors", proj)

    def save_checkpoint(self, folder: Path, state: dict) -> None:
        """Adapter + optimizer + loop state (RNG is derived from it), written to a temp folder and renamed."""
        from mlx.utils import tree_flatten

        from mlx_distill.io import atomic_dir

        with atomic_dir(folder) as tmp:
            save_arrays_atomic(tmp / "adapters.safetensors", self.adapter_weights())
            if self.projection_weights():
                save_arrays_atomic(tmp / f"{PROJECTION}.safetensors", self.projection_weights())
            save_arrays_atomic(tmp / "optimizer.safetensors", dict(tree_flatten(self.optimizer.state)))
            (tmp / "state.json").write_text(json.dumps(state, indent=2))

    def load_checkpoint(self, folder: Path) -> dict:
        """Restore adapter, optimizer and loop state; under mlx.launch rank 0 reads `folder` and
        the other ranks receive its arrays and state (they need no copy of the run folder)."""
        from mlx.utils import tree_flatten, tree_unflatten

        from mlx_distill.io import read_complete_dir

        mx, dist = self.mx, self.dist
        state = None
        if dist.is_main:
            def read(found: Path):  # every file read (and evaluated) before any is applied
                weights = mx.load(str(found / "adapters.safetensors"))
                if PROJECTION in self.model and (found / f"{PROJECTION}.safetensors").is_file():  # --kd-hidden
                    weights.update(mx.load(str(found / f"{PROJECTION}.safetensors")))
                opt = mx.load(str(found / "optimizer.safetensors"))
                mx.eval(list(weights.values()), list(opt.values()))
                return weights, opt, json.loads((found / "state.json").read_text())

            # a damaged (e.g. truncated) file: `last.old` when it is there, else one error line
            weights, opt, state = read_complete_dir(folder, read, "checkpoint", checkpoint_fix(folder))
            self.model.load_weights(list(weights.items()), strict=False)
            self.optimizer.state = tree_unflatten(list(opt.items()))
        if dist.world > 1:
            weights = _broadcast_tree(dist, self.model.trainable_parameters())
            self.model.load_weights(tree_flatten(weights), strict=False)
            self.optimizer.state = _broadcast_tree(dist, self.optimizer.state)
            state = dist.broadcast_json(state)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return state
