"""The ``triton`` backend: composes the fused kernels into VeRA's forward and backward.

forward:  h = x Aᵀ                              (saved for backward)
          y = ((d ⊙ h) Bᵀ) ⊙ b + base
backward: u = (b ⊙ g) B, dd = Σ_tokens u ⊙ h      (only if dx or dd is needed)
          dx = (d ⊙ u) A
          db = Σ_tokens g ⊙ ((d ⊙ h) Bᵀ)          (z never stored)

Which projection strategy a launch uses: ``vera_kernels.strategy``.
"""

import torch

from .. import strategy
from ..projection import MATRICES, join_key, projection_bound
from . import kernels
from .philox import generate_projection


def strategy_for(tokens: int) -> str:
    """``"generate"`` or ``"workspace"`` for a launch over ``tokens`` rows."""
    return strategy.strategy_for(tokens, kernels.BLOCK_M)


def _projection(matrix: str, rows: int, cols: int, key, like: torch.Tensor, mode: str, given):
    seed = join_key(key)
    workspace = given  # explicit projections: tiles are loaded from them
    if workspace is None and mode == "workspace":
        workspace = generate_projection(matrix, rows, cols, seed, dtype=like.dtype, device=like.device)
    return kernels.Projection(MATRICES[matrix], rows, cols, seed, projection_bound(cols), workspace)


def forward(x, lambda_d, lambda_b, key, base, given, into_base=False):
    mode = strategy_for(x.shape[0])
    r, in_features, out_features = lambda_d.shape[0], x.shape[1], lambda_b.shape[0]
    given_a, given_b = given
    proj_a = _projection("A", r, in_features, key, x, mode, given_a)
    proj_b = _projection("B", out_features, r, key, x, mode, given_b)
    h = kernels.gemm(x, proj_a, transposed=True)
    y = kernels.gemm(h, proj_b, transposed=True, x_scale=lambda_d, out_scale=lambda_b, base=base,
                     out=base if into_base else None)
    return y, h


def backward(grad, h, lambda_d, lambda_b, key, in_features, given, need_dx, need_dd, need_db):
    mode = strategy_for(h.shape[0])
    r, out_features = lambda_d.shape[0], lambda_b.shape[0]
    given_a, given_b = given
    proj_b = _projection("B", out_features, r, key, h, mode, given_b)
    dx = dd = db = None
    if need_dx or need_dd:
        result = kernels.gemm(grad, proj_b, transposed=False, x_scale=lambda_b,
                              reduce_with=h if need_dd else None)
        u, dd_partial = result if need_dd else (result, None)
        if need_dd:
            dd = dd_partial.sum(0).to(lambda_d.dtype)
        if need_dx:
            proj_a = _projection("A", r, in_features, key, h, mode, given_a)
            dx = kernels.gemm(u, proj_a, transposed=False, x_scale=lambda_d)
    if need_db:
        db_partial = kernels.gemm(h, proj_b, transposed=True, x_scale=lambda_d,
                                  reduce_with=grad, store=False)
        db = db_partial.sum(0).to(lambda_b.dtype)
    return dx, dd, db
