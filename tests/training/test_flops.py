"""`mlx_distill.training.flops`: the FLOP formula the benchmark scripts share (hand-computed values, the
familiar 6N / 4N + 6 N_lora special cases, and the parameter counts against real models)."""

import json

import pytest

from mlx_distill.training.flops import Shape, adapted_blocks, lora_params, step_flops

# 2 blocks, d = 4, 2 query heads / 1 kv head of dim 2, MLP 8, vocabulary 10
S = Shape(layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)


def test_parameter_counts_by_hand():
    # q 4x4, k 4x2, v 4x2, o 4x4, gate/up/down 4x8 each
    assert S.block_params == 16 + 8 + 8 + 16 + 3 * 32 == 144
    assert S.head_params == 40
    assert S.matmul_params == 2 * 144 + 40
    # LoRA rank 1 on the top block: r * (in + out) summed over the seven linears
    assert lora_params(S, 1, 1) == (4 + 4) + (4 + 2) + (4 + 2) + (4 + 4) + 3 * (4 + 8)
    assert lora_params(S, 2, -1) == 2 * 2 * 64
    assert lora_params(S, 1, 5, keys=["self_attn.q_proj"]) == 2 * 8
    with pytest.raises(ValueError, match="unknown linear"):
        lora_params(S, 1, 1, keys=["q_proj"])
    assert adapted_blocks(S, -1) == 2 and adapted_blocks(S, 1) == 1 and adapted_blocks(S, 9) == 2


def test_step_flops_by_hand():
    # one row of 3 positions, nothing trained but the backward pass through both blocks
    f = step_flops(S, rows=1, width=3)
    attn = 4 * 3 * 4  # QK^T and AV over 3 positions, d_q = 4
    assert f["forward"] == 3 * 2 * (2 * 144 + attn) + 3 * 2 * 40 == 2256
    assert f["backward"] == 3 * 2 * 40 + 3 * 2 * (2 * 144 + 2 * attn) == 2544
    assert f["total"] == 2256 + 2544


def test_lora_on_every_block_is_4n_plus_6_nlora():
    rows, width, n_lora = 3, 5, lora_params(S, 4, -1)
    f = step_flops(S, rows, width, lora=n_lora)
    attention = 12 * S.layers * width * S.heads * S.head_dim
    assert f["total"] == rows * width * (4 * S.matmul_params + 6 * n_lora + attention)


def test_full_fine_tuning_is_6n():
    rows, width = 2, 7
    f = step_flops(S, rows, width, full=True, head_trained=True)
    attention = 12 * S.layers * width * S.heads * S.head_dim
    assert f["total"] == rows * width * (6 * S.matmul_params + attention)


def test_backward_stops_at_the_lowest_adapted_block_and_head_trimming_counts():
    rows, width = 2, 8
    n1 = lora_params(S, 8, 1)
    top1 = step_flops(S, rows, width, backprop_blocks=1, lora=n1)
    both = step_flops(S, rows, width, backprop_blocks=2, lora=n1)
    assert top1["forward"] == both["forward"]
    assert both["backward"] - top1["backward"] == rows * width * (2 * S.block_params + 8 * width * S.d_q)
    trimmed = step_flops(S, rows, width, head_positions=rows * 3, backprop_blocks=1, lora=n1)
    assert top1["total"] - trimmed["total"] == rows * (width - 3) * 4 * S.head_params


def test_shape_matches_real_models(tiny_model):
    """Shape's linears are the model's projection weights (biases aside), and lora_params is
    what mlx-lm's LoRA layers actually train."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    shape = Shape.from_config(json.loads((tiny_model / "config.json").read_text()))
    model, _ = load(str(tiny_model))
    weights = dict(tree_flatten(model.parameters()))
    blocks = sum(v.size for k, v in weights.items() if k.startswith("model.layers.") and k.endswith("_proj.weight"))
    assert blocks == shape.layers * shape.block_params
    assert weights["model.embed_tokens.weight"].size == shape.head_params
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert trainable == lora_params(shape, 8, 1)


def test_smollm2_shape():
    """SmolLM2-135M (the embedded model's config): 106.2M non-embedding matmul weights."""
    cfg = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}
    s = Shape.from_config(cfg)
    assert s.layers * s.block_params == 106_168_320
    assert s.head_params == 576 * 49152
    assert Shape.from_config({"text_config": cfg}) == s
