"""VeRALinear, apply_vera and the adapter state dict."""

import io

import pytest
import torch
from torch import nn

import vera_kernels as vk
from vera_kernels.module import decode_extra_state
from vera_kernels.reference import vera_linear_reference
from helpers import DEVICES, EPS, assert_close_scaled


def _randomize_vectors(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=gen))


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(width, width), "v_proj": nn.Linear(width, width)})
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.attn["q_proj"](x) * torch.sigmoid(self.attn["v_proj"](x))
        return x + self.mlp(self.norm(x))


def _model(width=12, depth=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(width) for _ in range(depth)], nn.Linear(width, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_drop_in_for_linear_while_b_is_zero(device):
    linear = nn.Linear(20, 9, device=device)
    x = torch.randn(4, 5, 20, device=device)
    expected = linear(x)
    layer = vk.VeRALinear.from_linear(linear, r=6, seed=3)
    assert layer.base_layer is linear
    assert torch.equal(layer(x), expected)


def test_constructor_matches_reference_formula():
    layer = vk.VeRALinear(17, 11, r=5, seed=2**50 + 1, bias=False, dtype=torch.float64)
    assert torch.equal(layer.vera_lambda_d.detach(), torch.full((5,), 0.1, dtype=torch.float64))
    assert torch.equal(layer.vera_lambda_b.detach(), torch.zeros(11, dtype=torch.float64))
    _randomize_vectors(layer)
    x = torch.randn(3, 17, dtype=torch.float64)
    expected = vera_linear_reference(
        x, layer.vera_lambda_d, layer.vera_lambda_b, layer.seed, layer.base_layer(x)
    )
    assert_close_scaled(layer(x), expected, 1e-12)
    assert layer.base_layer.bias is None


def test_only_vectors_train():
    layer = vk.VeRALinear(8, 4, r=2)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_d", "vera_lambda_b"}


def test_vectors_in_wider_dtype_than_activations():
    layer = vk.VeRALinear(8, 4, r=2, dtype=torch.float16)
    layer.vera_lambda_d.data = layer.vera_lambda_d.data.float()
    layer.vera_lambda_b.data = torch.ones(4)
    y = layer(torch.randn(3, 8).half())
    y.float().sum().backward()
    assert y.dtype == torch.float16 and layer.vera_lambda_d.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    torch.manual_seed(0)
    layer = vk.VeRALinear(24, 10, r=4, seed=9, dtype=dtype)
    _randomize_vectors(layer)
    x = torch.randn(7, 24, dtype=dtype)
    weight = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    merged_scale = layer.base_layer.weight.abs().max().double()
    # Merged forward: the dense weight now carries the adapter. Merging rounds
    # each of the 24 summed weights once more, so allow 16 eps of the scale.
    assert_close_scaled(layer(x), unmerged, 16 * EPS[dtype])
    layer.unmerge()
    assert not layer.merged
    # Back to the base weight, up to one rounding (half an ulp) of the merged
    # weight and one of the result.
    err = (layer.base_layer.weight.double() - weight.double()).abs().max()
    assert err <= EPS[dtype] * merged_scale
    assert_close_scaled(layer(x), unmerged, 16 * EPS[dtype])


def test_merge_twice_warns_and_changes_nothing():
    layer = vk.VeRALinear(6, 5, r=2)
    _randomize_vectors(layer)
    layer.merge()
    merged_weight = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged_weight)


def test_extra_repr_and_state():
    layer = vk.VeRALinear(6, 5, r=2, seed=2**40)
    text = repr(layer)
    assert "in_features=6, out_features=5, r=2, seed=1099511627776, merged=False" in text
    state = layer.state_dict()
    assert decode_extra_state(state["_extra_state"]) == {"seed": 2**40, "r": 2, "merged": False,
                                                        "merged_adapter": None}
    other = vk.VeRALinear(6, 5, r=2, seed=0)
    other.load_state_dict(state)
    assert other.seed == 2**40
    # As for any shape mismatch, torch's load_state_dict reports it (even with strict=False).
    with pytest.raises(RuntimeError, match="state has r=2 but this VeRALinear has r=3"):
        vk.VeRALinear(6, 5, r=3).load_state_dict(state, strict=False)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: vk.VeRALinear(6, 5, r=0), ValueError, "r must be a positive int"),
        (lambda: vk.VeRALinear(0, 5, r=2), ValueError, "in_features must be a positive int"),
        (lambda: vk.VeRALinear(6, 5, r=2, seed=-4), ValueError, "seed must be in"),
        (lambda: vk.VeRALinear.from_linear(nn.Conv1d(3, 3, 1), r=2), TypeError, "expects an nn.Linear"),
        (lambda: vk.VeRALinear(6, 5, r=2)(torch.randn(3, 7)), ValueError, r"expected input of shape \(\.\.\., 6\), got \(3, 7\)"),
    ],
)
def test_bad_construction_and_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_apply_vera_targets_by_suffix_and_regex():
    model = vk.apply_vera(_model(), ["q_proj", "mlp.2"], r=4, seed=5)
    names = {n for n, m in model.named_modules() if isinstance(m, vk.VeRALinear)}
    assert names == {"0.attn.q_proj", "1.attn.q_proj", "0.mlp.2", "1.mlp.2"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.vera_lambda_{v}" for n in names for v in "db"}

    regex = vk.apply_vera(_model(), r"\d+\.attn\.(q|v)_proj", r=4)
    names = {n for n, m in regex.named_modules() if isinstance(m, vk.VeRALinear)}
    assert names == {f"{i}.attn.{p}_proj" for i in (0, 1) for p in "qv"}
    # Applying again leaves the adapted layers as they are.
    again = vk.apply_vera(regex, r"\d+\.attn\.(q|v)_proj", r=4)
    assert {n for n, m in again.named_modules() if isinstance(m, vk.VeRALinear)} == names


def test_apply_vera_errors():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        vk.apply_vera(_model(), ["k_proj"], r=4)
    with pytest.raises(TypeError, match="'0.norm' is a LayerNorm"):
        vk.apply_vera(_model(), ["norm"], r=4)


def test_training_reduces_loss():
    torch.manual_seed(0)
    teacher = vk.apply_vera(_model(seed=1), ["q_proj", "v_proj", "mlp.0", "mlp.2"], r=8, seed=11)
    _randomize_vectors(teacher, seed=5)
    student = vk.apply_vera(_model(seed=1), ["q_proj", "v_proj", "mlp.0", "mlp.2"], r=8, seed=11)
    x = torch.randn(64, 12)
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(50):
        loss = nn.functional.mse_loss(student(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_state_dict_round_trip_and_size():
    targets = ["q_proj", "v_proj", "mlp.0", "mlp.2"]
    model = vk.apply_vera(_model(), targets, r=8, seed=2**45 + 3)
    _randomize_vectors(model)
    x = torch.randn(5, 12)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(vk.vera_state_dict(model), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    # Only the vectors: 8 layers x (r + out) numbers.
    assert sum(t.numel() for t in tensors.values()) == 2 * (4 * 8 + 12 + 12 + 24 + 12)
    fresh = vk.apply_vera(_model(), targets, r=8, seed=2**45 + 3)
    assert not torch.allclose(fresh(x), expected)
    vk.load_vera_state_dict(fresh, state)
    assert torch.equal(fresh(x), expected)


def test_state_dict_mismatch_is_an_error():
    state = vk.vera_state_dict(vk.apply_vera(_model(), ["q_proj"], r=8, seed=1))
    with pytest.raises(ValueError, match="missing from the state dict .*0.attn.v_proj"):
        vk.load_vera_state_dict(vk.apply_vera(_model(), ["q_proj", "v_proj"], r=8, seed=1), state)
    with pytest.raises(ValueError, match="VeRA layer '0.attn.q_proj': state dict has .*'r': 8"):
        vk.load_vera_state_dict(vk.apply_vera(_model(), ["q_proj"], r=4, seed=1), state)
    with pytest.raises(ValueError, match="'seed': 2"):
        vk.load_vera_state_dict(vk.apply_vera(_model(), ["q_proj"], r=8, seed=2), state)
    with pytest.raises(ValueError, match="not a vera_state_dict"):
        vk.load_vera_state_dict(_model(), {"weight": torch.zeros(1)})


@pytest.mark.parametrize("device", DEVICES)  # on CUDA: through the Triton backend
def test_torch_compile_fullgraph_matches_eager(device):
    model = vk.apply_vera(_model(), ["q_proj", "mlp.2"], r=4, seed=5).to(device)
    _randomize_vectors(model)
    x = torch.randn(6, 12, device=device)
    eager_y = model(x)
    eager_y.square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    assert_close_scaled(y, eager_y, 1e-5)
    for name, grad in eager_grads.items():
        assert_close_scaled(dict(model.named_parameters())[name].grad, grad, 1e-5, name)


def test_state_dict_sees_through_compile_wrapper():
    model = vk.apply_vera(_model(), ["q_proj"], r=4, seed=5)
    compiled = torch.compile(model)  # names get an "_orig_mod." prefix on the wrapper
    assert vk.vera_state_dict(compiled).keys() == vk.vera_state_dict(model).keys()
    vk.load_vera_state_dict(compiled, vk.vera_state_dict(model))


def _allocations(step) -> list:
    """Sizes (bytes) of the CPU allocations ``step`` makes, from torch.profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    "triton" not in vk.available_backends("cpu"), reason="needs Triton (the interpreter on CPU)"))])
def test_training_step_allocates_no_extra_tokens_sized_tensors(backend):
    # Base layer and adapter are one autograd node: the adapter goes into the
    # base output's buffer, its dx into the base layer's dx.
    tokens, n_in, n_out, r = 97, 61, 43, 5  # distinct sizes, so allocations tell apart
    layer = vk.VeRALinear(n_in, n_out, r, seed=3, bias=True).double()
    layer.backend = backend
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
    x = torch.randn(tokens, n_in, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(tokens, n_out, dtype=torch.float64)

    def step():
        y = layer(x)
        torch.autograd.grad(y, [x, layer.vera_lambda_d, layer.vera_lambda_b], grad)

    step()  # warm caches (projections)
    sizes = _allocations(step)
    assert sizes.count(tokens * n_out * 8) == 1  # y
    assert sizes.count(tokens * n_in * 8) == 1  # dx
    # ... and the gradients are those of the base layer plus the reference adapter.
    leaves = [x.detach().requires_grad_(True), layer.vera_lambda_d.detach().requires_grad_(True),
              layer.vera_lambda_b.detach().requires_grad_(True)]
    y_ref = layer.base_layer(leaves[0]) + vera_linear_reference(*leaves, 3)
    expected = torch.autograd.grad(y_ref, leaves, grad)
    got = torch.autograd.grad(layer(x), [x, layer.vera_lambda_d, layer.vera_lambda_b], grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_changing_the_base_weight_before_backward_is_caught():
    layer = vk.VeRALinear(8, 6, 3, seed=1).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        layer.base_layer.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
