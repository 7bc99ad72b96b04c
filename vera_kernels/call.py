"""One ``vera_linear`` call, checked: the validation step between the public API and the ops.

:func:`check_call` turns the user's arguments into a :class:`VeRACall` (or
raises TypeError / ValueError naming the problem): shapes, dtypes and devices
checked, autocast applied, the seed or explicit projections turned into a
:class:`ProjectionSource`, the backend resolved, and the in-place decision
made. Nothing here launches a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .backends import ProjectionSource, resolve_backend
from .dropout import DropoutMask, check_probability, draw_call_seed, seed_words
from .projection import SUPPORTED_DTYPES, WHOLE, ProjectionShard

__all__ = ["VeRACall", "check_call"]


@dataclass(frozen=True)
class VeRACall:
    """A checked call, in the form the ops take.

    Attributes:
        x: ``(tokens, in)``, a view of the input where possible.
        lambda_d, lambda_b: ``(r,)`` and ``(out,)``, in x's dtype.
        base: ``(tokens, out)`` or None.
        base_output: the caller's base_output (returned by an in-place call).
        source: where A and B come from.
        backend: the resolved backend name.
        out_shape: the result's shape, ``(*x.shape[:-1], out)``.
        into_base: write the result into ``base``'s buffer (no graph is needed, not
            under torch.export).
        adapter_ids: ``(tokens,)`` int32 when the vectors are banks, else None.
        dropout: the call's dropout mask on the adapter's input (its seed a tensor on
            x's device), or None.
        base_scale: ``(out,)`` (banks: ``(n_adapters, out)``) scaling ``base - base_bias``
            (DVoRA's magnitude over the norm), or None.
        base_bias: ``(out,)`` the part of base that ``base_scale`` leaves unscaled, or None.
    """

    x: Tensor
    lambda_d: Tensor
    lambda_b: Tensor
    base: Optional[Tensor]
    base_output: Optional[Tensor]
    source: ProjectionSource
    backend: str
    out_shape: tuple
    into_base: bool
    adapter_ids: Optional[Tensor] = None
    dropout: Optional[DropoutMask] = None
    base_scale: Optional[Tensor] = None
    base_bias: Optional[Tensor] = None


def _check_tensor(name: str, t, dims: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_projections(projections) -> tuple[Optional[Tensor], Optional[Tensor]]:
    if projections is None:
        return None, None
    if not isinstance(projections, (tuple, list)) or len(projections) != 2:
        raise TypeError("projections must be a pair (A, B) of tensors")
    for i, t in enumerate(projections):
        _check_tensor(f"projections[{i}]", t, dims=2)
    return projections[0], projections[1]


def _autocast(tensors: list, device_type: str) -> list:
    """Cast to the autocast dtype when autocast is on for ``device_type`` (as nn.Linear would)."""
    # Devices without autocast (meta, ...) would make the query itself raise.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors]


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_alike(x: Tensor, named: dict, vectors: tuple = ()) -> None:
    """Same device and dtype as x; the ``vectors`` may also be float32 when x is half."""
    for name, t in named.items():
        if t is None:
            continue
        wider_vector = name in vectors and x.dtype in HALF_DTYPES and t.dtype == torch.float32
        if t.dtype != x.dtype and not wider_vector:
            allowed = " (or float32 for the vectors)" if x.dtype in HALF_DTYPES else ""
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; use one "
                            f"dtype{allowed}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_MISSING = object()


def _check_adapter_ids(ids, x: Tensor, n_adapters: int, check_range: bool) -> Tensor:
    """``ids`` flattened to (tokens,) int32, after checking type, shape, device and range."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"adapter_ids must be an integer torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"adapter_ids must have an integer dtype, got {ids.dtype}")
    if tuple(ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"adapter_ids must have x's leading shape {tuple(x.shape[:-1])}, "
                         f"got {tuple(ids.shape)}")
    if ids.device != x.device:
        raise ValueError(f"adapter_ids is on {ids.device} but x is on {x.device}")
    # Every integer dtype, unsigned ones too (torch has no min / max for some): widened
    # on the ids' device. An unsigned id past 2^63 wraps negative here, and unsigned ids
    # have no -1, so any negative one is out of range.
    wide = ids.to(torch.int64)
    if check_range and wide.numel() and wide.device.type != "meta":  # meta: shapes only
        low, high = torch.stack([wide.min(), wide.max()]).tolist()  # one host sync
        floor = -1 if ids.is_signed() else 0
        if low < floor or high >= n_adapters:
            raise ValueError(f"adapter_ids must be in [{floor}, {n_adapters}) (-1: no adapter) "
                             f"for banks of {n_adapters} adapters, got values in [{low}, {high}]"
                             + (" (as int64)" if floor == 0 else ""))
    return wide.reshape(-1).to(torch.int32).contiguous()


def _check_dropout(p, seed, device: torch.device) -> Optional[DropoutMask]:
    p = check_probability(p)
    if p == 0:
        return None
    if seed is None:
        return DropoutMask(p, draw_call_seed(device))
    if not isinstance(seed, Tensor):
        return DropoutMask(p, seed_words(seed, device))  # TypeError / ValueError for bad ints
    if seed.dtype != torch.int64:
        raise TypeError(f"dropout_seed as a tensor must be int64 (two key words), got {seed.dtype}")
    if tuple(seed.shape) != (2,):
        raise ValueError(f"dropout_seed as a tensor must have shape (2,) (two key words), got "
                         f"{tuple(seed.shape)}")
    if seed.device != device:
        raise ValueError(f"dropout_seed is on {seed.device} but x is on {device}")
    return DropoutMask(p, seed.contiguous())  # the kernels read words 0 and 1 from memory


def _check_shard(shard, in_features: int, out_features: int, explicit: bool,
                 dropout: float) -> ProjectionShard:
    if shard is None:
        return WHOLE
    if not isinstance(shard, ProjectionShard):
        raise TypeError(f"shard must be a vera_kernels.ProjectionShard or None, got "
                        f"{type(shard).__name__}")
    if shard.is_whole:
        return shard
    if explicit:
        raise ValueError("shard selects a block of the seed's projections; with explicit "
                         "projections pass the shard's own A and B instead")
    if dropout:
        # The mask is drawn over the call's own features: a row-parallel shard's would not
        # be its slice of the full layer's mask.
        raise ValueError("shard does not support adapter dropout")
    shard.check(in_features)
    # The spec's counters are 32-bit: B's rows and A's column groups in the full layer.
    if shard.out_offset + out_features > 1 << 32 or shard.in_offset + in_features > 1 << 34:
        raise ValueError("shard: the full layer's rows or column groups would pass 2**32, the "
                         "projection spec's counter range")
    return shard


def _check_base_affine(base_scale, base_bias, base_output, scale_shape: tuple,
                       out_features: int) -> None:
    if base_scale is None:
        if base_bias is not None:
            raise ValueError("base_bias is the part of base_output that base_scale leaves "
                             "unscaled: pass it together with base_scale")
        return
    if base_output is None:
        raise ValueError("base_scale scales base_output: pass base_output too")
    if tuple(base_scale.shape) != scale_shape:
        raise ValueError(f"base_scale must have shape {scale_shape} (lambda_b's), got "
                         f"{tuple(base_scale.shape)}")
    if base_bias is not None and tuple(base_bias.shape) != (out_features,):
        raise ValueError(f"base_bias must have shape ({out_features},), got "
                         f"{tuple(base_bias.shape)}")


def check_call(x, lambda_d, lambda_b, seed, base_output=None, *, backend=None, projections=None,
               into_base=False, adapter_ids=_MISSING, check_ids=True, dropout=0.0,
               dropout_seed=None, shard=None, base_scale=None, base_bias=None) -> VeRACall:
    """Validate ``vera_linear``'s arguments (see its docstring) and describe the call.

    With ``adapter_ids`` (``vera_linear_multi``) the vectors are banks, one
    row per adapter; ``check_ids=False`` skips the range check (a host sync)
    for ids the caller has already checked.
    """
    banked = adapter_ids is not _MISSING
    vector_dims = 2 if banked else 1
    names = ("lambda_d_bank", "lambda_b_bank") if banked else ("lambda_d", "lambda_b")
    _check_tensor("x", x)
    _check_tensor(names[0], lambda_d, dims=vector_dims)
    _check_tensor(names[1], lambda_b, dims=vector_dims)
    if banked and lambda_d.shape[0] != lambda_b.shape[0]:
        raise ValueError(f"the banks hold {lambda_d.shape[0]} and {lambda_b.shape[0]} adapters; "
                         "they must hold the same adapters")
    if base_output is not None:
        _check_tensor("base_output", base_output)
    if base_scale is not None:
        _check_tensor("base_scale", base_scale, dims=vector_dims)
    if base_bias is not None:
        _check_tensor("base_bias", base_bias, dims=1)
    proj_a, proj_b = _check_projections(projections)
    x, lambda_d, lambda_b, base_output, proj_a, proj_b, base_scale, base_bias = _autocast(
        [x, lambda_d, lambda_b, base_output, proj_a, proj_b, base_scale, base_bias], x.device.type
    )
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., in) with in >= 1, got {tuple(x.shape)}")
    if lambda_d.numel() == 0 or lambda_b.numel() == 0:
        raise ValueError(
            f"{names[0]} and {names[1]} must be non-empty, got shapes {tuple(lambda_d.shape)} "
            f"and {tuple(lambda_b.shape)}"
        )
    vectors = (*names, "base_scale", "base_bias")
    _check_alike(x, {names[0]: lambda_d, names[1]: lambda_b, "base_output": base_output,
                     "projections[0]": proj_a, "projections[1]": proj_b,
                     "base_scale": base_scale, "base_bias": base_bias}, vectors=vectors)
    r, out_features = lambda_d.shape[-1], lambda_b.shape[-1]
    out_shape = (*x.shape[:-1], out_features)
    if base_output is not None and tuple(base_output.shape) != out_shape:
        raise ValueError(
            f"base_output must have shape {out_shape} (x's leading dims, len(lambda_b)), "
            f"got {tuple(base_output.shape)}"
        )
    _check_base_affine(base_scale, base_bias, base_output, tuple(lambda_b.shape), out_features)
    shard = _check_shard(shard, x.shape[-1], lambda_b.shape[-1], proj_a is not None, dropout)
    if proj_a is None:
        source = ProjectionSource.from_seed(seed, shard)
    else:
        r_in = (r, x.shape[-1])
        if tuple(proj_a.shape) != r_in or tuple(proj_b.shape) != (out_features, r):
            raise ValueError(
                f"projections must have shapes {r_in} and {(out_features, r)} "
                f"((r, in) and (out, r)), got {tuple(proj_a.shape)} and {tuple(proj_b.shape)}"
            )
        source = ProjectionSource.explicit(proj_a, proj_b)  # frozen: no gradient flows into them
    return VeRACall(
        x=x.reshape(-1, x.shape[-1]),
        lambda_d=lambda_d,
        lambda_b=lambda_b,
        base=base_output.reshape(-1, out_features) if base_output is not None else None,
        base_output=base_output,
        source=source,
        backend=resolve_backend(backend, x.device),
        out_shape=out_shape,
        # Not under torch.export: it turns the in-place op into a functional copy
        # (auto_functionalized) that exporters such as torch.onnx cannot translate.
        into_base=bool(into_base) and base_output is not None and base_output.is_contiguous()
        and not _needs_graph(x, lambda_d, lambda_b, base_output, base_scale, base_bias)
        and not torch.compiler.is_exporting(),
        adapter_ids=_check_adapter_ids(adapter_ids, x, lambda_d.shape[0], check_ids)
        if banked else None,
        dropout=_check_dropout(dropout, dropout_seed, x.device),
        base_scale=base_scale,
        base_bias=base_bias,
    )
