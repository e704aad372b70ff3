"""convert-adapter: mlx-lm <-> PEFT folders give the same logits in mlx-lm and transformers + peft."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import mlx.core as mx  # noqa: E402
from mlx_lm import load  # noqa: E402

from mlx_distill import adapters  # noqa: E402
from mlx_distill.io import InputError  # noqa: E402

PROMPT = "Ann has 12 apples and buys 30 more. How many apples does Ann have now?"


def mlx_adapter(model_path, out, fine_tune_type="lora", num_layers=1, keys=None, rank=4, scale=10.0, seed=0):
    """An mlx-lm adapter folder with non-zero B (and m), made by mlx-lm's own LoRA layers."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_path))
    model.freeze()
    lp = {"rank": rank, "scale": scale, "dropout": 0.0, **({"keys": keys} if keys else {})}
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, lp, use_dora=fine_tune_type == "dora")
    rng = np.random.default_rng(seed)
    w = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    for k in w:
        if not k.endswith(".lora_a"):
            w[k] = (w[k] + rng.normal(0, 0.05, w[k].shape)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), {k: mx.array(v) for k, v in w.items()})
    (out / "adapter_config.json").write_text(json.dumps(
        {"model": str(model_path), "fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": lp}))
    return out


def mlx_logits(model_path, adapter, tokens):
    model, _ = load(str(model_path), adapter_path=str(adapter) if adapter else None)
    return np.array(model(mx.array(tokens)))


def peft_logits(model_path, adapter, tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    m = PeftModel.from_pretrained(m, str(adapter)).eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def tokens_of(model_path):
    from transformers import AutoTokenizer

    return np.array([AutoTokenizer.from_pretrained(str(model_path)).encode(PROMPT)], dtype=np.int32)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("ftype,num_layers,keys", [("lora", 1, None),
                                                   ("dora", 2, ["self_attn.q_proj", "mlp.down_proj"])])
def test_mlx_to_peft_to_mlx_round_trip(tiny_model, tmp_path, ftype, num_layers, keys):
    src = mlx_adapter(tiny_model, tmp_path / "mlx", ftype, num_layers, keys)
    tokens = tokens_of(tiny_model)
    ref = mlx_logits(tiny_model, src, tokens)
    assert rel(ref, mlx_logits(tiny_model, None, tokens)) > 1e-3  # the adapter changes the model

    adapters.main(["--from", "mlx", "--input", str(src), "--output", str(tmp_path / "peft")])
    pc = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert pc["r"] == 4 and pc["lora_alpha"] == 40.0 and pc["use_dora"] == (ftype == "dora")
    assert rel(ref, peft_logits(tiny_model, tmp_path / "peft", tokens)) < 1e-5  # transformers + peft

    adapters.main(["--input", str(tmp_path / "peft"), "--output", str(tmp_path / "back"), "--model", str(tiny_model)])
    back = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert back["num_layers"] == num_layers and back["fine_tune_type"] == ftype
    w0 = mx.load(str(src / "adapters.safetensors"))
    w1 = mx.load(str(tmp_path / "back" / "adapters.safetensors"))
    assert set(w0) == set(w1) and all(np.array_equal(np.array(w0[k]), np.array(w1[k])) for k in w0)
    np.testing.assert_array_equal(mlx_logits(tiny_model, tmp_path / "back", tokens), ref)  # identical


def test_native_peft_adapter_with_patterns_converts_exactly(tiny_llama, tmp_path):
    """Short target names, layers_to_transform, rslora, per-module rank and alpha: the mlx-lm
    adapter gives peft's logits (lower blocks get B = 0, smaller ranks are zero-padded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                    use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 32}, lora_dropout=0.1,
                    init_lora_weights=False)  # random B, so the adapter does something
    pm = get_peft_model(m, lc)
    pm.save_pretrained(str(tmp_path / "peft"))
    tokens = tokens_of(tiny_llama)
    ref = peft_logits(tiny_llama, tmp_path / "peft", tokens)

    c = adapters.peft_to_mlx(tmp_path / "peft", tmp_path / "mlx", model=str(tiny_llama))
    assert c["num_layers"] == 1 and c["lora_parameters"]["rank"] == 4
    assert c["lora_parameters"]["scale"] == pytest.approx(8 / 2)  # rslora: alpha / sqrt(r)
    assert c["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert rel(ref, mlx_logits(tiny_llama, tmp_path / "mlx", tokens)) < 1e-5


def test_refuses_what_mlx_lm_cannot_represent(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only")).save_pretrained(str(tmp_path / "b"))
    with pytest.raises(InputError, match="bias"):
        adapters.peft_to_mlx(tmp_path / "b", tmp_path / "o", model=str(tiny_model))

    full = tmp_path / "full"
    full.mkdir()
    (full / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full", "num_layers": 1}))
    mx.save_safetensors(str(full / "adapters.safetensors"), {"model.layers.1.mlp.up_proj.weight": mx.zeros((2, 2))})
    with pytest.raises(InputError, match="full fine-tune"):
        adapters.mlx_to_peft(full, tmp_path / "o2")

    with pytest.raises(InputError, match="neither"):
        adapters.detect_format(tmp_path)

    # no --model and a base_model_name_or_path that is not a local folder: the block count is unknown
    src = mlx_adapter(tiny_model, tmp_path / "mlx")
    adapters.mlx_to_peft(src, tmp_path / "peft", model="org/not-a-folder")
    with pytest.raises(InputError, match="--model"):
        adapters.peft_to_mlx(tmp_path / "peft", tmp_path / "o3")
