"""What every fused backend (triton, cuda) promises beyond matching the reference:
both projection strategies, bitwise agreement between them, deterministic
token reductions, and bf16 on a GPU.

Triton runs here in its interpreter on CPU tensors; the cuda backend and
Triton on CUDA tensors run where a GPU is present (`gpu` mark).
"""

import pytest
import torch

import vera_kernels as vk
from vera_kernels.backends import strategy as projection_strategy
from vera_kernels.reference import vera_linear_reference
from helpers import EPS, assert_close_scaled, vera_inputs

SEED = 2**32 + 12345
STRATEGIES = ["generate", "workspace"]
FUSED = [
    pytest.param("triton", "cpu", id="triton-cpu"),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.gpu),
]


def _grads(x, d, b, base, backend=None):
    """Output and gradients of x, d, b, base for a fixed upstream gradient (reference if no backend)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, d, b, base)]
    if backend is None:
        y = vera_linear_reference(*leaves[:3], SEED, leaves[3])
    else:
        y = vk.vera_linear(*leaves[:3], SEED, leaves[3], backend=backend)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(grad.to(y.dtype).to(y.device))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_both_strategies_match_reference(backend, device, strategy, dtype, monkeypatch):
    # fp16: the tensor-core dtype the interpreter runs (bf16 is broken there).
    monkeypatch.setenv(projection_strategy.ENV_VAR, strategy)
    inputs = vera_inputs((3, 7), 29, 41, 18, dtype=dtype, device=device)
    got = _grads(*inputs, backend=backend)
    expected = _grads(*(t.double() for t in inputs))
    # fp64 leaves only summation order; fp32 as in test_function.py; fp16 as bf16 on a GPU.
    tol = {torch.float64: 1e-12, torch.float32: 64 * EPS[torch.float32],
           torch.float16: 16 * EPS[torch.float16]}[dtype]
    for name, g, e in zip(["y", "dx", "dd", "db", "dbase"], got, expected):
        assert g.dtype == dtype
        assert_close_scaled(g, e, tol, f"{backend} {strategy} {name}")


@pytest.mark.parametrize("backend,device", FUSED)
def test_strategies_agree_bitwise(backend, device, monkeypatch):
    # Same tile values, same block order: only where the tiles come from differs.
    inputs = vera_inputs((20,), 23, 17, 6, dtype=torch.float32, device=device)
    results = {}
    for strategy in STRATEGIES:
        monkeypatch.setenv(projection_strategy.ENV_VAR, strategy)
        results[strategy] = _grads(*inputs, backend=backend)
    for g, w in zip(results["generate"], results["workspace"]):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backward_is_deterministic(backend, device, strategy, monkeypatch):
    monkeypatch.setenv(projection_strategy.ENV_VAR, strategy)
    inputs = vera_inputs((37,), 21, 33, 9, dtype=torch.float32, device=device)
    first = _grads(*inputs, backend=backend)
    second = _grads(*inputs, backend=backend)
    for a, b in zip(first[2:4], second[2:4]):  # dd and db: reductions over tokens
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_on_gpu(backend, strategy, monkeypatch):
    monkeypatch.setenv(projection_strategy.ENV_VAR, strategy)
    inputs = vera_inputs((300,), 257, 513, 64, dtype=torch.bfloat16, device="cuda")
    got = _grads(*inputs, backend=backend)
    expected = _grads(*(t.double() for t in inputs))
    for name, g, e in zip(["y", "dx", "dd", "db", "dbase"], got, expected):
        assert_close_scaled(g, e, 16 * EPS[torch.bfloat16], f"{backend} {strategy} {name}")


def test_strategy_choice(monkeypatch):
    monkeypatch.delenv(projection_strategy.ENV_VAR, raising=False)
    assert projection_strategy.strategy_for(1, 64) == "generate"
    assert projection_strategy.strategy_for(4 * 64, 64) == "generate"
    assert projection_strategy.strategy_for(4 * 64 + 1, 64) == "workspace"
    monkeypatch.setenv(projection_strategy.ENV_VAR, "generate")
    assert projection_strategy.strategy_for(10**6, 64) == "generate"
    monkeypatch.setenv(projection_strategy.ENV_VAR, "registers")
    with pytest.raises(ValueError, match="expected one of"):
        projection_strategy.strategy_for(1, 64)
