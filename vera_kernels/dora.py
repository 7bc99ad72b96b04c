"""DVoRA: DoRA's magnitude / direction split over VeRA, without the out x in matrix.

A DVoRA layer computes ``y = s ⊙ (W0 x + ΔW x) + bias`` with ``s = m / n``,
``m`` a trainable magnitude per output feature and ``n`` the row norms of
``W0 + ΔW``, detached (DoRA paper §4.3: no gradient flows through the norm).
DoRA implementations build ``W0 + ΔW`` on every step to take those norms.
VeRA's A is fixed, so with ``ΔW_i = b_i Σ_k B_ik d_k A_k``:

    n_i² = ‖W0_i‖² + 2 b_i Σ_k (B_i ⊙ d)_k (W0 Aᵀ)_ik + b_i² (B_i ⊙ d) (A Aᵀ) (B_i ⊙ d)ᵀ

``‖W0‖²`` (out), ``W0 Aᵀ`` (out x r) and ``A Aᵀ`` (r x r) depend on the base
weight alone: :class:`NormTerms`, computed once per layer (float32, float64
for a float64 base) and kept until the weight changes (merge, load,
requantize bump its version), so a step costs O(out · r²) and no out x in
tensor. Quantized bases take the terms from the dequantized weight (once).

This module holds that math; ``module.py`` applies it (``use_dora=True``)
and the fused op scales the base in its epilogue (``base_scale``).
"""

from __future__ import annotations

import weakref
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .dropout import DropoutMask, drop_rows_

__all__ = ["NormTerms", "NormCache", "norm_terms", "weight_row_squares", "row_norms",
           "magnitude_scale", "tensor_key", "drop_input", "zero_magnitude_problem", "ROW_CHUNK"]

ROW_CHUNK = 1024  # weight rows converted to float32 at a time: no out x in float32 copy


class NormTerms(NamedTuple):
    """What the row norms of ``W0 + ΔW`` need from the base weight and A.

    Attributes:
        weight_sq: ``‖W0_i‖²`` (out,).
        weight_a: ``W0 Aᵀ`` (out x r): as large as the B VeRA never stores
            (r · out · 4 bytes per layer).
        a_gram: ``A Aᵀ`` (r x r).
    """

    weight_sq: Tensor
    weight_a: Tensor
    a_gram: Tensor


def _row_chunks(weight: Tensor, dtype: torch.dtype):
    for start in range(0, weight.shape[0], ROW_CHUNK):
        yield weight[start:start + ROW_CHUNK].to(dtype)


def _squares(rows: Tensor) -> Tensor:
    return (rows * rows).sum(1)


# Chunks are concatenated, not written into slices with out=: torch.export's
# functionalization would lose such writes.

@torch.no_grad()
def weight_row_squares(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``‖W0_i‖²`` (out,) of ``weight`` (out x in), in ``dtype``, ``ROW_CHUNK`` rows at a
    time (as :func:`norm_terms` takes them: the same values, bit for bit)."""
    return torch.cat([_squares(chunk) for chunk in _row_chunks(weight, dtype)])


@torch.no_grad()
def norm_terms(weight: Tensor, proj_a: Tensor, dtype: torch.dtype) -> NormTerms:
    """:class:`NormTerms` of ``weight`` (out x in, dense) and ``proj_a`` (r x in), in ``dtype``.

    The weight is converted ``ROW_CHUNK`` rows at a time, once.
    """
    proj_a = proj_a.to(weight.device, dtype)
    squares, products = [], []
    for chunk in _row_chunks(weight, dtype):
        squares.append(_squares(chunk))
        products.append(chunk @ proj_a.T)
    return NormTerms(torch.cat(squares), torch.cat(products), proj_a @ proj_a.T)


def row_norms(terms: NormTerms, proj_b: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> Tensor:
    """``‖W0_i + ΔW_i‖`` (out,) for one adapter's vectors, in the terms' dtype (no grad).

    The squared norm is clamped at 0 before the root: where ``ΔW_i ≈ -W0_i``
    the cross term cancels the others up to rounding.
    """
    with torch.no_grad():
        dtype = terms.weight_sq.dtype
        b = lambda_b.to(dtype)
        bd = proj_b.to(dtype) * lambda_d.to(dtype)  # (out, r): B_i ⊙ d
        cross = (bd * terms.weight_a).sum(1)
        quad = ((bd @ terms.a_gram) * bd).sum(1)
        return (terms.weight_sq + 2 * b * cross + b * b * quad).clamp_min(0).sqrt()


def magnitude_scale(magnitude: Tensor, norms: Tensor) -> Tensor:
    """``s = m / n``, differentiable in m; a zero norm counts as 1.

    A row with ``n = 0`` has ``W0_i + ΔW_i = 0``: its output is the bias
    whatever s is, so any finite s is exact; 1 keeps m's gradient finite.
    """
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return magnitude / safe.to(magnitude.dtype)


def tensor_key(t: Tensor) -> tuple:
    """What says a tensor's values may have changed: its version, storage, dtype and device.
    ZeRO-3's partitioned parameters are keyed by their id alone (their storage comes and
    goes with each gather; a base weight is only ever replaced whole)."""
    if hasattr(t, "ds_id"):
        return ("zero3", t.ds_id)
    try:
        storage = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without one storage
        storage = None
    return (t._version, storage, t.dtype, t.device)


class NormCache:
    """A DVoRA layer's norms, kept while they are valid (not state: a copy starts empty).

    * The base weight's :class:`NormTerms`, until the weight changes object or
      ``key`` (its :func:`tensor_key`, the projections') changes.
    * Each adapter's norms, for inference calls only, until its d or b changes
      object, version, storage or dtype (the package's loaders write with
      ``copy_``, which bumps the version). A training call (grad mode, d or b
      requiring grad) computes them afresh and drops the adapter's entry: fused
      optimizers, FSDP2's and ZeRO-3's gathers write the vectors without a version
      bump, and an evaluation between steps must not reuse what an earlier one kept.

    While torch.export traces, nothing is read or kept: its tensors are not real.
    """

    def __init__(self):
        self._terms: Optional[tuple] = None  # (weak ref to the weight, key, terms)
        self._norms: dict = {}  # adapter -> (weak ref to d, to b, key, norms)

    def terms(self, weight: Tensor, key: tuple, compute: Callable[[], NormTerms]) -> NormTerms:
        if torch.compiler.is_compiling():
            return compute()
        cached = self._terms
        if cached is None or cached[0]() is not weight or cached[1] != key:
            self._terms = (weakref.ref(weight), key, compute())
            self._norms.clear()
        return self._terms[2]

    def norms(self, adapter: str, lambda_d: Tensor, lambda_b: Tensor,
              compute: Callable[[], Tensor]) -> Tensor:
        trains = torch.is_grad_enabled() and (lambda_d.requires_grad or lambda_b.requires_grad)
        if trains or torch.compiler.is_compiling():
            self._norms.pop(adapter, None)
            return compute()
        key = (tensor_key(lambda_d), tensor_key(lambda_b))
        cached = self._norms.get(adapter)
        if cached is None or cached[0]() is not lambda_d or cached[1]() is not lambda_b \
                or cached[2] != key:
            cached = (weakref.ref(lambda_d), weakref.ref(lambda_b), key, compute())
            self._norms[adapter] = cached
        return cached[3]

    def __getstate__(self) -> dict:
        return {"_terms": None, "_norms": {}}  # weak references do not pickle


class _DropInput(torch.autograd.Function):
    """``dropout(x)`` with the call's regenerated mask (rows: x's flattened tokens); backward
    applies the same mask to the gradient, so nothing but the seed is kept."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.mask = mask
        dropped = x.reshape(-1, x.shape[-1]).clone(memory_format=torch.contiguous_format)
        return drop_rows_(dropped, mask).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        dropped = grad.reshape(-1, grad.shape[-1]).clone(memory_format=torch.contiguous_format)
        return drop_rows_(dropped, ctx.mask).reshape(grad.shape), None


def drop_input(x: Tensor, mask: DropoutMask) -> Tensor:
    """``x`` under ``mask``, as the fused op drops its input for that mask (same seed, same
    rows): the magnitude term's input under PEFT's DoRA dropout."""
    return _DropInput.apply(x, mask)


def zero_magnitude_problem(magnitude: Tensor) -> Optional[str]:
    """Why a weight merged with ``magnitude`` could not be unmerged (some m = 0), or None."""
    zeros = (magnitude == 0).nonzero().flatten()
    if not zeros.numel():
        return None
    return (f"its magnitude is 0 in output rows {zeros[:5].tolist()}: the merged weight's rows "
            "would be 0 and could not be unmerged")
