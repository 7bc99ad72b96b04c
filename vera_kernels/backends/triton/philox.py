"""The projection spec (docs/design.md) as a Triton tile generator, and a kernel that materializes it.

``projection_tile`` is what every fused kernel calls to get a block of A or B
in registers; ``generate_projection`` writes a whole matrix with it (the
per-launch workspace, and the bit-exactness tests).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import dropout
from ...projection import MATRICES, projection_bound


DROPOUT_STREAM: tl.constexpr = tl.constexpr(dropout.STREAM)


@triton.jit
def _philox_words(seed, row_start, first_group, STREAM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                  GROUPS: tl.constexpr):
    """Philox4x32-10 of the counters (first_group + g, row_start + t, STREAM, 0), keyed by
    the seed's two words, for a (BLOCK_ROWS, GROUPS) block of (t, g):
    ``words[t, g, i, j]`` = word 2i + j of call (t, g)."""
    rows = (row_start + tl.arange(0, BLOCK_ROWS)).to(tl.uint32)
    groups = (first_group + tl.arange(0, GROUPS)).to(tl.uint32)
    c0 = tl.broadcast_to(groups[None, :], (BLOCK_ROWS, GROUPS))
    c1 = tl.broadcast_to(rows[:, None], (BLOCK_ROWS, GROUPS))
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero + STREAM, zero)
    return tl.join(tl.join(w0, w2), tl.join(w1, w3))


@triton.jit
def projection_tile(
    seed,
    bound,
    row_start,
    col_start,
    STREAM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """float32 block ``[row_start : +BLOCK_ROWS, col_start : +BLOCK_COLS]`` of spec matrix STREAM.

    Args:
        seed: the 64-bit seed; ``tl.philox`` keys with (seed low word, seed high word).
        bound: float32(sqrt(6 / cols)) of the whole matrix, computed on the host.
        row_start, col_start: block origin; ``col_start`` must be a multiple of 4.
        STREAM: 0 for A, 1 for B (counter word c2).
        BLOCK_COLS: a multiple of 4; one Philox call yields four adjacent columns.

    Elements past the matrix edge are finite garbage: callers mask the other
    operand (or the store), never rely on zeros here.
    """
    # Column 4g + k takes word k.
    words = tl.reshape(_philox_words(seed, row_start, col_start // 4, STREAM, BLOCK_ROWS,
                                     BLOCK_COLS // 4), (BLOCK_ROWS, BLOCK_COLS))
    v = (words >> 8).to(tl.float32) * 1.1920928955078125e-07 - 1.0  # 2^-23; exact
    return v * bound


@triton.jit
def load_seed(seed_ptr):
    """The 64-bit seed whose key words (int64, low 32 bits used) are at ``seed_ptr[0:2]``.

    A dropout seed lives in device memory (drawn on the device, possibly
    inside a CUDA graph): it is read here, not passed by value.
    """
    key0 = tl.load(seed_ptr).to(tl.uint32).to(tl.uint64)
    key1 = tl.load(seed_ptr + 1).to(tl.uint32).to(tl.uint64)
    return key0 | (key1 << 32)


@triton.jit
def dropout_scale_tile(seed, threshold, scale, row_start, col_start, BLOCK_ROWS: tl.constexpr,
                       BLOCK_COLS: tl.constexpr):
    """float32 ``keep · scale`` for token rows ``[row_start, +BLOCK_ROWS)`` x features
    ``[col_start, +BLOCK_COLS)`` of the dropout stream (vera_kernels/dropout.py).

    ``seed``: the call's 64-bit seed (``load_seed``). ``col_start`` must be a
    multiple of 8: one Philox call yields eight 16-bit draws.
    """
    # [..., h] = the low / high half of each word: feature 8g + 2·word + h.
    words = _philox_words(seed, row_start, col_start // 8, DROPOUT_STREAM, BLOCK_ROWS,
                          BLOCK_COLS // 8)
    draws = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (BLOCK_ROWS, BLOCK_COLS))
    return tl.where(draws >= threshold, scale, 0.0)


@triton.jit(do_not_specialize=["seed", "row0", "col0"])
def _generate_kernel(
    out_ptr,
    stride_row,
    stride_col,
    n_rows,
    n_cols,
    seed,
    bound,
    row0,
    col0,
    STREAM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Write the block at (row0, col0) (col0 a multiple of 4) of spec matrix STREAM
    (n_rows x n_cols) into ``out_ptr``, rounded to its dtype."""
    row_start = tl.program_id(0) * BLOCK_ROWS
    col_start = tl.program_id(1) * BLOCK_COLS
    tile = projection_tile(seed, bound, row0 + row_start, col0 + col_start, STREAM, BLOCK_ROWS,
                           BLOCK_COLS)
    rows = row_start + tl.arange(0, BLOCK_ROWS)
    cols = col_start + tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    ptrs = (out_ptr + rows[:, None].to(tl.int64) * stride_row
            + cols[None, :].to(tl.int64) * stride_col)
    tl.store(ptrs, tile.to(out_ptr.dtype.element_ty), mask=mask)


def generate_projection(
    matrix: str, rows: int, cols: int, seed: int, *, dtype: torch.dtype, device,
    row_offset: int = 0, col_offset: int = 0, fan: Optional[int] = None,
) -> torch.Tensor:
    """``vk.projection`` (with its block arguments) computed by the Triton tile generator
    (bit-identical by the spec)."""
    # The generator starts on a multiple of 4 columns: a block that does not is
    # cut from a slightly wider one (a strided view).
    lead = col_offset % 4
    out = torch.empty(rows, cols + lead, dtype=dtype, device=device)
    block_rows, block_cols = 32, 64
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols + lead, block_cols))
    _generate_kernel[grid](
        out, out.stride(0), out.stride(1), rows, cols + lead, seed,
        projection_bound(fan or cols), row_offset, col_offset - lead,
        STREAM=MATRICES[matrix], BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
    )
    return out[:, lead:] if lead else out
