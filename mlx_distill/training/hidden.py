"""Feature (hidden-state) distillation: ``train --kd-teacher MODEL --kd-hidden GAMMA
[--kd-hidden-layers auto|S:T,...] [--kd-hidden-loss cosine|mse]``.

The output of student block S (0-based, before the final norm) is mapped by a learned linear
projection P_S (student width -> teacher width, no bias; one per pair) and compared with the
output of teacher block T at the same position::

    L_hidden = (1 / N_H) sum_{positions} (1 / |pairs|) sum_{(S, T)} d(P_S h_S, g_T)

    cosine: d(x, y) = 1 - x.y / (|x| |y|)        mse: d(x, y) = mean_k (x_k - y_k)^2

and the objective is L = w L_SFT + alpha L_KD + gamma L_hidden (`objectives.kd_objective`).
Cosine is the default: it ignores the teacher's activation scale (large and family-specific),
which MSE has to learn through P before it can match anything.

Which positions (N_H): with the student's tokenizer, every completion position (the teacher
reads the same tokens). Across tokenizers, only the positions whose text prefix ends at the same
byte on both sides (`teacher.align`'s exact/matched classes: the student position predicting
completion token k pairs with the teacher row predicting the token that starts at the same byte);
their share of the completion positions is printed and recorded (manifest ``kd_hidden``).

The projections are a child module of the student (``model.hidden_projection``): trainable,
so the optimizer, gradient accumulation, clipping and the checkpoint's optimizer state include
them; the backend keeps them out of ``adapters.safetensors`` and writes them beside it as
``hidden_projection.safetensors`` (and into checkpoints, for --resume). Generation never uses them.

Block outputs are read by *taps*: the tapped blocks' class is swapped for a subclass whose
``__call__`` records its output (the module tree, and so the parameter names, are unchanged).
The teacher's are taken from the forward pass that scores the batch for logit KD (no second
teacher pass). MLX only: the torch backend refuses --kd-hidden.
"""

import sys

import numpy as np

from mlx_distill.config import TrainConfig
from mlx_distill.io import InputError

PROJECTION = "hidden_projection"  # = backends.mlx.PROJECTION (the backend saves it apart)
MAX_AUTO_PAIRS = 4


# ----------------------------------------------------------------------------- the layer map
def parse_layers(spec: str, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """``auto`` -> up to MAX_AUTO_PAIRS evenly spaced (S, T) pairs ending at both last blocks;
    ``S:T,S:T`` -> those pairs, checked against the block counts."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        k = min(MAX_AUTO_PAIRS, n_student, n_teacher)
        # block (j + 1) n / k - 1, rounded half up (Python's round() rounds half to even)
        pairs = [(int((j + 1) * n_student / k + 0.5) - 1, int((j + 1) * n_teacher / k + 0.5) - 1) for j in range(k)]
        return list(dict.fromkeys(pairs))
    pairs = []
    for item in spec.split(","):
        try:
            s, t = (int(x) for x in item.strip().split(":"))
        except ValueError:
            raise InputError(f"--kd-hidden-layers {spec!r}: {item.strip()!r} is not S:T (two block numbers, e.g. "
                             "'5:11,11:23'), nor 'auto'") from None
        if not (0 <= s < n_student and 0 <= t < n_teacher):
            raise InputError(f"--kd-hidden-layers {spec!r}: pair {s}:{t} is outside the blocks (student 0..{n_student - 1}, "
                             f"teacher 0..{n_teacher - 1}; 0-based)")
        pairs.append((s, t))
    if len(set(pairs)) != len(pairs):
        raise InputError(f"--kd-hidden-layers {spec!r}: a pair is listed twice")
    return pairs


# ----------------------------------------------------------------------------- taps
def blocks(model) -> list:
    """The transformer blocks of an mlx-lm model (``model.layers``, the decoder's list)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise InputError(f"--kd-hidden: cannot find the transformer blocks of {type(model).__name__} "
                         "(no `layers` list)")
    return list(layers)


def _width(model) -> int:
    w = getattr(getattr(model, "args", None), "hidden_size", None)
    if w is None:
        raise InputError(f"--kd-hidden: the width (hidden_size) of {type(model).__name__} is unknown")
    return int(w)


class Taps:
    """Records the outputs of chosen blocks of an mlx-lm model on each forward pass (`out[i]`)."""

    def __init__(self, model, indices):
        self.out: dict = {}
        bl = blocks(model)
        for i in indices:
            layer = bl[i]
            base = type(layer)
            if getattr(base, "_tap_sink", None) is self.out:
                continue  # already tapped here

            def call(mod, *a, _i=i, _base=base, **kw):
                y = _base.__call__(mod, *a, **kw)
                type(mod)._tap_sink[_i] = y[0] if isinstance(y, tuple) else y
                return y

            layer.__class__ = type(f"Tapped{base.__name__}", (base,), {"__call__": call, "_tap_sink": self.out})

    def clear(self) -> None:
        self.out.clear()


# ----------------------------------------------------------------------------- the loss
def hidden_distance(o, x, y, kind: str):
    """Per position (..., D) -> (...) distance: 1 - cos(x, y), or the mean squared error."""
    if kind == "cosine":
        num = o.sum(x * y, -1)
        den = (o.sum(x * x, -1) * o.sum(y * y, -1) + 1e-12) ** 0.5
        return 1.0 - num / den
    if kind == "mse":
        return o.sum((x - y) * (x - y), -1) / x.shape[-1]
    raise ValueError(f"hidden loss must be cosine or mse, got {kind!r}")


class HiddenKD:
    """The student half: taps on its blocks, the projections, and `loss(model, batch)`."""

    def __init__(self, cfg: TrainConfig, model, pairs, teacher_width: int):
        import mlx.nn as nn

        self.kind, self.pairs = cfg.kd_hidden_loss, pairs
        self.student_width, self.teacher_width = _width(model), int(teacher_width)
        self.taps = Taps(model, sorted({s for s, _ in pairs}))
        if PROJECTION not in model:  # a resumed run loads its weights into these (backend.load_checkpoint)
            proj = nn.Module()
            proj.maps = [nn.Linear(self.student_width, self.teacher_width, bias=False) for _ in pairs]
            setattr(model, PROJECTION, proj)

    def loss(self, model, b):
        """(sum over covered positions of the pair-averaged distance, number of covered positions)."""
        from mlx_distill.backends.ops import ops

        T = b["targets"].shape[1]
        g = b["kd_hidden"][:, -T:]  # (B, T, pairs, Dt): the teacher's, untrimmed (not in data.PER_POSITION)
        o = ops(g)
        m = o.f32(b["mask"]) * o.f32(b["kd_hidden_mask"][:, -T:])
        proj = getattr(model, PROJECTION).maps
        d = 0.0
        for j, (s, _) in enumerate(self.pairs):
            h = o.f32(self.taps.out[s][:, -T:])
            d = d + hidden_distance(o, proj[j](h), o.f32(g[:, :, j]), self.kind)
        d = d / len(self.pairs)
        return o.sum(d * m), o.sum(m)


# ----------------------------------------------------------------------------- the teacher half
class HiddenTeacherSource:
    """The KD source (`training.kd.kd_setup`'s online teacher) with the teacher's block outputs
    added to each batch: ``kd_hidden`` (B, L-1, pairs, Dt) float32 and ``kd_hidden_mask``
    (B, L-1), 1 where the student position has a teacher position to match. Everything else is
    the wrapped source's."""

    def __init__(self, store, pairs):
        self.store, self.pairs = store, pairs
        self.taps = Taps(store.teacher.model, sorted({t for _, t in pairs}))
        self.width = _width(store.teacher.model)
        self.summary: dict = {}

    def __getattr__(self, name):  # check, alignment_summary, cross, reports ...: the wrapped source's
        return getattr(self.store, name)

    def _gather(self):
        import mlx.core as mx

        out = [self.taps.out[t].astype(mx.float32) for _, t in self.pairs]
        mx.eval(out)
        return np.stack([np.array(x) for x in out], axis=2)  # (B_t, L_t, pairs, Dt)

    def batch_arrays(self, batch, top_k=None) -> dict:
        self.taps.clear()
        kd = self.store.batch_arrays(batch, top_k)
        B, L = batch.tokens.shape
        if not getattr(self.store, "cross", False):  # the teacher read batch.tokens[:, :-1] itself
            g = self._gather()
            return {**kd, "kd_hidden": g, "kd_hidden_mask": np.ones((B, L - 1), np.float32)}
        from mlx_distill.teacher.base import first_target

        g = np.zeros((B, L - 1, len(self.pairs), self.width), np.float32)
        hm = np.zeros((B, L - 1), np.float32)
        scored = [i for i in batch.ids if i in self.store._ex]  # the teacher's batch rows, in this order
        plans = self.store.planner.plans
        if scored:
            tg = self._gather()
            for r, eid in enumerate(batch.ids):
                p = plans.get(eid)
                if eid not in self.store._ex or p is None or not len(p["t"]):
                    continue
                keep = p["t"] < batch.lengths[r] - 1
                t, rows = p["t"][keep], p["rows"][keep]
                pos = first_target(self.store._ex[eid].prompt_len) + rows  # the teacher's input position
                g[r, t] = tg[scored.index(eid), pos]
                hm[r, t] = 1.0
        return {**kd, "kd_hidden": g, "kd_hidden_mask": hm}

    def position_share(self, split: str = "train") -> float:
        """Share of the split's completion positions that get a hidden-state target."""
        rep = self.store.reports.get(split, {})
        n = rep.get("positions", 0)
        if not getattr(self.store, "cross", False):
            return 1.0 if n else 0.0
        matched = rep.get("classes", {}).get("matched", 0) + rep.get("classes", {}).get("exact", 0)
        return round(matched / n, 4) if n else 0.0


# ----------------------------------------------------------------------------- setup
def check_options(cfg: TrainConfig, backend_name: str) -> None:
    """Refusals before any model is loaded."""
    if cfg.kd_hidden <= 0:
        return
    if not cfg.kd_teacher or cfg.kd_teacher == "api":
        raise InputError("--kd-hidden needs --kd-teacher MODEL, a local teacher held in memory (its hidden states "
                         "are not stored by `logits`, and a vLLM server does not return them)")
    if backend_name != "mlx":
        raise InputError(f"--kd-hidden: feature distillation runs on the MLX backend only (got --backend "
                         f"{backend_name}); use --backend mlx, or drop --kd-hidden")
    if cfg.on_policy_fraction > 0:
        raise InputError("--kd-hidden with --on-policy-fraction > 0 is not supported: rollouts carry no "
                         "hidden-state targets; drop one of them")


def setup(cfg: TrainConfig, backend, store):
    """-> (the source with hidden states, the `HiddenKD` for the objective); adds the projections to
    the student and restarts its optimizer so they are trained (called before any step or resume)."""
    check_options(cfg, backend.name)
    teacher = getattr(store, "teacher", None)
    if getattr(teacher, "backend", "mlx") != "mlx" or not hasattr(teacher, "model"):
        raise InputError(f"--kd-hidden: the teacher {cfg.kd_teacher} must run on MLX (local model)")
    n_s, n_t = len(blocks(backend.model)), len(blocks(teacher.model))
    pairs = parse_layers(cfg.kd_hidden_layers, n_s, n_t)
    src = HiddenTeacherSource(store, pairs)
    hkd = HiddenKD(cfg, backend.model, pairs, src.width)
    backend.init_optimizer()  # the projections are new trainable parameters
    share = src.position_share("train")
    src.summary = {"layer_pairs": [f"{s}:{t}" for s, t in pairs], "loss": cfg.kd_hidden_loss, "weight": cfg.kd_hidden,
                   "student_width": hkd.student_width, "teacher_width": hkd.teacher_width,
                   "student_blocks": n_s, "teacher_blocks": n_t, "position_share": share,
                   "positions": "every completion position (same tokenizer)" if not getattr(store, "cross", False)
                   else "positions whose text prefixes end at the same byte (align exact/matched)",
                   "projection": f"{PROJECTION}.safetensors"}
    print(f"kd hidden: pairs {', '.join(src.summary['layer_pairs'])} ({cfg.kd_hidden_loss}, gamma {cfg.kd_hidden}), "
          f"widths {hkd.student_width} -> {hkd.teacher_width}, {share:.1%} of the train completion positions",
          file=sys.stderr)
    return src, hkd
