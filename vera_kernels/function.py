"""Autograd for the VeRA op, and ``vera_linear``: check the call, then dispatch it.

Forward saves only ``h`` (tokens x r) and the two vectors; backward hands
them to the same backend's backward. The gradient of ``base_output`` is the
upstream gradient itself. With ``base_scale`` (DVoRA, ``dora.py``) the base
is scaled in the forward's epilogue; then ``base_output`` is kept (a
reference to the caller's tensor, never written in place under autograd)
for the gradient of the scale, ``Σ_tokens g ⊙ (base - base_bias)``. Under
torch.compile the custom ops of ``ops.py``
(with the autograd registered here) are traced; in eager mode an
``autograd.Function`` calls the same backend functions directly, which costs
a fraction of the dispatch overhead.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import ops
from .backends import Grads, NeededGrads
from .backends.banks import per_adapter_sum, token_scales
from .call import VeRACall, check_call
from .dropout import DropoutMask
from .projection import ProjectionShard

__all__ = ["vera_linear", "vera_linear_multi", "DOUBLE_BACKWARD_ERROR"]

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


def _guard_double_backward(grads: Grads, *inputs) -> Grads:
    # With create_graph=True autograd records the backward itself. Ours is
    # not differentiable (terms through h = A x would be silently missing), so
    # the gradients are routed through a node whose backward raises.
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or not any(
        isinstance(t, Tensor) and t.requires_grad for t in inputs
    ):
        return grads
    present = [g for g in grads if g is not None]
    guarded = iter(_NoDoubleBackward.apply(len(present), *present, *inputs))
    return Grads(*(None if g is None else next(guarded) for g in grads))


def _save(ctx, x, lambda_d, lambda_b, source, backend, adapter_ids, dropout, h, *extra,
          affine: tuple = (None, None, None)) -> None:
    # An explicit source holds frozen inputs: keeping it keeps references, no
    # copies. Dropout keeps its seed tensor (two words) only: the mask is regenerated.
    # ``affine``: (base, base_scale, base_bias), kept when there is a base_scale.
    seed = dropout.seed if dropout is not None else None
    ctx.affine = affine[1] is not None
    ctx.save_for_backward(h, lambda_d, lambda_b, adapter_ids, seed,
                          *(affine if ctx.affine else ()), *extra)
    ctx.source, ctx.backend, ctx.in_features = source, backend, x.shape[1]
    ctx.dropout_p = dropout.p if dropout is not None else 0.0


def _affine_grads(ctx, saved: tuple, grad_y: Tensor, needs: tuple) -> tuple:
    """The gradients of (base, base_scale, base_bias) that ``needs`` asks for.

    With ``y = s ⊙ (base - bias) + bias + adapter``: ``dbase = g ⊙ s``,
    ``ds = Σ_tokens g ⊙ (base - bias)`` (per adapter for a bank, whose rows with
    id -1 have s = 1), ``dbias = Σ_tokens g ⊙ (1 - s)``; sums in float32 or wider.
    """
    need_base, need_scale, need_bias = needs
    if not ctx.affine:
        return grad_y if need_base else None, None, None
    adapter_ids = saved[3]
    base, scale, bias = saved[5:8]
    acc = torch.promote_types(torch.promote_types(grad_y.dtype, scale.dtype), torch.float32)
    rows = token_scales(scale, adapter_ids).to(acc)
    g = grad_y.to(acc)
    dbase = (g * rows).to(grad_y.dtype) if need_base else None
    dscale = dbias = None
    if need_scale:
        centred = base.to(acc) if bias is None else base.to(acc) - bias.to(acc)
        products = g * centred
        dscale = (products.sum(0) if adapter_ids is None
                  else per_adapter_sum(products, adapter_ids, scale.shape[0])).to(scale.dtype)
    if need_bias:
        dbias = (g * (1 - rows)).sum(0).to(bias.dtype)
    return dbase, dscale, dbias


def _input_grads(ctx, saved: tuple, grad_y: Tensor, needed: NeededGrads, backward: Callable,
                 **options) -> Grads:
    """The backend's gradients for ``needed`` (through ``backward``: the op, or the eager
    call), from ``saved`` = ``ctx.saved_tensors`` (unpacked once: checkpointing allows no more)."""
    if not needed.any():
        return Grads(None, None, None)
    h, lambda_d, lambda_b, adapter_ids, seed = saved[:5]
    grads = backward(grad_y, h, lambda_d, lambda_b, ctx.source, ctx.in_features, ctx.backend,
                     needed, adapter_ids, DropoutMask.from_op_args(ctx.dropout_p, seed), **options)
    return _guard_double_backward(grads, grad_y, lambda_d, lambda_b)


# Autograd of the custom op, for graphs torch.compile traces.
def _setup_context(ctx, inputs, output):
    (x, lambda_d, lambda_b, source, base, backend, adapter_ids, dropout, base_scale,
     base_bias) = ops.op_forward_inputs(inputs)
    _save(ctx, x, lambda_d, lambda_b, source, backend, adapter_ids, dropout, output[1],
          affine=(base, base_scale, base_bias))
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, grad_y, _grad_h):
    needed, affine_needs = ops.op_needed_grads(ctx.needs_input_grad)
    saved = ctx.saved_tensors
    grads = _input_grads(ctx, saved, grad_y, needed, ops.backward_op)
    return ops.op_input_grads(grads, _affine_grads(ctx, saved, grad_y, affine_needs))


torch.library.register_autograd("vera_kernels::vera_forward", _op_backward,
                                setup_context=_setup_context)


class _VeRAFunction(torch.autograd.Function):
    """The eager path: the same backend calls and saved state, without torch.library dispatch."""

    @staticmethod
    def forward(ctx, x, lambda_d, lambda_b, base, source, backend, adapter_ids, dropout,
                base_scale, base_bias):
        y, h = ops.run_forward(x, lambda_d, lambda_b, source, base, backend,
                               adapter_ids=adapter_ids, dropout=dropout, base_scale=base_scale,
                               base_bias=base_bias)
        _save(ctx, x, lambda_d, lambda_b, source, backend, adapter_ids, dropout, h,
              affine=(base, base_scale, base_bias))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        need_x, need_d, need_b, need_base = ctx.needs_input_grad[:4]
        saved = ctx.saved_tensors
        grads = _input_grads(ctx, saved, grad_y, NeededGrads(need_x, need_d, need_b),
                             ops.run_backward)
        dbase, dscale, dbias = _affine_grads(ctx, saved, grad_y,
                                             (need_base, *ctx.needs_input_grad[8:10]))
        return (*grads, dbase, None, None, None, None, dscale, dbias)


class _VeRALayerFunction(torch.autograd.Function):
    """A frozen dense base layer and the adapter in one autograd node (eager training).

    Forward adds the adapter into the base output's buffer (the base layer's
    backward never needs its output); backward computes the base layer's dx
    and the adapter's dx is added into that buffer by the backend (Triton: in
    the dx kernel's epilogue), so no separate tokens x in adapter dx, no
    tokens x out adapter output, and no add pass exist.
    """

    @staticmethod
    def forward(ctx, x, lambda_d, lambda_b, weight, bias, weight_in_out, source, backend,
                adapter_ids, dropout):
        base = _dense_base(x, weight, bias, weight_in_out)
        y, h = ops.run_forward(x, lambda_d, lambda_b, source, base, backend, into_base=True,
                               adapter_ids=adapter_ids, dropout=dropout)
        # The weight is saved (a reference) so that changing it before backward is caught.
        _save(ctx, x, lambda_d, lambda_b, source, backend, adapter_ids, dropout, h, weight)
        ctx.weight_in_out = weight_in_out
        return y

    @staticmethod
    def backward(ctx, grad_y):
        need_x, need_d, need_b = ctx.needs_input_grad[:3]
        saved = ctx.saved_tensors
        dx_base = None
        if need_x:
            weight = saved[5]
            dx_base = grad_y @ (weight.T if ctx.weight_in_out else weight)
        grads = _input_grads(ctx, saved, grad_y, NeededGrads(need_x, need_d, need_b),
                             ops.run_backward, dx_into=dx_base)
        return (*grads, None, None, None, None, None, None, None)


def _dense_base(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_in_out: bool) -> Tensor:
    if not weight_in_out:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.addmm(bias, x, weight) if bias is not None else x @ weight  # Conv1D: (in, out)


def vera_linear_layer(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_in_out: bool,
                      lambda_d: Tensor, lambda_b: Tensor, seed: Optional[int], *,
                      adapter_ids: Optional[Tensor] = None, **options) -> Tensor:
    """``base(x) + adapter`` for a frozen dense base layer, as one autograd node (eager).

    ``weight`` is (out, in) (``nn.Linear``) or (in, out) (``weight_in_out``,
    transformers' Conv1D); neither it nor ``bias`` may require grad. The other
    arguments are ``vera_linear``'s / ``vera_linear_multi``'s (with
    ``adapter_ids``); ``check_ids=False`` for ids the caller checked.
    """
    if adapter_ids is None:
        call = check_call(x, lambda_d, lambda_b, seed, **options)
    else:
        call = check_call(x, lambda_d, lambda_b, seed, adapter_ids=adapter_ids, **options)
    y = _VeRALayerFunction.apply(call.x, call.lambda_d, call.lambda_b, weight, bias, weight_in_out,
                                 call.source, call.backend, call.adapter_ids, call.dropout)
    return y.reshape(call.out_shape)


def _forward(call: VeRACall) -> Tensor:
    if torch.compiler.is_compiling():
        y, _ = ops.forward_op(call.x, call.lambda_d, call.lambda_b, call.source, call.base,
                              call.backend, call.adapter_ids, call.dropout, call.base_scale,
                              call.base_bias)
        return y
    return _VeRAFunction.apply(call.x, call.lambda_d, call.lambda_b, call.base, call.source,
                               call.backend, call.adapter_ids, call.dropout, call.base_scale,
                               call.base_bias)


def _forward_into_base(call: VeRACall) -> None:
    args = (call.x, call.lambda_d, call.lambda_b, call.source, call.base, call.backend)
    if torch.compiler.is_compiling():
        # a declared mutation: functionalized when traced
        ops.forward_into_base_op(*args, call.adapter_ids, call.dropout, call.base_scale,
                                 call.base_bias)
        return
    ops.run_forward(*args, into_base=True, adapter_ids=call.adapter_ids, dropout=call.dropout,
                    base_scale=call.base_scale, base_bias=call.base_bias)
    # A fused kernel's write is invisible to autograd: bump the version so a
    # graph that saved base_output refuses to use it.
    torch.autograd.graph.increment_version(call.base_output)


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
    dropout: float = 0.0,
    dropout_seed: Union[int, Tensor, None] = None,
    shard: Optional[ProjectionShard] = None,
    base_scale: Optional[Tensor] = None,
    base_bias: Optional[Tensor] = None,
) -> Tensor:
    """VeRA's adapter path: ``base_output + lambda_b * (B @ (lambda_d * (A @ x)))`` per token.

    A (r x in) and B (out x r) are the spec projections for ``seed``
    (see :func:`vera_kernels.projection`); they are regenerated, never stored.

    Args:
        x: ``(..., in)`` activations; any leading dims, any strides.
        lambda_d: ``(r,)`` trainable scaling of the r-dimensional bottleneck.
        lambda_b: ``(out,)`` trainable scaling of the output.
        seed: int in [0, 2**64) selecting A and B (any integer type).
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
            base_output is contiguous; otherwise a new tensor as usual. The
            write bumps base_output's version counter, as any in-place op does.
        dropout: probability of dropping each adapter input (PEFT's
            ``vera_dropout``: ``A @ dropout(x)``); the mask is regenerated from
            Philox in backward, never stored (``vera_kernels/dropout.py``).
        dropout_seed: the mask's seed: an int in [0, 2**64), or an int64 tensor
            of its two key words ``(seed & 0xFFFFFFFF, seed >> 32)`` on x's
            device (``vera_kernels.dropout.seed_words``; the low 32 bits of
            each count). ``None`` draws one with ``torch.randint`` on x's
            device, so a compiled graph or a CUDA graph draws a new mask per
            call; ``torch.manual_seed`` reproduces eager calls (Inductor draws
            its own way, as for ``nn.Dropout``).
        shard: a tensor-parallel shard of a larger layer
            (:class:`vera_kernels.ProjectionShard`): A and B are this shard's
            block of the full layer's, so the shards' results combine to the
            full layer's (concatenated for a column-parallel shard, summed
            for a row-parallel one). Not with explicit projections or dropout.
        base_scale: ``(out,)``, DVoRA's output scale s (``dora.py``): the result is
            then ``s ⊙ (base_output - base_bias) + base_bias + adapter``, s applied
            in the same epilogue that adds the base. ``base_output`` is then kept
            for backward (``ds = Σ_tokens g ⊙ (base_output - base_bias)``).
            float32 is accepted under half x, as for the vectors.
        base_bias: ``(out,)``, the part of base_output that base_scale leaves
            unscaled (the base layer's bias); only with base_scale.

    Returns:
        ``(..., out)`` tensor in x's dtype, differentiable in x, lambda_d,
        lambda_b, base_output, base_scale and base_bias (once: double
        backward raises). Under
        ``torch.autocast`` everything is computed in the autocast dtype.

    Raises:
        TypeError: non-tensors, unsupported dtypes, x and the vectors in
            different dtypes, or a dropout_seed tensor that is not int64.
        ValueError: shape or device mismatches, a bad seed or backend name.
    """
    return _run(check_call(x, lambda_d, lambda_b, seed, base_output, backend=backend,
                           projections=projections, into_base=into_base, dropout=dropout,
                           dropout_seed=dropout_seed, shard=shard, base_scale=base_scale,
                           base_bias=base_bias))


def _run(call: VeRACall) -> Tensor:
    if call.into_base:
        _forward_into_base(call)
        return call.base_output
    return _forward(call).reshape(call.out_shape)


def vera_linear_multi(
    x: Tensor,
    lambda_d_bank: Tensor,
    lambda_b_bank: Tensor,
    adapter_ids: Tensor,
    seed: Optional[int],
    base_output: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
    projections: Optional[tuple[Tensor, Tensor]] = None,
    into_base: bool = False,
    check_ids: bool = True,
    dropout: float = 0.0,
    dropout_seed: Union[int, Tensor, None] = None,
    shard: Optional[ProjectionShard] = None,
    base_scale: Optional[Tensor] = None,
    base_bias: Optional[Tensor] = None,
) -> Tensor:
    """``vera_linear`` for a batch that mixes several adapters sharing A and B (one seed).

    Token t computes ``base_output[t] + b[i] * (B @ (d[i] * (A @ x[t])))`` with
    ``i = adapter_ids[t]`` and ``d, b`` the banks' rows; ``i = -1`` means no
    adapter (the token's output is ``base_output[t]``, or zeros). ``h = x Aᵀ``
    is one product for all tokens; the fused kernels gather each row's d and b
    inside the kernels, so the mixed batch costs what one adapter costs.

    Args:
        x: ``(..., in)``.
        lambda_d_bank: ``(n_adapters, r)``; lambda_b_bank: ``(n_adapters, out)``.
        adapter_ids: an integer tensor of shape ``x.shape[:-1]`` with values in
            [-1, n_adapters); a per-sequence id broadcast over the sequence
            works (``ids[:, None].expand(batch, seq)``).
        seed, base_output, backend, projections, into_base, dropout, dropout_seed, shard,
        base_bias: as for ``vera_linear``.
        base_scale: ``(n_adapters, out)``, each adapter's DVoRA scale (rows with id -1
            keep their base output unscaled).
        check_ids: check the ids' range (one host sync); pass False only for
            ids already checked.

    Returns:
        ``(..., out)``, differentiable in x, base_output and both banks (the
        rows used get their tokens' gradients summed, deterministically).

    Raises:
        TypeError / ValueError: as ``vera_linear``, and for ids of a non-integer
        dtype, another shape or device, or out of range.
    """
    return _run(check_call(x, lambda_d_bank, lambda_b_bank, seed, base_output, backend=backend,
                           projections=projections, into_base=into_base, adapter_ids=adapter_ids,
                           check_ids=check_ids, dropout=dropout, dropout_seed=dropout_seed,
                           shard=shard, base_scale=base_scale, base_bias=base_bias))
