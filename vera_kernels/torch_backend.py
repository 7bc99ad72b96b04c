"""The ``torch`` backend: plain PyTorch, runs on any device, still lean.

* A and B come from an LRU cache per (seed, shape, dtype, device) instead of
  being regenerated per call.
* No tokens x out temporary besides the output: the vectors are folded into
  the small projections (d and b into B's columns and rows for the forward,
  b into B and d into A for dx), and the base output is added by ``addmm``.
* Backward needs only ``h``: db and dd come from ``P = gradᵀ h`` (out x r).

Folding d into B rather than A keeps ``h = x Aᵀ`` itself available for dd,
so nothing has to be divided back out.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import Backend, register_backend
from .projection import cached_projection, join_key


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def _projections(key, in_features: int, out_features: int, r: int, like: Tensor, given):
    if given[0] is not None:
        return given
    seed = join_key(key)
    proj_a = cached_projection("A", r, in_features, seed, like.dtype, like.device)
    proj_b = cached_projection("B", out_features, r, seed, like.dtype, like.device)
    return proj_a, proj_b


def _scaled(matrix: Tensor, rows: Optional[Tensor], cols: Optional[Tensor]) -> Tensor:
    """``rows[:, None] * matrix * cols[None, :]`` in the accumulate dtype, rounded once."""
    acc = matrix.to(_accumulate_dtype(matrix.dtype))
    if rows is not None:
        acc = acc * rows.to(acc.dtype)[:, None]
    if cols is not None:
        acc = acc * cols.to(acc.dtype)
    return acc.to(matrix.dtype)


def forward(x: Tensor, lambda_d: Tensor, lambda_b: Tensor, key, base: Optional[Tensor], given,
            into_base: bool = False):
    proj_a, proj_b = _projections(key, x.shape[1], lambda_b.shape[0], lambda_d.shape[0], x, given)
    h = x @ proj_a.T
    w = _scaled(proj_b, lambda_b, lambda_d)  # (out, r): b_o * B[o, i] * d_i
    if base is None:
        y = h @ w.T
    elif into_base:
        y = base.addmm_(h, w.T)
    else:
        y = torch.addmm(base, h, w.T)
    return y, h


def backward(grad: Tensor, h: Tensor, lambda_d: Tensor, lambda_b: Tensor, key, in_features: int,
             given, need_dx: bool, need_dd: bool, need_db: bool):
    proj_a, proj_b = _projections(key, in_features, lambda_b.shape[0], lambda_d.shape[0], h, given)
    dx = dd = db = None
    if need_dd or need_db:
        acc = _accumulate_dtype(h.dtype)
        # P ⊙ B with P = gradᵀ h: db_o = Σ_i (P⊙B)[o,i] d_i, dd_i = Σ_o (P⊙B)[o,i] b_o
        pb = (grad.T @ h).to(acc) * proj_b.to(acc)
        db = (pb @ lambda_d.to(acc)).to(lambda_b.dtype) if need_db else None
        dd = (lambda_b.to(acc) @ pb).to(lambda_d.dtype) if need_dd else None
    if need_dx:
        u = grad @ _scaled(proj_b, lambda_b, None)  # (tokens, r)
        dx = u @ _scaled(proj_a, lambda_d, None)
    return dx, dd, db


register_backend(
    Backend(
        name="torch",
        forward=forward,
        backward=backward,
        unavailable_on=lambda device: None,
        priority=100,
    )
)
