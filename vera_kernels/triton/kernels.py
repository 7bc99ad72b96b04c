"""The two fused kernel shapes VeRA needs, with their launchers.

Every product in VeRA's forward and backward is one of two shapes (the names
follow vLLM's LoRA kernels):

* **shrink**: ``out (M x R) = x (M x K) @ Q (K x R)``, a wide contraction into
  the rank-r bottleneck. Forward ``h = x Aᵀ`` (Q = Aᵀ) and backward
  ``u = g (b ⊙ B)`` (Q = B with rows scaled by b, applied to g's columns), the
  latter with an epilogue that also reduces ``dd = Σ_tokens u ⊙ h``.
* **expand**: ``out (M x N) = (v ⊙ d) (M x R) @ P (R x N)``, from the
  bottleneck back out. Forward ``y = base + b ⊙ ((d ⊙ h) Bᵀ)`` (P = Bᵀ) and
  backward ``dx = (d ⊙ u) A`` (P = A), or with an epilogue that reduces
  ``db = Σ_tokens g ⊙ z`` instead of storing ``z = (d ⊙ h) Bᵀ``.

So no tokens x out tensor is ever written besides y: z is recomputed tile by
tile and consumed in registers.

Where Q and P come from (``GENERATE``)
--------------------------------------
Philox4x32-10 costs ~25 integer ops per generated element (DESIGN.md §5).
A program that owns BLOCK_M token rows generates each projection tile once and
reuses it for those BLOCK_M rows, so generation costs
``25 · R · (K + N) · M / BLOCK_M`` integer ops against
``2 · M · R · (K + N)`` tensor-core flops and ``M · (K + 2N)`` elements of
memory traffic. On an H200 (~16 T int op/s, ~4.8 TB/s) generation outweighs the
memory time by about ``3.75 · R / BLOCK_M``: cheap for a few token tiles,
dominant for thousands of tokens at r = 256.

Hence two strategies, chosen per launch by the caller (``backend.py``):

* ``GENERATE=True``: tiles generated in registers from the seed; reuse factor
  = BLOCK_M rows (a meta-parameter). No projection ever touches memory. Best
  when tokens are few (decoding, small batches).
* ``GENERATE=False``: the same tile generator first writes A and B once per
  launch into a small workspace (r · (in + out) elements, L2-resident), and
  the kernels load tiles from it; reuse factor = all tokens of the launch.
  The same path serves explicitly given projections (e.g. PEFT's stored ones).

Token reductions (dd, db) are deterministic: each program writes its own
fp32 partial row, summed afterwards in a fixed order; no atomics.
"""

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .philox import projection_tile

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

_TORCH_TO_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _fetch_tile(
    proj_ptr,
    stride_row,
    stride_col,
    n_rows,
    n_cols,
    seed,
    bound,
    row_start,
    col_start,
    STREAM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    GENERATE: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Block of projection STREAM in DTYPE: generated from the seed, or loaded from proj_ptr."""
    if GENERATE:
        tile = projection_tile(seed, bound, row_start, col_start, STREAM, BLOCK_ROWS, BLOCK_COLS)
        tile = tile.to(DTYPE)
    else:
        rows = row_start + tl.arange(0, BLOCK_ROWS)
        cols = col_start + tl.arange(0, BLOCK_COLS)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        ptrs = proj_ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col
        tile = tl.load(ptrs, mask=mask, other=0.0).to(DTYPE)
    return tile


@triton.jit(do_not_specialize=["seed"])
def _shrink_kernel(
    # out = x @ Q, Q (K x R) a projection or its transpose
    x_ptr, stride_xm, stride_xk,
    out_ptr, stride_om, stride_or,
    # projection workspace when not GENERATE; stored as (R, K) or (K, R), see Q_IS_STORED_KR
    proj_ptr, stride_pr, stride_pc,
    # b (K,): scales x's columns (u = (g ⊙ b) B) when SCALE_X
    x_scale_ptr,
    # dd epilogue: partial[pid_m, :] = Σ_rows out ⊙ h
    h_ptr, stride_hm, stride_hr, partial_ptr,
    M, K, R,
    M_BUCKET,  # next power of two of M: the autotuning key, unused otherwise
    seed, bound,
    STREAM: tl.constexpr,
    Q_IS_STORED_KR: tl.constexpr,  # projection is (K x R) as stored (B for u); else (R x K) (A for h)
    SCALE_X: tl.constexpr,
    REDUCE_WITH_H: tl.constexpr,
    GENERATE: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # token rows sharing each generated tile: the reuse factor
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if SCALE_X:
            scale = tl.load(x_scale_ptr + offs_k, mask=mask_k, other=0.0)
            x = (x.to(ACC_DTYPE) * scale.to(ACC_DTYPE)[None, :]).to(DTYPE)
        if Q_IS_STORED_KR:
            q = _fetch_tile(proj_ptr, stride_pr, stride_pc, K, R, seed, bound, k_start,
                            pid_r * BLOCK_R, STREAM, BLOCK_K, BLOCK_R, GENERATE, DTYPE)
        else:
            q = tl.trans(_fetch_tile(proj_ptr, stride_pr, stride_pc, R, K, seed, bound,
                                     pid_r * BLOCK_R, k_start, STREAM, BLOCK_R, BLOCK_K,
                                     GENERATE, DTYPE))
        acc = tl.dot(x.to(DTYPE), q, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    mask = mask_m[:, None] & (offs_r[None, :] < R)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or,
             acc.to(DTYPE), mask=mask)
    if REDUCE_WITH_H:
        h = tl.load(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                    mask=mask, other=0.0)
        partial = tl.sum(acc * h.to(ACC_DTYPE), axis=0)
        tl.store(partial_ptr + pid_m * R + offs_r, partial, mask=offs_r < R)


@triton.jit(do_not_specialize=["seed"])
def _expand_kernel(
    # out = ((v ⊙ d) @ P) ⊙ col_scale + base, P (R x N) a projection or its transpose
    v_ptr, stride_vm, stride_vr,
    d_ptr,
    out_ptr, stride_om, stride_on,
    base_ptr, stride_bm, stride_bn,
    col_scale_ptr,
    # db epilogue: partial[pid_m, :] = Σ_rows g ⊙ ((v ⊙ d) @ P), nothing stored to out
    g_ptr, stride_gm, stride_gn, partial_ptr,
    # projection workspace when not GENERATE; stored as (R, N) or (N, R), see P_IS_STORED_RN
    proj_ptr, stride_pr, stride_pc,
    M, N, R,
    M_BUCKET,  # next power of two of M: the autotuning key, unused otherwise
    seed, bound,
    STREAM: tl.constexpr,
    P_IS_STORED_RN: tl.constexpr,  # projection is (R x N) as stored (A for dx); else (N x R) (B for y)
    HAS_BASE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    REDUCE_WITH_G: tl.constexpr,
    GENERATE: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # token rows sharing each generated tile: the reuse factor
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for r_start in range(0, R, BLOCK_R):
        offs_r = r_start + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        v = tl.load(v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        d = tl.load(d_ptr + offs_r, mask=mask_r, other=0.0)
        vd = (v.to(ACC_DTYPE) * d.to(ACC_DTYPE)[None, :]).to(DTYPE)
        if P_IS_STORED_RN:
            p = _fetch_tile(proj_ptr, stride_pr, stride_pc, R, N, seed, bound, r_start,
                            pid_n * BLOCK_N, STREAM, BLOCK_R, BLOCK_N, GENERATE, DTYPE)
        else:
            p = tl.trans(_fetch_tile(proj_ptr, stride_pr, stride_pc, N, R, seed, bound,
                                     pid_n * BLOCK_N, r_start, STREAM, BLOCK_N, BLOCK_R,
                                     GENERATE, DTYPE))
        acc = tl.dot(vd, p, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    mask = mask_m[:, None] & mask_n[None, :]
    if REDUCE_WITH_G:
        g = tl.load(g_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask, other=0.0)
        partial = tl.sum(acc * g.to(ACC_DTYPE), axis=0)
        tl.store(partial_ptr + pid_m * N + offs_n, partial, mask=mask_n)
    else:
        if HAS_COL_SCALE:
            scale = tl.load(col_scale_ptr + offs_n, mask=mask_n, other=0.0)
            acc = acc * scale.to(ACC_DTYPE)[None, :]
        if HAS_BASE:
            base = tl.load(base_ptr + rows[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                           mask=mask, other=0.0)
            acc = acc + base.to(ACC_DTYPE)
        tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(DTYPE), mask=mask)


# ----------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------

# The reduction partials have one row per BLOCK_M tile, so BLOCK_M is chosen
# by the launcher (not autotuned) and the buffers can be sized before launch.
BLOCK_M = 16 if INTERPRETING else 64


def _configs(second: str, third: str):
    if INTERPRETING:  # autotune cannot run in the interpreter; small blocks keep it fast
        return [triton.Config({second: 16, third: 16}, num_warps=1)]
    return [
        triton.Config({second: s, third: t}, num_warps=w, num_stages=st)
        for s, t, w, st in [
            (64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3),
            (32, 64, 4, 4), (256, 32, 8, 3), (64, 128, 8, 3),
        ]
    ]


def _autotuned(kernel, second: str, third: str, flags: list):
    if INTERPRETING:
        return kernel
    # M enters the key only through its power-of-two bucket, so a new token
    # count does not retune. Tensor dtypes join the key automatically.
    key = ["M_BUCKET", "R", *flags]
    return triton.autotune(_configs(second, third), key=key)(kernel)


_shrink = _autotuned(
    _shrink_kernel, "BLOCK_K", "BLOCK_R", ["K", "Q_IS_STORED_KR", "SCALE_X", "REDUCE_WITH_H", "GENERATE"]
)
_expand = _autotuned(
    _expand_kernel, "BLOCK_N", "BLOCK_R",
    ["N", "P_IS_STORED_RN", "HAS_BASE", "HAS_COL_SCALE", "REDUCE_WITH_G", "GENERATE"],
)


@dataclass(frozen=True)
class Projection:
    """Where a kernel takes one spec matrix from.

    Attributes:
        stream: 0 for A, 1 for B.
        rows, cols: its shape (A: r x in, B: out x r).
        seed, bound: what the tile generator needs.
        workspace: the matrix materialized in the compute dtype, to load tiles
            from; ``None`` generates them in registers.
    """

    stream: int
    rows: int
    cols: int
    seed: int
    bound: float
    workspace: Optional[torch.Tensor] = None


def _meta(dtype: torch.dtype) -> dict:
    return dict(
        DTYPE=_TORCH_TO_TL[dtype],
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        INPUT_PRECISION=_input_precision(dtype),
    )


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul precision setting, like torch.mm does.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _source_args(proj: Projection, like: torch.Tensor) -> tuple:
    ws = proj.workspace
    if ws is None:  # pointer unused when generating
        return (like, 0, 0)
    return (ws, ws.stride(0), ws.stride(1))


def _fixed_blocks(*names: str) -> dict:
    # Interpreter runs are not autotuned: small fixed blocks keep them fast.
    return {name: 16 for name in names} if INTERPRETING else {}


def _partial_buffer(m: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.empty(triton.cdiv(m, BLOCK_M), width, dtype=acc, device=device)


def shrink(
    x: torch.Tensor,
    proj: Projection,
    *,
    stored_kr: bool,
    x_scale: Optional[torch.Tensor] = None,
    h_for_dd: Optional[torch.Tensor] = None,
):
    """``x (M x K) @ Q`` with Q = proj (``stored_kr``, proj is K x R) or projᵀ (proj is R x K).

    ``x_scale`` (K,) scales x's columns first. With ``h_for_dd`` (M x R) also
    returns per-tile partial sums of ``out ⊙ h`` over rows (sum them over dim 0).
    Returns ``(out, partials or None)``; out has x's dtype.
    """
    m, k = x.shape
    r = proj.cols if stored_kr else proj.rows
    out = torch.empty(m, r, dtype=x.dtype, device=x.device)
    partial = _partial_buffer(m, r, x.dtype, x.device) if h_for_dd is not None else None
    h = h_for_dd if h_for_dd is not None else out
    grid = lambda meta: (triton.cdiv(m, BLOCK_M), triton.cdiv(r, meta["BLOCK_R"]))  # noqa: E731
    _shrink[grid](
        x, x.stride(0), x.stride(1),
        out, out.stride(0), out.stride(1),
        *_source_args(proj, x),
        x_scale if x_scale is not None else x,
        h, h.stride(0), h.stride(1), partial if partial is not None else out,
        m, k, r, triton.next_power_of_2(m), proj.seed, proj.bound,
        STREAM=proj.stream, Q_IS_STORED_KR=stored_kr, SCALE_X=x_scale is not None,
        REDUCE_WITH_H=h_for_dd is not None, GENERATE=proj.workspace is None,
        BLOCK_M=BLOCK_M, **_meta(x.dtype), **_fixed_blocks("BLOCK_K", "BLOCK_R"),
    )
    return out, partial


def expand(
    v: torch.Tensor,
    d: torch.Tensor,
    proj: Projection,
    *,
    stored_rn: bool,
    base: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    reduce_with: Optional[torch.Tensor] = None,
):
    """``((v ⊙ d) (M x R) @ P) ⊙ col_scale + base`` with P = proj (``stored_rn``) or projᵀ.

    With ``reduce_with`` (g, M x N) nothing is stored; returns per-tile partial
    sums of ``g ⊙ ((v ⊙ d) @ P)`` over rows instead (sum them over dim 0).
    """
    m, r = v.shape
    n = proj.cols if stored_rn else proj.rows
    if reduce_with is not None:
        out = _partial_buffer(m, n, v.dtype, v.device)
        g = reduce_with
    else:
        out = torch.empty(m, n, dtype=v.dtype, device=v.device)
        g = out
    base_t = base if base is not None else out
    grid = lambda meta: (triton.cdiv(m, BLOCK_M), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _expand[grid](
        v, v.stride(0), v.stride(1),
        d,
        out, out.stride(0), out.stride(1),
        base_t, base_t.stride(0), base_t.stride(1),
        col_scale if col_scale is not None else d,
        g, g.stride(0), g.stride(1), out,
        *_source_args(proj, v),
        m, n, r, triton.next_power_of_2(m), proj.seed, proj.bound,
        STREAM=proj.stream, P_IS_STORED_RN=stored_rn, HAS_BASE=base is not None,
        HAS_COL_SCALE=col_scale is not None, REDUCE_WITH_G=reduce_with is not None,
        GENERATE=proj.workspace is None,
        BLOCK_M=BLOCK_M, **_meta(v.dtype), **_fixed_blocks("BLOCK_N", "BLOCK_R"),
    )
    return out
