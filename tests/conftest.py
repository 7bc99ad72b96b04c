"""Test session setup: the Triton interpreter on GPU-less machines, and the `gpu` mark."""

import os

import pytest
import torch

# Triton kernels run on CPU tensors in the interpreter; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU; this machine has none (run `pytest -m gpu` on one)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
