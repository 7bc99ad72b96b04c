"""The fused kernel behind every VeRA product, and its launcher.

All five products of VeRA's forward and backward are one shape,
``acc (M x N) = (x ⊙ x_scale) (M x K) @ T (K x N)`` with T a spec projection or
its transpose, followed by one of three epilogues:

    forward   h  = x Aᵀ                    "shrink" into the rank-r bottleneck
              y  = ((d ⊙ h) Bᵀ) ⊙ b + base  "expand" back out
    backward  u  = (b ⊙ g) B,  dd = Σ_tokens u ⊙ h    (store + reduce)
              dx = (d ⊙ u) A
              db = Σ_tokens g ⊙ ((d ⊙ h) Bᵀ)          (reduce only)

(shrink / expand are vLLM's LoRA kernel names for the two directions.) So no
tokens x out tensor is ever written besides y: z = (d ⊙ h) Bᵀ is recomputed
tile by tile and consumed in registers. csrc/vera_kernels.cu is the same
kernel in CUDA C++.

Where T comes from (``GENERATE``)
---------------------------------
Philox4x32-10 costs ~25 integer ops per generated element (docs/design.md, cost model).
A program that owns BLOCK_M token rows generates each projection tile once and
reuses it for those BLOCK_M rows, so generation costs
``25 · R · (K + N) · M / BLOCK_M`` integer ops against
``2 · M · R · (K + N)`` tensor-core flops and ``M · (K + 2N)`` elements of
memory traffic. On an H200 (~16 T int op/s, ~4.8 TB/s) in bf16, generation
outweighs the memory time by ``3.75 · R / BLOCK_M · (K + N) / (K + 2N)``
(``2.5 · R / BLOCK_M`` for a square layer): cheap for a few token tiles,
dominant for thousands of tokens at r = 256.

Hence two strategies, chosen per launch by the caller (``backend.py``):

* ``GENERATE=True``: tiles generated in registers from the seed; reuse factor
  = BLOCK_M rows (64 or 128, autotuned). No projection ever
  touches memory. Best when tokens are few (decoding, small batches).
* ``GENERATE=False``: the same tile generator first writes A and B once per
  launch into a small workspace (r · (in + out) elements, L2-resident), and
  the kernel loads tiles from it; reuse factor = all tokens of the launch.
  The same path serves explicitly given projections (e.g. PEFT's stored ones).
  (``backends/strategy.py`` picks per launch.)

Which tensor-core instruction
-----------------------------
On Hopper, Triton issues ``tl.dot`` as ``wgmma`` and keeps one in flight while
the next tiles load, but only when both operands stream from memory into its
multi-buffered shared memory. When an operand is computed in the loop
(``has_computed_operand``: a generated projection tile, x under a dropout
mask or scaled per row) it stages that operand through a single buffer and
waits for every wgmma before overwriting it: the tensor cores and the ALUs
take turns. Those loops are bound by the ALUs anyway (a generated element
costs ~25 integer ops and feeds only 2 · BLOCK_M flops), so on sm_90 they are
tuned over 2-warp tiles (``SYNC_MMA_TILES``): below a warpgroup Triton
issues ``mma.sync``, which takes its operands from registers, needs no
staging buffer and lets the next tile's integer work issue while it runs.
``scripts/compile_check.py`` checks both (no wgmma wait in any main loop
the autotuner can pick). On sm_80 every dot is ``mma.sync``.

Token reductions (dd, db) are deterministic: each program writes its own
fp32 partial row, summed afterwards in a fixed order; no atomics.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...dropout import DropoutMask
from .philox import dropout_scale_tile, projection_tile

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


# Epilogues (the EPILOGUE meta-parameter).
STORE: tl.constexpr = tl.constexpr(0)  # out = acc ⊙ out_scale + base (both optional)
STORE_AND_REDUCE: tl.constexpr = tl.constexpr(1)  # out = acc; partial[pid_m, :] = Σ_rows acc ⊙ aux
REDUCE: tl.constexpr = tl.constexpr(2)  # partial[pid_m, :] = Σ_rows acc ⊙ aux; nothing stored

# Adapter dropout (the DROPOUT meta-parameter): the mask multiplies x's tiles
# as they load (h = dropout(x) Aᵀ) or the output (dx of dropped inputs).
NO_DROPOUT: tl.constexpr = tl.constexpr(0)
DROP_X: tl.constexpr = tl.constexpr(1)
DROP_OUT: tl.constexpr = tl.constexpr(2)


@triton.jit(do_not_specialize=["seed", "drop_seed"])
def _vera_gemm_kernel(
    # acc = (x ⊙ x_scale) @ T, T (K x N): T(k, n) = P(n, k) if TRANSPOSED else P(k, n)
    x_ptr, stride_xm, stride_xk,
    # (K,) when SCALE_X; with ROW_IDS a bank (n_adapters, K), row ids[m] scaling row m
    x_scale_ptr, stride_sx,
    # projection P when not GENERATE (a workspace or explicit matrix)
    proj_ptr, stride_pr, stride_pc,
    out_ptr, stride_om, stride_on,
    out_scale_ptr, stride_so,  # (N,) when SCALE_OUT; with ROW_IDS a bank (n_adapters, N)
    ids_ptr,  # (M,) adapter id of each row when ROW_IDS; -1: no adapter (scales are 0)
    base_ptr, stride_bm, stride_bn,  # (M, N) when HAS_BASE
    aux_ptr, stride_am, stride_an, partial_ptr,  # reducing epilogues
    M, N, K,
    M_BUCKET,  # next power of two of M: the autotuning key, unused otherwise
    seed, bound,
    drop_seed, drop_threshold, drop_scale,  # the dropout stream, when DROPOUT
    STREAM: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    SCALE_X: tl.constexpr,
    SCALE_OUT: tl.constexpr,
    ROW_IDS: tl.constexpr,
    DROPOUT: tl.constexpr,  # NO_DROPOUT, DROP_X (x's columns are features) or DROP_OUT (out's are)
    HAS_BASE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    GENERATE: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # token rows sharing each generated tile: the reuse factor
    PARTIAL_ROWS: tl.constexpr,  # rows behind each partial-sum row (divides BLOCK_M)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    if ROW_IDS:  # the scales are gathered per row from the banks, inside the kernel
        ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
        has_adapter = ids >= 0
        bank_rows = tl.where(has_adapter, ids, 0).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT == DROP_X:  # regenerated, never stored
            keep = dropout_scale_tile(drop_seed, drop_threshold, drop_scale, pid_m * BLOCK_M,
                                      k_start, BLOCK_M, BLOCK_K)
            x = (x.to(ACC_DTYPE) * keep.to(ACC_DTYPE)).to(DTYPE)
        if SCALE_X and ROW_IDS:  # a scale per row: it can only go on x
            scale = tl.load(x_scale_ptr + bank_rows[:, None] * stride_sx + offs_k[None, :],
                            mask=has_adapter[:, None] & mask_k[None, :], other=0.0)
            x = (x.to(ACC_DTYPE) * scale.to(ACC_DTYPE)).to(DTYPE)
        if TRANSPOSED:
            t = tl.trans(_fetch_tile(proj_ptr, stride_pr, stride_pc, N, K, seed, bound,
                                     pid_n * BLOCK_N, k_start, STREAM, BLOCK_N, BLOCK_K,
                                     GENERATE, DTYPE))
        else:
            t = _fetch_tile(proj_ptr, stride_pr, stride_pc, K, N, seed, bound, k_start,
                            pid_n * BLOCK_N, STREAM, BLOCK_K, BLOCK_N, GENERATE, DTYPE)
        if SCALE_X and not ROW_IDS:
            # (x ⊙ s) T = x (diag(s) T): the scale goes on the generated tile,
            # which passes through registers anyway, so x streams to the
            # tensor cores untouched and the loop stays pipelined.
            scale = tl.load(x_scale_ptr + offs_k, mask=mask_k, other=0.0)
            t = (t.to(ACC_DTYPE) * scale.to(ACC_DTYPE)[:, None]).to(DTYPE)
        acc = tl.dot(x.to(DTYPE), t, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE != STORE:  # sum over this program's rows, PARTIAL_ROWS at a time
        aux = tl.load(aux_ptr + rows[:, None] * stride_am + offs_n[None, :] * stride_an,
                      mask=mask, other=0.0)
        GROUPS: tl.constexpr = BLOCK_M // PARTIAL_ROWS
        products = tl.reshape(acc * aux.to(ACC_DTYPE), (GROUPS, PARTIAL_ROWS, BLOCK_N))
        partial = tl.sum(products, axis=1)
        # The buffer has a row per PARTIAL_ROWS rows whatever BLOCK_M the
        # autotuner picked: every row is written once, summed in one order.
        groups = pid_m * GROUPS + tl.arange(0, GROUPS)
        tl.store(partial_ptr + groups[:, None] * N + offs_n[None, :], partial,
                 mask=(groups[:, None] * PARTIAL_ROWS < M) & mask_n[None, :])
    if EPILOGUE != REDUCE:
        if DROPOUT == DROP_OUT:
            keep = dropout_scale_tile(drop_seed, drop_threshold, drop_scale, pid_m * BLOCK_M,
                                      pid_n * BLOCK_N, BLOCK_M, BLOCK_N)
            acc = acc * keep.to(ACC_DTYPE)
        if SCALE_OUT:
            if ROW_IDS:
                scale = tl.load(out_scale_ptr + bank_rows[:, None] * stride_so + offs_n[None, :],
                                mask=has_adapter[:, None] & mask_n[None, :], other=0.0)
                acc = acc * scale.to(ACC_DTYPE)
            else:
                scale = tl.load(out_scale_ptr + offs_n, mask=mask_n, other=0.0)
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

# The smallest BLOCK_M: the reuse factor the projection strategy assumes, and
# the rows behind each row of the reduction partials, so their buffers can be
# sized before launch whatever BLOCK_M the autotuner picks.
MIN_BLOCK_M = 16 if INTERPRETING else 64

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Tensor-core dtypes (bf16,
# fp16, tf32) take the first list. Without tensor cores (fp32 at IEEE
# precision, fp64) tl.dot runs on FMA units, where big tiles only add
# registers and spill (the compile check measured it): those take small tiles.
TENSOR_CORE_TILES = [
    (64, 32, 64, 4, 3), (64, 32, 128, 4, 3), (64, 64, 64, 4, 3), (64, 64, 128, 8, 3),
    (64, 64, 32, 4, 4), (64, 128, 32, 8, 3), (64, 128, 64, 8, 3), (64, 256, 32, 8, 3),
    (128, 64, 64, 8, 3), (128, 128, 32, 8, 3),
]
FMA_TILES = [(64, 32, 32, 4, 2), (64, 64, 32, 8, 2), (64, 32, 16, 4, 2)]
# sm_90+: loops with a computed operand, on mma.sync (2 warps: no warpgroup for
# wgmma). Spill-free in every such launch (compile check); tf32 operands take
# twice the registers of 16-bit ones and only the first tile stays spill-free.
SYNC_MMA_TILES = [(64, 32, 32, 2, 3), (64, 64, 32, 2, 3), (128, 32, 32, 2, 3)]
# sm_8x, where mma.sync keeps both operands' fragments in registers: the tiles
# ptxas spills in some launch (8-112 B per thread; compile check, Triton 3.6
# and 3.8), never tuned there.
SM80_SPILLING_TILES = {(64, 256, 32, 8, 3), (64, 32, 128, 4, 3), (64, 32, 16, 4, 2)}


def _config(tile) -> "triton.Config":
    m, n, k, warps, stages = tile
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps,
                         num_stages=stages)


def _tile(config) -> tuple:
    kw = config.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages)


# Autotuning cannot run in the interpreter: one small tile keeps it fast.
INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def _configs():
    if INTERPRETING:
        return [triton.Config(dict(INTERPRETER_TILE), num_warps=1)]
    return [_config(tile) for tile in TENSOR_CORE_TILES + FMA_TILES + SYNC_MMA_TILES]


def pipeline_shared_bytes(config: triton.Config, element_bytes: int) -> int:
    """Shared memory the software pipeline needs: an x tile and a T tile per stage."""
    m, k, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"], config.kwargs["BLOCK_N"]
    return config.num_stages * (m * k + k * n) * element_bytes


def fitting_configs(configs: list, element_bytes: int, shared_limit: int) -> list:
    """The configs whose pipeline fits ``shared_limit`` bytes (the smallest one if none does)."""
    fits = [c for c in configs if pipeline_shared_bytes(c, element_bytes) <= shared_limit]
    return fits or [min(configs, key=lambda c: pipeline_shared_bytes(c, element_bytes))]


def uses_tensor_cores(dtype: torch.dtype, input_precision: str) -> bool:
    return dtype in (torch.float16, torch.bfloat16) or (
        dtype == torch.float32 and input_precision == "tf32")


def has_computed_operand(meta: dict) -> bool:
    """Whether a launch's main loop computes a dot operand in registers instead of
    loading it as is: a generated projection tile, x under a dropout mask, x
    scaled per row (adapter banks). ``meta``: the launch's meta-parameters."""
    return bool(meta["GENERATE"] or meta["DROPOUT"] == DROP_X.value
                or (meta["SCALE_X"] and meta["ROW_IDS"]))


def tiles_for(meta: dict, dtype: torch.dtype, capability: tuple) -> list:
    """The tiles a launch is tuned over on a device of compute ``capability``."""
    if not uses_tensor_cores(dtype, meta["INPUT_PRECISION"]):
        tiles = FMA_TILES
    elif capability[0] >= 9 and has_computed_operand(meta):
        tiles = SYNC_MMA_TILES[:1] if dtype == torch.float32 else SYNC_MMA_TILES
    else:
        tiles = TENSOR_CORE_TILES
    if capability[0] == 8:
        tiles = [t for t in tiles if t not in SM80_SPILLING_TILES]
    return tiles


def _prune(configs, named_args, **kwargs):
    # Never autotune what spills, waits on its wgmma or cannot launch: the
    # tiles of the launch's units, of those the ones that fit the device's
    # opt-in shared memory.
    x = named_args["x_ptr"]
    props = torch.cuda.get_device_properties(x.device)
    tiles = tiles_for(kwargs, x.dtype, (props.major, props.minor))
    configs = [c for c in configs if _tile(c) in tiles] or configs
    limit = getattr(props, "shared_memory_per_block_optin", 163 * 1024)  # older torch: sm_80's
    return fitting_configs(configs, x.element_size(), limit)


# M enters the autotuning key only through its power-of-two bucket, so a new
# token count does not retune. Tensor dtypes join the key automatically;
# INPUT_PRECISION decides the tiles (tensor cores or not). The
# tuner runs each config several times: restoring out_ptr keeps an in-place
# launch (out is base) from adding the adapter more than once.
_vera_gemm = _vera_gemm_kernel if INTERPRETING else triton.autotune(
    _configs(),
    key=["M_BUCKET", "N", "K", "TRANSPOSED", "SCALE_X", "SCALE_OUT", "ROW_IDS", "DROPOUT",
         "HAS_BASE", "EPILOGUE", "GENERATE", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["out_ptr"],
)(_vera_gemm_kernel)


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


class GemmResult(NamedTuple):
    """What a launch produced: the stored result and the per-row-tile partial sums (or None)."""

    out: Optional[torch.Tensor]
    partials: Optional[torch.Tensor]


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul precision setting, like torch.mm does.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _strides(t: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple:
    # Pointer and strides of an optional operand; unused ones point at dummy.
    return (t, t.stride(0), t.stride(1)) if t is not None else (dummy, 0, 0)


def _bank(t: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple:
    # A scale vector (row stride unused) or a bank of them; unused ones point at dummy.
    if t is None:
        return dummy, 0
    return t, t.stride(0) if t.dim() == 2 else 0


def _scaled_workspace(proj: Projection, scale: torch.Tensor, transposed: bool) -> Projection:
    """``proj`` with T's rows (the K dim) scaled: P's columns if transposed, else its rows."""
    ws = proj.workspace
    acc = torch.promote_types(ws.dtype, torch.float32)
    factor = scale.to(acc)[None, :] if transposed else scale.to(acc)[:, None]
    return dataclasses.replace(proj, workspace=(ws.to(acc) * factor).to(ws.dtype))


def gemm(
    x: torch.Tensor,
    proj: Projection,
    *,
    transposed: bool,
    x_scale: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
    base: Optional[torch.Tensor] = None,
    reduce_with: Optional[torch.Tensor] = None,
    store: bool = True,
    out: Optional[torch.Tensor] = None,
    row_ids: Optional[torch.Tensor] = None,
    dropout: Optional[DropoutMask] = None,
    dropout_on: str = "x",
):
    """``(x ⊙ x_scale) @ T`` with T = projᵀ (``transposed``) or proj, and its epilogue.

    Args:
        x: (M, K) in the compute dtype, any strides.
        x_scale: (K,) scaling x's columns, applied as ``x (diag(x_scale) T)``:
            to T's tiles in the kernel (generated) or to the workspace once
            per launch (loaded). out_scale: (N,) scaling the result's
            columns; base: (M, N) added to it.
        row_ids: (M,) int32 adapter ids: the scales are then banks
            (n_adapters, K) / (n_adapters, N) with contiguous rows, and row m
            takes bank row ``row_ids[m]`` (-1: zero scales, the adapter is off).
        dropout: the call's dropout mask (rows are tokens), applied to x's
            columns (``dropout_on="x"``) or to the result's (``"out"``).
        reduce_with: (M, N); also compute partial sums over each MIN_BLOCK_M
            rows of ``acc ⊙ reduce_with`` (sum them over dim 0).
        store: write the result (False only together with ``reduce_with``).
        out: (M, N) to write the result into (may be ``base`` itself: each
            element is read and written by the same program); new otherwise.

    Returns:
        ``GemmResult(out, partials)``: ``out`` None when not stored, ``partials``
        (one fp32 row per MIN_BLOCK_M rows; fp64 for fp64) None without ``reduce_with``.
    """
    m, k = x.shape
    n = proj.rows if transposed else proj.cols
    dtype = x.dtype
    if x_scale is not None and row_ids is None and proj.workspace is not None:
        # A loaded projection is scaled once per launch here instead of per
        # tile in the kernel, so both operands stream from memory untouched.
        proj = _scaled_workspace(proj, x_scale, transposed)
        x_scale = None
    if out is None and store:
        out = torch.empty(m, n, dtype=dtype, device=x.device)
    partial = None
    if reduce_with is not None:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        partial = torch.empty(triton.cdiv(m, MIN_BLOCK_M), n, dtype=acc, device=x.device)
    epilogue = STORE if reduce_with is None else (STORE_AND_REDUCE if store else REDUCE)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _vera_gemm[grid](
        x, x.stride(0), x.stride(1),
        *_bank(x_scale, x),
        *_strides(proj.workspace, x),
        *_strides(out, x),
        *_bank(out_scale, x),
        row_ids if row_ids is not None else x,
        *_strides(base, x),
        *_strides(reduce_with, x), partial if partial is not None else x,
        m, n, k, triton.next_power_of_2(m), proj.seed, proj.bound,
        *(dropout.seed, dropout.threshold, dropout.scale) if dropout is not None else (0, 0, 1.0),
        STREAM=proj.stream, TRANSPOSED=transposed, SCALE_X=x_scale is not None,
        SCALE_OUT=out_scale is not None, ROW_IDS=row_ids is not None,
        DROPOUT=(NO_DROPOUT if dropout is None else DROP_X if dropout_on == "x" else DROP_OUT).value,
        HAS_BASE=base is not None,
        EPILOGUE=epilogue.value,
        GENERATE=proj.workspace is None, DTYPE=_TORCH_TO_TL[dtype],
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        INPUT_PRECISION=_input_precision(dtype), PARTIAL_ROWS=MIN_BLOCK_M,
        **(INTERPRETER_TILE if INTERPRETING else {}),
    )
    return GemmResult(out if store else None, partial)
