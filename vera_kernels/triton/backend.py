"""The ``triton`` backend: composes the fused kernels into VeRA's forward and backward.

forward:  h = shrink(x, Aᵀ)                      (saved for backward)
          y = expand(h ⊙ d, Bᵀ) ⊙ b + base
backward: u, dd = shrink(g ⊙ b, B), Σ u ⊙ h       (only if dx or dd is needed)
          dx = expand(u ⊙ d, A)
          db = Σ_tokens g ⊙ expand(h ⊙ d, Bᵀ)      (z never stored)

Which projection strategy a launch uses: ``vera_kernels.strategy``.
"""

import torch

from .. import strategy
from ..projection import MATRICES, projection_bound
from . import kernels
from .philox import generate_projection


def strategy_for(tokens: int) -> str:
    """``"generate"`` or ``"workspace"`` for a launch over ``tokens`` rows."""
    return strategy.strategy_for(tokens, kernels.BLOCK_M)


def _projection(matrix: str, rows: int, cols: int, key, like: torch.Tensor, strategy: str, given):
    seed = key[0] | (key[1] << 32)
    workspace = given  # explicit projections: tiles are loaded from them
    if workspace is None and strategy == "workspace":
        workspace = generate_projection(matrix, rows, cols, seed, dtype=like.dtype, device=like.device)
    return kernels.Projection(MATRICES[matrix], rows, cols, seed, projection_bound(cols), workspace)


def forward(x, lambda_d, lambda_b, key, base, explicit):
    strategy = strategy_for(x.shape[0])
    r, in_features, out_features = lambda_d.shape[0], x.shape[1], lambda_b.shape[0]
    given_a, given_b = explicit if explicit is not None else (None, None)
    proj_a = _projection("A", r, in_features, key, x, strategy, given_a)
    proj_b = _projection("B", out_features, r, key, x, strategy, given_b)
    h, _ = kernels.shrink(x, proj_a, stored_kr=False)
    y = kernels.expand(h, lambda_d, proj_b, stored_rn=False, base=base, col_scale=lambda_b)
    return y, h


def backward(grad, h, lambda_d, lambda_b, key, in_features, explicit, need_dx, need_dd, need_db):
    strategy = strategy_for(h.shape[0])
    r, out_features = lambda_d.shape[0], lambda_b.shape[0]
    given_a, given_b = explicit if explicit is not None else (None, None)
    proj_b = _projection("B", out_features, r, key, h, strategy, given_b)
    dx = dd = db = None
    if need_dx or need_dd:
        u, dd_partial = kernels.shrink(
            grad, proj_b, stored_kr=True, x_scale=lambda_b, h_for_dd=h if need_dd else None
        )
        if need_dd:
            dd = dd_partial.sum(0).to(lambda_d.dtype)
        if need_dx:
            proj_a = _projection("A", r, in_features, key, h, strategy, given_a)
            dx = kernels.expand(u, lambda_d, proj_a, stored_rn=True)
    if need_db:
        db = kernels.expand(h, lambda_d, proj_b, stored_rn=False, reduce_with=grad)
        db = db.sum(0).to(lambda_b.dtype)
    return dx, dd, db
