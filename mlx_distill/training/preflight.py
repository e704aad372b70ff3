"""Memory preflight for `train`: estimate the peak before any batch reaches the device.

A Mac has a fixed amount of unified memory and a Metal out-of-memory error kills the
process, minutes or hours into a run. `train` calls `run` after the model is loaded and its
adapter added (so the weights and trainable parameters are counted exactly) and before the
first batch: it prints the estimate against the device's limit and refuses, with concrete
suggestions, when it is above; ``--no-preflight`` trains anyway.

The estimate, in bytes (``s`` = bytes per activation element, the model's compute dtype)::

    weights        every parameter at its stored dtype (quantized weights + scales + biases)
    trainable      P_t bytes x 4: the parameters' AdamW moments (2) and the gradient plus its
                   clipped / accumulated copy (2)
    activations    max over the training batches (B rows, T input positions, n positions
                   projected to the vocabulary: train.py trims the shortest prompt and asks
                   `forward(keep=n)`) of
                     L_a * B * [T (9 d + 4.5 f) s + 1.5 h T^2 4]     saved per layer
                     + B * [3 h T^2 4 + 2 T (d + f) 4]              one layer's backward
                     + 3 * B n V 4                                   float32 logits, log-softmax, grad
                   (with --loss-chunk C, min(B n, 4 C) replaces B n in the vocabulary terms:
                   MLX keeps about four chunks' logits in flight, measured on Gemma-3-270M at
                   4 x 239 tokens, C 128, and a 262k-vocabulary stand-in at C 32 and 128)
                   L_a = the blocks gradients flow through (the trained top --lora-layers; MLX
                   keeps nothing for the frozen blocks below them). --grad-checkpoint keeps
                   ~5 B T d s per block instead, plus one block's full activations.
    kd             + B n M 8 (teacher ids + log-probs) + B n V 4 (the KD term's own
                   log-softmax at temperature T); --kd: the store's shards, which stay in host
                   memory once read (the same pool on unified memory); an online --kd-teacher
                   adds its weights (the folder's safetensors); its forward runs before the
                   student's step (a peak of its own: 3 B n V_t 4 + 2 B T (d_t + f_t) 4)
    rollouts       --on-policy-fraction > 0: batches of prompt + --rollout-max-tokens, and
                   the generation's KV cache B (P + R) L 2 g e s

d, f, h, g, e, V, L come from the model's config.json (hidden, intermediate, heads, kv heads,
head dim, vocabulary, layers). The coefficients were fitted on MLX's CPU backend (peak of
`mx.get_peak_memory` around a compiled step, tiny and SmolLM2-135M models, float32; see
tests/test_preflight.py): attention's T^2 terms assume MLX materialises the score matrix in
the backward pass. They are an estimate: the limit check is what it is for, not an exact
budget.

The limit: Metal's recommended working set (``mx.device_info()``) on Apple silicon; on
Linux, MemAvailable (/proc/meminfo) plus what this process already holds (the loaded model);
``MLX_DISTILL_MEMORY_LIMIT_GB`` overrides both (e.g. to keep headroom for other programs).
"""

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlx_distill.backends.base import resolve_loss_chunk
from mlx_distill.io import InputError

LIMIT_ENV = "MLX_DISTILL_MEMORY_LIMIT_GB"
GB = 1e9


@dataclass
class Dims:
    """What the activation formula needs from a model's config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Dims":
        c = cfg.get("text_config") or cfg  # multimodal configs nest the language model's
        d = int(c["hidden_size"])
        h = int(c.get("num_attention_heads") or max(d // 64, 1))
        return cls(hidden=d, intermediate=int(c.get("intermediate_size") or 4 * d),
                   layers=int(c.get("num_hidden_layers") or c.get("n_layer")), heads=h,
                   kv_heads=int(c.get("num_key_value_heads") or h), head_dim=int(c.get("head_dim") or d // h),
                   vocab=int(c["vocab_size"]))


@dataclass
class Estimate:
    parts: dict = field(default_factory=dict)  # name -> bytes
    batch: tuple = (0, 0, 0)  # the worst batch: (rows, input positions, projected positions)
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.parts.items() if v)
        b, t, n = self.batch
        return f"{fmt_bytes(self.total)} ({parts}; longest batch {b} x {t} tokens, {n} with logits)"


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- the formula
def batch_shapes(examples, batch_size: int, pad_multiple: int = 16, trim_multiple: int = 16) -> list[tuple]:
    """(B, T, n) of every training batch as `data.BatchStream` and `data.trim_prompt` make them:
    T = the padded width - 1 (inputs), n = T minus the trimmed shortest prompt."""
    from mlx_distill.data import bucket

    out = set()
    for idx in bucket(examples, batch_size):
        width = -(-max(len(examples[i].tokens) for i in idx) // pad_multiple) * pad_multiple
        start = max(0, min(examples[i].prompt_len for i in idx) - 1) // trim_multiple * trim_multiple
        out.add((len(idx), width - 1, width - 1 - start))
    return sorted(out)


# Chunks of --loss-chunk whose logits coexist at the peak. Counting the 3 vocabulary-wide copies of
# the formula at C positions alone underestimated Gemma-3-270M's peak by 40% (1.53 GB of head and
# loss above the blocks' activations = 11.4 chunk-sized logits; a 262k stand-in: ~13 at C 32 and
# 128 with KD): the chunks run one after another, but MLX frees a chunk's arrays a few chunks late.
CHUNKS_IN_FLIGHT = 4


def activation_bytes(dims: Dims, b: int, t: int, n: int, trained_layers: int, s: int,
                     grad_checkpoint: bool = False, kd_slots: int = 0, loss_chunk: int = 0) -> int:
    """Peak working memory of one training micro-step (see the module docstring). With a
    `loss_chunk` (positions per chunk of the LM head, `--loss-chunk` resolved) at most that many
    positions x vocabulary of logits are computed at once, and MLX keeps `CHUNKS_IN_FLIGHT` such
    chunks alive (their logits, log-softmax and gradient copies)."""
    d, f, h, v = dims.hidden, dims.intermediate, dims.heads, dims.vocab
    wide = min(b * n, CHUNKS_IN_FLIGHT * loss_chunk) if loss_chunk > 0 else b * n  # positions whose logits coexist
    layer = b * (t * (9 * d + 4.5 * f) * s + 1.5 * h * t * t * 4)
    work = b * (3 * h * t * t * 4 + 2 * t * (d + f) * 4)
    if grad_checkpoint:
        saved = trained_layers * 5 * b * t * d * s + layer
    else:
        saved = trained_layers * layer
    logits = 3 * wide * v * 4
    kd = (b * n * kd_slots * 8 + wide * v * 4) if kd_slots else 0
    return int(saved + work + logits + kd)


def estimate(cfg, dims: Dims, weights: int, trainable: int, act_dtype_bytes: int, shapes: list[tuple],
             kd_slots: int = 0, teacher: int = 0, teacher_dims: Dims | None = None, prompt_max: int = 0,
             kd_store: int = 0) -> Estimate:
    """The peak estimate of a run of `cfg` (see the module docstring); pure arithmetic, so the
    refusal can price its suggestions."""
    s = act_dtype_bytes
    layers = dims.layers if cfg.lora_layers < 0 else min(cfg.lora_layers, dims.layers)
    est = Estimate()
    est.parts["weights"] = weights
    # AdamW: two moments; the gradient tree, plus its clipped (or accumulated) copy
    est.parts["trainable+AdamW"] = trainable * (1 + 2 + 2 + (1 if cfg.grad_accumulation > 1 else 0))
    shapes = list(shapes)
    if getattr(cfg, "on_policy_fraction", 0) > 0:  # rollout batches: each prompt + up to --rollout-max-tokens
        r = min(cfg.rollout_max_tokens, max(cfg.max_seq_length - prompt_max, 0))
        t = -(-(prompt_max + r) // 16) * 16 - 1
        shapes.append((cfg.batch_size, t, r))
        kv = cfg.batch_size * (prompt_max + r) * dims.layers * 2 * dims.kv_heads * dims.head_dim * s
        est.parts["rollout KV cache"] = int(kv)
    chunk = resolve_loss_chunk(getattr(cfg, "loss_chunk", 0), dims.vocab)
    best = (0, (0, 0, 0))
    for b, t, n in shapes:
        a = activation_bytes(dims, b, t, n, layers, s, cfg.grad_checkpoint, kd_slots, chunk)
        if teacher_dims is not None:  # online teacher: its forward (no gradient) runs before the step, not during it
            tv, th, tf = teacher_dims.vocab, teacher_dims.hidden, teacher_dims.intermediate
            a = max(a, 3 * b * n * tv * 4 + 2 * b * t * (th + tf) * 4)
        best = max(best, (a, (b, t, n)))
    est.parts["activations"] = best[0]
    est.batch = best[1]
    if teacher:
        est.parts["teacher weights"] = teacher
    if kd_store:  # host memory, but on unified memory (a Mac) the same pool
        est.parts["KD store"] = kd_store
    return est


# ----------------------------------------------------------------------------- the device's limit
def mem_available() -> int | None:
    """Linux: MemAvailable of /proc/meminfo in bytes (None elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_limit(backend_name: str = "mlx") -> tuple[int | None, str]:
    """(bytes, where the number comes from) for the device the run trains on."""
    env = os.environ.get(LIMIT_ENV)
    if env:
        try:
            return int(float(env) * GB), f"{LIMIT_ENV}={env}"
        except ValueError:
            raise InputError(f"{LIMIT_ENV}={env!r}: expected a number of GB, e.g. 16") from None
    if backend_name == "mlx":
        import mlx.core as mx

        if mx.metal.is_available():
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            ws = info.get("max_recommended_working_set_size")
            if ws:
                return int(ws), "Metal's recommended working set"
        avail = mem_available()
        if avail is not None:
            held = mx.get_active_memory()  # the loaded model is counted in the estimate too
            return avail + held, f"MemAvailable {avail / GB:.2f} GB + {held / GB:.2f} GB already loaded"
        return None, "unknown (no Metal, no /proc/meminfo)"
    try:
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            held = torch.cuda.memory_allocated()
            return free + held, f"CUDA free {free / GB:.2f} GB + {held / GB:.2f} GB already loaded"
    except ImportError:
        pass
    avail = mem_available()
    return (avail, "MemAvailable") if avail is not None else (None, "unknown")


# ----------------------------------------------------------------------------- the model's side
def _read_config(path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def model_bytes(backend) -> tuple[int, int, int]:
    """(all parameters, trainable parameters, bytes per activation element) of the loaded model."""
    model = backend.model
    if backend.name == "mlx":
        import mlx.core as mx
        from mlx.utils import tree_flatten

        params = tree_flatten(model.parameters())
        total = sum(v.nbytes for _, v in params)
        trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
        floats = [v for _, v in params if mx.issubdtype(v.dtype, mx.floating)]
        # the compute dtype: the embedding's (or a quantized model's scales') float type
        s = min((v.dtype.size for v in floats), default=4)
        return int(total), int(trainable), int(s)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    s = min((p.element_size() for p in model.parameters() if p.is_floating_point()), default=4)
    return int(total), int(trainable), int(s)


def _folder_weights(path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def _kd_slots(cfg) -> int:
    if cfg.kd_teacher:
        return cfg.kd_top_k
    if cfg.kd_dir:
        try:
            return int(json.loads((Path(cfg.kd_dir) / "manifest.json").read_text()).get("top_m") or cfg.kd_top_k)
        except (OSError, ValueError):
            return cfg.kd_top_k
    return 0


def for_run(cfg, backend, examples) -> Estimate:
    """The estimate of this run: the loaded model (after `prepare`) and its training examples."""
    dims_cfg = _read_config(backend.model_path)
    weights, trainable, s = model_bytes(backend)
    est_kw = {"kd_store": _folder_weights(cfg.kd_dir)} if cfg.kd_dir and Path(cfg.kd_dir).is_dir() else {}
    if cfg.kd_teacher and cfg.kd_teacher != "api":  # a server's teacher takes no memory here
        try:
            from mlx_distill.models import resolve_model

            tpath = resolve_model(cfg.kd_teacher, "--kd-teacher")
            est_kw.update(teacher=_folder_weights(tpath), teacher_dims=Dims.from_config(_read_config(tpath)))
        except Exception:  # noqa: BLE001 - kd_setup reports a bad teacher itself, with its own message
            pass
    try:
        dims = Dims.from_config(dims_cfg)
    except (KeyError, TypeError, ValueError):
        est = Estimate(parts={"weights": weights, "trainable+AdamW": trainable * 5})
        est.notes.append(f"{backend.model_path}/config.json lacks the sizes for an activation estimate")
        return est
    prompt_max = max((e.prompt_len for e in examples), default=0)
    return estimate(cfg, dims, weights, trainable, s, batch_shapes(examples, cfg.batch_size),
                    kd_slots=_kd_slots(cfg), prompt_max=prompt_max, **est_kw)


def suggestions(cfg, backend, examples, limit: int) -> list[str]:
    """Concrete changes, each priced with this module's estimate: the mildest value of each
    option that fits (or its extreme, marked 'still above'), then a combination."""
    out = []

    def total(new_cfg, exs=examples) -> int:
        return for_run(new_cfg, backend, exs).total

    def first_fit(values, make, exs=examples):
        """The first of `values` whose config fits, else the last one; (value, estimate, fits)."""
        for v in values:
            est = total(make(v), exs(v) if callable(exs) else exs)
            if est <= limit:
                return v, est, True
        return v, est, False

    def say(flag, est, fits, why=""):
        out.append(f"{flag} (~{fmt_bytes(est)}{'' if fits else ', still above'}{why})")

    halvings = lambda n: [n >> k for k in range(1, n.bit_length()) if n >> k >= 1]  # noqa: E731
    if cfg.batch_size > 1:
        per_step = cfg.batch_size * cfg.grad_accumulation
        b, est, fits = first_fit(halvings(cfg.batch_size),
                                 lambda b: replace(cfg, batch_size=b, grad_accumulation=max(per_step // b, 1)))
        say(f"--batch-size {b} --grad-accumulation {max(per_step // b, 1)}", est, fits,
            "; the same examples per optimizer step")
    if not cfg.grad_checkpoint:
        est = total(replace(cfg, grad_checkpoint=True))
        say("--grad-checkpoint", est, est <= limit, "; about 1/3 more compute per step")
    n_layers = getattr(backend, "num_layers", None) or (cfg.lora_layers if cfg.lora_layers > 0 else 0)
    if n_layers and n_layers > 1:
        k, est, fits = first_fit(halvings(n_layers), lambda k: replace(cfg, lora_layers=k))
        say(f"--lora-layers {k}", est, fits, f"; now {n_layers}")
    lengths = sorted(len(e.tokens) for e in examples)
    # shorter --max-seq-length: only where it keeps at least half of the examples
    cands = sorted({lengths[int(q * (len(lengths) - 1))] for q in (0.95, 0.9, 0.75, 0.5)}, reverse=True)
    cands = [m for m in cands if m < lengths[-1]]
    if cands:
        keep = lambda m: [e for e in examples if len(e.tokens) <= m]  # noqa: E731
        m, est, fits = first_fit(cands, lambda m: replace(cfg, max_seq_length=m), keep)
        skipped = len(examples) - len(keep(m))
        say(f"--max-seq-length {m}", est, fits, f"; skips {skipped} of {len(examples)} training examples "
            f"longer than {m} tokens, now up to {lengths[-1]}")
    if cfg.batch_size > 1 and not cfg.grad_checkpoint:
        per_step = cfg.batch_size * cfg.grad_accumulation
        b, est, fits = first_fit(halvings(cfg.batch_size), lambda b: replace(
            cfg, grad_checkpoint=True, batch_size=b, grad_accumulation=max(per_step // b, 1)))
        say(f"--grad-checkpoint --batch-size {b} --grad-accumulation {max(per_step // b, 1)}", est, fits)
    return out


def run(cfg, backend, examples, quiet: bool = False) -> Estimate | None:
    """Print the estimate against the device's limit; raise `InputError` with suggestions when
    it is above and ``cfg.preflight`` is on. Only the MLX backend's numbers were calibrated."""
    if backend.model is None or not examples:
        return None
    est = for_run(cfg, backend, examples)
    if backend.name != "mlx":
        est.notes.append(f"the activation formula is fitted on MLX; {backend.name}'s allocator and kernels differ "
                         "(a rough estimate here; --no-preflight if it refuses a run you know fits)")
    limit, source = device_limit(backend.name)
    say = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))
    where = f"limit {fmt_bytes(limit)} ({source})" if limit else f"limit {source}"
    say(f"memory preflight: estimated peak {est.describe()} | {where}")
    for note in est.notes:
        say(f"memory preflight: {note}")
    if limit is None or est.total <= limit:
        return est
    if not cfg.preflight:
        print(f"warning: the memory estimate is above the {where}; --no-preflight: training anyway",
              file=sys.stderr, flush=True)
        return est
    tips = suggestions(cfg, backend, examples, limit)
    raise InputError(f"memory preflight: the estimated peak {fmt_bytes(est.total)} exceeds the {where}; "
                     f"a run this size would be killed by an out-of-memory error. Try: {'; '.join(tips)}; "
                     "or pass --no-preflight to train anyway")
