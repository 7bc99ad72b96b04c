"""Adapter dropout, regenerated from Philox instead of stored (docs/design.md, "Dropout").

PEFT's ``vera_dropout`` drops the adapter's input: ``h = dropout(x) Aᵀ``. The
mask here is a pure function of a per-call seed, the token row t and the
feature j, on a third Philox stream (counter word c2 = 2):

    key     = (call_seed & 0xFFFFFFFF, call_seed >> 32)
    counter = (j >> 3, t, 2, 0)
    u16     = bits [16 (j & 1), 16 (j & 1) + 16) of word ((j >> 1) & 3)
    keep    = u16 >= threshold,   threshold = round(p · 65536)

so one Philox call yields eight draws. Kept inputs are scaled by
``65536 / (65536 - threshold)``: exactly unbiased for the probability
actually used (p rounded to a multiple of 2⁻¹⁶). Backward regenerates the
mask for dx, so nothing of size tokens x in is ever stored.

The call seed is a device tensor, its two key words as int64 (``seed_words``),
never a Python int: drawn by ``torch.randint`` on x's device, it is an
ordinary traced op under torch.compile and a replayed one in a CUDA graph,
and the kernels read it from memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .projection import philox4x32_10, split_seed

__all__ = ["check_probability", "DropoutMask", "STREAM", "draw_call_seed", "seed_words",
           "keep_mask", "scaled_mask_chunks", "dropped_chunks", "drop_rows_", "dropped"]

STREAM = 2
_LEVELS = 1 << 16
# Rows of mask generated at once by the torch implementation (bounded temporaries).
_CHUNK_ELEMENTS = 1 << 22


def check_probability(p) -> float:
    """``p`` as a float in [0, 1), the dropout probabilities this package takes; ValueError else."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
    return float(p)


def seed_words(seed, device) -> Tensor:
    """A 64-bit int seed as the mask's seed tensor: int64 ``(seed & 0xFFFFFFFF, seed >> 32)``."""
    return torch.tensor(split_seed(seed), dtype=torch.int64, device=device)


def draw_call_seed(device) -> Tensor:
    """A fresh seed tensor on ``device`` from torch's default generator for it.

    ``torch.randint`` on the device, no host synchronization: traced as a
    random op under torch.compile, replayed with a new draw by a CUDA graph.
    ``torch.manual_seed`` reproduces the sequence in eager mode.
    """
    return torch.randint(0, 1 << 32, (2,), dtype=torch.int64, device=device)


@dataclass(frozen=True, eq=False)
class DropoutMask:
    """One call's dropout: probability ``p`` in [0, 1) and the call's seed.

    ``seed`` is an int64 tensor of two key words on the activations' device
    (``seed_words``, ``draw_call_seed``); only each word's low 32 bits count.
    """

    p: float
    seed: Tensor

    def __post_init__(self):
        check_probability(self.p)

    @property
    def threshold(self) -> int:
        return min(_LEVELS - 1, round(self.p * _LEVELS))

    @property
    def scale(self) -> float:
        """The factor for kept inputs, float32(1 / keep probability) for the threshold used.

        Rounded to float32 once, like the projections' bound, so that every
        backend multiplies by the very same number.
        """
        return torch.tensor(_LEVELS / (_LEVELS - self.threshold), dtype=torch.float32).item()

    @staticmethod
    def from_op_args(p: float, seed: Optional[Tensor]) -> Optional["DropoutMask"]:
        """The mask of the ops' ``(dropout_p, dropout_seed)``; None for p = 0."""
        return DropoutMask(p, seed) if p > 0 else None


def keep_mask(dropout: DropoutMask, row_start: int, rows: int, cols: int, device) -> Tensor:
    """The spec's keep mask for rows ``[row_start, row_start + rows)`` x ``cols`` features (bool)."""
    groups = math.ceil(cols / 8)  # one Philox call: 8 features
    c0 = torch.arange(groups, dtype=torch.int64, device=device)
    # The token row is a 32-bit counter word (as in the kernels): it wraps past 2^32 rows.
    c1 = (torch.arange(row_start, row_start + rows, dtype=torch.int64, device=device)
          & 0xFFFFFFFF)[:, None]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    words = philox4x32_10((c0, c1, zero + STREAM, zero), (dropout.seed[0], dropout.seed[1]))
    # (rows, groups, 4 words, 2 halves) -> feature 8g + 2w + h
    halves = torch.stack([torch.stack([w & 0xFFFF, w >> 16], dim=-1) for w in words], dim=-2)
    draws = halves.reshape(rows, groups * 8)[:, :cols]
    return draws >= dropout.threshold


def scaled_mask_chunks(dropout: DropoutMask, rows: int, cols: int, dtype, device):
    """``(start, stop, keep · scale)`` over row chunks, in float32 or wider (``dtype`` promoted).

    Multiply a chunk of x (or of dx) by these in that precision, then round:
    what the fused kernels do. Chunks keep the temporaries bounded (~4 M elements).
    """
    acc = torch.promote_types(dtype, torch.float32)
    for start, stop in _row_chunks(rows, cols):
        mask = keep_mask(dropout, start, stop - start, cols, device)
        yield start, stop, mask.to(acc) * dropout.scale


def _row_chunks(rows: int, cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, cols))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _compiled_on_host(t: Tensor, dropout: DropoutMask) -> bool:
    # The compiled CPU mask (backends/host_dropout.py) in eager mode; under
    # torch.compile Inductor fuses the torch implementation itself.
    if t.device.type != "cpu" or dropout.seed.device.type != "cpu" \
            or torch.compiler.is_compiling():
        return False
    from .backends import host_dropout

    return host_dropout.library() is None


def dropped_chunks(x: Tensor, dropout: DropoutMask):
    """``(start, stop, dropout(x[start:stop]))`` over row chunks: new tensors, x untouched."""
    if _compiled_on_host(x, dropout):
        from .backends.host_dropout import apply_dropout_

        for start, stop in _row_chunks(x.shape[0], x.shape[1]):
            chunk = x[start:stop].clone(memory_format=torch.contiguous_format)
            apply_dropout_(chunk, dropout.seed, start, dropout.threshold, dropout.scale)
            yield start, stop, chunk
        return
    for start, stop, factors in scaled_mask_chunks(dropout, x.shape[0], x.shape[1], x.dtype,
                                                   x.device):
        yield start, stop, dropped(x[start:stop], factors)


def drop_rows_(t: Tensor, dropout: DropoutMask) -> Tensor:
    """Apply the mask and scale to ``t`` (tokens x features) in place."""
    if t.is_contiguous() and _compiled_on_host(t, dropout):
        from .backends.host_dropout import apply_dropout_

        apply_dropout_(t, dropout.seed, 0, dropout.threshold, dropout.scale)
        return t
    for start, stop, chunk in dropped_chunks(t, dropout):
        t[start:stop] = chunk
    return t


def dropped(chunk: Tensor, factors: Tensor) -> Tensor:
    """``chunk · factors`` in the factors' precision, rounded once to the chunk's dtype."""
    return (chunk.to(factors.dtype) * factors).to(chunk.dtype)
