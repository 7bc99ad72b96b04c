"""The ``triton`` backend: fused VeRA kernels that regenerate A and B from the seed.

    philox.py   the projection spec as a Triton tile generator
    kernels.py  the one fused GEMM kernel behind every product, and its launcher
    backend.py  forward and backward composed from launches

Importing this package imports nothing from Triton; the kernel modules load
on first use, so TRITON_INTERPRET (read when kernels are defined) can still be
set after ``import vera_kernels``.
"""

import importlib
import importlib.util
import os
from typing import Optional

import torch

from ..strategy import RegeneratingBackend


class TritonBackend(RegeneratingBackend):
    name = "triton"
    priority = 10
    auto_devices = ("cuda",)

    def unavailable_on(self, device: torch.device) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is available"
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return None
            return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1"
        return f"Triton does not run on {device.type} tensors"

    @property
    def reuse_factor(self) -> int:
        return _impl().kernels.MIN_BLOCK_M  # at least; the autotuner may pick 128

    def forward(self, x, lambda_d, lambda_b, source, base, *, into_base=False, adapter_ids=None,
                dropout=None, base_scale=None, base_bias=None):
        return _impl().forward(self, x, lambda_d, lambda_b, source, base, into_base, adapter_ids,
                               dropout, base_scale, base_bias)

    def backward(self, grad, h, lambda_d, lambda_b, source, in_features, needed, adapter_ids=None,
                 dropout=None, dx_into=None):
        return _impl().backward(self, grad, h, lambda_d, lambda_b, source, in_features, needed,
                                adapter_ids, dropout, dx_into)


def _impl():
    return importlib.import_module(".backend", __name__)


BACKEND = TritonBackend()
