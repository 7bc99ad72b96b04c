"""The cuda backend's kernels run on the CPU (VERA_KERNELS_CUDA_EMULATE=1): csrc/vera_kernels.cu
compiled by the host C++ compiler against csrc/cuda_emulation.h, checked against the float64
reference within the README's budgets, on shapes on and around every tile edge (kBlockM = 64
token rows, kBlockN = 64 outputs, kBlockK = 16), with strided and expanded inputs, adapter
banks with -1 rows, dropout masks bit for bit the torch backend's, both projection
strategies, into_base / dx_into, gradcheck, and fp32 at TF32 precision (on emulated tensor
cores) below torch's "highest" float32 matmul precision; and the emulation's model itself on
small kernels (csrc/cuda_emulation_check.cpp). Needs the CUDA toolkit's headers, no GPU.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import vera_kernels as vk
from vera_kernels import backends as ops
from vera_kernels.backends import cuda as cuda_backend
from vera_kernels.backends import strategy as projection_strategy
from vera_kernels.backends.contract import NeededGrads, ProjectionSource
from vera_kernels.dropout import DropoutMask, keep_mask, seed_words
from helpers import assert_close_scaled
from test_properties import TOL, Case, check_vera_linear

SEED = 2**40 + 77
# Tokens, in, out, r: one past a multiple of every tile edge. 65 tokens are two
# row blocks (and two partial rows in the token reductions); r = 17 is K of two
# steps for y and u, in = 33 three steps for h; out = 65 two column blocks.
LEAD, IN, OUT, R = (5, 13), 33, 65, 17
# ... and on the edges, and one short of them.
SHAPES = [(LEAD, IN, OUT, R), ((2, 32), 64, 128, 16), ((63,), 31, 63, 15)]
STRATEGIES = ["generate", "workspace"]
CPU = torch.device("cpu")
CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    """The cuda backend on CPU tensors, its library built (once per machine) and loaded."""
    monkeypatch.setenv(cuda_backend.EMULATE_ENV_VAR, "1")
    reason = cuda_backend.BACKEND.unavailable_on(CPU)
    if reason is not None:
        pytest.skip(reason)
    cuda_backend.load_emulation()


@pytest.fixture(params=STRATEGIES)
def strategy(request, monkeypatch):
    monkeypatch.setenv(projection_strategy.ENV_VAR, request.param)
    return request.param


CONTIGUOUS = {"x": "contiguous", "lambda_d": "contiguous", "lambda_b": "contiguous",
              "base_output": "contiguous", "grad": "contiguous"}
STRIDED = {"x": "strided", "lambda_d": "expanded", "lambda_b": "strided",
           "base_output": "transposed", "grad": "expanded"}
EXPANDED = {"x": "expanded", "lambda_d": "strided", "lambda_b": "expanded",
            "base_output": "expanded", "grad": "transposed"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layouts", [CONTIGUOUS, STRIDED, EXPANDED],
                         ids=["contiguous", "strided", "expanded"])
@pytest.mark.parametrize("shape", SHAPES, ids=["past", "on", "short"])
def test_within_the_budgets(shape, dtype, layouts, strategy):
    # test_properties' check (y and every gradient against float64, §6's budget), one
    # case; it reports its error to hypothesis, so it runs as a one-example property.
    case = Case("cuda", dtype, *shape, SEED, layouts,
                ("x", "lambda_d", "lambda_b", "base_output"), (1.0, 1.0), 3)
    one_case = given(st.just(case))(check_vera_linear)
    settings(max_examples=1, database=None, deadline=None)(one_case)()


@pytest.fixture
def matmul_precision():
    """Sets torch's float32 matmul precision for one test; restores it after."""
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


# The README's fp32 budgets: TF32 on tensor cores below "highest", IEEE (SIMT) at it.
@pytest.mark.parametrize("precision,tol", [("high", 8 * 2**-10),
                                           ("highest", 32 * torch.finfo(torch.float32).eps)])
@pytest.mark.parametrize("shape", SHAPES, ids=["past", "on", "short"])
def test_fp32_within_the_budget_of_its_matmul_precision(shape, precision, tol, strategy,
                                                        matmul_precision, monkeypatch):
    matmul_precision(precision)
    monkeypatch.setitem(TOL, torch.float32, tol)
    case = Case("cuda", torch.float32, *shape, SEED, STRIDED,
                ("x", "lambda_d", "lambda_b", "base_output"), (1.0, 1.0), 3)
    one_case = given(st.just(case))(check_vera_linear)
    settings(max_examples=1, database=None, deadline=None)(one_case)()


def _tf32(t):
    """cvt.rna.tf32.f32 of finite float32 values: 10 mantissa bits, ties away from zero."""
    return ((t.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("precision", ["high", "medium", "highest"])
def test_fp32_operands_rounded_to_tf32_below_highest(precision, matmul_precision):
    # Identity projections and unit vectors: y = x and dx = grad, each one term, so the
    # operands' rounding shows bit for bit (TF32: both GEMMs round, the second exactly).
    matmul_precision(precision)
    tokens, features = 70, 67
    eye, ones = torch.eye(features), torch.ones(features)
    x = _rand(tokens, features, seed=1, dtype=torch.float32)
    x[0, :3] = torch.tensor([1 + 2**-11, -(1 + 2**-11), 1 + 2**-11 - 2**-23])  # ties, and not
    grad = _rand(tokens, features, seed=2, dtype=torch.float32)
    leaf = x.clone().requires_grad_(True)
    y = vk.vera_linear(leaf, ones, ones, None, projections=(eye, eye), backend="cuda")
    y.backward(grad)
    rounded = precision != "highest"
    assert torch.equal(y.detach(), _tf32(x) if rounded else x)
    assert torch.equal(leaf.grad, _tf32(grad) if rounded else grad)
    if rounded:
        assert y[0, :3].tolist() == [1 + 2**-10, -(1 + 2**-10), 1.0]


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(dtype)


def _outputs_and_grads(fn, *inputs):
    """fn's output and the gradients of its inputs for a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    y.backward(_rand(*y.shape, seed=9))
    return [y.detach()] + [t.grad for t in leaves]


def _assert_like_torch(fn, *inputs, tol=1e-12):
    """fn(..., backend) under the emulated cuda backend against the torch backend (float64)."""
    got = _outputs_and_grads(lambda *t: fn(*t, backend="cuda"), *inputs)
    expected = _outputs_and_grads(lambda *t: fn(*t, backend="torch"), *inputs)
    for name, g, e in zip(["y", "dx", "dd", "db", "dbase"], got, expected):
        assert_close_scaled(g, e, tol, name)


def test_adapter_banks_with_rows_of_no_adapter(strategy):
    tokens = 65
    ids = torch.randint(-1, 3, (tokens,), generator=torch.Generator().manual_seed(4))
    ids[:2] = torch.tensor([-1, 2])  # both kinds, whatever the draw

    def multi(x, d, b, base, backend):
        return vk.vera_linear_multi(x, d, b, ids, SEED, base, backend=backend)

    _assert_like_torch(multi, _rand(tokens, IN, seed=1), _rand(3, R, seed=2),
                       _rand(3, OUT, seed=3), _rand(tokens, OUT, seed=5))


def test_dropout_like_torch(strategy):
    def dropped(x, d, b, base, backend):
        return vk.vera_linear(x, d, b, SEED, base, backend=backend, dropout=0.3,
                              dropout_seed=2**35 + 3)

    _assert_like_torch(dropped, _rand(65, IN, seed=1), _rand(R, seed=2), _rand(OUT, seed=3),
                       _rand(65, OUT, seed=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dropout_masks_bit_exact(dtype):
    # With identity projections and unit vectors, y = dropout(x) and dx = dropout(grad):
    # one nonzero term per output, so both backends' masks show bit for bit.
    tokens, features = 70, 67  # past a row block, a column block and a dropout group of 8
    eye, ones = torch.eye(features, dtype=dtype), torch.ones(features, dtype=dtype)
    x = _rand(tokens, features, seed=1, dtype=dtype)
    grad = _rand(tokens, features, seed=2, dtype=dtype)
    results = {}
    for backend in ("cuda", "torch"):
        leaf = x.clone().requires_grad_(True)
        y = vk.vera_linear(leaf, ones, ones, None, projections=(eye, eye), backend=backend,
                           dropout=0.3, dropout_seed=2**40 + 9)
        y.backward(grad)
        results[backend] = (y.detach(), leaf.grad)
    assert torch.equal(results["cuda"][0], results["torch"][0])
    assert torch.equal(results["cuda"][1], results["torch"][1])
    dropout = DropoutMask(0.3, seed_words(2**40 + 9, "cpu"))
    # The kernels scale in the accumulator's precision and round once.
    acc = torch.promote_types(dtype, torch.float32)
    factors = keep_mask(dropout, 0, tokens, features, "cpu").to(acc) * dropout.scale
    assert torch.equal(results["cuda"][1], (grad.to(acc) * factors).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("matrix,rows,cols", [("A", 37, 131), ("B", 515, 19)])
def test_projection_kernel_bit_exact(matrix, rows, cols, dtype):
    got = cuda_backend._ops(CPU).projection({"A": 0, "B": 1}[matrix], rows, cols,
                                            SEED & 0xFFFFFFFF, SEED >> 32,
                                            torch.empty(0, dtype=dtype))
    assert torch.equal(got, vk.projection(matrix, rows, cols, SEED, dtype=dtype))


def test_into_base_and_dx_into(strategy):
    x, d, b = _rand(65, IN, seed=1), _rand(R, seed=2), _rand(OUT, seed=3)
    base = _rand(65, OUT, seed=4)
    expected = vk.vera_linear(x, d, b, SEED, base, backend="torch")
    target = base.clone()
    with torch.no_grad():
        got = vk.vera_linear(x, d, b, SEED, target, backend="cuda", into_base=True)
    assert got is target
    assert_close_scaled(got, expected, 1e-12, "y into base")

    source = ProjectionSource.from_seed(SEED)
    grad, h = _rand(65, OUT, seed=5), _rand(65, R, seed=6)
    needed = NeededGrads(True, True, True)
    plain = cuda_backend.BACKEND.backward(grad, h, d, b, source, IN, needed)
    dx_into = _rand(65, IN, seed=7)
    added = cuda_backend.BACKEND.backward(grad, h, d, b, source, IN, needed,
                                          dx_into=dx_into.clone())
    assert_close_scaled(added.x, dx_into + plain.x, 1e-12, "dx into")
    assert torch.equal(added.lambda_d, plain.lambda_d) and torch.equal(added.lambda_b,
                                                                       plain.lambda_b)


def test_gradcheck():
    inputs = [_rand(3, 5, seed=1), _rand(2, seed=2), _rand(4, seed=3), _rand(3, 4, seed=4)]
    inputs = [t.requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(
        lambda x, d, b, base: vk.vera_linear(x, d, b, SEED, base, backend="cuda"), inputs)


def test_chosen_only_by_name_for_cpu_tensors():
    # Emulation is a test tool: CPU tensors still go to another backend unless named.
    assert "cuda" in vk.available_backends("cpu")
    assert ops.resolve_backend(None, CPU) != "cuda"
    assert ops.resolve_backend("cuda", CPU) == "cuda"


def test_the_model_on_small_kernels(tmp_path):
    # csrc/cuda_emulation_check.cpp: a barrier exchange in 2-D blocks of a 2-D grid,
    # barriers after half a block has returned, one warp's WMMA product (fp16, and tf32
    # with __float_to_tf32's rounding), bad launches.
    from torch.utils.cpp_extension import CUDA_HOME

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    binary = tmp_path / "cuda_emulation_check"
    subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Werror", "-DVERA_CUDA_EMULATION",
                    f"-I{CSRC}", f"-I{Path(CUDA_HOME) / 'include'}",
                    str(CSRC / "cuda_emulation_check.cpp"), "-o", str(binary)],
                   check=True, timeout=120)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert run.stdout.split("\n")[:-1] == [
        "rotate ok", "rounds_after_exits ok", "wmma ok", "tf32 ok",
        "invalid_launches ok"], run.stdout
    assert run.returncode == 0
