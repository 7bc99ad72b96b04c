"""Adapter banks: several VeRA adapters that share A and B, one chosen per token row.

A bank stacks the vectors of n adapters, ``lambda_d (n, r)`` and
``lambda_b (n, out)``; ``adapter_ids (tokens,)`` picks each row's adapter
(-1: none, the row's adapter output is zero). Forward and the per-token
backward products gather a row's vectors where they use them; the bank
gradients sum each adapter's rows with :func:`per_adapter_sum`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["per_adapter_sum", "row_vectors", "token_scales"]


def per_adapter_sum(values: Tensor, adapter_ids: Tensor, n_adapters: int) -> Tensor:
    """``out[a] = Σ_{t: adapter_ids[t] == a} values[t]``, (n_adapters, C) in float32 or wider.

    Deterministic on every device (index_add_ on CUDA is not: it adds with
    atomics): rows are ordered by adapter with a stable sort and each
    adapter's segment is summed on its own, in float64 (a segmented reduction:
    one adapter's magnitude never enters another's sum). Rows with id -1 are
    dropped.
    """
    acc = torch.promote_types(values.dtype, torch.float32)
    slots = torch.where(adapter_ids >= 0, adapter_ids, n_adapters).long()  # -1 -> a last slot
    order = torch.argsort(slots, stable=True)
    lengths = torch.bincount(slots, minlength=n_adapters + 1)
    totals = torch.segment_reduce(values[order].to(torch.float64), "sum", lengths=lengths, axis=0)
    return totals[:n_adapters].to(acc)


def row_vectors(bank: Tensor, adapter_ids: Tensor, fill: float = 0.0) -> Tensor:
    """``bank[adapter_ids]`` with rows of ``fill`` for id -1 (0: no adapter output; 1 for a
    DVoRA base scale): each token's vector, (tokens, C)."""
    rows = bank.index_select(0, adapter_ids.clamp(min=0))
    return rows.masked_fill_((adapter_ids < 0)[:, None], fill)


def token_scales(scale: Tensor, adapter_ids) -> Tensor:
    """A DVoRA base scale as each token sees it: ``scale`` (out,) itself for one adapter,
    or (tokens, out) bank rows, 1 for id -1 (that token's base output stays unscaled)."""
    return scale if adapter_ids is None else row_vectors(scale, adapter_ids, fill=1.0)
