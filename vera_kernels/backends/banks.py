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

__all__ = ["per_adapter_sum", "row_vectors"]


def per_adapter_sum(values: Tensor, adapter_ids: Tensor, n_adapters: int) -> Tensor:
    """``out[a] = Σ_{t: adapter_ids[t] == a} values[t]``, (n_adapters, C) in float32 or wider.

    Deterministic on every device (index_add_ on CUDA is not: it adds with
    atomics): rows are ordered by adapter with a stable sort, summed by a
    float64 prefix sum, and each adapter's total is the difference of the
    prefix sums at its segment's ends. Rows with id -1 are dropped.
    """
    acc = torch.promote_types(values.dtype, torch.float32)
    slots = torch.where(adapter_ids >= 0, adapter_ids, n_adapters).long()  # -1 -> a last slot
    order = torch.argsort(slots, stable=True)
    prefix = torch.cumsum(values[order].to(torch.float64), dim=0)
    prefix = torch.cat([prefix.new_zeros(1, values.shape[1]), prefix])
    ends = torch.cumsum(torch.bincount(slots, minlength=n_adapters + 1), dim=0)
    at_ends = prefix[ends]
    totals = at_ends - torch.cat([at_ends.new_zeros(1, values.shape[1]), at_ends[:-1]])
    return totals[:n_adapters].to(acc)


def row_vectors(bank: Tensor, adapter_ids: Tensor) -> Tensor:
    """``bank[adapter_ids]`` with zero rows for id -1: each token's vector, (tokens, C)."""
    rows = bank.index_select(0, adapter_ids.clamp(min=0))
    return rows.masked_fill_((adapter_ids < 0)[:, None], 0)
