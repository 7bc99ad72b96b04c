"""Test session setup: the Triton interpreter on GPU-less machines, and the `gpu` mark."""

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
