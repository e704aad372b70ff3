"""PyTorch backend: transformers models + peft LoRA/DoRA with mlx-lm's semantics, MLX's AdamW.

`TorchBackend` implements the interface `mlx_distill.training.train` drives (see `backends/__init__.py`)
so that ``python -m mlx_distill train --backend torch`` runs the same loop, data, masks,
batches and losses (`mlx_distill.training.losses`) as the MLX path and gives the same numbers:

- LoRA: mlx-lm computes ``y = W x + scale * (dropout(x) @ A) @ B`` with A (in, r) drawn
  from U(+-1/sqrt(in)) and B = 0. peft computes ``W x + (alpha / r) * B'(A'(dropout(x)))``
  with A' = A^T, B' = B^T, so ``lora_alpha = scale * r``. Adapters go on the same
  projections (``lora_keys``, default: every Linear of a block) of the same top
  ``lora_layers`` blocks. DoRA maps to peft's ``use_dora`` (magnitude ``m``; the weight norm
  is a constant in both); the two differ only with dropout > 0, where peft also drops the
  input of the base projection.
- Optimiser: MLX's AdamW has *no bias correction* (``mlx.optimizers.Adam(bias_correction=False)``)
  and decays the weight before the Adam step: ``w <- w(1 - lr wd) - lr m / (sqrt(v) + eps)``.
  ``torch.optim.AdamW`` corrects the bias (its first step is ~3x smaller), so the update is
  written out here (`_adamw_`). The learning rate comes from `lr_at`, the closed form of
  `MLXBackend.schedule`.
- Gradient accumulation: summed-loss gradients of every micro-batch accumulate; on the
  update they are divided once by the total token count, clipped to ``max_grad_norm``
  (``min(1, max_norm / (norm + 1e-6))``, as ``mlx.optimizers.clip_grad_norm``), applied.
- Files: the adapter is saved in mlx-lm's format and names (``adapters.safetensors`` with
  ``...q_proj.lora_a`` of shape (in, r)), and checkpoints hold the optimiser state under
  MLX's names and layouts (``step``, ``learning_rate``, ``<param>.m``, ``<param>.v``), so a
  run folder, an adapter or a checkpoint written by one backend is read by the other.
- Precision: float32 on CPU, bfloat16 weights on CUDA (LoRA weights stay float32, as
  mlx-lm creates them; peft's ``autocast_adapter_dtype``).

Multi-GPU (``torchrun``; WORLD_SIZE > 1): every rank sees the same micro-batch stream and
takes the rows ``rank::world`` of each micro-batch; at the update the summed gradients and
token counts are all-reduced, so the step is the single-process step on the whole batch
(not DDP's average of per-rank means). Loss sums are all-reduced too, so every rank logs the
same numbers. Only rank 0 writes the run folder (and reads it on resume, handing the state to
the other ranks). World, rank, the row split, the all-reduce and the rank-0-only writes
come from `mlx_distill.backends.distributed` (`torch_group`)::

    torchrun --nproc-per-node 4 -m mlx_distill train --backend torch --model PATH --data DIR --out runs/x

Generation through transformers (``TorchClient``) lives with the other clients in
`mlx_distill.generation.torch`.
"""

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from mlx_distill.models import resolve_model
from mlx_distill.backends.base import BackendBase, SplitHead, checkpoint_fix, resolve_loss_chunk

BETAS, EPS = (0.9, 0.999), 1e-8  # mlx.optimizers.AdamW defaults




def run_chunks(piece, x, bounds):
    """`SplitHead.run` on torch: eager, so the chunks run in turn; each under activation
    checkpointing, so the backward recomputes one chunk's logits at a time instead of keeping all."""
    from torch.utils.checkpoint import checkpoint

    outs = []
    for j, (lo, hi) in enumerate(bounds):
        outs.extend(checkpoint(piece, x[:, lo:hi], j, use_reentrant=False))
    return outs


def lr_at(cfg, step: int) -> float:
    """Learning rate of update number ``step + 1`` (0-based ``step``): `MLXBackend.schedule`
    in closed form. Warm-up step s gets lr*(s+1)/warmup; then cosine / linear / constant
    from lr to lr*min_lr_ratio over ``(decay_iters or iters) - warmup`` steps, constant after."""
    lr, warm = cfg.learning_rate, max(cfg.warmup, 0)
    if step < warm:
        return lr * (step + 1) / warm
    s = step - warm
    decay = max((cfg.decay_iters or cfg.iters) - warm, 1)
    end = lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return end + 0.5 * (1.0 + math.cos(math.pi / decay * min(s, decay))) * (lr - end)
    if cfg.lr_schedule == "linear":
        return min(s, decay) * ((end - lr) / decay) + lr
    return lr


def decoder_layers(model):
    """The ModuleList of transformer blocks (``model.model.layers`` for llama/qwen2/...)."""
    import torch.nn as nn

    base = model
    for attr in ("base_model", "model"):  # peft wrapper, then the decoder
        while hasattr(base, attr) and isinstance(getattr(base, attr), nn.Module) and not hasattr(base, "layers"):
            base = getattr(base, attr)
    if hasattr(base, "layers") and isinstance(base.layers, nn.ModuleList):
        return base.layers
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return m
    raise ValueError(f"{type(model).__name__}: cannot find the list of transformer blocks")


# mlx-lm adapter names <-> torch parameter names. peft wraps the model as
# base_model.model.<hf name> and names LoRA weights <module>.lora_A.<adapter>.weight.
_PEFT_PREFIX = "base_model.model."


def mlx_name(torch_name: str) -> tuple[str, bool]:
    """torch parameter name -> (mlx-lm name, transpose?)."""
    n = torch_name[len(_PEFT_PREFIX):] if torch_name.startswith(_PEFT_PREFIX) else torch_name
    for torch_leaf, mlx_leaf, transpose in ((".lora_A.default.weight", ".lora_a", True),
                                             (".lora_B.default.weight", ".lora_b", True),
                                             (".lora_magnitude_vector.default.weight", ".m", False)):
        if n.endswith(torch_leaf):
            return n[: -len(torch_leaf)] + mlx_leaf, transpose
    if n.endswith(".base_layer.weight") or n.endswith(".base_layer.bias"):
        head, leaf = n.rsplit(".base_layer.", 1)
        return f"{head}.{leaf}", False
    return n, False


class TorchBackend(BackendBase):
    name = "torch"

    def __init__(self, cfg, device: Optional[str] = None, dtype: Optional[str] = None):
        import torch

        from mlx_distill.backends import distributed

        self.cfg, self.torch = cfg, torch
        _, _, local = distributed.env_ranks()
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        self.dist = distributed.torch_group(self.device)  # under torchrun: joins the process group
        self.world, self.rank = self.dist.world, self.dist.rank
        self.model = None
        self.params: list = []  # (mlx name, parameter, transpose) of the trainable parameters
        self.opt_step = 0
        self.opt_state: dict = {}
        self._objective = None
        self._acc_n = 0.0

    # ------------------------------------------------------------------ model
    def load(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = resolve_model(self.cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype).to(self.device)
        self.model.config.use_cache = False
        return self.model, self.tokenizer

    def lora_targets(self) -> list[str]:
        """Full names of the modules that get adapters: mlx-lm's choice (`linear_to_lora_layers`)."""
        import torch.nn as nn

        layers = decoder_layers(self.model)
        prefix = next(n for n, m in self.model.named_modules() if m is layers)
        keys = set(self.cfg.lora_keys or [])
        names = []
        for i in range(len(layers) - self.num_layers, len(layers)):
            for rel, m in layers[i].named_modules():
                if isinstance(m, nn.Linear) and (not keys or rel in keys):
                    names.append(f"{prefix}.{i}.{rel}")
        if keys:
            found = {n.split(".", len(prefix.split(".")) + 1)[-1] for n in names}
            # like mlx-lm, a key that names a whole-model module (e.g. lm_head) adapts it too
            for name, m in self.model.named_modules():
                if name in keys and isinstance(m, nn.Linear):
                    names.append(name)
                    found.add(name)
            missing = sorted(keys - found)
            if missing:
                raise ValueError(f"--lora-keys {missing}: no such Linear in the blocks of {self.model_path}")
        return names

    def prepare(self):
        """Freeze the base, add LoRA/DoRA layers (or unfreeze blocks for full fine-tuning)."""
        torch, cfg = self.torch, self.cfg
        torch.manual_seed(cfg.seed)
        n_layers = len(decoder_layers(self.model))
        self.num_layers = n_layers if cfg.lora_layers < 0 else min(cfg.lora_layers, n_layers)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if cfg.fine_tune_type == "full":
            layers = decoder_layers(self.model)
            for layer in list(layers)[n_layers - self.num_layers:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            lc = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_scale * cfg.lora_rank, lora_dropout=cfg.lora_dropout,
                            target_modules=self.lora_targets(), use_dora=cfg.fine_tune_type == "dora", bias="none",
                            task_type="CAUSAL_LM")
            self.model = get_peft_model(self.model, lc, autocast_adapter_dtype=True)
            # mlx-lm's init, drawn from a generator seeded by --seed (peft's kaiming_uniform(a=sqrt(5))
            # is the same distribution, but from the global RNG)
            g = torch.Generator().manual_seed(cfg.seed)
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if ".lora_A." in name:
                        bound = 1.0 / math.sqrt(p.shape[1])
                        p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound)
                    elif ".lora_B." in name:
                        p.zero_()
        if cfg.grad_checkpoint:
            enable = getattr(self.model, "activation_checkpointing_enable", None) or \
                self.model.gradient_checkpointing_enable  # the new name in transformers >= 5
            enable()
            if hasattr(self.model, "enable_input_require_grads"):
                self.model.enable_input_require_grads()
        self.params = []
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                name, transpose = mlx_name(n)
                self.params.append((name, p, transpose))
        self._split = self._find_split()
        return self.model

    def _find_split(self):
        """(decoder, head) when the logits are exactly head(decoder(x).last_hidden_state) (the CausalLM's
        output embeddings, soft-capped where its config says so), checked numerically once; and
        ``self.loss_chunk`` for --loss-chunk (as `MLXBackend._resolve_loss_chunk`)."""
        from mlx_distill.io import InputError

        torch = self.torch
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        decoder, linear = getattr(base, "model", None), base.get_output_embeddings()
        cap = getattr(base.config, "final_logit_softcapping", None)

        def head(h):
            z = linear(h)
            return torch.tanh(z / cap) * cap if cap else z

        found, vocab = None, 0
        if decoder is not None and linear is not None:
            was = self.model.training
            self.model.eval()
            with torch.no_grad():
                x = torch.tensor([[1, 2, 3, 4]], device=self.device)
                full = self.model(input_ids=x, use_cache=False).logits
                mine = head(decoder(input_ids=x, use_cache=False).last_hidden_state)
                vocab = int(full.shape[-1])
                if torch.allclose(full.float(), mine.float(), rtol=1e-4, atol=1e-4):
                    found = (decoder, head)
            self.model.train(was)
        self.loss_chunk = resolve_loss_chunk(self.cfg.loss_chunk, vocab)
        if self.loss_chunk and found is None:
            if self.cfg.loss_chunk > 0:
                raise InputError(f"--loss-chunk {self.cfg.loss_chunk}: the logits of {self.cfg.model} are not its "
                                 "output head applied to its final hidden states; use --loss-chunk 0")
            self.loss_chunk = 0
        return found

    def parameter_counts(self) -> dict:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for _, p, _ in self.params)
        return {"total": int(total), "trainable": int(trainable)}

    def forward(self, model, inputs, keep: int | None = None, split: bool = False):
        """Logits for the last `keep` positions (all when None); transformers projects only those.
        With `split` and a loss chunk (``--loss-chunk``), a `SplitHead` for `training.losses.lm_losses`."""
        if split and getattr(self, "loss_chunk", 0):
            decoder, head = self._split
            h = decoder(input_ids=inputs, use_cache=False).last_hidden_state
            return SplitHead(h if keep is None or keep >= inputs.shape[1] else h[:, -keep:], head, self.loss_chunk,
                             run_chunks)
        if keep is None or keep >= inputs.shape[1]:
            return model(input_ids=inputs, use_cache=False).logits
        return model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits

    def to_arrays(self, arrays: dict) -> dict:
        """NumPy -> tensors on the device (integers as int64); under torchrun, this rank's rows."""
        torch = self.torch
        out = {}
        for k, v in arrays.items():
            if isinstance(v, np.ndarray):
                v = self.dist.shard(v)  # batch-major arrays; scalars (kd_alpha) stay whole
                t = torch.from_numpy(np.array(v, copy=True, order="C"))
                t = t.long() if np.issubdtype(v.dtype, np.integer) else t.float()
                v = t.to(self.device)
            out[k] = v
        return out

    # ------------------------------------------------------------------ optimisation
    def init_optimizer(self):
        torch = self.torch
        self.opt_step = 0
        self.opt_state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p, _ in self.params}

    def build_step(self, objective):
        if not self.opt_state:
            self.init_optimizer()
        self._objective = objective
        self._acc_n = 0.0
        for _, p, _ in self.params:
            p.grad = None

    def _all_reduce(self, t):
        return self.dist.all_reduce(t)

    def train_step(self, arrays: dict, update: bool, micro: int = 0) -> dict:
        torch = self.torch
        # dropout's RNG is a pure function of (seed, micro-batch index[, rank]), as on MLX:
        # a resumed run draws the masks the uninterrupted run would have
        torch.manual_seed((self.cfg.seed * 1_000_003 + micro) * self.world + self.rank)
        b = self.to_arrays(arrays)
        if b["inputs"].shape[0] == 0:  # more ranks than rows: contribute nothing, join the all-reduce
            s, n, parts = self._empty_result("kd_ids" in arrays)
        else:
            s, n, parts = self._objective(self.model, b)
            s.backward()
        # reduced on the device (NCCL takes no CPU tensors), then read
        vals = self._all_reduce(torch.stack([s.detach().float(), n.detach().float(),
                                             *[v.detach().float() for v in parts.values()]])).cpu().tolist()
        self._acc_n += vals[1]
        if update:
            self._update(self._acc_n)
            self._acc_n = 0.0
        return {"loss_sum": vals[0], "ntokens": vals[1], **dict(zip(parts, vals[2:]))}

    def _empty_result(self, kd: bool):
        """What a rank without rows contributes: zeros, with the parts (in order) of the objective
        the other ranks run, the KD one (`objectives.kd_objective`) when the batch carries KD arrays."""
        z = self.torch.zeros((), device=self.device)
        names = ("sft_loss", "kd_loss", "kd_positions") if kd else ("sft_loss",)
        return z, z, {k: z for k in names}

    def _update(self, ntokens: float) -> None:
        """Divide by the token count once, all-reduce (torchrun), clip, MLX's AdamW step."""
        torch, cfg = self.torch, self.cfg
        params = [p for _, p, _ in self.params]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world > 1:  # one flat all-reduce of the summed gradients (a bucket per dtype)
            for dt in {p.grad.dtype for p in params}:
                group = [p for p in params if p.grad.dtype == dt]
                flat = torch.cat([p.grad.reshape(-1) for p in group])
                self.dist.all_reduce(flat)
                for p, g in zip(group, flat.split([p.numel() for p in group])):
                    p.grad.copy_(g.view_as(p.grad))
        with torch.no_grad():
            for p in params:
                p.grad.div_(max(ntokens, 1.0))
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = lr_at(cfg, self.opt_step)
            self.opt_step += 1
            for n, p, _ in self.params:
                m, v = self.opt_state[n]
                _adamw_(p, p.grad, m, v, lr, cfg.weight_decay)
        for p in params:
            p.grad = None

    def eval_step(self, objective, arrays: dict) -> dict:
        torch = self.torch
        b = self.to_arrays(arrays)
        with torch.no_grad():
            s, n, parts = objective(self.model, b) if b["inputs"].shape[0] else self._empty_result("kd_ids" in arrays)
            vals = self._all_reduce(torch.stack([s.float(), n.float(), *[v.float() for v in parts.values()]]))
        vals = vals.cpu().tolist()
        return {"loss_sum": vals[0], "ntokens": vals[1], **dict(zip(parts, vals[2:]))}

    def train_mode(self, on: bool) -> None:
        self.model.train(on)

    def generate(self, prompts: list, max_tokens: int, batch_size: int = 32) -> list:
        """Greedy continuations (token ids, EOS excluded) of `prompts` by the live (peft) model
        with its current adapter: `hf_generate` on this very model object (no copy).
        The caller puts the model in eval mode. Under torchrun every rank generates them all."""
        model, tok = self.model, self.tokenizer
        ids = eos_ids(model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else ids[0]
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[i: i + batch_size]]
            out += [toks for toks, _ in hf_generate(model, self.device, chunk, [max_tokens] * len(chunk), ids, pad)]
        return out

    def sample(self, prompts: list, max_tokens: list, temperature: float, top_p: float, key: int) -> list:
        """Not implemented: on-policy distillation runs on the MLX backend only (refused before training)."""
        from mlx_distill.io import InputError

        raise InputError("--on-policy-fraction > 0: the torch backend does not generate rollouts inside training; "
                         "use --backend mlx")

    def learning_rate(self) -> float:
        """The rate of the last update (before any: the first one's), as MLX reports it."""
        return float(lr_at(self.cfg, max(self.opt_step - 1, 0)))

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.device) / 1e9
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # process peak RSS (KiB on Linux)

    # ------------------------------------------------------------------ weights in mlx-lm layout
    def adapter_weights(self) -> dict:
        """Trainable weights under mlx-lm names and layouts (CPU tensors)."""
        return {n: (p.detach().T if t else p.detach()).contiguous().cpu() for n, p, t in self.params}

    def set_adapter_weights(self, weights: dict, strict: bool = True) -> None:
        """Load mlx-lm-named arrays (NumPy, torch or MLX) into the trainable parameters."""
        torch = self.torch
        known = {n: (p, t) for n, p, t in self.params}
        if strict:
            extra, missing = sorted(set(weights) - set(known)), sorted(set(known) - set(weights))
            if extra or missing:
                raise ValueError(f"adapter weights do not match the model: unexpected {extra[:5]}, missing {missing[:5]}")
        with torch.no_grad():
            for n, w in weights.items():
                if n not in known:
                    continue
                p, t = known[n]
                w = _to_torch(w)
                w = w.T if t else w
                if tuple(w.shape) != tuple(p.shape):
                    raise ValueError(f"{n}: shape {tuple(w.shape)} does not fit the model's {tuple(p.shape)}")
                p.copy_(w.to(p.dtype))

    def save_adapter(self, folder: Path, name: str = "adapters.safetensors") -> None:
        _save_tensors(Path(folder) / name, self.adapter_weights())

    def save_checkpoint(self, folder: Path, state: dict) -> None:
        """Adapter + optimizer (MLX names and layouts) + loop state (the RNG is derived from it),
        written to a temp folder and renamed into place."""
        from mlx_distill.io import atomic_dir

        torch = self.torch
        with atomic_dir(folder) as tmp:
            _save_tensors(tmp / "adapters.safetensors", self.adapter_weights(), atomic=False)
            opt = {"step": torch.tensor(self.opt_step, dtype=torch.uint64),
                   "learning_rate": torch.tensor(self.learning_rate(), dtype=torch.float32)}
            transpose = {n: t for n, _, t in self.params}
            for n, (m, v) in self.opt_state.items():
                opt[f"{n}.m"] = (m.T if transpose[n] else m).contiguous().cpu()
                opt[f"{n}.v"] = (v.T if transpose[n] else v).contiguous().cpu()
            _save_tensors(tmp / "optimizer.safetensors", opt, atomic=False)
            (tmp / "state.json").write_text(json.dumps(state, indent=2))

    def load_checkpoint(self, folder: Path) -> dict:
        """Resume from a checkpoint written by this backend or by the MLX one. Under torchrun rank 0
        reads `folder` and the other ranks receive its weights, optimizer and loop state."""
        from safetensors.torch import load_file

        from mlx_distill.io import read_complete_dir

        dist, state = self.dist, None
        if dist.is_main:
            def read(found: Path):  # every file read before any is applied
                return (load_file(str(found / "adapters.safetensors")), load_file(str(found / "optimizer.safetensors")),
                        json.loads((found / "state.json").read_text()))

            # a damaged (e.g. truncated) file: `last.old` when it is there, else one error line
            weights, opt, state = read_complete_dir(folder, read, "checkpoint", checkpoint_fix(folder))
            self.set_adapter_weights(weights)
            self.opt_step = int(opt["step"].item())
            for n, p, t in self.params:
                m, v = opt[f"{n}.m"], opt[f"{n}.v"]
                self.opt_state[n] = ((m.T if t else m).contiguous().to(p), (v.T if t else v).contiguous().to(p))
        if dist.world > 1:
            with self.torch.no_grad():
                for n, p, _ in self.params:  # the same order on every rank: the model's
                    p.copy_(dist.broadcast(p.detach().clone()))
                    self.opt_state[n] = tuple(dist.broadcast(x.clone()) for x in self.opt_state[n])
            self.opt_step = int(dist.broadcast_json(self.opt_step))
            state = dist.broadcast_json(state)
        return state


def _adamw_(p, g, m, v, lr: float, wd: float) -> None:
    """mlx.optimizers.AdamW in place: decay, moments, step; no bias correction."""
    b1, b2 = BETAS
    p.mul_(1 - lr * wd)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    p.addcdiv_(m, v.sqrt().add_(EPS), value=-lr)


def _to_torch(w):
    import torch

    if isinstance(w, torch.Tensor):
        return w
    if not isinstance(w, np.ndarray) and type(w).__module__.startswith("mlx"):
        import mlx.core as mx

        if w.dtype == mx.bfloat16:
            w = w.astype(mx.float32)
        w = np.array(w)
    return torch.from_numpy(np.ascontiguousarray(w))


def _save_tensors(path: Path, tensors: dict, atomic: bool = True) -> None:
    from safetensors.torch import save_file

    from mlx_distill.io import atomic_path

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # always through atomic_path, even inside a checkpoint's temporary folder (atomic=False): it
    # gives the file the permissions of every other output (safetensors' save_file writes 0600)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "mlx"})


def load_model(path: str, adapter_path: Optional[str] = None, device=None, dtype=None):
    """A transformers model (+ an mlx-lm or PEFT adapter folder, fused into nothing: kept as peft layers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if adapter_path:
        from peft import PeftModel

        from mlx_distill.adapters import ensure_format

        model = PeftModel.from_pretrained(model, str(ensure_format(adapter_path, "peft", path)), autocast_adapter_dtype=True)
    return model, tokenizer


def hf_generate(model, device, prompts: list[list[int]], max_tokens: list[int], eos_ids: list[int], pad_id: int,
                temperature: float = 0.0, seed: Optional[int] = None, top_p: Optional[float] = None) -> list[tuple[list[int], str]]:
    """Token ids after each (left-padded) prompt and the finish reason ("stop" at EOS, else "length"):
    transformers' ``generate`` with a fresh config. Shared by `generation.torch.TorchClient` and the
    torch backend's in-training generation."""
    import os

    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token is at the end
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    from transformers import GenerationConfig

    # A fresh config: the model's generation_config.json (Qwen's repetition_penalty 1.05,
    # top_k 20, ...) would make "greedy" differ from mlx-lm's plain argmax / categorical.
    kw = dict(max_new_tokens=max(max_tokens), eos_token_id=eos_ids, pad_token_id=pad_id,
              repetition_penalty=1.0, use_cache=True)
    if temperature > 0:
        torch.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        kw.update(do_sample=True, temperature=temperature, top_p=top_p or 1.0, top_k=0)
    else:
        kw.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  generation_config=GenerationConfig(**kw))
    results = []
    for i, n in enumerate(max_tokens):
        toks = out[i, width:].tolist()
        cut = next((j for j, t in enumerate(toks) if t in eos_ids), None)
        if cut is not None and cut < n:
            results.append((toks[:cut], "stop"))
        else:
            results.append((toks[:n], "length"))
    return results


def eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for v in (getattr(model.generation_config, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
              tokenizer.eos_token_id):
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return ids
