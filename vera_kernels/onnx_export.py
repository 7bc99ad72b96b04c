"""ONNX export of VeRA layers with ``torch.onnx.export(..., dynamo=True)``.

The dynamo exporter translates each op of the exported graph with an ONNX
Script function; it knows ATen, not this package's custom op, and takes the
translation of other ops per call (``custom_translation_table=``).
:func:`onnx_translation_table` gives it ``vera_kernels::vera_forward`` in
plain ONNX ops (``Gemm``, ``Mul``, ``Add``; ``Gather`` for adapter banks):

    h = x Aᵀ,   y = base + b ⊙ ((d ⊙ h) Bᵀ)

(DVoRA layers: ``base`` scaled as ``s ⊙ (base - bias) + bias``; a tensor-parallel
shard: its block of A and B.)

A seed's A (r x in) and B (out x r) are computed here, at export time, with
:func:`vera_kernels.projection.projection` in the activations' dtype and stored
as initializers named after their matrix, shape, seed and dtype: layers of one
shape and seed share them. Explicit projections (``projections=``,
``SharedProjections``) are used as the graph already has them. Adapter dropout
has no ONNX form: export in eval mode.

Needs ``onnx`` and ``onnxscript`` (and ``onnxruntime`` to run the result); this
module is not imported by ``vera_kernels`` itself.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

try:
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import to_torch_dtype
    from onnxscript import opset18 as op
except ImportError as error:  # optional dependencies
    raise ImportError(
        "vera_kernels.onnx_export needs onnx and onnxscript: pip install onnx onnxscript"
    ) from error

from .projection import ProjectionShard, join_key, projection

__all__ = ["onnx_translation_table", "export_onnx", "DROPOUT_EXPORT_ERROR"]

DROPOUT_EXPORT_ERROR = (
    "vera_kernels: adapter dropout has no ONNX translation; export with dropout off "
    "(VeRALinear layers turn it off in eval mode: call model.eval() first)"
)


def _as(value, dtype: ir.DataType):
    """``value`` in ``dtype``, with a Cast only where it differs."""
    return value if value.dtype == dtype else op.Cast(value, to=dtype)


def _projection_value(like, matrix: str, rows: int, cols: int, seed: int,
                      shard: ProjectionShard):
    """The initializer holding ``projection(matrix, rows, cols, seed)`` (the shard's block)
    in ``like``'s dtype, created on first use in ``like``'s graph and shared by every later
    layer that asks."""
    dtype = like.dtype
    row_offset, col_offset, fan = shard.block(matrix, rows, cols)
    block = f"_at{row_offset}x{col_offset}_fan{fan}" if not shard.is_whole else ""
    name = f"vera_{matrix}_{rows}x{cols}{block}_seed{seed}_{dtype.name.lower()}"
    graph = like.graph
    if name not in graph.initializers:
        tensor = projection(matrix, rows, cols, seed, dtype=to_torch_dtype(dtype),
                            row_offset=row_offset, col_offset=col_offset, fan=fan)
        graph.register_initializer(ir.Value(name=name, shape=ir.Shape(tensor.shape),
                                            type=ir.TensorType(dtype),
                                            const_value=ir.tensor(tensor, name=name)))
    return graph.initializers[name]


def _row_vectors(bank, adapter_ids, fill: float = 0.0):
    """Each token's row of ``bank`` (tokens x C), ``fill`` where the id is -1 (no adapter)."""
    # Gather takes -1 as the last row; the Where replaces those rows.
    rows = op.Gather(bank, adapter_ids, axis=0)
    no_adapter = op.Unsqueeze(op.Less(adapter_ids, 0), [1])
    return op.Where(no_adapter, fill, rows)


def _scaled_base(base, scale, bias, adapter_ids, dtype):
    """DVoRA's ``s ⊙ (base - bias) + bias`` in the scale's dtype, rounded once to ``dtype``."""
    wide = scale.dtype  # read before the gather: its output's dtype is not inferred yet
    if adapter_ids is not None:
        scale = _row_vectors(scale, adapter_ids, fill=1.0)
    term = _as(base, wide)
    if bias is not None:
        term = op.Sub(term, _as(bias, wide))
    term = op.Mul(term, scale)
    if bias is not None:
        term = op.Add(term, _as(bias, wide))
    return _as(term, dtype)


def _vera_forward(x, lambda_d, lambda_b, key0: int, key1: int, base, backend: str,
                  proj_a=None, proj_b=None, adapter_ids=None, dropout_p: float = 0.0,
                  dropout_seed=None, shard_in_offset: int = 0, shard_out_offset: int = 0,
                  shard_in_features: int = 0, base_scale=None, base_bias=None):
    """``vera_kernels::vera_forward`` as ONNX: ``(y, h)`` for 2-D ``x`` (see ``ops.py``)."""
    del backend, dropout_seed  # the kernel choice, and the mask seed (None for p = 0)
    if dropout_p:
        raise NotImplementedError(DROPOUT_EXPORT_ERROR)
    if proj_a is None:
        seed = join_key((key0, key1))
        shard = ProjectionShard.from_op_args(shard_in_offset, shard_out_offset,
                                             shard_in_features)
        r, in_features, out_features = lambda_d.shape[-1], x.shape[-1], lambda_b.shape[-1]
        proj_a = _projection_value(x, "A", r, in_features, seed, shard)
        proj_b = _projection_value(x, "B", out_features, r, seed, shard)
    if base_scale is not None:
        base = _scaled_base(base, base_scale, base_bias, adapter_ids, x.dtype)
    # The vectors are in x's dtype, or float32 under half activations: d scales h in
    # its own dtype, rounded once to x's (as the torch backend does).
    dtype, vector_dtype = x.dtype, lambda_d.dtype
    if adapter_ids is not None:
        lambda_d, lambda_b = (_row_vectors(lambda_d, adapter_ids),
                              _row_vectors(lambda_b, adapter_ids))
    h = op.Gemm(x, proj_a, transB=1)
    scaled_h = _as(op.Mul(_as(h, vector_dtype), lambda_d), dtype)
    adapter = op.Mul(op.Gemm(scaled_h, proj_b, transB=1), _as(lambda_b, dtype))
    y = adapter if base is None else op.Add(base, adapter)
    return y, h


def onnx_translation_table() -> dict[Callable, Callable]:
    """The translations ``torch.onnx.export(..., dynamo=True)`` needs for VeRA layers.

    Pass it as ``custom_translation_table=`` (merge it with your own entries
    if you have some). It covers ``vera_kernels::vera_forward``, the one op
    a VeRA forward leaves in an exported graph: the in-place variant is not
    taken under torch.export, and the backward op does not appear in an
    inference graph.

    Returns:
        ``{torch.ops.vera_kernels.vera_forward.default: onnxscript translation}``.
    """
    return {torch.ops.vera_kernels.vera_forward.default: _vera_forward}


def export_onnx(model: torch.nn.Module, args: tuple, path: Optional[Any] = None,
                **kwargs) -> "torch.onnx.ONNXProgram":
    """``torch.onnx.export(model, args, path, dynamo=True, ...)`` with VeRA's translations.

    Entries of a ``custom_translation_table`` in ``kwargs`` are added to (and
    take precedence over) :func:`onnx_translation_table`'s; other keyword
    arguments go to ``torch.onnx.export`` as they are.

    Returns:
        The :class:`torch.onnx.ONNXProgram` (also saved to ``path`` when given).
    """
    table = {**onnx_translation_table(), **(kwargs.pop("custom_translation_table", None) or {})}
    return torch.onnx.export(model, args, path, dynamo=True, custom_translation_table=table,
                             **kwargs)
