"""What VeRA needs from the frozen base layer it wraps, whatever its kind.

Any module that maps ``(..., in)`` to ``(..., out)`` linearly and exposes its
weight: ``nn.Linear``; transformers' ``Conv1D`` (weight stored (in, out));
bitsandbytes ``Linear4bit`` (nf4, fp4) and ``Linear8bitLt``; an ``nn.Linear``
whose weight is a torchao quantized tensor. The base layer always runs its
own kernel; this module only answers the questions VeRA asks of it: its
shape, the dtype its outputs come in, and (for merging) its weight as a
dense matrix and how to store a dense matrix back.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import Tensor, nn

__all__ = ["is_conv1d", "is_adaptable", "base_shape", "compute_dtype", "is_quantized",
           "dense_weight", "store_dense_weight"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: a linear layer with weight stored (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def is_adaptable(module: nn.Module) -> bool:
    """Whether VeRA can wrap ``module``: an nn.Linear (bitsandbytes' and torchao's
    quantized linears are nn.Linear too) or a transformers Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an adaptable module."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"VeRA wraps nn.Linear or transformers' Conv1D, got {type(base).__name__}")


def _bnb_kind(weight) -> str | None:
    # bitsandbytes is imported only by models that use it: look, don't import.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(weight, bnb.nn.Params4bit):
        return "bnb-4bit"
    # Int8Params with has_fp16_weights=True (bitsandbytes' default) keeps a float
    # weight, quantized on the fly at each forward: a dense weight, not int8 data.
    if isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8:
        return "bnb-8bit"
    return None


def _is_torchao(weight) -> bool:
    return type(weight).__module__.startswith("torchao") and callable(
        getattr(weight, "dequantize", None))


def is_quantized(base: nn.Module) -> bool:
    weight = base.weight
    return _bnb_kind(weight) is not None or _is_torchao(weight)


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The floating dtype the base layer computes in (a quantized weight's storage is not)."""
    weight = base.weight
    if weight.is_floating_point() and _bnb_kind(weight) is None:
        return weight.dtype
    return getattr(base, "compute_dtype", None) or torch.float32


def dense_weight(base: nn.Module) -> Tensor:
    """The weight as a dense floating matrix, in the base layer's layout (dequantized)."""
    weight, kind = base.weight, _bnb_kind(base.weight)
    if kind == "bnb-4bit":
        import bitsandbytes.functional as F

        return F.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "bnb-8bit":
        # Row-wise absmax int8: W = CB * SCB / 127. The data is CB; after the
        # first forward bitsandbytes keeps SCB in the layer's state instead.
        scb = weight.SCB if weight.SCB is not None else base.state.SCB
        return weight.data.float() * scb.float()[:, None] / 127
    if _is_torchao(weight):
        return weight.dequantize()
    return weight


def store_dense_weight(base: nn.Module, dense: Tensor) -> None:
    """Write ``dense`` into the base layer's weight, requantizing a quantized one (lossy)."""
    weight, kind = base.weight, _bnb_kind(base.weight)
    if kind is None and not _is_torchao(weight):
        with torch.no_grad():
            weight.copy_(dense.to(weight.dtype))
        return
    if _is_torchao(weight):
        raise NotImplementedError(
            "cannot merge into a torchao-quantized weight: it cannot be requantized with its "
            "original configuration here; merge before quantizing, or keep the adapter unmerged"
        )
    warnings.warn("merging into a bitsandbytes-quantized weight requantizes it: lossy",
                  stacklevel=3)
    import bitsandbytes as bnb

    if kind == "bnb-4bit":
        new = bnb.nn.Params4bit(dense.to("cpu"), requires_grad=False, quant_type=weight.quant_type,
                                blocksize=weight.blocksize,
                                compress_statistics=weight.compress_statistics,
                                quant_storage=weight.quant_storage)
    else:
        new = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False, has_fp16_weights=False)
    base.weight = new.to(weight.device)
