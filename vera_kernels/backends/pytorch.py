"""The ``torch`` backend: plain PyTorch, runs on any device (meta included), still lean.

* A and B come from an LRU cache per (seed, shape, dtype, device) instead of
  being regenerated per call.
* No tokens x out temporary besides the output: the vectors are folded into
  the small projections (d and b into B's columns and rows for the forward,
  b into B and d into A for dx), and the base output is added by ``addmm``.
* Backward needs only ``h``: db and dd come from ``P = gradᵀ h`` (out x r).
* float16 has a narrow exponent range: there the vectors (and h, for P) are
  scaled to unit magnitude by exact powers of two before they are folded,
  so the fold neither underflows nor overflows where the unfused
  computation would not (``_fold_scales``).

Folding d into B rather than A keeps ``h = x Aᵀ`` itself available for dd,
so nothing has to be divided back out.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..projection import cached_projection
from ..dropout import drop_rows_, dropped_chunks
from .banks import per_adapter_sum, row_vectors, token_scales
from .contract import Backend, Grads, NeededGrads, ProjectionSource


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def _projections(source: ProjectionSource, in_features: int, out_features: int, r: int,
                 like: Tensor) -> tuple[Tensor, Tensor]:
    if source.is_explicit:
        return source.a, source.b
    proj_a = cached_projection("A", r, in_features, source.seed, like.dtype, like.device,
                               source.shard)
    proj_b = cached_projection("B", out_features, r, source.seed, like.dtype, like.device,
                               source.shard)
    return proj_a, proj_b


def _fold_scales(dtype: torch.dtype, *vectors: Tensor) -> list[float]:
    """Per tensor, the power of two just above its largest magnitude (float16), else 1.

    Folding raw vectors into a float16 matrix underflows (small vectors) or
    overflows (large ones) where the unfused computation does not. Vectors
    divided by these exact powers of two fold safely, and the powers are
    applied in the matmul's fp32 epilogue (``alpha``) or to its result.
    bfloat16 and wider have float32's exponent range and need none of this,
    which spares them the host sync of reading the magnitudes.
    """
    if dtype != torch.float16 or vectors[0].device.type == "meta":
        return [1.0] * len(vectors)
    peaks = torch.stack([
        v.detach().abs().max().float() if v.numel() else v.new_zeros((), dtype=torch.float32)
        for v in vectors
    ]).tolist()
    return [2.0 ** math.frexp(p)[1] if math.isfinite(p) and p > 0 else 1.0 for p in peaks]


def _scaled(matrix: Tensor, rows: Optional[Tensor], cols: Optional[Tensor],
            scales=(1.0, 1.0)) -> Tensor:
    """``rows[:, None] / scales[0] * matrix * cols[None, :] / scales[1]``, rounded once."""
    acc = matrix.to(_accumulate_dtype(matrix.dtype))
    if rows is not None:
        acc = acc * (rows.to(acc.dtype) / scales[0])[:, None]
    if cols is not None:
        acc = acc * (cols.to(acc.dtype) / scales[1])
    return acc.to(matrix.dtype)


class TorchBackend(Backend):
    name = "torch"
    priority = 100

    def unavailable_on(self, device: torch.device) -> Optional[str]:
        return None

    def forward(self, x, lambda_d, lambda_b, source, base, *, into_base=False, adapter_ids=None,
                dropout=None, base_scale=None, base_bias=None):
        proj_a, proj_b = _projections(source, x.shape[1], lambda_b.shape[-1], lambda_d.shape[-1], x)
        h = _shrink(x, proj_a, dropout)
        if base_scale is not None:
            base = _affine_base(base, base_scale, base_bias, adapter_ids, into_base)
            into_base = True  # base is now the caller's buffer (in place) or this call's own
        if adapter_ids is not None:
            return _forward_rows(h, lambda_d, lambda_b, proj_b, base, into_base, adapter_ids), h
        scales = _fold_scales(x.dtype, lambda_b, lambda_d)
        w = _scaled(proj_b, lambda_b, lambda_d, scales)  # (out, r): b_o * B[o, i] * d_i / scale
        scale = scales[0] * scales[1]
        if base is None:
            y = torch.mm(h, w.T)
            if scale != 1.0:
                y.mul_(scale)  # exact: a power of two
        elif into_base:
            y = base.addmm_(h, w.T, alpha=scale)
        else:
            y = torch.addmm(base, h, w.T, alpha=scale)
        return y, h

    def backward(self, grad, h, lambda_d, lambda_b, source, in_features, needed: NeededGrads,
                 adapter_ids=None, dropout=None, dx_into=None):
        proj_a, proj_b = _projections(source, in_features, lambda_b.shape[-1], lambda_d.shape[-1], h)
        # One adapter without dropout adds dx into dx_into with addmm itself.
        direct = dx_into if adapter_ids is None and dropout is None else None
        if adapter_ids is not None:
            grads = _backward_rows(grad, h, lambda_d, lambda_b, proj_a, proj_b, needed, adapter_ids)
        else:
            grads = _backward(grad, h, lambda_d, lambda_b, proj_a, proj_b, needed, direct)
        if dropout is not None and grads.x is not None:
            drop_rows_(grads.x, dropout)  # the mask regenerated: dx of the dropped input
        if dx_into is not None and direct is None and grads.x is not None:
            grads = grads._replace(x=dx_into.add_(grads.x))
        return grads


def _affine_base(base: Tensor, scale: Tensor, bias: Optional[Tensor], adapter_ids,
                 in_place: bool) -> Tensor:
    """DVoRA's base term ``s ⊙ (base - bias) + bias``, computed in float32 or wider and
    rounded once: into ``base`` (``in_place``) or a new tensor."""
    acc = torch.promote_types(_accumulate_dtype(base.dtype), scale.dtype)
    rows = token_scales(scale, adapter_ids).to(acc)
    term = base.to(acc) * rows
    if bias is not None:
        term += bias.to(acc) * (1 - rows)
    return base.copy_(term) if in_place else term.to(base.dtype)


def _shrink(x: Tensor, proj_a: Tensor, dropout) -> Tensor:
    """h = dropout(x) Aᵀ, the dropped input made a row chunk at a time."""
    if dropout is None:
        return x @ proj_a.T
    h = x.new_empty(x.shape[0], proj_a.shape[0])
    for start, stop, chunk in dropped_chunks(x, dropout):
        torch.mm(chunk, proj_a.T, out=h[start:stop])
    return h


def _backward(grad, h, lambda_d, lambda_b, proj_a, proj_b, needed, dx_into=None):
    dx = dd = db = None
    scale_b, scale_d, scale_h = _fold_scales(h.dtype, lambda_b, lambda_d, h)
    if needed.lambda_d or needed.lambda_b:
        acc = _accumulate_dtype(h.dtype)
        # P ⊙ B with P = gradᵀ h: db_o = Σ_i (P⊙B)[o,i] d_i, dd_i = Σ_o (P⊙B)[o,i] b_o.
        # P is a sum of products of two small numbers: h at unit scale keeps
        # it out of float16's subnormal range.
        unit_h = h / scale_h if scale_h != 1.0 else h
        pb = (grad.T @ unit_h).to(acc) * (proj_b.to(acc) * scale_h)
        db = (pb @ lambda_d.to(acc)).to(lambda_b.dtype) if needed.lambda_b else None
        dd = (lambda_b.to(acc) @ pb).to(lambda_d.dtype) if needed.lambda_d else None
    if needed.x:
        u = grad @ _scaled(proj_b, lambda_b, None, (scale_b, 1.0))  # (tokens, r), / scale_b
        scaled_a = _scaled(proj_a, lambda_d, None, (scale_d, 1.0))
        if dx_into is not None:
            dx = dx_into.addmm_(u, scaled_a, alpha=scale_b * scale_d)
        else:
            dx = u @ scaled_a
            if scale_b * scale_d != 1.0:
                dx.mul_(scale_b * scale_d)
    return Grads(dx, dd, db)


# Adapter banks: each row's vectors differ, so nothing folds into the projections;
# the per-row vectors are gathered (tokens x r, tokens x out temporaries).

def _times_rows(t: Tensor, rows: Tensor) -> Tensor:
    """``t ⊙ rows`` rounded to t's dtype (the vectors may be wider, e.g. float32 under bf16)."""
    return (t * rows).to(t.dtype)


def _forward_rows(h, d_bank, b_bank, proj_b, base, into_base, adapter_ids):
    z = _times_rows(h, row_vectors(d_bank, adapter_ids)) @ proj_b.T
    b_rows = row_vectors(b_bank, adapter_ids).to(z.dtype)
    if base is None:
        return z.mul_(b_rows)
    return base.addcmul_(z, b_rows) if into_base else torch.addcmul(base, z, b_rows)


def _backward_rows(grad, h, d_bank, b_bank, proj_a, proj_b, needed, adapter_ids):
    n = d_bank.shape[0]
    dx = dd = db = None
    d_rows = row_vectors(d_bank, adapter_ids)
    if needed.x or needed.lambda_d:
        u = _times_rows(grad, row_vectors(b_bank, adapter_ids)) @ proj_b
        if needed.lambda_d:
            dd = per_adapter_sum(u * h, adapter_ids, n).to(d_bank.dtype)
        if needed.x:
            dx = _times_rows(u, d_rows) @ proj_a
    if needed.lambda_b:
        z = _times_rows(h, d_rows) @ proj_b.T
        db = per_adapter_sum(grad * z, adapter_ids, n).to(b_bank.dtype)
    return Grads(dx, dd, db)


BACKEND = TorchBackend()
