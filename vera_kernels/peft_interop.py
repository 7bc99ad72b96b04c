"""Switch between PEFT's VeRA and ours without retraining.

* ``from_peft``: PEFT VeRA layers (nn.Linear or transformers' Conv1D, active
  adapter) become ``VeRALinear`` layers in explicit-projection mode: PEFT drew
  A and B from ``torch.Generator``, not from our spec, so the converted layers
  keep PEFT's stored ``vera_A`` / ``vera_B`` (shared, sliced per layer as PEFT
  slices them) together with the trained vectors, dropout and base layer.
* ``save_peft_adapter``: writes PEFT's adapter format (adapter_config.json +
  adapter_model.safetensors, ``save_projection=True``) so that
  ``PeftModel.from_pretrained`` reproduces our layers' outputs.

PEFT keeps one A (r x max_in) for all layers and slices ``A[:, :in]``; our
spec scales each layer's A by ``sqrt(6 / in)`` of that layer instead. The
export therefore writes A for the largest ``in`` and folds the ratio of the
scales into each layer's ``lambda_d`` (exact up to float32 rounding). B needs
nothing: its scale depends on r only, and a smaller B is the top rows of a
larger one.
"""

from __future__ import annotations

import os
from typing import Union

from torch import nn

from .model import replace_submodule, vera_layers
from .base_layers import is_conv1d
from .module import SharedProjections, VeRALinear
from .projection import projection, projection_bound

__all__ = ["from_peft", "save_peft_adapter"]


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Replace every PEFT VeRA layer of ``peft_model`` by a ``VeRALinear``, in place.

    Returns the underlying model (``peft_model.get_base_model()``), whose
    outputs and gradients are PEFT's. The lambda parameters are PEFT's own
    tensors (moved, not copied); A and B stay PEFT's stored projections.

    Raises:
        ValueError: no VeRA layer found, a layer with several active adapters,
            or a merged layer (unmerge it in PEFT first).
    """
    from peft.tuners.vera.layer import VeraLayer

    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    shared: dict = {}
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, VeraLayer)]
    if not found:
        raise ValueError("from_peft: the model has no PEFT VeRA layers")
    for name, layer in found:
        adapters = list(layer.active_adapters)
        if len(adapters) != 1:
            raise ValueError(f"from_peft: layer {name!r} has active adapters {adapters}; need one")
        if layer.merged:
            raise ValueError(f"from_peft: layer {name!r} is merged; unmerge it in PEFT first")
        adapter = adapters[0]
        proj_a, proj_b = layer.vera_A[adapter], layer.vera_B[adapter]
        key = (proj_a.data_ptr(), proj_b.data_ptr())
        if key not in shared:
            shared[key] = SharedProjections(proj_a, proj_b)
        lambda_d = layer.vera_lambda_d[adapter]
        ours = VeRALinear.from_linear(layer.get_base_layer(), lambda_d.shape[0])
        ours.vera_lambda_d = lambda_d
        ours.vera_lambda_b = layer.vera_lambda_b[adapter]
        peft_dropout = layer.vera_dropout[adapter]
        ours.dropout = peft_dropout.p if isinstance(peft_dropout, nn.Dropout) else 0.0
        ours.projections = shared[key]
        replace_submodule(model, name, ours)
    return model


def _one_value(layers: list, what: str, value_of) -> object:
    """The value all layers share (PEFT stores one per adapter); ValueError otherwise."""
    values = {value_of(layer) for _, layer in layers}
    if len(values) != 1:
        raise ValueError(f"save_peft_adapter: PEFT needs one {what} for all layers, "
                         f"got {sorted(values, key=repr)}")
    return values.pop()


def _export_projections(layers: list, r: int):
    """PEFT's (vera_A, vera_B) and each layer's factor to fold into lambda_d."""
    pairs = {id(layer.projections): layer.projections for _, layer in layers}
    if len(pairs) != 1:
        raise ValueError("save_peft_adapter: layers mix seeded and explicit projections, or "
                         "several explicit pairs; PEFT stores one pair for all layers")
    shared = pairs.popitem()[1]
    if shared is not None:
        return shared.vera_A.float(), shared.vera_B.float(), {name: 1.0 for name, _ in layers}
    seed = _one_value(layers, "seed", lambda layer: layer.seed)
    max_in = max(layer.in_features for _, layer in layers)
    max_out = max(layer.out_features for _, layer in layers)
    scales = {name: projection_bound(layer.in_features) / projection_bound(max_in)
              for name, layer in layers}
    return projection("A", r, max_in, seed), projection("B", max_out, r, seed), scales


def _adapter_tensors(layers: list, proj_a, proj_b, scales: dict) -> dict:
    tensors = {}
    for name, layer in layers:
        prefix = f"base_model.model.{name}"
        d = layer.vera_lambda_d.detach().double() * scales[name]
        tensors[f"{prefix}.vera_lambda_d"] = d.to(layer.vera_lambda_d.dtype).cpu().contiguous()
        tensors[f"{prefix}.vera_lambda_b"] = layer.vera_lambda_b.detach().cpu().contiguous()
    tensors["base_model.vera_A"] = proj_a.detach().cpu().contiguous()
    tensors["base_model.vera_B"] = proj_b.detach().cpu().contiguous()
    return tensors


def save_peft_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write the VeRA layers of ``model`` as a PEFT adapter directory at ``path``.

    Load it with ``PeftModel.from_pretrained(base_model, path)``, where
    ``base_model`` is the model without VeRA layers. All layers must share r,
    the dropout probability and (for seeded layers) the seed, as PEFT requires.
    """
    from peft import VeraConfig
    from safetensors.torch import save_file

    layers = list(vera_layers(model))
    if not layers:
        raise ValueError("save_peft_adapter: the model has no VeRA layers")
    r = _one_value(layers, "r", lambda layer: layer.r)
    dropout = _one_value(layers, "dropout probability", lambda layer: layer.dropout)
    proj_a, proj_b, scales = _export_projections(layers, r)
    config = VeraConfig(
        r=r,
        target_modules=[name for name, _ in layers],
        save_projection=True,
        vera_dropout=dropout,
        fan_in_fan_out=all(is_conv1d(layer.base_layer) for _, layer in layers),
    )
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(str(path))
    save_file(_adapter_tensors(layers, proj_a, proj_b, scales),
              os.path.join(str(path), "adapter_model.safetensors"))
