"""vera_linear through every backend usable here: values, gradients, contract and errors."""

import pytest
import torch

import vera_kernels as vk
from vera_kernels import backends as ops
from vera_kernels.reference import vera_linear_reference, vera_linear_with_projections
from helpers import DEVICES, EPS, assert_close_scaled, backend_device_params, vera_inputs

# Odd on purpose: not multiples of any block size, not powers of two.
SHAPES = [
    # (leading dims, in, out, r)
    ((2, 3), 37, 53, 5),
    ((1,), 19, 7, 1),
    ((33,), 64, 40, 16),
    ((2, 9), 45, 35, 20),  # r spans two 16-wide tiles
]
SEED = 2**33 + 77

# Error budget relative to the output's scale, in units of the compute dtype's
# eps: A/B and the vectors are rounded to the dtype (1 eps each), h, the scaled
# B and the result once more, and fp32 accumulation adds little on top.
# A wrong kernel (a transposed tile, a lost vector, a wrong Philox word) is off
# by O(1) of the scale, far outside this.
OUTPUT_TOL_EPS = 8
# Gradients pass through one more rounded product (P or u) than the output.
GRAD_TOL_EPS = 16


def _tol(dtype, eps_multiple):
    # fp32 has no rounded inputs to dominate: the error is summation order over
    # up to ~64 terms in the matmuls, so allow 64 eps (7.6e-6) of the scale.
    return eps_multiple * EPS[dtype] if dtype != torch.float32 else 64 * EPS[dtype]


def _run(fn, x, d, b, base, seed=SEED, **kw):
    """Output and the four gradients for a fixed random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, d, b, base)]
    y = fn(*leaves[:3], seed, leaves[3], **kw)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y.backward(grad.to(y.dtype).to(y.device))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("lead,n_in,n_out,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(backend, device, lead, n_in, n_out, r, dtype):
    if dtype == torch.bfloat16 and backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter computes bf16 wrongly (docs/design.md); bf16 runs on GPU")
    inputs = vera_inputs(lead, n_in, n_out, r, dtype=dtype, device=device)
    got = _run(vk.vera_linear, *inputs, backend=backend)
    # The oracle sees the same (already rounded) inputs, computed in float64.
    expected = _run(vera_linear_reference, *(t.double() for t in inputs))
    names = ["y", "dx", "dd", "db", "dbase"]
    for name, g, e in zip(names, got, expected):
        assert g.dtype == dtype, name
        tol = _tol(dtype, OUTPUT_TOL_EPS if name == "y" else GRAD_TOL_EPS)
        assert_close_scaled(g, e, tol, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("explicit", [False, True], ids=["seeded", "explicit"])
def test_gradcheck_float64(backend, device, explicit):
    x, d, b, base = (
        t.requires_grad_(True)
        for t in vera_inputs((2, 3), 37, 53, 5, dtype=torch.float64, device=device)
    )
    proj = _explicit_projections(37, 53, 5, torch.float64, device) if explicit else None
    fn = lambda x, d, b, base: vk.vera_linear(  # noqa: E731
        x, d, b, SEED, base, backend=backend, projections=proj
    )
    # fast_mode checks random Jacobian-vector products rather than every
    # column: as strict per direction, and affordable in the Triton interpreter.
    assert torch.autograd.gradcheck(fn, (x, d, b, base), eps=1e-6, atol=1e-7, fast_mode=True)


def test_reference_gradcheck_float64():
    # The oracle itself, against finite differences.
    x, d, b, base = (
        t.requires_grad_(True) for t in vera_inputs((3,), 11, 6, 4, dtype=torch.float64, device="cpu")
    )
    fn = lambda x, d, b, base: vera_linear_reference(x, d, b, SEED, base)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, d, b, base), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_non_contiguous_input_and_no_base(backend, device):
    x, d, b, _ = vera_inputs((9,), 21, 13, 3, dtype=torch.float32, device=device, with_base=False)
    x_t = torch.randn(21, 9, device=device).T  # (9, 21), transposed strides
    for inp in (x, x_t, x.repeat(1, 2)[:, ::2]):
        y = vk.vera_linear(inp, d, b, SEED, backend=backend)
        expected = vera_linear_reference(inp.double(), d.double(), b.double(), SEED)
        assert_close_scaled(y, expected, _tol(torch.float32, OUTPUT_TOL_EPS))


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_zero_tokens(backend, device, lead):
    x, d, b, base = (
        t.requires_grad_(True)
        for t in vera_inputs(lead, 8, 6, 3, dtype=torch.float32, device=device)
    )
    y = vk.vera_linear(x, d, b, SEED, base, backend=backend)
    assert y.shape == (*lead, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(d.grad, torch.zeros_like(d)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_saves_only_h_for_backward(backend, device):
    tokens, n_in, n_out, r = 12, 40, 24, 4
    x, d, b, base = vera_inputs((tokens,), n_in, n_out, r, dtype=torch.float32, device=device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    d.requires_grad_(True)
    b.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vk.vera_linear(x.requires_grad_(True), d, b, SEED, base, backend=backend)
    shapes = sorted(tuple(t.shape) for t in saved)
    # h (tokens x r) and the two vectors; never x nor anything tokens x out.
    assert shapes == sorted([(tokens, r), (r,), (n_out,)])


def test_frozen_vectors_skip_their_gradients():
    x, d, b, base = vera_inputs((5,), 9, 7, 2, dtype=torch.float64, device="cpu")
    x.requires_grad_(True)
    vk.vera_linear(x, d, b, SEED, base).sum().backward()
    assert d.grad is None and b.grad is None
    x_ref = x.detach().clone().requires_grad_(True)
    vera_linear_reference(x_ref, d, b, SEED, base).sum().backward()
    assert_close_scaled(x.grad, x_ref.grad, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x, d, b, _ = vera_inputs((6,), 16, 10, 4, dtype=torch.float32, device=device, with_base=False)
    d.requires_grad_(True)
    b.requires_grad_(True)
    layer = torch.nn.Linear(16, 10, device=device)
    with torch.autocast(device, dtype=dtype):
        base = layer(x)
        y = vk.vera_linear(x, d, b, SEED, base)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert d.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    expected = vera_linear_reference(x.double(), d.double(), b.double(), SEED, base.double())
    assert_close_scaled(y, expected, 8 * EPS[dtype])


def test_default_backend_and_env_override(monkeypatch):
    assert "torch" in vk.available_backends()
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("VERA_KERNELS_BACKEND", "torch")
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("VERA_KERNELS_BACKEND", "no-such-backend")
    x, d, b, _ = vera_inputs((2,), 4, 3, 2, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        vk.vera_linear(x, d, b, 0)


def _bad(**changes):
    x, d, b, base = vera_inputs((2, 3), 8, 5, 4, dtype=torch.float32, device="cpu")
    args = dict(x=x, lambda_d=d, lambda_b=b, seed=1, base_output=base, backend=None)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args,error,match",
    [
        # float32 vectors are fine under half activations; float64 ones are not.
        (_bad(x=torch.randn(2, 3, 8).half(), lambda_d=torch.randn(4).double()), TypeError,
         "lambda_d has dtype torch.float64 but x has dtype torch.float16"),
        (_bad(x=torch.randn(2, 3, 8).half()), TypeError,
         "base_output has dtype torch.float32 but x has dtype torch.float16"),
        (_bad(x=torch.ones(2, 3, 8, dtype=torch.int32)), TypeError, "x must be float16, bfloat16, float32 or float64"),
        (_bad(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (_bad(x=torch.randn(2, 3, 0)), ValueError, r"x must have shape \(\.\.\., in\) with in >= 1"),
        (_bad(lambda_d=torch.randn(4, 1)), ValueError, r"lambda_d must be 1-D, got shape \(4, 1\)"),
        (_bad(lambda_b=torch.randn(())), ValueError, "lambda_b must be 1-D"),
        (_bad(lambda_d=torch.randn(0)), ValueError, "must be non-empty"),
        (_bad(base_output=torch.randn(2, 3, 6)), ValueError, r"base_output must have shape \(2, 3, 5\)"),
        (_bad(base_output=torch.randn(2, 3, 5).double()), TypeError, "base_output has dtype torch.float64"),
        (_bad(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\)"),
        (_bad(seed=2**64), ValueError, r"seed must be in \[0, 2\*\*64\)"),
        (_bad(seed="7"), TypeError, "seed must be an int"),
        (_bad(backend="tpu"), ValueError, "unknown backend 'tpu'"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        vk.vera_linear(
            args["x"], args["lambda_d"], args["lambda_b"], args["seed"], args["base_output"],
            backend=args["backend"],
        )


def test_vectors_must_match_input_length():
    # r is len(lambda_d) and out is len(lambda_b); x's last dim is "in". A
    # base_output of another width is the mismatch the functional API can see.
    x, d, b, _ = vera_inputs((4,), 8, 5, 4, dtype=torch.float32, device="cpu", with_base=False)
    with pytest.raises(ValueError, match="base_output must have shape"):
        vk.vera_linear(x, d, b, 0, torch.zeros(4, 8))


@pytest.mark.gpu
def test_device_mismatch_is_an_error():
    x, d, b, _ = vera_inputs((4,), 8, 5, 4, dtype=torch.float32, device="cpu", with_base=False)
    with pytest.raises(ValueError, match="lambda_d is on cuda"):
        vk.vera_linear(x, d.cuda(), b, 0)


def _explicit_projections(n_in, n_out, r, dtype, device):
    """Arbitrary (non-spec) A and B as PEFT keeps them: slices of larger shared matrices."""
    gen = torch.Generator().manual_seed(11)
    big_a = torch.randn(r, n_in + 7, generator=gen, dtype=torch.float64).to(dtype).to(device)
    big_b = torch.randn(n_out + 5, r, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return big_a[:, :n_in], big_b[:n_out, :]  # non-contiguous views


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_explicit_projections_match_reference(backend, device, dtype):
    inputs = vera_inputs((3, 5), 27, 19, 6, dtype=dtype, device=device)
    proj = _explicit_projections(27, 19, 6, dtype, device)

    def ours(x, d, b, seed, base):
        return vk.vera_linear(x, d, b, None, base, backend=backend, projections=proj)

    def oracle(x, d, b, seed, base):
        return vera_linear_with_projections(x, d, b, proj[0].double(), proj[1].double(), base)

    got = _run(ours, *inputs)
    expected = _run(oracle, *(t.double() for t in inputs))
    for name, g, e in zip(["y", "dx", "dd", "db", "dbase"], got, expected):
        tol = _tol(dtype, OUTPUT_TOL_EPS if name == "y" else GRAD_TOL_EPS)
        assert_close_scaled(g, e, tol, f"{backend} explicit {name}")


@pytest.mark.parametrize(
    "projections,error,match",
    [
        ((torch.randn(4, 8), torch.randn(6, 4)), ValueError, r"projections must have shapes \(4, 8\) and \(5, 4\)"),
        ((torch.randn(4, 8),), TypeError, "projections must be a pair"),
        ((torch.randn(4, 8).double(), torch.randn(5, 4)), TypeError, r"projections\[0\] has dtype torch.float64"),
    ],
)
def test_bad_explicit_projections(projections, error, match):
    x, d, b, _ = vera_inputs((2,), 8, 5, 4, dtype=torch.float32, device="cpu", with_base=False)
    with pytest.raises(error, match=match):
        vk.vera_linear(x, d, b, None, projections=projections)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_into_base_writes_in_place_only_without_autograd(backend, device):
    x, d, b, base = vera_inputs((4, 3), 21, 13, 5, dtype=torch.float32, device=device)
    expected = vera_linear_reference(x.double(), d.double(), b.double(), SEED, base.double())
    tol = _tol(torch.float32, OUTPUT_TOL_EPS)

    buffer = base.clone()
    with torch.no_grad():
        y = vk.vera_linear(x, d, b, SEED, buffer, backend=backend, into_base=True)
    assert y is buffer
    assert_close_scaled(buffer, expected, tol)

    # Autograd needs the graph: a new tensor, and the buffer is left alone.
    buffer = base.clone()
    y = vk.vera_linear(x, d.requires_grad_(True), b, SEED, buffer, backend=backend, into_base=True)
    assert y.data_ptr() != buffer.data_ptr() and torch.equal(buffer, base)
    assert_close_scaled(y.detach(), expected, tol)


def test_custom_ops_pass_opcheck():
    # The ops torch.compile traces: schema, fake kernels, autograd registration
    # and AOT dispatch, as torch.library checks them.
    x, d, b, base = vera_inputs((5,), 9, 7, 3, dtype=torch.float32, device="cpu")
    for t in (x, d, b, base):
        t.requires_grad_(True)
    proj = _explicit_projections(9, 7, 3, torch.float32, "cpu")
    for explicit in (None, proj):
        pa, pb = explicit if explicit is not None else (None, None)
        torch.library.opcheck(
            torch.ops.vera_kernels.vera_forward.default, (x, d, b, 1, 2, base, "torch", pa, pb)
        )
        h = torch.randn(5, 3)
        grad = torch.randn(5, 7)
        torch.library.opcheck(
            torch.ops.vera_kernels.vera_backward.default,
            (grad, h, d.detach(), b.detach(), 1, 2, 9, "torch", True, True, True, pa, pb),
        )
        torch.library.opcheck(
            torch.ops.vera_kernels.vera_forward_into_base.default,
            (x.detach(), d.detach(), b.detach(), 1, 2, base.detach().clone(), "torch", pa, pb),
        )


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_float32_vectors_with_half_activations(backend, device):
    # The vectors lose nothing (PEFT keeps adapters in fp32): the kernels scale in fp32.
    x, _, _, base = vera_inputs((3, 11), 21, 17, 6, dtype=torch.float16, device=device)
    d, b = (torch.randn(n, device=device, dtype=torch.float32) for n in (6, 17))
    got = _run(vk.vera_linear, x, d, b, base, backend=backend)
    expected = _run(vera_linear_reference, *(t.double() for t in (x, d, b, base)))
    assert [t.dtype for t in got] == [torch.float16, torch.float16, torch.float32,
                                      torch.float32, torch.float16]
    for name, g, e in zip(["y", "dx", "dd", "db", "dbase"], got, expected):
        assert_close_scaled(g, e, _tol(torch.float16, GRAD_TOL_EPS), f"{backend} {name}")


def test_module_keeps_float32_vectors_under_a_bf16_base():
    layer = vk.VeRALinear(8, 6, r=3, dtype=torch.bfloat16)
    assert layer.vera_lambda_d.dtype == layer.vera_lambda_b.dtype == torch.float32
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.vera_lambda_b.grad.dtype == torch.float32
