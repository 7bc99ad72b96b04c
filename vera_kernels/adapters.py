"""Several VeRA adapters in one model: add, choose, delete, and mix them per batch row.

Adapters made with one seed share A and B, so an adapter is just ``r + out``
numbers per layer, and a batch that mixes adapters row by row costs what one
adapter costs (``vera_linear_multi``). PEFT's names where it has them:

    vk.add_adapter(model, "fr", state=None)        # fresh, from a vera_state_dict, or a file
    vk.set_adapter(model, "fr")                    # every row; None = the base model alone
    vk.list_adapters(model); vk.delete_adapter(model, "fr")
    with vk.adapter_batch(model, ["fr", None, "de"]):   # one name per batch row
        model.generate(...)
    vk.set_trainable_adapters(model, ["fr", "de"])      # train several in one mixed batch

``apply_vera`` creates the adapter called ``"default"``. Which vectors train:
the active adapter's alone (``set_adapter`` makes it so, as in PEFT; a new
adapter starts frozen), or exactly those ``set_trainable_adapters`` names.
Each function checks every layer before changing any, then calls the
layers' transitions (``lifecycle.py``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .model import _check_vera_state_dict, _copy_into, shared_value, vera_layers
from .lifecycle import DEFAULT_ADAPTER, check_adapter_name

__all__ = ["add_adapter", "set_adapter", "delete_adapter", "list_adapters", "adapter_batch",
           "active_adapter", "set_trainable_adapters"]


def _layers(model: nn.Module) -> dict:
    layers = dict(vera_layers(model))
    if not layers:
        raise ValueError("the model has no VeRA layers: apply_vera first")
    return layers


def active_adapter(model: nn.Module) -> str:
    """The adapter every row uses now: the one the weights hold if merged, else the active
    one (``"default"`` while the base model alone is active)."""
    name = shared_value(_layers(model).values(),
                        lambda layer: layer.merged_adapter or layer.active_adapter,
                        "the VeRA layers have different active adapters {values}: "
                        "set_adapter(model, name) first")
    return name or DEFAULT_ADAPTER


def list_adapters(model: nn.Module) -> list[str]:
    """The adapters of ``model``'s VeRA layers, ``"default"`` first."""
    return next(iter(_layers(model).values())).adapter_names()


def add_adapter(model: nn.Module, name: str,
                state: Optional[Union[dict, str, os.PathLike]] = None) -> None:
    """Add adapter ``name`` to every VeRA layer: fresh (d = d_initial, b = 0; DVoRA: m = the
    base rows' norms), or loaded.

    ``state`` is a ``vera_state_dict`` (of any adapter of a model with the same
    VeRA layers) or a file ``torch.save`` wrote from one. The layers' seed, r
    and shapes must match; everything is checked before anything is added.
    The new adapter is frozen until ``set_adapter`` makes it the active one
    (or ``set_trainable_adapters`` names it).
    """
    check_adapter_name(name)
    layers = _layers(model)
    if isinstance(state, (str, os.PathLike)):
        state = torch.load(state, weights_only=True)
    if state is not None:
        _check_vera_state_dict(layers, state, strict=True)
    for layer in layers.values():
        if name in layer.adapter_names():
            raise ValueError(f"adapter {name!r} exists already")
    for layer_name, layer in layers.items():
        parameters = layer.add_adapter_vectors(name)
        if state is not None:
            with torch.no_grad():
                for attr, vector in parameters.items():
                    _copy_into(vector, state[f"{layer_name}.{attr}"])


def _check_unmerged(layers: dict, action: str) -> None:
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"cannot {action} while layers are merged ({merged[:3]}...): "
                           "unmerge_vera first")


def set_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Make ``name`` every row's adapter (``None``: the base model alone); only its vectors
    require grad from now on (as in PEFT)."""
    layers = _layers(model)
    held = [n for n, layer in layers.items() if layer.merged and layer.merged_adapter != name]
    if held:
        raise RuntimeError(f"cannot switch to adapter {name!r} while layers {held[:3]} hold another "
                           "one in their weights: unmerge_vera first")
    if name is not None:
        for layer in layers.values():
            layer.adapter_vectors(name)  # KeyError naming the adapters if absent
    for layer in layers.values():
        layer.activate(name)


def set_trainable_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """Exactly the vectors of adapters ``names`` require grad in every VeRA layer: to train
    several adapters in one mixed batch (``adapter_batch``). ``set_adapter`` resets it to the
    active adapter alone."""
    layers = _layers(model)
    if isinstance(names, str):
        raise ValueError(f"set_trainable_adapters takes a list of adapter names, got {names!r}")
    for layer in layers.values():
        for name in names:
            layer.adapter_vectors(name)
    for layer in layers.values():
        layer.set_trainable(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every VeRA layer: not ``"default"``, not the active one,
    not the merged one (its delta is in the base weight), nor one an open ``disable_vera`` or
    ``adapter_batch`` block needs."""
    layers = _layers(model)
    for layer_name, layer in layers.items():
        problem = layer.deletion_problem(name)
        if problem is not None:
            raise ValueError(f"layer {layer_name!r}: {problem}")
    for layer in layers.values():
        layer.delete_adapter_vectors(name)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[Optional[str]]):
    """Within the block, batch row i of every forward uses adapter ``names[i]`` (None: none).

    Inputs must have the batch as their first dim (``(batch, seq, in)``, as in
    transformers models, including ``generate()`` with a KV cache and left
    padding). Merging is refused inside the block. Blocks nest: leaving an inner block
    brings the outer one's rows back.
    """
    layers = _layers(model)
    _check_unmerged(layers, "mix adapters per row")
    if isinstance(names, str) or not len(names):
        raise ValueError(f"adapter_batch needs one adapter name (or None) per batch row, got {names!r}")
    distinct = list(dict.fromkeys(n for n in names if n is not None))
    for layer in layers.values():
        for name in distinct:
            layer.adapter_vectors(name)
    row_ids = torch.tensor([-1 if n is None else distinct.index(n) for n in names],
                           dtype=torch.int32)
    depths = [layer.push_rows(tuple(distinct), row_ids) for layer in layers.values()]
    try:
        yield model
    finally:
        for layer, depth in zip(layers.values(), depths):
            layer.pop_rows(depth)
