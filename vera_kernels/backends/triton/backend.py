"""The ``triton`` backend's forward and backward, composed from launches of the fused kernel.

forward:  h = x Aᵀ                              (saved for backward)
          y = ((d ⊙ h) Bᵀ) ⊙ b + base    (DVoRA: s ⊙ (base - bias) + bias)
backward: u = (b ⊙ g) B, dd = Σ_tokens u ⊙ h      (only if dx or dd is needed)
          dx = (d ⊙ u) A
          db = Σ_tokens g ⊙ ((d ⊙ h) Bᵀ)          (z never stored)

Which projection strategy a launch uses: ``backends/strategy.py``.
"""

from ...projection import MATRICES, projection_bound
from ..banks import per_adapter_sum
from ..contract import Grads
from . import kernels
from .philox import generate_projection


def _projection(matrix: str, rows: int, cols: int, source, like, generate: bool):
    """The kernels' view of spec matrix ``matrix`` (the source's shard of it): generated, or
    loaded from a workspace."""
    if source.is_explicit:
        workspace = source.a if matrix == "A" else source.b
        return kernels.Projection(MATRICES[matrix], rows, cols, 0, 1.0, workspace)
    row_offset, col_offset, fan = source.shard.block(matrix, rows, cols)
    workspace = None
    # The tile generator fills four columns per Philox call from a multiple of 4.
    if not generate or col_offset % 4:
        workspace = generate_projection(matrix, rows, cols, source.seed, dtype=like.dtype,
                                        device=like.device, row_offset=row_offset,
                                        col_offset=col_offset, fan=fan)
    return kernels.Projection(MATRICES[matrix], rows, cols, source.seed, projection_bound(fan),
                              workspace, row_offset, col_offset)


def forward(backend, x, lambda_d, lambda_b, source, base, into_base, adapter_ids=None,
            dropout=None, base_scale=None, base_bias=None):
    generate = backend.generates(x.shape[0])
    r, in_features, out_features = lambda_d.shape[-1], x.shape[1], lambda_b.shape[-1]
    proj_a = _projection("A", r, in_features, source, x, generate)
    proj_b = _projection("B", out_features, r, source, x, generate)
    # h is shared by every adapter of a bank; dropout masks x's tiles as they load.
    h = kernels.gemm(x, proj_a, transposed=True, dropout=dropout, dropout_on="x").out
    y = kernels.gemm(h, proj_b, transposed=True, x_scale=lambda_d, out_scale=lambda_b, base=base,
                     base_scale=base_scale, base_bias=base_bias,
                     out=base if into_base else None, row_ids=adapter_ids).out
    return y, h


def backward(backend, grad, h, lambda_d, lambda_b, source, in_features, needed, adapter_ids=None,
             dropout=None, dx_into=None):
    generate = backend.generates(h.shape[0])
    r, out_features = lambda_d.shape[-1], lambda_b.shape[-1]
    proj_b = _projection("B", out_features, r, source, h, generate)
    banked = adapter_ids is not None
    dx = dd = db = None
    if needed.x or needed.lambda_d:
        # One adapter: dd is a reducing epilogue. A bank: per-adapter sums of u ⊙ h.
        u, dd_partials = kernels.gemm(grad, proj_b, transposed=False, x_scale=lambda_b,
                                      reduce_with=h if needed.lambda_d and not banked else None,
                                      row_ids=adapter_ids)
        if needed.lambda_d:
            dd = (per_adapter_sum(u * h, adapter_ids, lambda_d.shape[0]) if banked
                  else dd_partials.sum(0)).to(lambda_d.dtype)
        if needed.x:
            proj_a = _projection("A", r, in_features, source, h, generate)
            # Into dx_into: its tile is read and written by the same program.
            dx = kernels.gemm(u, proj_a, transposed=False, x_scale=lambda_d, row_ids=adapter_ids,
                              dropout=dropout, dropout_on="out", base=dx_into, out=dx_into).out
    if needed.lambda_b and banked:
        # z = (d ⊙ h) Bᵀ is stored here (a tokens x out transient) to be summed per adapter.
        z = kernels.gemm(h, proj_b, transposed=True, x_scale=lambda_d, row_ids=adapter_ids).out
        db = per_adapter_sum(grad * z, adapter_ids, lambda_b.shape[0]).to(lambda_b.dtype)
    elif needed.lambda_b:
        db_partials = kernels.gemm(h, proj_b, transposed=True, x_scale=lambda_d,
                                   reduce_with=grad, store=False).partials
        db = db_partials.sum(0).to(lambda_b.dtype)
    return Grads(dx, dd, db)
