"""The Triton backend: fused VeRA kernels that regenerate A and B from the seed.

Registering the backend imports nothing from Triton; the kernel modules load
on first use, so TRITON_INTERPRET (read when kernels are defined) can still be
set after ``import vera_kernels``.
"""

import importlib
import importlib.util
import os

import torch

from ..ops import Backend, register_backend


def _unavailable_on(device: torch.device):
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1"
    return f"Triton does not run on {device.type} tensors"


def _impl():
    return importlib.import_module(".backend", __name__)


register_backend(
    Backend(
        name="triton",
        forward=lambda *args: _impl().forward(*args),
        backward=lambda *args: _impl().backward(*args),
        unavailable_on=_unavailable_on,
        priority=10,
        auto_devices=("cuda",),
    )
)
