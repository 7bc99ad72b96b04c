"""Triton-specific checks: the tile generator, both projection strategies, fp64, determinism.

On a machine without a GPU these run in the Triton interpreter on CPU tensors
(conftest.py sets TRITON_INTERPRET=1); with a GPU the `gpu` variants run too.
"""

import pytest
import torch

import vera_kernels as vk
from vera_kernels import ops
from vera_kernels.reference import vera_linear_reference
from helpers import DEVICES, EPS, assert_close_scaled, vera_inputs

pytest.importorskip("triton")
from vera_kernels.triton import backend as triton_backend  # noqa: E402
from vera_kernels.triton import kernels  # noqa: E402
from vera_kernels.triton.philox import generate_projection  # noqa: E402

SEED = 2**32 + 12345


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 2**32 + 3, 2**64 - 2])
@pytest.mark.parametrize("matrix,rows,cols", [("A", 5, 13), ("B", 70, 3), ("A", 33, 130), ("B", 1, 1)])
def test_tile_generator_bit_exact(matrix, rows, cols, seed, device):
    got = generate_projection(matrix, rows, cols, seed, dtype=torch.float32, device=device)
    expected = vk.projection(matrix, rows, cols, seed, device=device)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_tile_generator_rounds_like_projection(dtype, device):
    got = generate_projection("B", 19, 7, SEED, dtype=dtype, device=device)
    assert torch.equal(got, vk.projection("B", 19, 7, SEED, dtype=dtype, device=device))


def _grads(x, d, b, base, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, d, b, base)]
    y = vk.vera_linear(*leaves[:3], SEED, leaves[3], **kw) if kw else vera_linear_reference(
        *leaves[:3], SEED, leaves[3]
    )
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(grad.to(y.dtype).to(y.device))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["generate", "workspace"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_both_strategies_match_reference(strategy, dtype, device, monkeypatch):
    monkeypatch.setenv(triton_backend.STRATEGY_ENV_VAR, strategy)
    inputs = vera_inputs((3, 7), 29, 41, 18, dtype=dtype, device=device)
    got = _grads(*inputs, backend="triton")
    expected = _grads(*(t.double() for t in inputs))
    tol = 1e-12 if dtype == torch.float64 else 64 * EPS[torch.float32]
    for name, g, e in zip(["y", "dx", "dd", "db", "dbase"], got, expected):
        assert g.dtype == dtype
        assert_close_scaled(g, e, tol, f"{strategy} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_strategies_agree_bitwise(device, monkeypatch):
    # Same tile values and the same block order: only where tiles come from differs.
    inputs = vera_inputs((20,), 23, 17, 6, dtype=torch.float32, device=device)
    results = {}
    for strategy in ("generate", "workspace"):
        monkeypatch.setenv(triton_backend.STRATEGY_ENV_VAR, strategy)
        results[strategy] = _grads(*inputs, backend="triton")
    for g, w in zip(results["generate"], results["workspace"]):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device, monkeypatch):
    monkeypatch.setenv(triton_backend.STRATEGY_ENV_VAR, "workspace")
    inputs = vera_inputs((37,), 21, 33, 9, dtype=torch.float32, device=device)
    first = _grads(*inputs, backend="triton")
    second = _grads(*inputs, backend="triton")
    for a, b in zip(first[2:4], second[2:4]):  # dd and db: reductions over tokens
        assert torch.equal(a, b)


def test_strategy_choice(monkeypatch):
    monkeypatch.delenv(triton_backend.STRATEGY_ENV_VAR, raising=False)
    assert triton_backend.strategy_for(1) == "generate"
    assert triton_backend.strategy_for(triton_backend.GENERATE_MAX_TOKENS + 1) == "workspace"
    monkeypatch.setenv(triton_backend.STRATEGY_ENV_VAR, "generate")
    assert triton_backend.strategy_for(10**6) == "generate"
    monkeypatch.setenv(triton_backend.STRATEGY_ENV_VAR, "registers")
    with pytest.raises(ValueError, match="expected one of"):
        triton_backend.strategy_for(1)


def test_fp32_follows_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kernels._input_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kernels._input_precision(torch.float32) == "tf32"
        assert kernels._input_precision(torch.bfloat16) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_cpu_default_stays_torch_even_when_interpreting():
    # The interpreter is for testing: backend=None never picks it.
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", torch.device("cpu"))


@pytest.mark.gpu
def test_triton_is_the_default_for_cuda_tensors():
    assert ops.resolve_backend(None, torch.device("cuda")) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["generate", "workspace"])
def test_bf16_on_gpu(strategy, monkeypatch):
    monkeypatch.setenv(triton_backend.STRATEGY_ENV_VAR, strategy)
    inputs = vera_inputs((300,), 257, 513, 64, dtype=torch.bfloat16, device="cuda")
    got = _grads(*inputs, backend="triton")
    expected = _grads(*(t.double() for t in inputs))
    for name, g, e in zip(["y", "dx", "dd", "db", "dbase"], got, expected):
        assert_close_scaled(g, e, 16 * EPS[torch.bfloat16], name)
