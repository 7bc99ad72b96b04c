"""The projection spec (docs/design.md) in plain PyTorch integer ops.

A and B are never stored: every backend regenerates them from the seed with
the counter-based Philox4x32-10 generator. Element (i, j) of matrix m takes
word ``j & 3`` of Philox4x32-10 with counter ``(j >> 2, i, m, 0)`` and key
``(seed & 0xFFFFFFFF, seed >> 32)``, maps it to ``float32(w >> 8) * 2^-23 - 1``
in [-1, 1) and scales it by ``float32(sqrt(6 / cols))``.

A tensor-parallel shard of a layer regenerates exactly its block of the full
layer's A and B (:class:`ProjectionShard`): the counters are the full matrix's
indices and A's bound keeps the full ``in``.

Everything here runs on int64 tensors (CPU or CUDA) so that no step overflows:
the 32 x 32 -> 64-bit products Philox needs are split into 16-bit halves.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = [
    "MATRICES",
    "philox4x32_10",
    "check_seed",
    "split_seed",
    "join_key",
    "projection_bound",
    "ProjectionShard",
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


@dataclass(frozen=True)
class ProjectionShard:
    """Which block of the full layer's A and B a call uses: a tensor-parallel shard's.

    A column-parallel shard holds output features ``[out_offset, out_offset + out)``
    of the full layer: B's rows there (and the matching slice of b). A
    row-parallel shard holds input features ``[in_offset, in_offset + in)``: A's
    columns there, scaled by the full layer's ``in_features`` (A's fan). The
    shards' outputs then combine to the full layer's: concatenated over the
    output features (column-parallel) or summed (row-parallel), as the base
    layer's are; the vector gradients combine the same way (summed over the
    shards where a shard holds the whole vector).

    Attributes:
        in_offset: the shard's first input feature in the full layer.
        out_offset: the shard's first output feature in the full layer.
        in_features: the full layer's input features (A's fan); ``None``:
            the call's own ``in`` (no input slice: ``in_offset`` must be 0).
    """

    in_offset: int = 0
    out_offset: int = 0
    in_features: Optional[int] = None

    def __post_init__(self):
        for name in ("in_offset", "out_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32:
                raise ValueError(f"ProjectionShard.{name} must be an int in [0, 2**32), got {value!r}")
        full = self.in_features
        if full is not None and (isinstance(full, bool) or not isinstance(full, int) or full < 1):
            raise ValueError(f"ProjectionShard.in_features must be a positive int or None, got {full!r}")
        if full is None and self.in_offset:
            raise ValueError("ProjectionShard: in_offset > 0 needs in_features (the full layer's, "
                             "A's scale)")

    @property
    def is_whole(self) -> bool:
        """Whether this is the whole layer (no offsets, A's fan the call's ``in``)."""
        return self == WHOLE

    def check(self, in_features: int) -> None:
        """Raise ValueError unless a call with ``in_features`` inputs fits in the full layer."""
        if self.in_features is not None and self.in_offset + in_features > self.in_features:
            raise ValueError(
                f"ProjectionShard: input features [{self.in_offset}, {self.in_offset + in_features})"
                f" pass the full layer's in_features={self.in_features}")

    def block(self, matrix: str, rows: int, cols: int) -> tuple[int, int, int]:
        """``(row_offset, col_offset, fan)`` of this shard's ``rows x cols`` block of ``matrix``
        (A: r x in, B: out x r) in the full layer's spec matrix."""
        if _matrix_index(matrix) == MATRICES["A"]:
            return 0, self.in_offset, self.in_features or cols
        return self.out_offset, 0, cols

    def op_args(self) -> tuple[int, int, int]:
        """``(in_offset, out_offset, in_features or 0)``: the ops' integer form."""
        return self.in_offset, self.out_offset, self.in_features or 0

    @classmethod
    def from_op_args(cls, in_offset: int, out_offset: int, in_features: int) -> "ProjectionShard":
        """The inverse of :meth:`op_args`."""
        return cls(in_offset, out_offset, in_features or None)


WHOLE = ProjectionShard()


def projection(
    matrix: str,
    rows: int,
    cols: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
    row_offset: int = 0,
    col_offset: int = 0,
    fan: Optional[int] = None,
) -> torch.Tensor:
    """Materialize the frozen VeRA projection ``matrix`` exactly as the spec defines it.

    Args:
        matrix: ``"A"`` (shape r x in, fan = in) or ``"B"`` (shape out x r, fan = r).
        rows, cols: the shape; a smaller shape is the top-left block of a larger
            one's raw values (only the scale ``sqrt(6 / cols)`` differs).
        seed: an int in [0, 2**64).
        dtype: float32 values are rounded to nearest-even into ``dtype``.
        device: where to generate (the generation runs there).
        row_offset, col_offset, fan: the block ``[row_offset : +rows,
            col_offset : +cols]`` of the matrix whose scale is
            ``sqrt(6 / fan)`` (``fan`` defaults to ``cols``): a shard's slice
            (:meth:`ProjectionShard.block`).

    Returns:
        A new ``(rows, cols)`` tensor. Memory for temporaries stays bounded
        (about 160 MiB) whatever the size: rows are generated in chunks.
    """
    stream = _matrix_index(matrix)
    seed = check_seed(seed)
    key = split_seed(seed)
    fan = cols if fan is None else fan
    for name, value, low in (("rows", rows, 1), ("cols", cols, 1), ("fan", fan, 1),
                             ("row_offset", row_offset, 0), ("col_offset", col_offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            kind = "positive" if low else "non-negative"
            raise ValueError(f"{name} must be a {kind} int, got {value!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    device = torch.device(device) if device is not None else torch.device("cpu")

    # One Philox call serves four columns: generate whole groups, keep the block's columns.
    lead = col_offset & 3
    groups = (lead + cols + 3) // 4
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    bound = projection_bound(fan)
    rows_per_chunk = max(1, _CHUNK_GROUPS // groups)
    c0 = torch.arange(col_offset >> 2, (col_offset >> 2) + groups, dtype=torch.int64, device=device)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        c1 = torch.arange(row_offset + start, row_offset + stop, dtype=torch.int64,
                          device=device)[:, None]
        words = philox4x32_10((c0, c1, zero + stream, zero), key)
        # (chunk, groups, 4) -> (chunk, 4 * groups): word k serves column 4g + k.
        w = torch.stack(words, dim=-1).reshape(stop - start, 4 * groups)[:, lead:lead + cols]
        v = (w >> 8).to(torch.float32) * 2.0**-23 - 1.0  # exact
        out[start:stop] = (v * bound).to(dtype)
    return out


def cached_projection(
    matrix: str, rows: int, cols: int, seed: int, dtype: torch.dtype, device: torch.device,
    shard: ProjectionShard = WHOLE,
) -> torch.Tensor:
    """``projection`` memoized per (matrix, shape, seed, dtype, device, shard), LRU-bounded:
    ``shard``'s block (:meth:`ProjectionShard.block`).

    The result is shared: callers must not modify it. While torch.export (or
    Dynamo) traces, it is generated afresh: a traced tensor must not enter the
    cache that later eager calls read.
    """
    if torch.compiler.is_compiling():
        return _block(matrix, rows, cols, seed, dtype, device, shard)
    return _cached_block(matrix, rows, cols, seed, dtype, device, shard)


def _block(matrix: str, rows: int, cols: int, seed: int, dtype: torch.dtype,
           device: torch.device, shard: ProjectionShard) -> torch.Tensor:
    row_offset, col_offset, fan = shard.block(matrix, rows, cols)
    with torch.no_grad():
        return projection(matrix, rows, cols, seed, dtype=dtype, device=device,
                          row_offset=row_offset, col_offset=col_offset, fan=fan)


_cached_block = functools.lru_cache(maxsize=64)(_block)
