"""Both conversion directions against the real peft package, on small transformers models
built from configs (no downloads), plus Conv1D, disable/merge for whole models."""

import copy

import pytest
import torch

import vera_kernels as vk
from helpers import EPS, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 97


def _llama():
    return tiny_llama(VOCAB).eval()


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {
    "llama-qv": (_llama, ["q_proj", "v_proj"]),
    "llama-all": (_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"]),  # Conv1D layers
}
TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def _randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))


def _logits_and_grads(model):
    """Logits and {layer path: (d grad, b grad)} of a fixed loss."""
    model.zero_grad()
    logits = model(TOKENS).logits
    logits.float().square().mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        if "vera_lambda" in name:
            # PEFT: "...q_proj.vera_lambda_d.default"; ours: "...q_proj.vera_lambda_d".
            key = name.replace("base_model.model.", "").replace(".default", "")
            grads[key] = p.grad.detach().clone()
    return logits.detach(), grads


def _peft_model(make, targets, dtype):
    config = peft.VeraConfig(r=8, target_modules=targets, save_projection=True)
    model = peft.get_peft_model(make(), config).to(dtype)
    _randomize(model)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", list(MODELS))
def test_from_peft_matches_peft(which, dtype):
    make, targets = MODELS[which]
    peft_model = _peft_model(make, targets, dtype)
    expected_logits, expected_grads = _logits_and_grads(peft_model)

    ours = vk.from_peft(copy.deepcopy(peft_model))
    layers = dict(vk.model.vera_layers(ours))
    assert len(layers) == len(expected_grads) // 2 and all(l.projections is not None for l in layers.values())
    logits, grads = _logits_and_grads(ours)
    # Same math, different operation order: a few eps of the logits' scale.
    tol = 1e-5 if dtype == torch.float32 else 16 * EPS[torch.bfloat16]
    scale = expected_logits.abs().max().float()
    assert (logits.float() - expected_logits.float()).abs().max() <= tol * scale
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        g_scale = expected_grads[key].abs().max().float()
        err = (grad.float() - expected_grads[key].float()).abs().max()
        assert err <= 4 * tol * g_scale + 1e-30, f"{key}: {err} vs scale {g_scale}"


@pytest.mark.parametrize("which", list(MODELS))
def test_save_peft_adapter_loads_in_peft(which, tmp_path):
    make, targets = MODELS[which]
    base = make()
    ours = vk.apply_vera(copy.deepcopy(base), targets, r=8, seed=2**40 + 5)
    _randomize(ours)
    with torch.no_grad():
        expected = ours(TOKENS).logits
        unadapted = base(TOKENS).logits
    assert not torch.allclose(expected, unadapted, atol=1e-3)  # the adapter matters

    vk.save_peft_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(TOKENS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_round_trip_through_peft_keeps_outputs(tmp_path):
    # ours -> PEFT file -> PeftModel -> from_peft -> ours again (explicit mode) -> PEFT file.
    base = _llama()
    ours = vk.apply_vera(copy.deepcopy(base), ["q_proj", "down_proj"], r=8, seed=7)
    _randomize(ours)
    with torch.no_grad():
        expected = ours(TOKENS).logits
    vk.save_peft_adapter(ours, tmp_path / "a")
    converted = vk.from_peft(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")))
    vk.save_peft_adapter(converted, tmp_path / "b")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b")).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


def test_conv1d_layers_merge_and_unmerge():
    model = vk.apply_vera(_gpt2(), ["c_attn"], r=4, seed=3)
    layers = dict(vk.model.vera_layers(model))
    assert all(layer.fan_in_fan_out for layer in layers.values())
    assert {(l.in_features, l.out_features) for l in layers.values()} == {(32, 96)}
    _randomize(model)
    with torch.no_grad():
        expected = model(TOKENS).logits
        vk.merge_vera(model)
        assert all(layer.merged for layer in layers.values())
        torch.testing.assert_close(model(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)
        vk.unmerge_vera(model)
        torch.testing.assert_close(model(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


def test_disable_vera_gives_the_base_model():
    base = _llama()
    with torch.no_grad():
        expected = base(TOKENS).logits
    model = vk.apply_vera(copy.deepcopy(base), ["q_proj", "up_proj"], r=4, seed=3)
    _randomize(model)
    with torch.no_grad():
        adapted = model(TOKENS).logits
        vk.merge_vera(model)  # disabling also works on merged layers
        with vk.disable_vera(model):
            torch.testing.assert_close(model(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(TOKENS).logits, adapted, rtol=1e-4, atol=1e-4)


def test_from_peft_errors():
    with pytest.raises(ValueError, match="no PEFT VeRA layers"):
        vk.from_peft(_llama())
    peft_model = _peft_model(_llama, ["q_proj"], torch.float32)
    peft_model.merge_adapter()
    with pytest.raises(ValueError, match="is merged; unmerge it in PEFT first"):
        vk.from_peft(peft_model)


def test_save_peft_adapter_refuses_what_peft_cannot_store(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    vk.apply_vera(model, ["0", "1"], r=3, seed=9)
    model[0].dropout = 0.1
    # PEFT has one vera_dropout per adapter: silently taking one would change training.
    with pytest.raises(ValueError, match="one dropout probability for all layers"):
        vk.save_peft_adapter(model, tmp_path / "a")
    model[1].dropout = 0.1
    vk.save_peft_adapter(model, tmp_path / "b")
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "b")).vera_dropout == 0.1
    model[1].seed = 10
    with pytest.raises(ValueError, match="one seed for all layers"):
        vk.save_peft_adapter(model, tmp_path / "c")
