"""VeRA over quantized base layers: bitsandbytes 4-bit / 8-bit and torchao int8 weight-only.

The base layer runs its own (quantized) kernel; the adapter is ours. bitsandbytes
0.50 runs nf4 / fp4 / int8 on the CPU, so all of this is checked here.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import vera_kernels as vk
from vera_kernels.base_layers import dense_weight
from vera_kernels.reference import vera_linear_reference
from helpers import tiny_llama

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
SEED = 2**40 + 9


def _bnb_4bit(linear: nn.Linear, quant_type: str) -> nn.Module:
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                 quant_type=quant_type)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def _bnb_8bit(linear: nn.Linear) -> nn.Module:
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False,
                                 has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def _torchao_int8(linear: nn.Linear) -> nn.Module:
    torchao = pytest.importorskip("torchao", reason="torchao is not installed")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    del torchao
    model = nn.Sequential(copy.deepcopy(linear))
    quantize_(model, Int8WeightOnlyConfig())
    return model[0]


QUANTIZE = {
    "bnb-nf4": lambda lin: _bnb_4bit(lin, "nf4"),
    "bnb-fp4": lambda lin: _bnb_4bit(lin, "fp4"),
    "bnb-int8": _bnb_8bit,
    "torchao-int8": _torchao_int8,
}


def _linear(n_in=64, n_out=48):
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out)


@pytest.mark.parametrize("kind", list(QUANTIZE))
def test_layer_is_the_quantized_base_plus_the_reference_adapter(kind):
    base = QUANTIZE[kind](_linear())
    layer = vk.VeRALinear.from_linear(base, r=8, seed=SEED)
    assert layer.vera_lambda_d.dtype == torch.float32  # the compute dtype, not the storage's
    with torch.no_grad():
        layer.vera_lambda_d.normal_()
        layer.vera_lambda_b.normal_()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = base(x) + vera_linear_reference(x, layer.vera_lambda_d, layer.vera_lambda_b,
                                                   SEED)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # Only the vectors train, through the quantized base.
    y = layer(x.requires_grad_(True))
    y.square().sum().backward()
    assert layer.vera_lambda_b.grad.abs().max() > 0 and x.grad is not None


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8"])
def test_merge_requantizes_with_a_warning(kind):
    plain = _linear()
    layer = vk.VeRALinear.from_linear(QUANTIZE[kind](plain), r=8, seed=SEED)
    with torch.no_grad():
        layer.vera_lambda_b.normal_(std=0.05)
    x = torch.randn(7, 64)
    with torch.no_grad():
        unmerged = layer(x)
        dense_before = dense_weight(layer.base_layer).clone()
        with pytest.warns(UserWarning, match="lossy"):
            layer.merge()
        merged = layer(x)
    # The merged layer is the requantized W + delta: within the format's rounding.
    scale = unmerged.abs().max()
    tol = 0.1 if kind == "bnb-nf4" else 0.02
    assert (merged - unmerged).abs().max() <= tol * scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.unmerge()
    drift = (dense_weight(layer.base_layer) - dense_before).abs().max()
    assert drift <= 2 * tol * dense_before.abs().max()


def test_merge_into_torchao_is_refused():
    layer = vk.VeRALinear.from_linear(QUANTIZE["torchao-int8"](_linear()), r=4, seed=SEED)
    with pytest.raises(NotImplementedError, match="torchao-quantized"):
        layer.merge()
    assert not layer.merged


transformers = pytest.importorskip("transformers")
VOCAB = 48


def _quantized_llama():
    model = tiny_llama(VOCAB, hidden_size=64, intermediate_size=96, max_position_embeddings=32)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            vk.model.replace_submodule(model.model.layers, name, _bnb_4bit(module, "nf4"))
    return model


@pytest.mark.slow
def test_qlora_style_training_saves_and_reloads(tmp_path):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = vk.apply_vera(_quantized_llama(), targets, r=16, seed=SEED)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("vera_lambda" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(params, lr=3e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        start = torch.randint(0, VOCAB, (16, 1), generator=gen)
        seq = (start + torch.arange(12)) % VOCAB  # count upwards
        loss = model(input_ids=seq, labels=seq).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # ln(48) = 3.87 at the start; the adapter alone takes it down clearly.
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5

    vk.save_adapter(model, tmp_path)
    fresh = vk.load_adapter(_quantized_llama(), tmp_path)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_from_peft_on_a_quantized_base():
    peft = pytest.importorskip("peft")
    model = _quantized_llama()
    peft_model = peft.get_peft_model(model, peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "vera_lambda_b" in name:
                p.normal_(std=0.1)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = peft_model(ids).logits
    ours = vk.from_peft(peft_model)
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, vk.VeRALinear) and isinstance(layer.base_layer, bnb.nn.Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
