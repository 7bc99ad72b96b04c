"""Test session setup: the Triton interpreter on GPU-less machines, the `gpu` mark, and the
``target`` fixture (every backend that runs here)."""

import os
import tempfile

import pytest
import torch

# Triton kernels run on CPU tensors in the interpreter; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's FX graph cache keys a graph by its code, in which a custom op's
# default arguments do not appear: code compiled against an older schema of our
# ops would be reused and fail. Each test session compiles into its own cache.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = tempfile.TemporaryDirectory(prefix="vera-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE.name


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU; this machine has none (run `pytest -m gpu` on one)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _targets():
    from vera_kernels import backends as ops

    params = [pytest.param((name, "cpu"), id=name) for name in ops.available_backends("cpu")]
    params.append(pytest.param(("cuda", "cpu"), id="cuda-emulated"))
    params += [pytest.param((name, "cuda"), id=f"{name}-cuda", marks=pytest.mark.gpu)
               for name in ops.registered_backends()]
    return params


@pytest.fixture(params=_targets())
def target(request, monkeypatch):
    """(backend, device): every backend that runs here, the cuda one emulated on the CPU."""
    from vera_kernels.backends import cuda as cuda_backend

    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "cuda" and device == "cpu":
        monkeypatch.setenv(cuda_backend.EMULATE_ENV_VAR, "1")
        reason = cuda_backend.BACKEND.unavailable_on(torch.device("cpu"))
        if reason is not None:
            pytest.skip(reason)
        cuda_backend.load_emulation()
    return backend, device
