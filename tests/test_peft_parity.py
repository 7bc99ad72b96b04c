"""PEFT parity without silent loss: modules_to_save, bias options, the converted PeftModel,
exported training dynamics, and PEFT's conveniences, each against the installed peft on
small transformers models built from configs (no downloads)."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import vera_kernels as vk
from vera_kernels.model import vera_layers
from test_peft_interop import TOKENS, _gpt2, _llama, _randomize

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RETIRED = "converted by vera_kernels.from_peft; use the returned model"


def _perturb(model, seed=1, scale=0.3):
    """Move every trainable tensor (vectors, biases, saved modules) so that each matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))


def _ours(name):
    """PEFT's parameter name as ours: no wrapper prefix, no adapter name, no copy wrapper."""
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
    return name.removesuffix(".default")


def _trainable(model):
    return sorted(_ours(n) for n, p in model.named_parameters() if p.requires_grad)


def _logits_and_all_grads(model):
    """Logits and {our name: grad} of every trainable parameter for a fixed loss."""
    model.zero_grad()
    logits = model(TOKENS).logits
    logits.float().square().mean().backward()
    grads = {_ours(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _assert_grads_close(grads, expected, tol=4e-5):
    assert grads.keys() == expected.keys()
    for key, grad in grads.items():
        scale = expected[key].abs().max()
        assert (grad - expected[key]).abs().max() <= tol * scale + 1e-30, key


def _peft_logits(base, path, **kwargs):
    loaded = peft.PeftModel.from_pretrained(base, str(path), **kwargs).eval()
    with torch.no_grad():
        return loaded(TOKENS).logits


def _has_peft_wrapper(model):
    from peft.utils.other import AuxiliaryTrainingWrapper

    return any(isinstance(m, AuxiliaryTrainingWrapper) for m in model.modules())


# modules_to_save ------------------------------------------------------------------------

def test_from_peft_carries_modules_to_save(tmp_path):
    # Regression: from_peft kept PEFT's ModulesToSaveWrapper, vera_state_dict and
    # save_peft_adapter left the trained lm_head out, and PEFT reloaded a different model.
    config = peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    peft_model = peft.get_peft_model(_llama(), config)
    _perturb(peft_model)
    expected, expected_grads = _logits_and_all_grads(peft_model)
    assert "lm_head.weight" in expected_grads

    ours = vk.from_peft(peft_model)
    assert not _has_peft_wrapper(ours) and isinstance(ours.lm_head, nn.Linear)
    assert vk.model.trained_extras(ours) == {"modules_to_save": ["lm_head"], "bias": "none"}
    logits, grads = _logits_and_all_grads(ours)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    _assert_grads_close(grads, expected_grads)

    state = vk.vera_state_dict(ours)
    assert torch.equal(state["lm_head.weight"], ours.lm_head.weight)
    vk.save_peft_adapter(ours, tmp_path)
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).modules_to_save == ["lm_head"]
    # PEFT -> ours -> PEFT: the very same tensors, so the very same logits.
    assert torch.equal(_peft_logits(_llama(), tmp_path), expected)


def test_apply_vera_modules_to_save_round_trips(tmp_path):
    base = _llama()
    ours = vk.apply_vera(copy.deepcopy(base), ["q_proj", "v_proj", "lm_head"], r=8, seed=5,
                         modules_to_save=["lm_head"])
    # As in PEFT, a module to save is trained whole, never adapted.
    assert isinstance(ours.lm_head, nn.Linear)
    assert [n for n, p in ours.named_parameters() if p.requires_grad and "vera" not in n] == ["lm_head.weight"]
    _perturb(ours)
    with torch.no_grad():
        expected = ours(TOKENS).logits

    fresh = vk.apply_vera(copy.deepcopy(base), ["q_proj", "v_proj"], r=8, seed=5)
    vk.load_vera_state_dict(fresh, vk.vera_state_dict(ours))  # takes the saved module on
    assert vk.model.trained_extras(fresh)["modules_to_save"] == ["lm_head"] and fresh.lm_head.weight.requires_grad
    vk.save_adapter(ours, tmp_path / "ours")
    reloaded = vk.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    vk.save_peft_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS).logits, expected)
        assert torch.equal(reloaded(TOKENS).logits, expected)
    torch.testing.assert_close(_peft_logits(copy.deepcopy(base), tmp_path / "peft"), expected,
                               rtol=1e-5, atol=1e-5)


def test_modules_to_save_refuses_what_it_cannot_carry():
    with pytest.raises(ValueError, match="shares a parameter with 'transformer.wte.weight'"):
        vk.apply_vera(_gpt2(), ["c_attn"], r=4, modules_to_save=["lm_head"])  # tied to wte
    with pytest.raises(ValueError, match="'classifier' matches no module"):
        vk.apply_vera(_llama(), ["q_proj"], r=4, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="is, holds or lies inside a VeRA layer"):
        vk.apply_vera(vk.apply_vera(_llama(), ["q_proj"], r=4), ["v_proj"], r=4,
                      modules_to_save=["q_proj"])

    model = vk.apply_vera(_llama(), ["q_proj"], r=4, modules_to_save=["lm_head"])
    state = vk.vera_state_dict(model)
    # One lm_head per model, not per adapter: an extra adapter cannot bring its own.
    with pytest.raises(ValueError, match="holds once for all its adapters, not per adapter"):
        vk.add_adapter(model, "other", state)
    # A model that trains its lm_head cannot load a state without it (and the reverse).
    plain_state = vk.vera_state_dict(vk.apply_vera(_llama(), ["q_proj"], r=4))
    with pytest.raises(ValueError, match=r"the model trains modules_to_save=\['lm_head'\]"):
        vk.load_vera_state_dict(model, plain_state)


def test_load_with_modules_to_save_is_atomic():
    model = vk.apply_vera(_llama(), ["q_proj"], r=4, bias="all", modules_to_save=["lm_head"])
    _perturb(model)
    good = vk.vera_state_dict(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = vk.apply_vera(_llama(), ["q_proj"], r=4)
    before_target = {k: v.clone() for k, v in target.state_dict().items()}
    for broken, match in [
        ({**good, "lm_head.weight": torch.zeros(3, 3)}, "'lm_head.weight': expected shape"),
        ({k: v for k, v in good.items() if k != "lm_head.weight"}, "has no 'lm_head.weight'"),
    ]:
        for victim, snapshot in ((model, before), (target, before_target)):
            with pytest.raises(ValueError, match=match):
                vk.load_vera_state_dict(victim, broken)
            assert all(torch.equal(v, snapshot[k]) for k, v in victim.state_dict().items())
    assert vk.model.trained_extras(target) == {"modules_to_save": [], "bias": "none"}


# bias ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_bias_option_trains_what_peft_trains(bias):
    targets = ["c_attn", "c_fc"]
    config = peft.VeraConfig(r=8, target_modules=targets, bias=bias, fan_in_fan_out=True)
    expected = _trainable(peft.get_peft_model(_gpt2(), config))
    ours = vk.apply_vera(_gpt2(), targets, r=8, bias=bias)
    assert _trainable(ours) == expected
    assert any(n.endswith(".bias") for n in expected)


@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_from_peft_and_export_keep_peft_bias(bias, tmp_path):
    # Regression: from_peft froze the biases PEFT trains, and save_peft_adapter wrote
    # bias: none without them.
    config = peft.VeraConfig(r=8, target_modules=["c_attn", "c_fc"], bias=bias, fan_in_fan_out=True)
    peft_model = peft.get_peft_model(_gpt2(), config)
    _perturb(peft_model)
    expected, expected_grads = _logits_and_all_grads(peft_model)

    ours = vk.from_peft(peft_model)
    logits, grads = _logits_and_all_grads(ours)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    _assert_grads_close(grads, expected_grads)  # biases included, still trainable
    bias_keys = {k for k in expected_grads if k.endswith(".bias")}
    assert bias_keys and bias_keys <= vk.vera_state_dict(ours).keys()

    vk.save_peft_adapter(ours, tmp_path)
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).bias == bias
    assert torch.equal(_peft_logits(_gpt2(), tmp_path), expected)


def test_apply_vera_bias_round_trips(tmp_path):
    base = _gpt2()
    ours = vk.apply_vera(copy.deepcopy(base), ["c_attn"], r=8, seed=3, bias="vera_only")
    _perturb(ours)
    with torch.no_grad():
        expected = ours(TOKENS).logits
    fresh = vk.apply_vera(copy.deepcopy(base), ["c_attn"], r=8, seed=3)
    vk.load_vera_state_dict(fresh, vk.vera_state_dict(ours))
    assert _trainable(fresh) == _trainable(ours)
    vk.save_peft_adapter(ours, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS).logits, expected)
    torch.testing.assert_close(_peft_logits(copy.deepcopy(base), tmp_path), expected,
                               rtol=1e-5, atol=1e-5)


# the PeftModel after from_peft ----------------------------------------------------------

def test_converted_peft_model_is_retired(tmp_path):
    # Regression: the converted PeftModel still looked usable; its save_pretrained wrote the
    # projections alone and save_peft_adapter(peft_model) wrote keys PEFT could not load.
    peft_model = peft.get_peft_model(_llama(), peft.VeraConfig(r=8, target_modules=["q_proj"]))
    _randomize(peft_model)
    ours = vk.from_peft(peft_model)
    for use in (lambda: peft_model(TOKENS), lambda: peft_model.save_pretrained(str(tmp_path / "x")),
                lambda: peft_model.generate(input_ids=TOKENS), peft_model.disable_adapter,
                peft_model.merge_and_unload, peft_model.print_trainable_parameters):
        with pytest.raises(RuntimeError, match=RETIRED):
            use()
    with pytest.raises(ValueError, match="converted already"):
        vk.from_peft(peft_model)

    # Our functions take the retired wrapper for the model it became.
    assert vk.vera_state_dict(peft_model).keys() == vk.vera_state_dict(ours).keys()
    vk.save_peft_adapter(peft_model, tmp_path / "a")
    with torch.no_grad():
        expected = ours(TOKENS).logits
    torch.testing.assert_close(_peft_logits(_llama(), tmp_path / "a"), expected, rtol=1e-5, atol=1e-5)


# exported training dynamics --------------------------------------------------------------

def _grads_by_layer(model):
    _, grads = _logits_and_all_grads(model)
    return grads


def test_exact_training_refuses_what_folding_would_change(tmp_path):
    model = vk.apply_vera(_llama(), ["q_proj", "down_proj"], r=8, seed=3)  # in 32 and 48
    with pytest.raises(ValueError, match=r"in_features differ \[32, 48\]"):
        vk.save_peft_adapter(model, tmp_path, exact_training=True)


def test_exact_training_gives_peft_our_gradients(tmp_path):
    base = _llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]  # all in = 32
    ours = vk.apply_vera(copy.deepcopy(base), targets, r=8, seed=3)
    _randomize(ours)
    expected = _grads_by_layer(ours)
    vk.save_peft_adapter(ours, tmp_path, exact_training=True)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    _assert_grads_close(_grads_by_layer(loaded), expected)


def test_default_export_divides_peft_lambda_d_gradients(tmp_path):
    # What the docstring says: outputs match, PEFT's lambda_d gradient is ours / sqrt(max_in / in).
    base = _llama()
    ours = vk.apply_vera(copy.deepcopy(base), ["q_proj", "down_proj"], r=8, seed=3)
    _randomize(ours)
    expected = _grads_by_layer(ours)
    vk.save_peft_adapter(ours, tmp_path)
    grads = _grads_by_layer(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path),
                                                           is_trainable=True))
    factor = {name: math.sqrt(48 / layer.in_features) for name, layer in vera_layers(ours)}
    for key, grad in expected.items():
        layer, _, vector = key.rpartition(".")
        scale = factor[layer] if vector == "vera_lambda_d" else 1.0
        torch.testing.assert_close(grads[key] * scale, grad, rtol=1e-4, atol=1e-6 * grad.abs().max())
    assert any(f != 1.0 for f in factor.values())


# target selection, PEFT's rules ----------------------------------------------------------

@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_all_linear_matches_peft(make):
    config = peft.VeraConfig(r=4, target_modules="all-linear", fan_in_fan_out=make is _gpt2)
    peft_model = peft.get_peft_model(make(), config)
    from peft.tuners.vera.layer import VeraLayer

    expected = sorted(_ours(n) for n, m in peft_model.named_modules() if isinstance(m, VeraLayer))
    ours = vk.apply_vera(make(), "all-linear", r=4)
    assert sorted(n for n, _ in vera_layers(ours)) == expected
    assert not isinstance(ours.lm_head, vk.VeRALinear)  # the output head stays as it is


SELECTIONS = [
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0], layers_pattern=["h", "layers"]),
    dict(target_modules=r".*\.(q|v)_proj", exclude_modules=r".*layers\.0\..*"),
    dict(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=["layers.1.self_attn.k_proj"]),
    # A name given in full is taken as it is, layers_to_transform or not (PEFT's rule).
    dict(target_modules=["mlp.up_proj", "model.layers.0.self_attn.q_proj"], layers_to_transform=[1]),
]


@pytest.mark.parametrize("options", SELECTIONS)
def test_target_selection_follows_peft(options):
    from peft.tuners.tuners_utils import check_target_module_exists

    rules = SimpleNamespace(**{"exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
                               "modules_to_save": None, "target_parameters": None, **options})
    model = _llama()
    expected = sorted(n for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and check_target_module_exists(rules, n))
    ours = vk.apply_vera(model, r=4, **options)
    assert sorted(n for n, _ in vera_layers(ours)) == expected


def test_target_options_peft_would_ignore_are_refused():
    with pytest.raises(ValueError, match="layers_to_transform applies to a list"):
        vk.apply_vera(_llama(), r".*q_proj", r=4, layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_to_transform applies to a list"):
        vk.apply_vera(_llama(), "all-linear", r=4, layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern needs layers_to_transform"):
        vk.apply_vera(_llama(), ["q_proj"], r=4, layers_pattern="layers")
    with pytest.warns(UserWarning, match="excluded nothing"):
        vk.apply_vera(_llama(), ["q_proj"], r=4, exclude_modules=["qkv_proj"])


# conveniences --------------------------------------------------------------------------

def test_trainable_parameter_counts_are_peft_s(capsys):
    config = peft.VeraConfig(r=8, target_modules=["c_attn"], bias="all", fan_in_fan_out=True)
    peft_model = peft.get_peft_model(_gpt2(), config)
    ours = vk.apply_vera(_gpt2(), ["c_attn"], r=8, bias="all")
    assert vk.get_nb_trainable_parameters(ours) == peft_model.get_nb_trainable_parameters()
    peft_model.print_trainable_parameters()
    vk.print_trainable_parameters(ours)
    peft_line, our_line = capsys.readouterr().out.splitlines()
    assert our_line == peft_line

    class Params4bit(nn.Parameter):  # bitsandbytes' class name: two 4-bit values per byte
        pass

    packed = nn.Linear(4, 4)
    packed.weight = Params4bit(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
    assert vk.get_nb_trainable_parameters(packed) == (4, 20)
    assert peft.PeftModel.get_nb_trainable_parameters(packed) == (4, 20)


def test_merge_and_unload_gives_the_plain_architecture(tmp_path):
    model = vk.apply_vera(_llama(), "all-linear", r=4, seed=9)
    _randomize(model)
    with torch.no_grad():
        expected = model(TOKENS).logits
    merged = vk.merge_and_unload(model)
    assert type(merged) is transformers.LlamaForCausalLM
    assert not any(isinstance(m, vk.VeRALinear) for m in merged.modules())
    with torch.no_grad():
        got = merged(TOKENS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    merged.save_pretrained(tmp_path)
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(TOKENS).logits, got)


@pytest.mark.parametrize("merged", [False, True])
def test_unload_gives_the_base_model_back(merged):
    base = _llama()
    with torch.no_grad():
        expected = base(TOKENS).logits
    model = vk.apply_vera(copy.deepcopy(base), ["q_proj", "up_proj"], r=4, seed=2)
    _randomize(model)
    if merged:
        vk.merge_vera(model)
    plain = vk.unload(model)
    assert plain.state_dict().keys() == base.state_dict().keys()
    with torch.no_grad():
        got = plain(TOKENS).logits
    if merged:  # unmerging is exact up to the weight's rounding
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # weights untouched
        assert torch.equal(got, expected)

    trained = vk.apply_vera(_llama(), ["q_proj"], r=4, modules_to_save=["lm_head"])
    with pytest.warns(UserWarning, match="keep their trained values"):
        vk.unload(trained)


def test_weight_and_bias_are_the_base_layer_s():
    linear = nn.Linear(6, 5)
    layer = vk.VeRALinear.from_linear(linear, r=2)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert vk.VeRALinear(6, 5, r=2, bias=False).bias is None
    assert {n for n, _ in layer.named_parameters()} == {"base_layer.weight", "base_layer.bias",
                                                        "vera_lambda_d", "vera_lambda_b"}


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_auto_peft_model_loads_the_export(task_type, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _llama().save_pretrained(tmp_path / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    vk.apply_vera(model, ["q_proj", "v_proj"], r=8, seed=4)
    _randomize(model)
    with torch.no_grad():
        expected = model(TOKENS).logits
    vk.save_peft_adapter(model, tmp_path / "adapter", task_type=task_type)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(tmp_path / "base")
    assert written["task_type"] == task_type
    auto = peft.AutoPeftModelForCausalLM if task_type else peft.AutoPeftModel
    loaded = auto.from_pretrained(str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


def test_disable_vera_says_what_stays_trained():
    model = vk.apply_vera(_gpt2(), ["c_attn"], r=4, bias="all")
    with pytest.warns(UserWarning, match=r"bias='all'; those keep their trained values"):
        with vk.disable_vera(model):
            pass


def test_merge_and_unload_keeps_a_trained_copy_of_a_tied_head(tmp_path):
    # GPT-2 ties lm_head to wte; PEFT's modules_to_save trains a separate copy. The merged
    # model must not re-tie it when it loads (PEFT sets tie_word_embeddings=False too).
    config = peft.VeraConfig(r=8, target_modules=["c_attn"], modules_to_save=["lm_head"], fan_in_fan_out=True)
    peft_model = peft.get_peft_model(_gpt2(), config)
    _perturb(peft_model)
    merged = vk.merge_and_unload(vk.from_peft(peft_model))
    with torch.no_grad():
        expected = merged(TOKENS).logits
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, expected)
