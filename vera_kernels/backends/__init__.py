"""The backends, and the registry that finds them by name.

    contract.py  what a backend implements (Backend, ProjectionSource, NeededGrads, Grads)
    pytorch.py   "torch":  plain PyTorch, any device
    triton/      "triton": fused Triton kernels (CUDA; CPU in the interpreter)
    cuda.py      "cuda":   the same kernels in CUDA C++ (csrc/)
    strategy.py  where the fused backends take A and B from, per launch

Each backend module exposes its instance as ``BACKEND`` and is loaded from
the name table below; importing one loads neither Triton nor the CUDA
extension (that happens at the backend's first launch).
"""

from __future__ import annotations

import importlib
import os
from typing import Optional, Union

import torch

from .contract import Backend, Grads, NeededGrads, ProjectionSource

__all__ = [
    "Backend",
    "Grads",
    "NeededGrads",
    "ProjectionSource",
    "BACKEND_ENV_VAR",
    "get_backend",
    "resolve_backend",
    "available_backends",
    "registered_backends",
]

BACKEND_ENV_VAR = "VERA_KERNELS_BACKEND"

# name -> module (relative to this package) that defines BACKEND.
_MODULES = {"torch": ".pytorch", "triton": ".triton", "cuda": ".cuda"}
# Loaded from the table here rather than on first use: torch.compile may
# trace the first lookup, and it cannot trace an import. The modules are
# light; Triton and the CUDA extension load at a backend's first launch.
_BACKENDS: dict = {name: importlib.import_module(module, __name__).BACKEND
                   for name, module in _MODULES.items()}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: expected one of {sorted(_BACKENDS)}") from None


def _by_priority() -> list[Backend]:
    return sorted(_BACKENDS.values(), key=lambda b: b.priority)


def registered_backends() -> list[str]:
    """Every backend, usable here or not, fastest first."""
    return [b.name for b in _by_priority()]


def resolve_backend(requested: Optional[str], device: torch.device) -> str:
    """Pick the backend for tensors on ``device``.

    ``requested`` wins, then the ``VERA_KERNELS_BACKEND`` environment variable,
    else the usable backend with the lowest priority. A named backend that
    cannot run on ``device`` raises RuntimeError saying why.
    """
    name = requested or os.environ.get(BACKEND_ENV_VAR) or None
    if name is None:
        for b in _by_priority():
            if (b.auto_devices is None or device.type in b.auto_devices) and (
                b.unavailable_on(device) is None
            ):
                return b.name
        raise RuntimeError(f"no vera_kernels backend can run on {device}")
    reason = get_backend(name).unavailable_on(device)
    if reason is not None:
        raise RuntimeError(f"vera_kernels backend {name!r} cannot run on {device}: {reason}")
    return name


def _present_devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


def available_backends(device: Optional[Union[torch.device, str]] = None) -> list[str]:
    """Names of the backends usable now, fastest first.

    With ``device``, those that run on it; otherwise those that run on any
    device this machine has (the CPU, and the current GPU if any).
    """
    devices = [torch.device(device)] if device is not None else _present_devices()
    return [
        b.name for b in _by_priority() if any(b.unavailable_on(dev) is None for dev in devices)
    ]
