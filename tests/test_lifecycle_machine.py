"""Several adapters through random sequences of every lifecycle transition (hypothesis).

``MultiAdapterMachine`` drives nn.Linear(9, 8) -> nn.Linear(8, 6) in float64 with
VeRA on both (r = 4) through: add / set / delete adapters, set an adapter's
vectors, merge a named adapter into every layer and unmerge, disable blocks,
nested ``adapter_batch`` blocks, ``load_state_dict`` of another seed's extra
state (also while merged), ``save_adapter`` / ``load_adapter`` into a new
adapter, and loads that must fail (a wrong-shaped entry of some adapter, a
truncated adapter file). A shadow holds what the model should be: each
adapter's vectors, the active and the merged adapter, the seed. After every
step, the model must compute what a model freshly built from the shadow
computes (the float64 reference, within 1e-10 of the output's scale; merges
round), every row of an ``adapter_batch`` must take its own adapter, and the
base weights must be the originals (within 1e-12) unmerged, the originals
plus the merged adapter's delta (within 1e-10) merged. ``DVoRAMachine`` runs the same
steps on DVoRA layers (``use_dora=True``: three vectors per adapter, the magnitude too;
the merged weight is ``s ⊙ (W0 + ΔW)``).

Examples: 100 runs of 20 steps by default (~10 s) (``VERA_HYPOTHESIS_EXAMPLES`` sets
the count); derandomized, so every run checks the same ones.
"""

import tempfile

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

import vera_kernels as vk
from helpers import budget

SIZES = (9, 8, 6)
RANK = 4
SEEDS = (2**63 + 5, 17)
NAMES = ("default", "fr", "de", "it")


def _error(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


class MultiAdapterMachine(RuleBasedStateMachine):
    USE_DORA = False

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.model = nn.Sequential(nn.Linear(9, 8), nn.Linear(8, 6)).double()
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / p.shape[-1] ** 0.5)
        vk.apply_vera(self.model, ["0", "1"], r=RANK, seed=SEEDS[0], use_dora=self.USE_DORA)
        self.layers = [self.model[0], self.model[1]]
        self.originals = [layer.base_layer.weight.detach().clone() for layer in self.layers]
        self.x = torch.randn(3, SIZES[0], generator=gen, dtype=torch.float64)
        self.seed = SEEDS[0]
        self.active, self.merged = "default", None
        self.vectors = {"default": self._read("default")}
        self.tmp = tempfile.TemporaryDirectory()

    def teardown(self):
        self.tmp.cleanup()

    # the shadow ------------------------------------------------------------------

    def _read(self, name):
        return [tuple(v.detach().clone() for v in layer.adapter_parameters(name).values())
                for layer in self.layers]

    def _projections(self, i):
        n_in, n_out = SIZES[i], SIZES[i + 1]
        return (vk.projection("A", RANK, n_in, self.seed, dtype=torch.float64),
                vk.projection("B", n_out, RANK, self.seed, dtype=torch.float64))

    def _weight(self, i, name):
        """Layer i's weight with adapter ``name`` in it (None: the original): W0 + ΔW, and
        DVoRA's ``s ⊙ (W0 + ΔW)``."""
        if name is None:
            return self.originals[i]
        (proj_a, proj_b), (d, b, *magnitude) = self._projections(i), self.vectors[name][i]
        weight = self.originals[i] + (b[:, None] * proj_b * d) @ proj_a
        if magnitude:
            weight = weight * (magnitude[0] / weight.norm(dim=1))[:, None]
        return weight

    def reference(self, x, name):
        """What a model freshly built with adapter ``name`` (None: none) computes."""
        for i, layer in enumerate(self.layers):
            x = x @ self._weight(i, name).T + layer.base_layer.bias.detach()
        return x

    # rules -------------------------------------------------------------------------

    @precondition(lambda self: len(self.vectors) < len(NAMES))
    @rule(data=st.data())
    def add(self, data):
        name = data.draw(st.sampled_from([n for n in NAMES if n not in self.vectors]))
        vk.add_adapter(self.model, name)
        self.vectors[name] = self._read(name)

    @precondition(lambda self: self.merged is None)
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
    def set_vectors(self, data, seed):
        name = data.draw(st.sampled_from(sorted(self.vectors)))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers:
                for v in layer.adapter_parameters(name).values():
                    v.copy_(torch.randn(v.shape, generator=gen, dtype=torch.float64))
        self.vectors[name] = self._read(name)

    @rule(data=st.data())
    def set_adapter(self, data):
        name = data.draw(st.sampled_from([None, *sorted(self.vectors)]))
        if self.merged is not None and name != self.merged:
            with pytest.raises(RuntimeError, match="unmerge"):
                vk.set_adapter(self.model, name)
            return
        vk.set_adapter(self.model, name)
        self.active = name

    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.vectors)))
        if name in ("default", self.active, self.merged):
            with pytest.raises(ValueError):
                vk.delete_adapter(self.model, name)
            return
        vk.delete_adapter(self.model, name)
        del self.vectors[name]

    @precondition(lambda self: self.merged is None)
    @rule(data=st.data())
    def merge_named(self, data):
        name = data.draw(st.sampled_from(sorted(self.vectors)))
        for layer in self.layers:
            layer.merge(name)
        self.merged = name

    @precondition(lambda self: self.merged is not None)
    @rule()
    def unmerge(self):
        vk.unmerge_vera(self.model)
        self.merged = None

    @rule()
    def disable_block(self):
        with vk.disable_vera(self.model), torch.no_grad():
            assert _error(self.model(self.x), self.reference(self.x, None)) <= 1e-10

    @precondition(lambda self: self.merged is None)
    @rule(data=st.data())
    def nested_batches(self, data):
        names = st.sampled_from([None, *sorted(self.vectors)])
        outer = data.draw(st.lists(names, min_size=3, max_size=3))
        inner = data.draw(st.lists(names, min_size=3, max_size=3))
        with torch.no_grad(), vk.adapter_batch(self.model, outer):
            self._check_rows(outer)
            with vk.adapter_batch(self.model, inner):
                self._check_rows(inner)
            self._check_rows(outer)  # the inner block gave the outer rows back

    def _check_rows(self, names):
        out = self.model(self.x)
        for i, name in enumerate(names):
            want = self.reference(self.x[i:i + 1], name)[0]
            assert _error(out[i], want) <= 1e-10, f"row {i} ({name})"

    @rule(seed=st.sampled_from(SEEDS))
    def load_another_seed(self, seed):
        other = vk.VeRALinear(1, 1, r=RANK, seed=seed).get_extra_state()
        for layer in self.layers:  # the extra state alone, also under a merged weight
            layer.load_state_dict({"_extra_state": other}, strict=False)
        self.seed = seed

    @rule(data=st.data())
    def save_and_load_as_new(self, data):
        free = [n for n in NAMES if n not in self.vectors]
        if self.active is None or not free:
            return
        name = data.draw(st.sampled_from(free))
        vk.save_adapter(self.model, self.tmp.name, adapter=self.active)
        vk.load_adapter(self.model, self.tmp.name, adapter_name=name)
        self.vectors[name] = [tuple(v.clone() for v in pair) for pair in self.vectors[self.active]]

    @rule(data=st.data())
    def failing_load(self, data):
        name = data.draw(st.sampled_from(sorted(self.vectors)))
        layer = self.layers[data.draw(st.sampled_from([0, 1]))]
        state = layer.state_dict()
        inner = "" if name == "default" else f"vera_adapters.{name}."
        state[f"{inner}vera_lambda_b"] = torch.zeros(1, dtype=torch.float64)
        state["base_layer.weight"] = state["base_layer.weight"] + 1
        with pytest.raises(RuntimeError, match="vera_lambda_b"):
            layer.load_state_dict(state)

    # invariants ----------------------------------------------------------------------

    @invariant()
    def matches_the_shadow(self):
        for i, layer in enumerate(self.layers):
            assert set(layer.adapter_names()) == set(self.vectors)
            assert (layer.active_adapter, layer.merged_adapter, layer.seed) == (
                self.active, self.merged, self.seed)
            for name, pairs in self.vectors.items():
                for got, want in zip(layer.adapter_parameters(name).values(), pairs[i]):
                    assert torch.equal(got.detach(), want), f"layer {i}: {name}'s vectors"
            weight = layer.base_layer.weight.detach()
            if self.merged is None:
                assert _error(weight, self.originals[i]) <= 1e-12, f"layer {i}: weight drifted"
            else:
                want = self._weight(i, self.merged)
                assert _error(weight, want) <= 1e-10, f"layer {i}: merged weight"
            trains = {n for n in self.vectors
                      if any(v.requires_grad for v in layer.adapter_parameters(n).values())}
            assert trains == ({self.active} if self.active else set()), f"layer {i}: {trains} train"
        with torch.no_grad():
            shown = self.merged or self.active
            assert _error(self.model(self.x), self.reference(self.x, shown)) <= 1e-10


class DVoRAMachine(MultiAdapterMachine):
    USE_DORA = True


MultiAdapterMachine.TestCase.settings = budget(100, stateful_step_count=20)
TestMultiAdapterLifecycle = MultiAdapterMachine.TestCase
DVoRAMachine.TestCase.settings = budget(100, stateful_step_count=20)
TestDVoRALifecycle = DVoRAMachine.TestCase

