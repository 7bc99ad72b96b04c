"""A VeRA adapter exported as PEFT LoRA (``vk.save_lora_adapter``) computes what it computed.

PEFT's own ``PeftModel.from_pretrained`` loads each export onto the plain base
model, and its logits must be ours with that adapter: a tiny Llama (linear
layers of two shapes, a module to save) and a tiny GPT-2 (Conv1D layers, their
biases trained), two adapters each, in float64 so that only rounding differs;
both again as DVoRA (PEFT's LoRA with ``use_dora``).
"""

import json
import warnings

import pytest
import torch

import vera_kernels as vk
from vera_kernels.model import vera_layers
from helpers import randomize_adapter, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SEED = 2**41 + 7


def _llama():
    return tiny_llama(64, tie_word_embeddings=False).double()


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).double().eval()  # GPT-2 has dropout


CASES = {
    # (base model builder, targets, apply_vera options, adapters). PEFT's LoRA holds
    # trained biases for one adapter only.
    "llama": (_llama, ["q_proj", "v_proj", "down_proj"], {"modules_to_save": ["lm_head"]},
              ("default", "fr")),
    "gpt2": (_gpt2, ["c_attn", "c_fc"], {}, ("default", "fr")),
    "gpt2-biases": (_gpt2, ["c_attn", "c_fc"], {"bias": "vera_only"}, ("default",)),
    # DVoRA: a LoRA with use_dora and the magnitudes (PEFT's DoRA takes the same norms).
    "llama-dora": (_llama, ["q_proj", "v_proj", "down_proj"], {"use_dora": True},
                   ("default", "fr")),
    "gpt2-dora": (_gpt2, ["c_attn", "c_fc"], {"use_dora": True}, ("default",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_export_to_our_logits(case, tmp_path):
    build, targets, options, adapters = CASES[case]
    model = vk.apply_vera(build(), targets, r=6, seed=SEED, **options)
    randomize_adapter(model, "default", 1)
    vk.add_adapter(model, "fr")
    randomize_adapter(model, "fr", 2)
    with torch.no_grad():  # the extras trained too: they must travel with the export
        for name, param in model.named_parameters():
            if param.requires_grad and "vera_" not in name:
                param.add_(0.01)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    ours = {}
    for adapter in adapters:
        vk.set_adapter(model, adapter)
        with torch.no_grad():
            ours[adapter] = model(ids).logits
        vk.save_lora_adapter(model, tmp_path / adapter, adapter=adapter)
    config = json.loads((tmp_path / adapters[-1] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 6
    assert config["fan_in_fan_out"] == case.startswith("gpt2")
    assert config["bias"] == ("lora_only" if options.get("bias") else "none")
    assert config["use_dora"] == options.get("use_dora", False)
    # PEFT, from the plain base model, with the extras the export carries.
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "default")
    for adapter in adapters[1:]:
        loaded.load_adapter(tmp_path / adapter, adapter_name=adapter)
    with torch.no_grad():
        plain = build()(ids).logits
    for adapter in adapters:
        loaded.set_adapter(adapter)
        with torch.no_grad():
            theirs = loaded(ids).logits
        torch.testing.assert_close(theirs, ours[adapter], rtol=1e-10, atol=1e-10)
        assert not torch.allclose(theirs, plain)


def test_factors_are_the_adapter_and_large_ranks_are_warned(tmp_path):
    from safetensors.torch import load_file

    model = vk.apply_vera(_llama(), ["q_proj"], r=4, seed=SEED)
    randomize_adapter(model, "default", 5)
    layer = next(layer for _, layer in vera_layers(model))
    vk.save_lora_adapter(model, tmp_path / "a", dtype=torch.float64)
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    lora_a, lora_b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    assert lora_a.shape == (4, 32) and lora_b.shape == (32, 4) and lora_a.dtype == torch.float64
    # lora_A is the spec's A; lora_B @ lora_A is the layer's delta.
    assert torch.equal(lora_a, vk.projection("A", 4, 32, SEED, dtype=torch.float64))
    torch.testing.assert_close(lora_b @ lora_a, layer.delta_weight().double(), rtol=1e-12,
                               atol=1e-15)
    big = vk.apply_vera(_llama(), ["q_proj"], r=513, seed=SEED)
    with pytest.warns(UserWarning, match="rank 513 is above vLLM's largest max_lora_rank"):
        vk.save_lora_adapter(big, tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vk.save_lora_adapter(model, tmp_path / "c")  # r = 4: no warning
