"""Helpers shared by the test modules."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

COMPILE_CHECK = Path(__file__).resolve().parent.parent / "scripts" / "compile_check.py"

# Devices a device-parametrized test runs on; "cuda" is skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# Machine epsilon of each compute dtype; tolerances are small multiples of it.
EPS = {
    dtype: torch.finfo(dtype).eps
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def assert_close_scaled(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max |expected|: error relative to the tensor's scale.

    Low-precision matmuls err relative to the magnitude of the terms summed, not
    elementwise, so an elementwise rtol would flag correct results near zero.
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * scale {scale:.3e}"


def vera_inputs(lead, in_features, out_features, r, *, dtype, device, seed=0, with_base=True):
    """Random x, lambda_d, lambda_b (non-zero, so the adapter path matters), base_output."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    x = rand(*lead, in_features)
    lambda_d = rand(r)
    lambda_b = rand(out_features)
    base = rand(*lead, out_features) if with_base else None
    return x, lambda_d, lambda_b, base


def backend_device_params():
    """(backend, device) pairs: every backend usable on the CPU here, every registered one on CUDA."""
    from vera_kernels import backends as ops

    params = [pytest.param(name, "cpu", id=f"{name}-cpu") for name in ops.available_backends("cpu")]
    params += [
        pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu)
        for name in ops.registered_backends()
    ]
    return params


def tiny_llama(vocab_size: int, **config):
    """A small ``LlamaForCausalLM`` built from a config (no download), the same weights every
    call; ``config`` overrides the LlamaConfig fields below."""
    import transformers

    torch.manual_seed(0)
    fields = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **config}))


def load_compile_check():
    """scripts/compile_check.py as a module (importing it has no side effects)."""
    name = "_vera_compile_check_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, COMPILE_CHECK)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)  # TRITON_INTERPRET is only dropped in its main()
    return sys.modules[name]


def budget(default_examples: int, **kwargs):
    """Hypothesis settings: ``default_examples`` (``VERA_HYPOTHESIS_EXAMPLES`` overrides),
    derandomized (every run checks the same examples), no deadline."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=int(os.environ.get("VERA_HYPOTHESIS_EXAMPLES", default_examples)),
        derandomize=True,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kwargs,
    )


def randomize_adapter(model, adapter: str, seed: int = 1) -> None:
    """Standard normal values (from ``seed``) in adapter ``adapter``'s vectors of every layer;
    a DVoRA magnitude scaled by factors in [0.5, 1.5) instead."""
    from vera_kernels.model import vera_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in vera_layers(model):
            for vector in layer.adapter_vectors(adapter):
                vector.copy_(torch.randn(vector.shape, generator=gen, dtype=vector.dtype))
            magnitude = layer.adapter_magnitude(adapter)
            if magnitude is not None:
                magnitude.mul_(0.5 + torch.rand(magnitude.shape, generator=gen,
                                                dtype=magnitude.dtype))
