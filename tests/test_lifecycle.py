"""A layer's adapters across merge, disable, delete, load and nested batches: each defect
found by adversarial use, as a regression test (issue: "Adapter lifecycle with one owner").

The invariants behind them are in vera_kernels/lifecycle.py; the hypothesis state
machine in test_properties.py drives the same transitions at random.
"""

import json

import pytest
import torch
from torch import nn

import vera_kernels as vk
from vera_kernels.model import vera_layers
from helpers import randomize_adapter

SEED = 2**36 + 21


def _mlp(seed=SEED):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    return vk.apply_vera(model, ["0", "2"], r=4, seed=seed)


def _two_adapters():
    model = _mlp()
    randomize_adapter(model, "default", 1)
    vk.add_adapter(model, "fr")
    randomize_adapter(model, "fr", 2)
    return model


def _weights(model):
    return [layer.base_layer.weight.detach().clone() for _, layer in vera_layers(model)]


def _x(rows=3):
    return torch.randn(rows, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _output_with(model, adapter, x):
    vk.set_adapter(model, adapter)
    with torch.no_grad():
        return model(x)


def test_nested_adapter_batch_restores_the_outer_rows():
    model = _two_adapters()
    x = _x()
    outer = ["fr", None, "default"]
    expected = torch.stack([_output_with(model, name, x[i:i + 1])[0] for i, name in enumerate(outer)])
    vk.set_adapter(model, "default")
    with torch.no_grad(), vk.adapter_batch(model, outer):
        with vk.adapter_batch(model, ["default", "fr", "fr"]):
            model(x)
        # Leaving the inner block used to end the outer one: every row took the active adapter.
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    assert all(layer.row_adapters is None for _, layer in vera_layers(model))


def test_disable_vera_folds_back_the_adapter_that_was_merged():
    model = _two_adapters()
    x = _x()
    expected = _output_with(model, "fr", x)
    vk.set_adapter(model, "fr")
    for _, layer in vera_layers(model):
        layer.merge("fr")
    merged_weights = _weights(model)
    with vk.disable_vera(model), torch.no_grad():
        base = model(x)
    assert not torch.allclose(base, expected)
    # It used to fold the active adapter back in (here "default" after switching).
    assert [layer.merged_adapter for _, layer in vera_layers(model)] == ["fr", "fr"]
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), merged_weights))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_disable_vera_restores_a_merged_adapter_other_than_the_active_one():
    model = _two_adapters()
    originals = _weights(model)
    vk.set_adapter(model, "default")
    model[0].merge("fr")  # the layer's weight holds "fr" while "default" is active
    held = _weights(model)[0]
    with vk.disable_vera(model):
        assert torch.allclose(_weights(model)[0], originals[0], rtol=0, atol=1e-12)
    assert model[0].merged_adapter == "fr" and torch.equal(_weights(model)[0], held)


def test_the_merged_adapter_cannot_be_deleted():
    model = _two_adapters()
    originals = _weights(model)
    vk.set_adapter(model, "fr")
    vk.merge_vera(model)
    with pytest.raises(ValueError, match="'fr' is active"):
        vk.delete_adapter(model, "fr")
    # Nor can another adapter become active while "fr" is in the weight.
    with pytest.raises(RuntimeError, match="unmerge_vera first"):
        vk.set_adapter(model, "default")
    vk.unmerge_vera(model)  # still possible: nothing was lost
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(_weights(model), originals))
    vk.set_adapter(model, "default")
    vk.delete_adapter(model, "fr")
    assert vk.list_adapters(model) == ["default"]


def test_a_layer_merged_with_another_adapter_than_the_active_one_keeps_it():
    model = _two_adapters()
    vk.set_adapter(model, "default")
    model[0].merge("fr")
    with pytest.raises(ValueError, match="merged into the base weight"):
        model[0].delete_adapter_vectors("fr")
    with pytest.raises(ValueError, match="merged into the base weight"):
        vk.delete_adapter(model, "fr")  # checked on every layer before any changes
    assert "fr" in model[2].adapter_names()


def test_a_seed_loaded_into_a_merged_layer_moves_the_delta_with_it():
    model = _mlp()
    randomize_adapter(model, "default")
    layer = model[0]
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    other = vk.VeRALinear(9, 8, r=4, seed=SEED + 1).double()
    # The extra state alone (strict=False): the seed changes under a merged weight.
    layer.load_state_dict({"_extra_state": other.get_extra_state()}, strict=False)
    assert layer.seed == SEED + 1 and layer.merged
    expected = original + layer.delta_weight()  # the new seed's delta
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected, rtol=0, atol=1e-12)
    layer.unmerge()  # used to take out the new seed's delta from the old seed's weight
    torch.testing.assert_close(layer.base_layer.weight.detach(), original, rtol=0, atol=1e-12)


def test_a_failed_layer_load_changes_nothing_whichever_adapter_is_bad():
    model = _two_adapters()
    layer = model[0]
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    other = vk.VeRALinear(9, 8, r=4, seed=SEED + 5).double()
    state["_extra_state"] = other.get_extra_state()
    state["vera_lambda_d"] = state["vera_lambda_d"] + 1
    state["base_layer.weight"] = state["base_layer.weight"] + 1
    state["vera_adapters.fr.vera_lambda_b"] = torch.zeros(7, dtype=torch.float64)  # wrong shape
    with pytest.raises(RuntimeError, match="vera_adapters.fr.vera_lambda_b.*shape"):
        layer.load_state_dict(state)
    assert layer.seed == SEED
    after = layer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k != "_extra_state")


def _saved_adapter(tmp_path, edit=lambda config: None):
    """An adapter directory whose config ``edit`` changed in place."""
    model = _mlp()
    randomize_adapter(model, "default")
    directory = tmp_path / "adapter"
    vk.save_adapter(model, directory)
    config_path = directory / "vera_adapter_config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    return directory


def _plain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 6)).double()


def _assert_plain_and_unchanged(model, reference):
    assert not list(vera_layers(model))
    assert [type(m) for m in model] == [type(m) for m in reference]
    assert [p.requires_grad for p in model.parameters()] == [True] * 4
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values()))
    assert not vars(model).get("_vera_kernels_root")


def test_load_adapter_onto_a_plain_model_is_atomic(tmp_path):
    from safetensors.torch import load_file, save_file

    # An r that does not fit the vectors: found only once the layers exist.
    directory = _saved_adapter(tmp_path, lambda config: config.update(r=5))
    model = _plain()
    with pytest.raises(ValueError, match="state dict has .*'r': 4.*model has .*'r': 5"):
        vk.load_adapter(model, directory)
    _assert_plain_and_unchanged(model, _plain())
    # A wrong-shaped vector.
    directory = _saved_adapter(tmp_path)
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["2.vera_lambda_b"] = torch.zeros(5, dtype=torch.float64)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="2.vera_lambda_b"):
        vk.load_adapter(model, directory)
    _assert_plain_and_unchanged(model, _plain())


def test_load_adapter_names_the_file_or_entry_at_fault(tmp_path):
    directory = _saved_adapter(tmp_path)
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])  # truncated
    model = _plain()
    with pytest.raises(ValueError, match="adapter_model.safetensors: cannot read"):
        vk.load_adapter(model, directory)
    _assert_plain_and_unchanged(model, _plain())
    directory = _saved_adapter(tmp_path, lambda config: config.pop("seed"))
    with pytest.raises(ValueError, match="vera_adapter_config.json: no 'seed' entry"):
        vk.load_adapter(model, directory)
    _assert_plain_and_unchanged(model, _plain())


@pytest.mark.parametrize("name", ["training", "forward", "keys", "_private", "a.b", ""])
def test_adapter_names_that_clash_are_refused_by_rule(name):
    model = _mlp()
    with pytest.raises(ValueError, match="not starting with '_', and not an attribute of "
                                         "nn.ModuleDict"):
        vk.add_adapter(model, name)
    assert vk.list_adapters(model) == ["default"]


def test_bitsandbytes_8bit_with_float_weights_merges_as_dense():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    for forward_first in (False, True):
        base = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=True)  # bitsandbytes' default
        base.load_state_dict(linear.state_dict())
        layer = vk.VeRALinear.from_linear(base, r=4, seed=3)
        with torch.no_grad():
            layer.vera_lambda_b.copy_(torch.linspace(-1, 1, 8))
            unmerged = layer(x)
            original = base.weight.detach().clone()
            if forward_first:
                layer(x)
            layer.merge()  # used to read the float weight as int8 data (or raise before a forward)
            merged = layer(x)
        # The base layer quantizes on the fly either way: int8 rounding, not hundreds off.
        assert (merged - unmerged).abs().max() <= 0.05 * unmerged.abs().max()
        layer.unmerge()
        assert torch.equal(base.weight.detach(), original) or torch.allclose(
            base.weight.detach(), original, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64,
                                   torch.int16])
def test_adapter_ids_of_every_integer_dtype(dtype):
    x = torch.randn(3, 5, dtype=torch.float64)
    d, b = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    expected = vk.vera_linear_multi(x, d, b, torch.tensor([0, 1, 1]), SEED)
    got = vk.vera_linear_multi(x, d, b, torch.tensor([0, 1, 1], dtype=dtype), SEED)
    assert torch.equal(got, expected)
    if not dtype.is_signed:
        with pytest.raises(ValueError, match=r"adapter_ids must be in \[0, 2\)"):
            vk.vera_linear_multi(x, d, b, torch.tensor([0, 1, 2], dtype=dtype), SEED)


def test_adapter_ids_on_meta_tensors():
    x = torch.empty(3, 5, device="meta")
    d, b = torch.empty(2, 4, device="meta"), torch.empty(2, 6, device="meta")
    y = vk.vera_linear_multi(x, d, b, torch.zeros(3, dtype=torch.int64, device="meta"), SEED)
    assert y.shape == (3, 6) and y.device.type == "meta"


def test_only_the_active_adapter_trains():
    model = _mlp()
    vk.add_adapter(model, "fr")
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {f"{i}.vera_lambda_{v}" for i in (0, 2) for v in "db"}  # new: frozen
    vk.set_adapter(model, "fr")
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {f"{i}.vera_adapters.fr.vera_lambda_{v}" for i in (0, 2) for v in "db"}
    vk.set_trainable_adapters(model, ["fr", "default"])
    assert sum(p.requires_grad for p in model.parameters()) == 8
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        vk.set_trainable_adapters(model, ["nope"])


def test_save_adapter_through_a_peft_wrapper_names_layers_of_the_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 6)).double()
    vk.apply_vera(model, ["0", "3"], r=4, seed=SEED)
    randomize_adapter(model, "default")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["2"]))
    vk.save_adapter(wrapped, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "vera_adapter_config.json").read_text())
    assert config["target_modules"] == ["0", "3"]  # not base_model.model.0
    plain = nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 6)).double()
    vk.load_adapter(plain, tmp_path / "a")
    for name in ("0", "3"):
        assert torch.equal(plain.get_submodule(name).vera_lambda_b,
                           model.get_submodule(name).vera_lambda_b)


def test_torch_jit_trace_is_refused_with_a_way_out():
    model = _mlp()
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot trace a VeRA layer: use "
                                           "torch.export.export"):
        torch.jit.trace(model, _x())
    plain = vk.merge_and_unload(model)
    traced = torch.jit.trace(plain, _x())
    torch.testing.assert_close(traced(_x()), plain(_x()))


def test_an_open_block_keeps_the_adapters_it_needs():
    model = _two_adapters()
    vk.set_adapter(model, "default")
    with vk.adapter_batch(model, ["fr", None, "fr"]):
        with pytest.raises(ValueError, match="open disable_vera / adapter_batch block"):
            vk.delete_adapter(model, "fr")
    vk.delete_adapter(model, "fr")  # free once the block is left


# --- found by an adversarial review of the above ------------------------------------------

class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = _plain(), _plain()


def test_two_adapted_submodules_are_both_seen_with_their_names():
    model = _Pair()
    vk.apply_vera(model.enc, ["0", "2"], r=4, seed=SEED)
    vk.apply_vera(model.dec, ["0", "2"], r=4, seed=SEED)
    assert [n for n, _ in vera_layers(model)] == ["enc.0", "enc.2", "dec.0", "dec.2"]
    assert [n for n, _ in vera_layers(model.enc)] == ["0", "2"]
    # Adapting the parent after a child: its names are relative to the parent.
    other = _Pair()
    vk.apply_vera(other.enc, ["0"], r=4, seed=SEED)
    vk.apply_vera(other, ["dec.0"], r=4, seed=SEED)
    assert [n for n, _ in vera_layers(other)] == ["enc.0", "dec.0"]


def test_merging_a_tied_weight_is_refused():
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).double()
    tied[1].weight = tied[0].weight
    vk.apply_vera(tied, ["0"], r=4, seed=SEED)
    randomize_adapter(tied, "default")
    before = tied[1].weight.detach().clone()
    with pytest.raises(ValueError, match="tied to .*1.weight.*merging would change them too"):
        vk.merge_vera(tied)
    with pytest.raises(ValueError, match="tied"):
        vk.merge_and_unload(tied)
    assert torch.equal(tied[1].weight.detach(), before) and not tied[0].merged


def test_a_merged_weight_loads_only_with_the_vectors_it_holds():
    model = _two_adapters()
    for _, layer in vera_layers(model):
        layer.merge("fr")
    state = model.state_dict()
    fresh = _mlp()  # no "fr": its weight would hold an adapter the layers cannot unmerge
    before = _weights(fresh)
    with pytest.raises(RuntimeError, match="holds adapter 'fr', which this layer does not have"):
        fresh.load_state_dict(state, strict=False)
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), before))
    without = {k: v for k, v in state.items() if "vera_adapters" not in k}
    vk.add_adapter(fresh, "fr")
    with pytest.raises(RuntimeError, match="holds adapter 'fr'.s delta, but that adapter's vectors"):
        fresh.load_state_dict(without, strict=False)
    fresh.load_state_dict(state)  # the vectors come along: fine, and it unmerges exactly
    vk.unmerge_vera(fresh)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(_weights(fresh), before))


def test_unload_inside_an_open_block_is_refused():
    model = _two_adapters()
    vk.merge_vera(model)
    with vk.disable_vera(model):
        with pytest.raises(RuntimeError, match="unload inside a disable_vera"):
            vk.unload(model)
        with pytest.raises(RuntimeError, match="merge_and_unload inside a disable_vera"):
            vk.merge_and_unload(model)
    assert model[0].merged_adapter == "default"  # the block gave it back


def test_merge_vera_merges_no_layer_when_one_cannot():
    model = _two_adapters()
    model[2].disabled = True
    with pytest.raises(RuntimeError, match="layer '2': cannot merge a disabled layer"):
        vk.merge_vera(model)
    assert not model[0].merged


def test_saving_defaults_to_the_adapter_the_model_computes(tmp_path):
    model = _two_adapters()
    vk.set_adapter(model, "default")
    for _, layer in vera_layers(model):
        layer.merge("fr")  # the weights hold "fr": that is what the model computes
    vk.save_adapter(model, tmp_path / "a")
    plain = vk.load_adapter(_plain(), tmp_path / "a")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-12, atol=1e-12)
