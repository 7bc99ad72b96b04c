"""The torch.library boundary: the custom ops torch.compile traces, and the dispatch to a backend.

    vera_kernels::vera_forward(x, lambda_d, lambda_b, key0, key1, base, backend, proj_a, proj_b,
                               adapter_ids, dropout_p, dropout_seed,
                               shard_in_offset, shard_out_offset, shard_in_features,
                               base_scale, base_bias) -> (y, h)
        y = base + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ), h = x Aᵀ
        (with base_scale s: base becomes s ⊙ (base - base_bias) + base_bias, DVoRA's)
    vera_kernels::vera_forward_into_base(same inputs) -> ()      base += the adapter, in place
    vera_kernels::vera_backward(grad, h, lambda_d, lambda_b, key0, key1, in_features, backend,
                                need_dx, need_dd, need_db, proj_a, proj_b, adapter_ids,
                                dropout_p, dropout_seed, shard_*) -> (dx, dd, db)

With ``adapter_ids`` (tokens,) the vectors are banks, one row per adapter
(``backends/banks.py``); with ``dropout_p`` > 0, h = dropout(x) Aᵀ with the
mask of the call's dropout seed (``dropout.py``), regenerated for dx. The
``shard_*`` integers are a tensor-parallel shard's place in the full layer
(``ProjectionShard.op_args``; zeros: the whole layer).

This is the one place where the call is spelled out positionally. A
torch.library int is int64, too small for a 64-bit seed, so a seed travels
as its two Philox key words (zeros when ``proj_a`` / ``proj_b`` give the
projections); everywhere else a :class:`ProjectionSource` carries it. The
dropout seed is a Tensor argument (int64, its two key words, on x's
device): drawn inside a compiled graph or a CUDA graph capture, it must
stay a tensor, which the kernels read from memory.
Fake implementations let torch.compile trace the ops without graph breaks.

:func:`run_forward` / :func:`run_backward` are the ops' bodies and also the
eager path (``function.py`` calls them directly outside torch.compile, where
torch.library dispatch would only add overhead).
"""

# No `from __future__ import annotations`: torch.library reads these signatures at runtime.
import contextlib
from typing import Optional

import torch
from torch import Tensor

from .backends import Grads, NeededGrads, ProjectionSource, get_backend
from .dropout import DropoutMask

__all__ = ["run_forward", "run_backward", "forward_op", "forward_into_base_op", "backward_op",
           "op_needed_grads", "op_input_grads", "op_forward_inputs"]


def _backend_for(x: Tensor, name: str):
    # An empty batch needs no kernel launch: the torch backend's matmuls give
    # the right (empty / zero) results on any device.
    return get_backend("torch" if x.shape[0] == 0 else name)


def _no_autocast(x: Tensor):
    # Autocast falls through custom ops but stays switched on inside them; the
    # caller has already cast the inputs, and the fp32 accumulations inside a
    # backend must not be cast back down. Devices without autocast (meta) need nothing.
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


def run_forward(x: Tensor, lambda_d: Tensor, lambda_b: Tensor, source: ProjectionSource,
                base: Optional[Tensor], backend: str, *, into_base: bool = False,
                adapter_ids: Optional[Tensor] = None, dropout: Optional[DropoutMask] = None,
                base_scale: Optional[Tensor] = None, base_bias: Optional[Tensor] = None):
    """``(y, h)`` from the named backend for 2-D ``x``; with ``into_base``, y is ``base``."""
    # The backends index the vectors as contiguous arrays (r and out elements: a cheap copy).
    lambda_d, lambda_b = lambda_d.contiguous(), lambda_b.contiguous()
    with _no_autocast(x):
        return _backend_for(x, backend).forward(x, lambda_d, lambda_b, source, base,
                                                into_base=into_base, adapter_ids=adapter_ids,
                                                dropout=dropout,
                                                base_scale=_contiguous(base_scale),
                                                base_bias=_contiguous(base_bias))


def run_backward(grad: Tensor, h: Tensor, lambda_d: Tensor, lambda_b: Tensor,
                 source: ProjectionSource, in_features: int, backend: str,
                 needed: NeededGrads, adapter_ids: Optional[Tensor] = None,
                 dropout: Optional[DropoutMask] = None, dx_into: Optional[Tensor] = None) -> Grads:
    """The gradients ``needed`` asks for (None for the others) from the named backend; dx is
    added into ``dx_into`` when given."""
    lambda_d, lambda_b = lambda_d.contiguous(), lambda_b.contiguous()
    with _no_autocast(h):
        return _backend_for(h, backend).backward(grad, h, lambda_d, lambda_b, source,
                                                 in_features, needed, adapter_ids, dropout,
                                                 dx_into=dx_into)


# ---------------------------------------------------------------------------
# The positional form, both ways
# ---------------------------------------------------------------------------

def op_forward_inputs(inputs: tuple) -> tuple:
    """``(x, lambda_d, lambda_b, source, base, backend, adapter_ids, dropout, base_scale,
    base_bias)`` from the forward op's inputs."""
    (x, lambda_d, lambda_b, key0, key1, base, backend, proj_a, proj_b, adapter_ids, drop_p,
     drop_seed, *shard, base_scale, base_bias) = inputs
    return (x, lambda_d, lambda_b,
            ProjectionSource.from_key_words(key0, key1, proj_a, proj_b, shard),
            base, backend, adapter_ids, DropoutMask.from_op_args(drop_p, drop_seed), base_scale,
            base_bias)


def op_needed_grads(needs_input_grad: tuple) -> tuple[NeededGrads, tuple]:
    """(gradients for the backend, whether base, base_scale and base_bias need one) from the
    forward op's needs_input_grad."""
    need_x, need_d, need_b, _, _, need_base = needs_input_grad[:6]
    return NeededGrads(need_x, need_d, need_b), (need_base, *needs_input_grad[-2:])


def op_input_grads(grads: Grads, affine_grads: tuple) -> tuple:
    """The forward op's input gradients, in its argument order; ``affine_grads`` are those of
    base, base_scale and base_bias."""
    dbase, dscale, dbias = affine_grads
    return (grads.x, grads.lambda_d, grads.lambda_b, None, None, dbase, None, None, None, None,
            None, None, None, None, None, dscale, dbias)


def _dropout_args(dropout: Optional[DropoutMask]) -> tuple:
    return (dropout.p, dropout.seed) if dropout is not None else (0.0, None)


def forward_op(x, lambda_d, lambda_b, source: ProjectionSource, base, backend: str,
               adapter_ids=None, dropout=None, base_scale=None, base_bias=None):
    """``(y, h)`` through the traced custom op."""
    return torch.ops.vera_kernels.vera_forward(x, lambda_d, lambda_b, *source.key_words(),
                                               base, backend, source.a, source.b, adapter_ids,
                                               *_dropout_args(dropout), *source.shard.op_args(),
                                               base_scale, base_bias)


def forward_into_base_op(x, lambda_d, lambda_b, source: ProjectionSource, base, backend: str,
                         adapter_ids=None, dropout=None, base_scale=None, base_bias=None):
    """``base = adapter + base (its affine map)`` through the traced (mutating) custom op."""
    torch.ops.vera_kernels.vera_forward_into_base(
        x, lambda_d, lambda_b, *source.key_words(), base, backend, source.a, source.b, adapter_ids,
        *_dropout_args(dropout), *source.shard.op_args(), base_scale, base_bias)


def backward_op(grad, h, lambda_d, lambda_b, source: ProjectionSource, in_features: int,
                backend: str, needed: NeededGrads, adapter_ids=None, dropout=None) -> Grads:
    """The backward through the traced custom op."""
    grads = torch.ops.vera_kernels.vera_backward(
        grad, h, lambda_d, lambda_b, *source.key_words(), in_features, backend,
        needed.x, needed.lambda_d, needed.lambda_b, source.a, source.b, adapter_ids,
        *_dropout_args(dropout), *source.shard.op_args())
    return Grads(*(g if need else None
                   for g, need in zip(grads, (needed.x, needed.lambda_d, needed.lambda_b))))


# ---------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------

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
    adapter_ids: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
    shard_in_offset: int = 0,
    shard_out_offset: int = 0,
    shard_in_features: int = 0,
    base_scale: Optional[Tensor] = None,
    base_bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(y, h) for 2-D ``x``; see the module docstring."""
    return run_forward(x, lambda_d, lambda_b,
                       ProjectionSource.from_key_words(key0, key1, proj_a, proj_b, (
                           shard_in_offset, shard_out_offset, shard_in_features)), base, backend,
                       adapter_ids=adapter_ids,
                       dropout=DropoutMask.from_op_args(dropout_p, dropout_seed),
                       base_scale=base_scale, base_bias=base_bias)


@vera_forward.register_fake
def _(x, lambda_d, lambda_b, key0, key1, base, backend, proj_a=None, proj_b=None,
      adapter_ids=None, dropout_p=0.0, dropout_seed=None, shard_in_offset=0, shard_out_offset=0,
      shard_in_features=0, base_scale=None, base_bias=None):
    tokens = x.shape[0]
    return x.new_empty(tokens, lambda_b.shape[-1]), x.new_empty(tokens, lambda_d.shape[-1])


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
    adapter_ids: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
    shard_in_offset: int = 0,
    shard_out_offset: int = 0,
    shard_in_features: int = 0,
    base_scale: Optional[Tensor] = None,
    base_bias: Optional[Tensor] = None,
) -> None:
    """``base += b * ((d * (x @ A.T)) @ B.T)`` in place: the forward without autograd."""
    run_forward(x, lambda_d, lambda_b,
                ProjectionSource.from_key_words(key0, key1, proj_a, proj_b, (
                    shard_in_offset, shard_out_offset, shard_in_features)),
                base, backend, into_base=True, adapter_ids=adapter_ids,
                dropout=DropoutMask.from_op_args(dropout_p, dropout_seed),
                base_scale=base_scale, base_bias=base_bias)


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
    adapter_ids: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
    shard_in_offset: int = 0,
    shard_out_offset: int = 0,
    shard_in_features: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dd, db); a gradient that was not asked for comes back as an empty tensor."""
    grads = run_backward(grad, h, lambda_d, lambda_b,
                         ProjectionSource.from_key_words(key0, key1, proj_a, proj_b, (
                             shard_in_offset, shard_out_offset, shard_in_features)),
                         in_features, backend, NeededGrads(need_dx, need_dd, need_db), adapter_ids,
                         DropoutMask.from_op_args(dropout_p, dropout_seed))
    return tuple(g if g is not None else h.new_empty(0) for g in grads)


@vera_backward.register_fake
def _(grad, h, lambda_d, lambda_b, key0, key1, in_features, backend, need_dx, need_dd, need_db,
      proj_a=None, proj_b=None, adapter_ids=None, dropout_p=0.0, dropout_seed=None,
      shard_in_offset=0, shard_out_offset=0, shard_in_features=0):
    tokens = h.shape[0]
    return (
        h.new_empty(tokens, in_features) if need_dx else h.new_empty(0),
        lambda_d.new_empty(lambda_d.shape) if need_dd else h.new_empty(0),
        lambda_b.new_empty(lambda_b.shape) if need_db else h.new_empty(0),
    )
