"""The projection spec (docs/design.md) in plain PyTorch integer ops.

A and B are never stored: every backend regenerates them from the seed with
the counter-based Philox4x32-10 generator. Element (i, j) of matrix m takes
word ``j & 3`` of Philox4x32-10 with counter ``(j >> 2, i, m, 0)`` and key
``(seed & 0xFFFFFFFF, seed >> 32)``, maps it to ``float32(w >> 8) * 2^-23 - 1``
in [-1, 1) and scales it by ``float32(sqrt(6 / cols))``.

Everything here runs on int64 tensors (CPU or CUDA) so that no step overflows:
the 32 x 32 -> 64-bit products Philox needs are split into 16-bit halves.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Optional, Union

import torch

__all__ = [
    "MATRICES",
    "philox4x32_10",
    "check_seed",
    "split_seed",
    "join_key",
    "projection_bound",
    "projection",
    "cached_projection",
]

# Matrix name -> stream index (counter word c2). c2 >= 2 is reserved.
MATRICES = {"A": 0, "B": 1}

_MASK32 = 0xFFFFFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_PHILOX_ROUNDS = 10

# Temporaries per projection chunk are ~20 int64 tensors of this many
# elements (about 160 MiB at most), whatever the matrix size.
_CHUNK_GROUPS = 1 << 20

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _mulhilo(m: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product m * a, for a < 2^32."""
    p_lo = m * (a & 0xFFFF)  # < 2^48
    p_hi = m * (a >> 16)  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[Union[int, torch.Tensor], Union[int, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Random123) on int64 tensors holding uint32 values.

    ``counter`` is four broadcastable int64 tensors (c0, c1, c2, c3); ``key`` is
    two Python ints or int64 tensors (k0, k1), of which the low 32 bits count
    (tensors: a dropout seed read on its device, no host sync). Returns the
    four output words as int64 tensors.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for round_index in range(_PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def check_seed(seed) -> int:
    """``seed`` as a Python int in [0, 2**64); any integer type (numpy's too) is accepted."""
    if isinstance(seed, (bool, torch.Tensor)):
        raise TypeError(f"seed must be an int in [0, 2**64), got {type(seed).__name__}")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int in [0, 2**64), got {type(seed).__name__}") from None
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def split_seed(seed: int) -> tuple[int, int]:
    """Validate ``seed`` and return the Philox key ``(seed & 0xFFFFFFFF, seed >> 32)``."""
    seed = check_seed(seed)
    return seed & _MASK32, seed >> 32


def join_key(key: tuple[int, int]) -> int:
    """The seed back from its Philox key: the inverse of ``split_seed``."""
    return key[0] | (key[1] << 32)


def projection_bound(fan: int) -> float:
    """float32(sqrt(6 / fan)), computed in float64 and rounded once to float32."""
    return torch.tensor(math.sqrt(6.0 / fan), dtype=torch.float64).float().item()


def _matrix_index(matrix: str) -> int:
    if matrix not in MATRICES:
        raise ValueError(f"unknown matrix {matrix!r}: expected one of {sorted(MATRICES)}")
    return MATRICES[matrix]


def projection(
    matrix: str,
    rows: int,
    cols: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Materialize the frozen VeRA projection ``matrix`` exactly as the spec defines it.

    Args:
        matrix: ``"A"`` (shape r x in, fan = in) or ``"B"`` (shape out x r, fan = r).
        rows, cols: the shape; a smaller shape is the top-left block of a larger
            one's raw values (only the scale ``sqrt(6 / cols)`` differs).
        seed: an int in [0, 2**64).
        dtype: float32 values are rounded to nearest-even into ``dtype``.
        device: where to generate (the generation runs there).

    Returns:
        A new ``(rows, cols)`` tensor. Memory for temporaries stays bounded
        (about 160 MiB) whatever the size: rows are generated in chunks.
    """
    stream = _matrix_index(matrix)
    seed = check_seed(seed)
    key = split_seed(seed)
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    device = torch.device(device) if device is not None else torch.device("cpu")

    groups = (cols + 3) // 4  # one Philox call serves four columns
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    bound = projection_bound(cols)
    rows_per_chunk = max(1, _CHUNK_GROUPS // groups)
    c0 = torch.arange(groups, dtype=torch.int64, device=device)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        c1 = torch.arange(start, stop, dtype=torch.int64, device=device)[:, None]
        words = philox4x32_10((c0, c1, zero + stream, zero), key)
        # (chunk, groups, 4) -> (chunk, 4 * groups): word k serves column 4g + k.
        w = torch.stack(words, dim=-1).reshape(stop - start, 4 * groups)[:, :cols]
        v = (w >> 8).to(torch.float32) * 2.0**-23 - 1.0  # exact
        out[start:stop] = (v * bound).to(dtype)
    return out


@functools.lru_cache(maxsize=64)
def cached_projection(
    matrix: str, rows: int, cols: int, seed: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``projection`` memoized per (matrix, shape, seed, dtype, device), LRU-bounded.

    The result is shared: callers must not modify it.
    """
    with torch.no_grad():
        return projection(matrix, rows, cols, seed, dtype=dtype, device=device)
