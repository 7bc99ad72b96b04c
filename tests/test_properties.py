"""Property tests: ``vera_linear`` against a float64 oracle, and a VeRA model's life cycle.

1. ``test_vera_linear_<backend>`` draws a call of ``vk.vera_linear``: 0-300
   tokens over 0-2 leading dims (x may be just ``(in,)``), in / out / r in
   1..300, any seed in [0, 2**64) (edge values included), the dtype (bf16 on
   the torch backend only: the Triton interpreter cannot run it), the memory
   layout of every tensor argument and of the upstream gradient
   (``make_layout``), which inputs require grad, with or without
   ``base_output``, and a magnitude 1e-3 / 1 / 1e3 for each vector. Values are
   standard normal. It compares the output and every gradient with VeRA's
   formula evaluated in float64 on the float64 values of the very tensors
   passed in, with A and B from ``vk.projection`` (exact in float64).

   The error budget. For each result R (y, dx, dd, db, dbase) let R_ref be the
   float64 reference and R_abs the same formula evaluated on absolute values
   (|x|, |A|, |d|, |B|, |b|, |g|, |base|) in float64: the magnitude of the
   terms summed, so the bound is robust to cancellation (a standard forward
   error bound). The test requires

       max |R - R_ref|  <=  tol[dtype] * max(R_abs) + tiny[dtype]

   with tol = 1e-12 (float64), 32 eps (float32), 8 eps (float16 and
   bfloat16), eps = torch.finfo(dtype).eps, and tiny = 8 units of the dtype's
   smallest subnormal (the absolute error of rounding a result that underflows).
   Draws whose R_abs exceeds half the dtype's largest value are discarded (the
   result would not be finite).

   The Triton interpreter is slow (~3-5 ms per 16x16x16 tile step on a
   2-core machine), so its draws keep in / out / r <= 70 and cap the tokens so
   that token tiles x r tiles x (in + out tiles) <= TRITON_TILE_BUDGET: about
   1-2 s per example, forward and backward. Sizes are still arbitrary (odd,
   not powers of two, smaller than a tile, ...).

2. ``TestVeRAModel`` is a stateful machine on nn.Linear(13, 11) -> nn.Linear(11, 7)
   in float64 with VeRA on both (r = 5, a seed >= 2**63). Rules merge, unmerge,
   disable, save, load (``load_vera_state_dict`` and ``load_state_dict`` of the
   vector keys, also while merged), set the vectors and take an SGD step. A
   shadow keeps the original base weights and the expected vectors; after
   every rule the model must compute the float64 reference within 1e-10
   (relative to the output's scale), the base weights must equal the
   originals within 1e-12 while unmerged and original + delta within 1e-10
   while merged. Loading vectors into a merged model must keep it merged
   with the new vectors folded in.

Example counts: the defaults below (torch 150, triton 30, stateful 100 runs
of 20 steps) keep this file around 60 s on a 2-core machine (under ~90 s
while other work shares it);
``VERA_HYPOTHESIS_EXAMPLES=N`` sets every test's count to N. Draws are
derandomized, so every run checks the same examples.
"""

import copy
import dataclasses
import math

import pytest
import torch
from hypothesis import assume, given, target
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)
from torch import nn

import vera_kernels as vk
from helpers import budget


DTYPES = {"torch": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
          "triton": (torch.float64, torch.float32, torch.float16)}
TOL = {torch.float64: 1e-12, torch.float32: 32 * torch.finfo(torch.float32).eps,
       torch.float16: 8 * torch.finfo(torch.float16).eps,
       torch.bfloat16: 8 * torch.finfo(torch.bfloat16).eps}
TINY = {dtype: 8 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps for dtype in TOL}
TRITON_TILE_BUDGET = 40
SEEDS = st.one_of(st.sampled_from([0, 2**32 - 1, 2**32, 2**63, 2**64 - 1]),
                  st.integers(0, 2**64 - 1))
VECTOR_LAYOUTS = ("contiguous", "strided", "expanded")
MATRIX_LAYOUTS = VECTOR_LAYOUTS + ("transposed",)
RESULT_NAMES = {"y": "y", "x": "dx", "lambda_d": "dd", "lambda_b": "db", "base_output": "dbase"}


# --------------------------------------------------------------------------- layouts

def make_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A new tensor equal to ``values`` with the given memory layout.

    contiguous; transposed: ``.mT`` of a buffer laid out the other way (>= 2-D);
    strided: a ``[::2]`` (vectors) or ``[::2, ..., ::3]`` view of a bigger
    buffer whose other elements are NaN; expanded: stride 0, one value (vectors)
    or one row (>= 2-D) broadcast, so ``values`` must be constant along it.
    """
    if layout == "contiguous":
        return values.clone(memory_format=torch.contiguous_format)
    if layout == "transposed":
        assert values.dim() >= 2
        return values.mT.contiguous().mT
    if layout == "strided":
        shape = list(values.shape)
        shape[0] *= 2
        if values.dim() > 1:
            shape[-1] *= 3
        buffer = values.new_full(shape, float("nan"))
        view = buffer[::2] if values.dim() == 1 else buffer[::2, ..., ::3]
        view.copy_(values)
        return view
    if layout == "expanded":
        if values.dim() == 1:
            source = values[:1].clone()
        elif values.numel():
            source = values.reshape(-1, values.shape[-1])[0].clone()
        else:
            source = values.new_zeros(values.shape[-1])
        expanded = source.expand(values.shape)
        assert torch.equal(expanded, values), "expanded values must be constant along the broadcast"
        return expanded
    raise ValueError(layout)


def random_values(gen, shape, layout, dtype, scale=1.0) -> torch.Tensor:
    """Standard normal values times ``scale`` in ``dtype``, constant where ``layout`` broadcasts."""
    source_shape = shape if layout != "expanded" else shape[-1:] if len(shape) > 1 else (1,)
    values = torch.randn(source_shape, generator=gen, dtype=torch.float64) * scale
    return values.expand(shape).to(dtype)


# --------------------------------------------------------------------------- vera_linear

@dataclasses.dataclass
class Case:
    backend: str
    dtype: torch.dtype
    lead: tuple  # x is (*lead, in)
    in_features: int
    out_features: int
    r: int
    seed: int
    layouts: dict  # tensor name -> layout; base_output -> None means no base
    requires_grad: tuple
    magnitudes: tuple  # (lambda_d, lambda_b) scales
    values_seed: int


def _tiles(n: int) -> int:
    return -(-n // 16)


@st.composite
def cases(draw, backend: str) -> Case:
    interpreted = backend == "triton"
    size = st.integers(1, 70 if interpreted else 300)
    in_features, out_features, r = draw(size), draw(size), draw(size)
    max_tokens = 300
    if interpreted:
        tile_rows = TRITON_TILE_BUDGET // (_tiles(r) * (_tiles(in_features) + _tiles(out_features)))
        max_tokens = 16 * max(tile_rows, 1)
    lead = []
    for _ in range(draw(st.integers(0, 2))):
        lead.append(draw(st.integers(0, max_tokens)))
        max_tokens //= max(lead[-1], 1)
    matrix = st.sampled_from(MATRIX_LAYOUTS if lead else VECTOR_LAYOUTS)
    vector = st.sampled_from(VECTOR_LAYOUTS)
    layouts = {"x": draw(matrix), "lambda_d": draw(vector), "lambda_b": draw(vector),
               "base_output": draw(st.one_of(st.none(), matrix)), "grad": draw(matrix)}
    inputs = [n for n in ("x", "lambda_d", "lambda_b", "base_output") if layouts[n] is not None]
    requires_grad = tuple(n for n in inputs if draw(st.booleans()))
    magnitude = st.sampled_from([1e-3, 1.0, 1e3])
    return Case(backend, draw(st.sampled_from(DTYPES[backend])), tuple(lead), in_features,
                out_features, r, draw(SEEDS), layouts, requires_grad,
                (draw(magnitude), draw(magnitude)), draw(st.integers(0, 2**32 - 1)))


def vera_terms(x, d, b, g, base, proj_a, proj_b) -> dict:
    """VeRA's output and gradients by hand (2-D x, g, base); with |inputs|, the magnitudes."""
    h = x @ proj_a.T
    z = (d * h) @ proj_b.T
    u = (b * g) @ proj_b
    return {"y": base + b * z, "x": (d * u) @ proj_a, "lambda_d": (u * h).sum(0),
            "lambda_b": (g * z).sum(0), "base_output": g}


def check_vera_linear(case: Case) -> None:
    gen = torch.Generator().manual_seed(case.values_seed)
    shapes = {"x": (*case.lead, case.in_features), "lambda_d": (case.r,),
              "lambda_b": (case.out_features,), "base_output": (*case.lead, case.out_features),
              "grad": (*case.lead, case.out_features)}
    scales = {"lambda_d": case.magnitudes[0], "lambda_b": case.magnitudes[1]}
    t = {}
    for name, layout in case.layouts.items():
        if layout is not None:
            values = random_values(gen, shapes[name], layout, case.dtype, scales.get(name, 1.0))
            t[name] = make_layout(values, layout)

    proj_a = vk.projection("A", case.r, case.in_features, case.seed, dtype=torch.float64)
    proj_b = vk.projection("B", case.out_features, case.r, case.seed, dtype=torch.float64)
    x2d = t["x"].double().reshape(-1, case.in_features)
    g2d = t["grad"].double().reshape(-1, case.out_features)
    base2d = (t["base_output"].double().reshape(-1, case.out_features) if "base_output" in t
              else torch.zeros_like(g2d))
    d, b = t["lambda_d"].double(), t["lambda_b"].double()
    ref = vera_terms(x2d, d, b, g2d, base2d, proj_a, proj_b)
    mag = vera_terms(*(v.abs() for v in (x2d, d, b, g2d, base2d, proj_a, proj_b)))
    assume(all(m.numel() == 0 or m.max() <= torch.finfo(case.dtype).max / 2 for m in mag.values()))

    for name in case.requires_grad:
        t[name].requires_grad_()
    y = vk.vera_linear(t["x"], t["lambda_d"], t["lambda_b"], case.seed, t.get("base_output"),
                       backend=case.backend, projections=None)
    results = {"y": y}
    if case.requires_grad:
        grads = torch.autograd.grad(y, [t[n] for n in case.requires_grad], t["grad"])
        results.update(zip(case.requires_grad, grads))

    for name, got in results.items():
        shape = shapes["base_output"] if name == "y" else shapes[name]
        assert got.shape == shape and got.dtype == case.dtype, \
            f"{RESULT_NAMES[name]}: {tuple(got.shape)} {got.dtype}, expected {shape} {case.dtype}"
        if got.numel() == 0:
            continue
        err = (got.double() - ref[name].reshape(shape)).abs().max().item()
        bound = TOL[case.dtype] * mag[name].max().item() + TINY[case.dtype]
        what = RESULT_NAMES[name]
        # Steer the search towards large errors (NaN / inf count as the largest).
        target(err / bound if math.isfinite(err) else 1e9, label=f"{what}: error / budget")
        assert err <= bound, (f"{what}: max error {err:.3e} > budget {bound:.3e} "
                              f"(= {err / max(mag[name].max().item(), 1e-300):.2e} x max(R_abs))")


@budget(150)
@given(case=cases("torch"))
def test_vera_linear_torch(case):
    check_vera_linear(case)


@pytest.mark.skipif("triton" not in vk.available_backends("cpu"), reason="triton not usable on CPU")
@budget(30)
@given(case=cases("triton"))
def test_vera_linear_triton(case):
    check_vera_linear(case)


# --------------------------------------------------------------------------- the model's life cycle

SIZES = (13, 11, 7)
RANK = 5
MODEL_SEED = 2**64 - 2**40 + 12345


@dataclasses.dataclass
class Saved:
    vera: dict  # vk.vera_state_dict(model), deep-copied
    full: dict  # model.state_dict(), deep-copied
    vectors: list  # the expected [(d, b)] at save time


def _scaled_error(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


class VeRAModelMachine(RuleBasedStateMachine):
    saves = Bundle("saves")

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.model = nn.Sequential(*(nn.Linear(i, o, dtype=torch.float64)
                                     for i, o in zip(SIZES, SIZES[1:])))
        with torch.no_grad():
            for p in self.model.parameters():  # nn.Linear's scale, so that training is stable
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / p.shape[-1] ** 0.5)
        vk.apply_vera(self.model, ["0", "1"], r=RANK, seed=MODEL_SEED)
        self.layers = [self.model[0], self.model[1]]
        self.originals = [(layer.base_layer.weight.detach().clone(),
                           layer.base_layer.bias.detach().clone()) for layer in self.layers]
        self.projections = [(vk.projection("A", RANK, i, MODEL_SEED, dtype=torch.float64),
                             vk.projection("B", o, RANK, MODEL_SEED, dtype=torch.float64))
                            for i, o in zip(SIZES, SIZES[1:])]
        self.x = torch.randn(6, SIZES[0], generator=gen, dtype=torch.float64)
        self.merged = False
        self._set_vectors(1)

    # the shadow's reference
    def reference(self, x, vectors, adapter=True):
        for (w, bias), (proj_a, proj_b), (d, b) in zip(self.originals, self.projections, vectors):
            x = x @ w.T + bias + (b * ((d * (x @ proj_a.T)) @ proj_b.T) if adapter else 0)
        return x

    def delta(self, i):
        (proj_a, proj_b), (d, b) = self.projections[i], self.vectors[i]
        return (b[:, None] * proj_b * d) @ proj_a

    def _set_vectors(self, seed):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers:
                for p in (layer.vera_lambda_d, layer.vera_lambda_b):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        self.vectors = [(layer.vera_lambda_d.detach().clone(), layer.vera_lambda_b.detach().clone())
                        for layer in self.layers]

    # rules
    @rule()
    def merge(self):
        vk.merge_vera(self.model)
        self.merged = True

    @rule()
    def unmerge(self):
        vk.unmerge_vera(self.model)
        self.merged = False

    @rule()
    def disable(self):
        with vk.disable_vera(self.model), torch.no_grad():
            out = self.model(self.x)
        assert _scaled_error(out, self.reference(self.x, self.vectors, adapter=False)) <= 1e-10

    @initialize(target=saves)
    def first_save(self):  # so that the load rules can run from the first step
        return self.save()

    @rule(target=saves)
    def save(self):
        return Saved(copy.deepcopy(vk.vera_state_dict(self.model)),
                     copy.deepcopy(self.model.state_dict()),
                     [(d.clone(), b.clone()) for d, b in self.vectors])

    @rule(saved=saves)
    def load(self, saved):
        vk.load_vera_state_dict(self.model, copy.deepcopy(saved.vera))
        self.vectors = [(d.clone(), b.clone()) for d, b in saved.vectors]

    @rule(saved=saves)
    def load_module_state_dict(self, saved):
        vectors = {k: v.clone() for k, v in saved.full.items() if "vera_lambda_" in k}
        result = self.model.load_state_dict(vectors, strict=False)
        assert not result.unexpected_keys
        self.vectors = [(d.clone(), b.clone()) for d, b in saved.vectors]

    @precondition(lambda self: not self.merged)
    @rule(seed=st.integers(0, 2**32 - 1))
    def set_vectors(self, seed):
        self._set_vectors(seed)

    @precondition(lambda self: not self.merged)
    @rule(seed=st.integers(0, 2**32 - 1))
    def train_step(self, seed, lr=0.01):
        # A squared error to a random target: bounded below, so steps never diverge.
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(5, SIZES[0], generator=gen, dtype=torch.float64)
        target = torch.randn(5, SIZES[-1], generator=gen, dtype=torch.float64)
        params = [p for p in self.model.parameters() if p.requires_grad]
        ((self.model(x) - target) ** 2).mean().backward()
        torch.optim.SGD(params, lr=lr).step()
        for p in params:
            p.grad = None
        leaves = [(d.clone().requires_grad_(), b.clone().requires_grad_()) for d, b in self.vectors]
        flat = [v for pair in leaves for v in pair]
        grads = torch.autograd.grad(((self.reference(x, leaves) - target) ** 2).mean(), flat)
        new = [(v - lr * g).detach() for v, g in zip(flat, grads)]
        self.vectors = list(zip(new[::2], new[1::2]))

    # invariants
    @invariant()
    def matches_shadow(self):
        for i, layer in enumerate(self.layers):
            assert layer.merged == self.merged, f"layer {i}: merged is {layer.merged}"
            for got, want in zip((layer.vera_lambda_d, layer.vera_lambda_b), self.vectors[i]):
                assert _scaled_error(got.detach(), want) <= 1e-10, f"layer {i}: vectors"
            weight, bias = self.originals[i]
            assert torch.equal(layer.base_layer.bias, bias), f"layer {i}: bias changed"
            if self.merged:
                err = _scaled_error(layer.base_layer.weight.detach(), weight + self.delta(i))
                assert err <= 1e-10, f"layer {i}: merged weight off by {err:.2e} (relative)"
            else:
                err = _scaled_error(layer.base_layer.weight.detach(), weight)
                assert err <= 1e-12, f"layer {i}: base weight drifted by {err:.2e} (relative)"
        with torch.no_grad():
            err = _scaled_error(self.model(self.x), self.reference(self.x, self.vectors))
        assert err <= 1e-10, f"output off by {err:.2e} (relative)"


VeRAModelMachine.TestCase.settings = budget(100, stateful_step_count=20)
TestVeRAModel = VeRAModelMachine.TestCase
