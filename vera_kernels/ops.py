"""The op layer: a backend registry and the two torch.library custom ops every backend serves.

``vera_kernels::vera_forward`` computes ``y = base + b * ((d * (x @ A.T)) @ B.T)``
and also returns ``h = x @ A.T`` (tokens x r), the only activation backward needs.
``vera_kernels::vera_backward`` turns the upstream gradient and ``h`` into
dx, dd and db (DESIGN.md §1). Both take 2-D ``x`` / ``grad`` and the Philox key
``(seed & 0xFFFFFFFF, seed >> 32)``: a torch.library int is int64, too small
for a 64-bit seed. Given ``proj_a`` (r x in) and ``proj_b`` (out x r), they use
those matrices instead of the seed's (explicit-projection mode, e.g. PEFT's
stored projections).

A backend is a pair of plain functions registered with :func:`register_backend`;
the ops look it up by name, so adding one touches neither the autograd glue
(``function.py``) nor the module. Fake implementations let ``torch.compile``
trace the ops without graph breaks.
"""

# No `from __future__ import annotations`: torch.library reads these signatures at runtime.
import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "Backend",
    "register_backend",
    "get_backend",
    "resolve_backend",
    "available_backends",
    "registered_backends",
    "BACKEND_ENV_VAR",
]

BACKEND_ENV_VAR = "VERA_KERNELS_BACKEND"

# forward(x2d, lambda_d, lambda_b, key, base2d | None, projections, into_base=False)
#   -> (y2d, h); with into_base, y2d is base2d, written in place.
ForwardFn = Callable[..., tuple]
# backward(grad2d, h, lambda_d, lambda_b, key, in_features, projections,
#          need_dx, need_dd, need_db) -> (dx | None, dd | None, db | None)
# projections: (A, B) in the compute dtype, or (None, None) to use the key's.
BackwardFn = Callable[..., tuple]


@dataclass(frozen=True)
class Backend:
    """One implementation of the VeRA forward and backward.

    Attributes:
        name: what ``backend=`` and ``VERA_KERNELS_BACKEND`` call it.
        forward, backward: see the signatures above; called only with at
            least one token, on tensors ``unavailable_on`` accepted.
        unavailable_on: ``device -> None`` when the backend can run on that
            device now, else a sentence saying why not.
        priority: lower wins when ``backend=None`` picks the fastest usable one.
        auto_devices: device types on which ``backend=None`` may pick it
            (``None``: all); e.g. Triton's CPU interpreter only when asked for.
    """

    name: str
    forward: ForwardFn
    backward: BackwardFn
    unavailable_on: Callable[[torch.device], Optional[str]]
    priority: int
    auto_devices: Optional[tuple] = None


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}: expected one of {sorted(_BACKENDS)}"
        ) from None


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


def _by_priority() -> list[Backend]:
    return sorted(_BACKENDS.values(), key=lambda b: b.priority)


def registered_backends() -> list[str]:
    """Every registered backend, usable here or not, fastest first."""
    return [b.name for b in _by_priority()]


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


def _backend_for(x: Tensor, name: str) -> Backend:
    # An empty batch needs no kernel launch: the torch backend's matmuls give
    # the right (empty / zero) results on any device.
    return get_backend("torch" if x.shape[0] == 0 else name)


def _no_autocast(x: Tensor):
    # Autocast falls through custom ops but stays switched on inside them; the
    # caller has already cast the inputs, and the fp32 accumulations inside a
    # backend must not be cast back down.
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def run_forward(x, lambda_d, lambda_b, key0, key1, base, backend, proj_a=None, proj_b=None,
                into_base=False) -> tuple:
    """(y, h) from the named backend; the body of the forward ops, and the eager path."""
    # The backends index the vectors as contiguous arrays (r and out elements: a cheap copy).
    lambda_d, lambda_b = lambda_d.contiguous(), lambda_b.contiguous()
    with _no_autocast(x):
        return _backend_for(x, backend).forward(
            x, lambda_d, lambda_b, (key0, key1), base, (proj_a, proj_b), into_base
        )


def run_backward(grad, h, lambda_d, lambda_b, key0, key1, in_features, backend,
                 need_dx, need_dd, need_db, proj_a=None, proj_b=None) -> tuple:
    """(dx, dd, db), None where not needed; the body of the backward op, and the eager path."""
    lambda_d, lambda_b = lambda_d.contiguous(), lambda_b.contiguous()
    with _no_autocast(h):
        return _backend_for(h, backend).backward(
            grad, h, lambda_d, lambda_b, (key0, key1), in_features,
            (proj_a, proj_b), need_dx, need_dd, need_db,
        )


# The custom ops: what torch.compile traces (function.py calls them while
# compiling and the plain functions above in eager mode, where torch.library
# dispatch would only add overhead).


@torch.library.custom_op("vera_kernels::vera_forward", mutates_args=())
def vera_forward(
    x: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    key0: int,
    key1: int,
    base: Optional[Tensor],
    backend: str,
    proj_a: Optional[Tensor] = None,
    proj_b: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(y, h) for 2-D ``x``; see the module docstring."""
    return run_forward(x, lambda_d, lambda_b, key0, key1, base, backend, proj_a, proj_b)


@vera_forward.register_fake
def _(x, lambda_d, lambda_b, key0, key1, base, backend, proj_a=None, proj_b=None):
    tokens = x.shape[0]
    return x.new_empty(tokens, lambda_b.shape[0]), x.new_empty(tokens, lambda_d.shape[0])


@torch.library.custom_op("vera_kernels::vera_forward_into_base", mutates_args=("base",))
def vera_forward_into_base(
    x: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    key0: int,
    key1: int,
    base: Tensor,
    backend: str,
    proj_a: Optional[Tensor] = None,
    proj_b: Optional[Tensor] = None,
) -> None:
    """``base += b * ((d * (x @ A.T)) @ B.T)`` in place: the forward without autograd."""
    run_forward(x, lambda_d, lambda_b, key0, key1, base, backend, proj_a, proj_b, into_base=True)


@torch.library.custom_op("vera_kernels::vera_backward", mutates_args=())
def vera_backward(
    grad: Tensor,
    h: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    key0: int,
    key1: int,
    in_features: int,
    backend: str,
    need_dx: bool,
    need_dd: bool,
    need_db: bool,
    proj_a: Optional[Tensor] = None,
    proj_b: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dd, db); a gradient that was not asked for comes back as an empty tensor."""
    grads = run_backward(grad, h, lambda_d, lambda_b, key0, key1, in_features, backend,
                         need_dx, need_dd, need_db, proj_a, proj_b)
    return tuple(g if g is not None else h.new_empty(0) for g in grads)


@vera_backward.register_fake
def _(grad, h, lambda_d, lambda_b, key0, key1, in_features, backend, need_dx, need_dd, need_db,
      proj_a=None, proj_b=None):
    tokens = h.shape[0]
    return (
        h.new_empty(tokens, in_features) if need_dx else h.new_empty(0),
        lambda_d.new_empty(lambda_d.shape) if need_dd else h.new_empty(0),
        lambda_b.new_empty(lambda_b.shape) if need_db else h.new_empty(0),
    )
