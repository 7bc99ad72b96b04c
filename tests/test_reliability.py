"""Regression tests for the silent wrong answers and data loss found by adversarial use.

Each test names the defect it guards against; each failed on the code before its fix.
"""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vera_kernels as vk
DOUBLE_BACKWARD_ERROR = "vera_kernels: double backward through vera_linear is not supported"
from vera_kernels.module import decode_extra_state
from vera_kernels.reference import vera_linear_reference, vera_linear_with_projections
from helpers import backend_device_params, vera_inputs

SEED = 2**40 + 3


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``t`` in the given memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":  # stored the other way round (vectors: a column of a matrix)
        if t.dim() == 1:
            return torch.stack([torch.zeros_like(t), t], dim=1)[:, 1]
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "stepped":  # every other element of a bigger buffer
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded":  # stride 0 along the first dim over a one-row storage
        return t[:1].clone().expand(t.shape)
    raise ValueError(layout)


LAYOUTS = ["contiguous", "transposed", "stepped", "expanded"]
ARGS = ["x", "lambda_d", "lambda_b", "base", "grad"]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("arg", ARGS)
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_every_argument_in_every_layout(backend, device, arg, layout):
    # Defect: triton ignored the strides of lambda_d / lambda_b and read an
    # expanded vector past its storage.
    x, d, b, base = vera_inputs((11,), 13, 9, 6, dtype=torch.float64, device=device)
    grad = torch.randn(11, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    values = dict(x=x, lambda_d=d, lambda_b=b, base=base, grad=grad.to(device))
    if layout == "expanded":
        values[arg] = values[arg][:1].expand(values[arg].shape).contiguous()
    laid = {k: _layout(v, layout) if k == arg else v for k, v in values.items()}
    assert torch.equal(laid[arg], values[arg]) and not laid[arg].is_contiguous()

    def run(fn, vals, **kw):
        # detach() keeps the layout
        leaves = [vals[k].detach().requires_grad_(True) for k in ("x", "lambda_d", "lambda_b", "base")]
        y = fn(*leaves[:3], SEED, leaves[3], **kw)
        return [y, *torch.autograd.grad(y, leaves, vals["grad"])]

    got = run(vk.vera_linear, laid, backend=backend)
    expected = run(vera_linear_reference, {k: v.cpu() for k, v in values.items()})
    for name, g, e in zip(["y", "dx", "dd", "db", "dbase"], got, expected):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-10, atol=1e-10, msg=f"{arg} {layout}: {name}")


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("layout", LAYOUTS[1:3])
def test_explicit_projections_in_any_layout(backend, device, layout):
    x, d, b, base = vera_inputs((7,), 10, 12, 5, dtype=torch.float64, device=device)
    gen = torch.Generator().manual_seed(2)
    proj = [torch.randn(5, 10, generator=gen, dtype=torch.float64).to(device),
            torch.randn(12, 5, generator=gen, dtype=torch.float64).to(device)]
    got = vk.vera_linear(x, d, b, None, base, backend=backend,
                         projections=[_layout(p, layout) for p in proj])
    expected = vera_linear_with_projections(x, d, b, *proj, base)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _model(seed=SEED):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    vk.apply_vera(model, ["0", "2"], r=4, seed=seed)
    with torch.no_grad():
        for _, layer in vk.model.vera_layers(model):
            layer.vera_lambda_b.normal_()
            layer.vera_lambda_d.normal_()
    return model


def _vectors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "vera_lambda" in k}


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "base_layer" in k}


def _randomized_state(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.mul_(-3.0).add_(0.5)
    return other


@pytest.mark.parametrize("how", ["load_vera_state_dict", "load_state_dict_strict_false"])
def test_load_into_merged_model_keeps_base_weight(how):
    # Defect: the forward kept the old adapter and a later unmerge subtracted
    # the new one, corrupting the base weight for good.
    model = _model()
    original = _weights(model)
    other = _randomized_state(model)
    x = torch.randn(5, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = other(x)
    vk.merge_vera(model)
    if how == "load_vera_state_dict":
        vk.load_vera_state_dict(model, vk.vera_state_dict(other))
    else:
        model.load_state_dict(_vectors(other), strict=False)
    assert all(layer.merged for _, layer in vk.model.vera_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    vk.unmerge_vera(model)
    for key, weight in _weights(model).items():
        torch.testing.assert_close(weight, original[key], rtol=1e-12, atol=1e-12, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_full_state_dict_of_merged_model_round_trips():
    # A full state dict carries the merged weight and the merged flag together.
    model = _model()
    vk.merge_vera(model)
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    assert all(layer.merged for _, layer in vk.model.vera_layers(fresh))
    vk.unmerge_vera(fresh)
    for key, weight in _weights(fresh).items():
        torch.testing.assert_close(weight, _weights(_model())[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_double_backward_raises_a_clear_error(backend, device):
    # Defect: create_graph=True silently missed every term through h = A x.
    x, d, b, _ = vera_inputs((4,), 6, 5, 3, dtype=torch.float64, device=device)
    leaves = [t.requires_grad_(True) for t in (x, d, b)]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.gradgradcheck(
            lambda *a: vk.vera_linear(*a, SEED, backend=backend), leaves
        )
    # First derivatives with create_graph=True still work until differentiated.
    y = vk.vera_linear(*leaves, SEED, backend=backend)
    (dd,) = torch.autograd.grad(y.square().sum(), d, create_graph=True)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR[:40]):
        dd.sum().backward()


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_in_place_write_is_seen_by_autograd(backend, device):
    # Defect: into_base on triton wrote into base_output without bumping its
    # version, so a graph that saved it computed wrong gradients.
    x, d, b, base = vera_inputs((6,), 7, 5, 3, dtype=torch.float64, device=device)
    leaf = base.clone().requires_grad_(True)
    saved = leaf.exp()  # exp saves its output for backward
    with torch.no_grad():
        out = vk.vera_linear(x, d, b, SEED, saved, backend=backend, into_base=True)
    assert out.data_ptr() == saved.data_ptr()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@pytest.mark.parametrize("x_scale,d_scale,b_scale,g_scale", [
    (1.0, 1e-3, 1e-3, 1.0), (1e-3, 1e3, 1e3, 1e-3), (1.0, 1e3, 1e-3, 1.0), (1.0, 1e-3, 1e3, 1.0),
    (1.0, 1.0, 1.0, 1.0),
])
def test_fp16_torch_backend_as_accurate_as_unfused(x_scale, d_scale, b_scale, g_scale):
    # Defect: folding b * B * d into one fp16 matrix gave ~10x the error of
    # the plain fp16 computation for small vectors and inf / NaN for large
    # ones where the plain computation stays finite.
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    x, d, b = rand(64, 96, scale=x_scale), rand(32, scale=d_scale), rand(80, scale=b_scale)
    grad = rand(64, 80, scale=g_scale)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, d, b)]
        y = fn(*leaves, SEED)
        return [y, *torch.autograd.grad(y, leaves, grad.to(dtype))]

    exact = run(vera_linear_reference, torch.float64)
    unfused = run(vera_linear_reference, torch.float16)
    ours = run(lambda *a: vk.vera_linear(*a, backend="torch"), torch.float16)
    for name, e, u, o in zip(["y", "dx", "dd", "db"], exact, unfused, ours):
        assert torch.isfinite(u).all(), f"{name}: the unfused fp16 result must be finite here"
        assert torch.isfinite(o).all(), name
        err_unfused = (u.double() - e).abs().max()
        err_ours = (o.double() - e).abs().max()
        assert err_ours <= 2 * err_unfused, f"{name}: {err_ours:.3e} vs unfused {err_unfused:.3e}"


@pytest.mark.parametrize("corrupt,match", [
    (lambda s: s.pop("2.vera_lambda_b"), "no '2.vera_lambda_b'"),
    (lambda s: s.__setitem__("2.vera_lambda_b", torch.zeros(7, dtype=torch.float64)), "shape"),
    (lambda s: s.__setitem__("2.vera_lambda_b", torch.zeros(1, dtype=torch.float64)), "shape"),
    (lambda s: s.__setitem__("2.vera_lambda_d", torch.tensor(1.0, dtype=torch.float64)), "shape"),
    (lambda s: s.__setitem__("2.vera_lambda_d", [1.0] * 4), "expected a tensor"),
    (lambda s: s.__setitem__("2.vera_lambda_d", torch.zeros(4, dtype=torch.int64)), "floating"),
    (lambda s: s.__setitem__("2.lora_A", torch.zeros(4)), "unknown keys"),
    (lambda s: s["vera_config"]["2"].__setitem__("seed", 5), "seed"),
    (lambda s: s["vera_config"]["2"].__setitem__("r", 3), "'r': 3"),
])
def test_load_vera_state_dict_is_atomic(corrupt, match):
    # Defect: a bad later entry raised after earlier layers were overwritten;
    # (1,)-shaped or 0-d tensors were broadcast; unknown keys were ignored.
    model = _model()
    state = copy.deepcopy(vk.vera_state_dict(_randomized_state(model)))
    corrupt(state)
    before = _vectors(model)
    with pytest.raises(ValueError, match=match):
        vk.load_vera_state_dict(model, state)
    after = _vectors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_vera_state_dict_unknown_keys_warn_when_not_strict():
    model = _model()
    other = _randomized_state(model)
    state = vk.vera_state_dict(other)
    state["extra"] = torch.zeros(1)
    with pytest.warns(UserWarning, match="unknown keys"):
        vk.load_vera_state_dict(model, state, strict=False)
    assert all(torch.equal(a, b) for a, b in zip(_vectors(model).values(), _vectors(other).values()))


def test_failed_layer_load_keeps_seed_and_r():
    # Defect: an out_features mismatch raised, but the seed had changed.
    layer = vk.VeRALinear(6, 5, r=3, seed=11)
    state = vk.VeRALinear(6, 4, r=3, seed=99).state_dict()
    with pytest.raises(RuntimeError, match="vera_lambda_b"):
        layer.load_state_dict(state)
    assert layer.seed == 11 and layer.r == 3
    state = vk.VeRALinear(6, 5, r=2, seed=99).state_dict()
    with pytest.raises(RuntimeError, match="r=2"):
        layer.load_state_dict(state)
    assert layer.seed == 11 and layer.r == 3


@pytest.mark.parametrize("kwargs", [dict(r=5, seed=SEED), dict(r=4, seed=SEED + 1)])
def test_apply_vera_again_with_other_r_or_seed_is_an_error(kwargs):
    # Defect: the second call kept the old layers silently and mixed ranks and seeds.
    model = nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 6))
    vk.apply_vera(model, ["0"], r=4, seed=SEED)
    with pytest.raises(ValueError, match="already has VeRA layer '0'"):
        vk.apply_vera(model, ["2"], **kwargs)
    vk.apply_vera(model, ["0", "2"], r=4, seed=SEED)  # the same r and seed may add layers
    assert {layer.r for _, layer in vk.model.vera_layers(model)} == {4}


def test_meta_tensors_give_shapes():
    # Defect: meta inputs failed with an unrelated autocast message.
    x = torch.empty(3, 4, 9, device="meta", requires_grad=True)
    layer = vk.VeRALinear(9, 6, r=5, device="meta")
    y = layer(x)
    assert y.shape == (3, 4, 6) and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("seed", [np.int64(7), np.uint64(2**63 + 5), np.int32(3)])
def test_numpy_integer_seeds(seed):
    x, d, b, _ = vera_inputs((3,), 5, 4, 2, dtype=torch.float64, device="cpu")
    expected = vera_linear_reference(x, d, b, int(seed))
    torch.testing.assert_close(vk.vera_linear(x, d, b, seed), expected)
    layer = vk.VeRALinear(5, 4, r=2, seed=seed)
    assert type(layer.seed) is int and layer.seed == int(seed)
    assert decode_extra_state(layer.get_extra_state())["seed"] == int(seed)


@pytest.mark.parametrize("seed", [1.0, True, torch.tensor(3), "3", -1, 2**64])
def test_bad_seeds(seed):
    x, d, b, _ = vera_inputs((3,), 5, 4, 2, dtype=torch.float64, device="cpu")
    with pytest.raises((TypeError, ValueError), match="seed"):
        vk.vera_linear(x, d, b, seed)


def test_forward_hook_sees_the_base_output_in_every_grad_mode():
    # Defect: under no_grad the hook's tensor later held base + adapter.
    layer = vk.VeRALinear(7, 5, r=3, seed=SEED).double()
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
    seen = []
    layer.base_layer.register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.randn(4, 7, dtype=torch.float64)
    base = nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    with torch.no_grad():
        y_no_grad = layer(x)
    y_grad = layer(x)
    assert len(seen) == 2
    for out in seen:
        torch.testing.assert_close(out, base, rtol=0, atol=0)
    torch.testing.assert_close(y_no_grad, y_grad.detach(), rtol=0, atol=0)


def test_ddp_example_writes_only_where_told(tmp_path):
    example = Path(__file__).resolve().parent.parent / "examples" / "train_ddp.py"
    proc = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "torchrun --nproc_per_node" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
         str(example), "--steps", "2", "--width", "16"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved in memory" in proc.stdout
    assert list(tmp_path.iterdir()) == []
