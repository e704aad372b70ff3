"""Model FLOPs of one training step: the one formula every benchmark script uses.

Counted are the matmuls (2 FLOPs per multiply-add) of a dense decoder-only transformer
(llama / qwen2 / mistral shapes: q, k, v, o, gate, up, down per block, and an LM head).
Norms, activations, the softmax, rotary embeddings, the optimizer and the embedding lookup
(a gather, not a matmul) are left out: a few percent at these sizes.

Notation, for one micro-batch of B rows padded to T positions:

    L        blocks;  d = hidden size;  f = MLP size;  V = vocabulary
    d_q      = query heads x head_dim;  d_kv = key-value heads x head_dim
    N_blk    = d*d_q + 2*d*d_kv + d_q*d + 3*d*f      matmul weights of one block (biases left out)
    N_head   = d * V                                  the LM head (tied to the embedding or not)
    P        = B * T     positions through the blocks: every computed position counts,
                         prompt and padding included (they cost the same as completion tokens)
    H        positions through the LM head: P, or fewer when the loss needs only the tail
             (our trainer's `data.trim_prompt` + `forward(keep=n)`: B * kept columns)
    L_bp     blocks the backward pass runs through: from the lowest block with trainable
             parameters up to the top (below it no gradient is needed, and autodiff computes none)
    N_lora   LoRA weights of the adapted blocks (A and B of every adapted linear layer)

Forward (every block, every position; the head on H positions; the adapters' own two matmuls):

    F_fwd = P * L * (2*N_blk + 4*T*d_q)  +  H * 2*N_head  +  P * 2*N_lora

where 4*T*d_q is attention's QK^T and AV over the full T x T score matrix (as PaLM's
appendix B counts it; a causal kernel may skip half of it).

Backward = activation gradients (dX = dY W^T: 2 FLOPs per weight per position) through the
head and the L_bp top blocks, plus weight gradients (dW = X^T dY: 2 FLOPs per weight per
position) for the trained weights only:

    F_bwd = H * 2*N_head + P * L_bp * (2*N_blk + 8*T*d_q)       activation gradients
          + P * 4*N_lora                                         LoRA: activation + weight gradients
          + P * 2*N_full  [+ H * 2*N_head if the head is trained]  full fine-tuning: weight gradients,
                                                                 N_full = L_bp * N_blk

So LoRA on every block costs ~ (2 + 2) * N per position plus 6 * N_lora (the familiar
"4N + 6 N_lora"), full fine-tuning ~ 6N, and LoRA on the top 16 of 30 blocks less than
either, because the backward pass stops at the lowest adapted block. Recomputation under
gradient checkpointing is not counted (model FLOPs, not hardware FLOPs, as MFU defines them).

MFU = F_total / step seconds / peak FLOP/s, where the peak is the chip's dense datasheet
figure (GPU, bf16) or, on a CPU, a large float32 matmul measured in the same run.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        """From a Hugging Face / mlx-lm config.json (a multimodal model's ``text_config`` too)."""
        c = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        heads = int(c["num_attention_heads"])
        return cls(layers=int(c["num_hidden_layers"]), hidden=int(c["hidden_size"]), heads=heads,
                   kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
                   intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]))

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict:
        """(in, out) of each matmul of a block, by mlx-lm / HF name."""
        d, f = self.hidden, self.intermediate
        return {"self_attn.q_proj": (d, self.d_q), "self_attn.k_proj": (d, self.d_kv),
                "self_attn.v_proj": (d, self.d_kv), "self_attn.o_proj": (self.d_q, d),
                "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}

    @property
    def block_params(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def matmul_params(self) -> int:
        return self.layers * self.block_params + self.head_params


def adapted_blocks(shape: Shape, lora_layers: int) -> int:
    """Blocks with trainable parameters (from the top), as the trainers read --lora-layers / --num-layers."""
    return shape.layers if lora_layers < 0 else min(lora_layers, shape.layers)


def lora_params(shape: Shape, rank: int, lora_layers: int, keys=None) -> int:
    """LoRA weights (A: rank x in, B: out x rank) on the top `lora_layers` blocks, on the linear
    layers named in `keys` (default: all seven, which is what both trainers adapt without --lora-keys)."""
    lin = shape.linears()
    names = list(keys) if keys else list(lin)
    unknown = [k for k in names if k not in lin]
    if unknown:
        raise ValueError(f"unknown linear layer(s) {unknown}; known: {sorted(lin)}")
    return adapted_blocks(shape, lora_layers) * sum(rank * (lin[k][0] + lin[k][1]) for k in names)


def step_flops(shape: Shape, rows: int, width: int, head_positions: int | None = None, *,
               backprop_blocks: int | None = None, lora: int = 0, full: bool = False,
               head_trained: bool = False) -> dict:
    """Model FLOPs of one forward + backward pass over a (rows x width) micro-batch (module docstring).

    head_positions: positions given to the LM head in the whole micro-batch (default rows * width).
    backprop_blocks: L_bp, the top blocks the backward pass runs through (default: all).
    lora: N_lora, the LoRA weights (0 for full fine-tuning); full: the L_bp blocks' weights are trained.
    Returns {"forward", "backward", "total"} in FLOPs (floats)."""
    P = rows * width
    H = P if head_positions is None else head_positions
    L_bp = shape.layers if backprop_blocks is None else min(max(backprop_blocks, 0), shape.layers)
    attn = 4 * width * shape.d_q
    fwd = P * shape.layers * (2 * shape.block_params + attn) + H * 2 * shape.head_params + P * 2 * lora
    bwd = H * 2 * shape.head_params + P * L_bp * (2 * shape.block_params + 2 * attn) + P * 4 * lora
    if full:
        bwd += P * 2 * L_bp * shape.block_params + (H * 2 * shape.head_params if head_trained else 0)
    return {"forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd)}


__all__ = ["Shape", "adapted_blocks", "lora_params", "step_flops"]
