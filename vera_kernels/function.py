"""Autograd for the VeRA op, and ``vera_linear``, the checked functional entry point.

Forward saves only ``h`` (tokens x r) and the two vectors; backward hands
them to the same backend's backward. The gradient of ``base_output`` is the
upstream gradient itself. Under torch.compile the custom ops of ``ops.py``
(with the autograd registered here) are traced; in eager mode an
``autograd.Function`` calls the same backend functions directly, which costs
a fraction of the dispatch overhead.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .projection import SUPPORTED_DTYPES, split_seed

__all__ = ["vera_linear"]


def _save(ctx, x, lambda_d, lambda_b, key0, key1, backend, proj_a, proj_b, h) -> None:
    # proj_a / proj_b (explicit mode only) are frozen inputs: saving them keeps
    # a reference, no copy.
    ctx.save_for_backward(h, lambda_d, lambda_b, proj_a, proj_b)
    ctx.key = (key0, key1)
    ctx.in_features = x.shape[1]
    ctx.backend = backend


DOUBLE_BACKWARD_ERROR = (
    "vera_kernels: double backward through vera_linear is not supported: its backward "
    "saves only h = x A^T, so the gradients are not differentiable functions of x. "
    "Compute the second derivative with the unfused reference "
    "(vera_kernels.reference.vera_linear_reference) instead."
)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the gradients that raises a clear error if anything differentiates them."""

    @staticmethod
    def forward(ctx, count, *tensors):
        # The first `count` tensors pass through; the rest only connect the
        # node to the graph (the gradients depend on them).
        return tensors[:count]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _guard_double_backward(grads: tuple, *inputs) -> tuple:
    # With create_graph=True autograd records the backward itself. Ours is
    # not differentiable (terms through h = A x would be silently missing), so
    # the gradients are routed through a node whose backward raises.
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or not any(
        isinstance(t, Tensor) and t.requires_grad for t in inputs
    ):
        return grads
    present = [g for g in grads if g is not None]
    guarded = iter(_NoDoubleBackward.apply(len(present), *present, *inputs))
    return tuple(None if g is None else next(guarded) for g in grads)


def _input_grads(ctx, grad_y, backward) -> tuple:
    """Gradients for (x, lambda_d, lambda_b, key0, key1, base, backend, proj_a, proj_b)."""
    h, lambda_d, lambda_b, proj_a, proj_b = ctx.saved_tensors
    need_x, need_d, need_b, _, _, need_base = ctx.needs_input_grad[:6]
    dx = dd = db = None
    if need_x or need_d or need_b:
        dx, dd, db = backward(
            grad_y, h, lambda_d, lambda_b, *ctx.key, ctx.in_features, ctx.backend,
            need_x, need_d, need_b, proj_a, proj_b,
        )
        dx, dd, db = _guard_double_backward((dx, dd, db), grad_y, lambda_d, lambda_b)
    return (
        dx if need_x else None,
        dd if need_d else None,
        db if need_b else None,
        None,
        None,
        grad_y if need_base else None,
        None,
        None,
        None,
    )


# Autograd of the custom op, for graphs torch.compile traces.
def _setup_context(ctx, inputs, output):
    x, lambda_d, lambda_b, key0, key1, _, backend, proj_a, proj_b = inputs
    _save(ctx, x, lambda_d, lambda_b, key0, key1, backend, proj_a, proj_b, output[1])
    ctx.mark_non_differentiable(output[1])


torch.library.register_autograd(
    "vera_kernels::vera_forward",
    lambda ctx, grad_y, _grad_h: _input_grads(ctx, grad_y, torch.ops.vera_kernels.vera_backward),
    setup_context=_setup_context,
)


class _VeRAFunction(torch.autograd.Function):
    """The eager path: the same backend calls and saved state, without torch.library dispatch."""

    @staticmethod
    def forward(ctx, x, lambda_d, lambda_b, key0, key1, base, backend, proj_a, proj_b):
        y, h = ops.run_forward(x, lambda_d, lambda_b, key0, key1, base, backend, proj_a, proj_b)
        _save(ctx, x, lambda_d, lambda_b, key0, key1, backend, proj_a, proj_b, h)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _input_grads(ctx, grad_y, ops.run_backward)


def _check_tensor(name: str, t, dims: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _autocast(tensors: list[Optional[Tensor]], device_type: str) -> list[Optional[Tensor]]:
    """Cast to the autocast dtype when autocast is on for ``device_type`` (as nn.Linear would)."""
    # Devices without autocast (meta, ...) would make the query itself raise.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors]


def vera_linear(
    x: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    seed: Optional[int],
    base_output: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
    projections: Optional[tuple[Tensor, Tensor]] = None,
    into_base: bool = False,
) -> Tensor:
    """VeRA's adapter path: ``base_output + lambda_b * (B @ (lambda_d * (A @ x)))`` per token.

    A (r x in) and B (out x r) are the spec projections for ``seed``
    (see :func:`vera_kernels.projection`); they are regenerated, never stored.

    Args:
        x: ``(..., in)`` activations; any leading dims, any strides.
        lambda_d: ``(r,)`` trainable scaling of the r-dimensional bottleneck.
        lambda_b: ``(out,)`` trainable scaling of the output.
        seed: int in [0, 2**64) selecting A and B.
        base_output: ``(..., out)`` added to the result (usually the frozen
            layer's output); ``None`` means zeros.
        backend: ``"torch"``, ``"triton"`` or ``"cuda"``; ``None`` picks the
            fastest usable one for x's device (``VERA_KERNELS_BACKEND``
            overrides the choice).
        projections: explicit ``(A, B)`` of shapes (r, in) and (out, r) in x's
            dtype, used instead of the seed's (e.g. PEFT's stored, sliced
            ``vera_A`` / ``vera_B``); ``seed`` may then be None. Frozen.
        into_base: write the result into ``base_output``'s buffer and return
            it, saving a tokens x out allocation, whenever autograd does not
            need the graph (no grad mode, or nothing requires grad) and
            base_output is contiguous; otherwise a new tensor as usual.

    Returns:
        ``(..., out)`` tensor in x's dtype, differentiable in x, lambda_d,
        lambda_b and base_output. Under ``torch.autocast`` everything is
        computed in the autocast dtype.

    Raises:
        TypeError: non-tensors, unsupported dtypes, or x and the vectors in
            different dtypes.
        ValueError: shape or device mismatches, a bad seed or backend name.
    """
    _check_tensor("x", x)
    _check_tensor("lambda_d", lambda_d, dims=1)
    _check_tensor("lambda_b", lambda_b, dims=1)
    if base_output is not None:
        _check_tensor("base_output", base_output)
    proj_a, proj_b = _check_projections(projections)
    x, lambda_d, lambda_b, base_output, proj_a, proj_b = _autocast(
        [x, lambda_d, lambda_b, base_output, proj_a, proj_b], x.device.type
    )

    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., in) with in >= 1, got {tuple(x.shape)}")
    if lambda_d.shape[0] == 0 or lambda_b.shape[0] == 0:
        raise ValueError(
            f"lambda_d and lambda_b must be non-empty, got r={lambda_d.shape[0]}, "
            f"out={lambda_b.shape[0]}"
        )
    named = (("lambda_d", lambda_d), ("lambda_b", lambda_b), ("base_output", base_output),
             ("projections[0]", proj_a), ("projections[1]", proj_b))
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; use one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    out_features = lambda_b.shape[0]
    out_shape = (*x.shape[:-1], out_features)
    if base_output is not None and tuple(base_output.shape) != out_shape:
        raise ValueError(
            f"base_output must have shape {out_shape} (x's leading dims, len(lambda_b)), "
            f"got {tuple(base_output.shape)}"
        )
    if proj_a is None:
        key0, key1 = split_seed(seed)
    else:
        r_in = (lambda_d.shape[0], x.shape[-1])
        if tuple(proj_a.shape) != r_in or tuple(proj_b.shape) != (out_features, r_in[0]):
            raise ValueError(
                f"projections must have shapes {r_in} and {(out_features, r_in[0])} "
                f"((r, in) and (out, r)), got {tuple(proj_a.shape)} and {tuple(proj_b.shape)}"
            )
        key0 = key1 = 0  # unused: the matrices are given
    name = ops.resolve_backend(backend, x.device)

    x2d = x.reshape(-1, x.shape[-1])
    base2d = base_output.reshape(-1, out_features) if base_output is not None else None
    args = (x2d, lambda_d, lambda_b, key0, key1, base2d, name, proj_a, proj_b)
    compiling = torch.compiler.is_compiling()
    if into_base and base_output is not None and base_output.is_contiguous() and not (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, lambda_d, lambda_b, base_output))
    ):
        if compiling:
            torch.ops.vera_kernels.vera_forward_into_base(*args)
        else:
            ops.run_forward(*args, into_base=True)
            # A fused kernel's write is invisible to autograd: bump the
            # version so a graph that saved base_output refuses to use it.
            torch.autograd.graph.increment_version(base_output)
        return base_output
    if compiling:
        y, _ = torch.ops.vera_kernels.vera_forward(*args)
    else:
        y = _VeRAFunction.apply(*args)
    return y.reshape(out_shape)


def _check_projections(projections) -> tuple[Optional[Tensor], Optional[Tensor]]:
    if projections is None:
        return None, None
    if not isinstance(projections, (tuple, list)) or len(projections) != 2:
        raise TypeError("projections must be a pair (A, B) of tensors")
    for i, t in enumerate(projections):
        _check_tensor(f"projections[{i}]", t, dims=2)
    # Frozen by definition: no gradient flows into them.
    return projections[0].detach(), projections[1].detach()
