"""Adapter files: the trainable vectors alone, loadable onto a fresh base model.

A directory written by :func:`save_adapter` holds

    adapter_model.safetensors   "<layer>.vera_lambda_d" / "<layer>.vera_lambda_b" for every layer
                                (and "<layer>.vera_magnitude" for DVoRA)
    vera_adapter_config.json    what rebuilds the layers: target module names, r, seed,
                                d_initial, dropout, use_dora, each layer's shape, the
                                package version

A few hundred kilobytes for a 7B model (the projections are regenerated from
the seed). :func:`load_adapter` applies the layers the config names to a plain
base model, or checks that the model's VeRA layers match it, and loads the
vectors atomically (``load_vera_state_dict``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Optional, Union

import torch
from torch import nn

from .model import (CONFIG_KEY, _put_base_layers_back, _set_trained, apply_vera,
                    load_vera_state_dict, shared_value, trained_extras, unwrap, vera_layers,
                    vera_state_dict)
from .adapters import active_adapter, add_adapter
from .base_layers import base_shape, is_adaptable
from .module import DEFAULT_ADAPTER

__all__ = ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "vera_adapter_config.json"
FORMAT = "vera-kernels-adapter"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def _one(layers: list, what: str, value_of):
    return shared_value((layer for _, layer in layers), value_of,
                        f"save_adapter: the VeRA layers differ in {what} ({{values}}); "
                        "an adapter file describes layers that share it")


def save_adapter(model: nn.Module, directory: PathLike, adapter: Optional[str] = None, *,
                 dtype: Optional[torch.dtype] = None) -> None:
    """Write one VeRA adapter of ``model`` (vectors + config) into ``directory`` (created if
    needed): ``adapter``, by default the active one (the one being trained).

    ``dtype`` stores the vectors (only) in another floating dtype (e.g.
    bfloat16 for half-size files); by default they are stored as they are.

    Under torch.distributed call it on every rank (FSDP2-sharded vectors are
    gathered collectively); rank 0 writes.

    Raises:
        ValueError: no VeRA layers, or layers that differ in r, seed,
            d_initial or dropout (the config holds one of each).
    """
    from safetensors.torch import save_file

    from . import __version__

    state = vera_state_dict(model, adapter or active_adapter(model))  # gathers sharded vectors
    layers = list(vera_layers(model))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vera_kernels_version": __version__,
        "target_modules": [name for name, _ in layers],
        "r": _one(layers, "r", lambda layer: layer.r),
        # Explicit (PEFT-converted) projections belong to their model, not to the file.
        "seed": _one(layers, "seed", lambda layer: None if layer.projections else layer.seed),
        "explicit_projections": _one(layers, "projection source",
                                     lambda layer: layer.projections is not None),
        "d_initial": _one(layers, "d_initial", lambda layer: layer.d_initial),
        "dropout": _one(layers, "dropout", lambda layer: layer.dropout),
        "use_dora": _one(layers, "use_dora", lambda layer: layer.use_dora),
        "layers": state.pop(CONFIG_KEY),
    }
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_rank() != 0:
        return  # every rank gathered (a collective under FSDP2); rank 0 writes
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    tensors = {key: value.detach().to(device="cpu", dtype=dtype if _is_vector(key) and dtype
                                      else value.dtype).contiguous()
               for key, value in state.items()}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": FORMAT})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=1)


def _is_vector(key: str) -> bool:
    return key.endswith((".vera_lambda_d", ".vera_lambda_b", ".vera_magnitude"))


# What load_adapter reads from a config, and the type each entry must have.
CONFIG_FIELDS = {"target_modules": list, "r": int, "seed": (int, type(None)),
                 "explicit_projections": bool, "d_initial": (int, float), "dropout": (int, float),
                 "layers": dict}


def read_adapter_config(directory: PathLike) -> dict:
    """The config of an adapter directory, checked to be one this package wrote, with every
    entry ``load_adapter`` reads (ValueError naming the file and the entry otherwise)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} holds no {CONFIG_NAME}: not a save_adapter directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT \
            or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a {FORMAT} config of version {FORMAT_VERSION}")
    for key, kind in CONFIG_FIELDS.items():
        if key not in config:
            raise ValueError(f"{path}: no {key!r} entry")
        if not isinstance(config[key], kind) or (kind is int and isinstance(config[key], bool)):
            raise ValueError(f"{path}: entry {key!r} is {config[key]!r}, not a {kind}")
    if not isinstance(config.get("use_dora", False), bool):  # absent in files before DVoRA
        raise ValueError(f"{path}: entry 'use_dora' is {config['use_dora']!r}, not a bool")
    return config


def _read_weights(directory: PathLike) -> dict:
    """The adapter's tensors, or ValueError naming the file that cannot be read (truncated,
    not safetensors)."""
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} holds no {WEIGHTS_NAME}")
    try:
        return load_file(path)
    except Exception as error:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{path}: cannot read the adapter's tensors ({error})") from error


def _apply_layers(model: nn.Module, config: dict) -> None:
    """Put the VeRA layers the config names into a model that has none."""
    if config["explicit_projections"]:
        raise ValueError("this adapter uses explicit projections (converted from PEFT), which "
                         "belong to the model it was trained in; load it into that model")
    names = config["target_modules"]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"the adapter names modules the model does not have: {missing}")
    for name in names:
        if not is_adaptable(modules[name]):
            raise ValueError(f"the adapter's layer {name!r} is a {type(modules[name]).__name__} "
                             "in this model, not an nn.Linear or Conv1D")
        saved = config["layers"].get(name)
        if not isinstance(saved, dict) or not {"in_features", "out_features"} <= set(saved):
            raise ValueError(f"the adapter config's 'layers' entry for {name!r} is {saved!r}, "
                             "not {'in_features', 'out_features', ...}")
        if base_shape(modules[name]) != (saved["in_features"], saved["out_features"]):
            raise ValueError(
                f"the adapter's layer {name!r} is {saved['in_features']} -> "
                f"{saved['out_features']}, but the model's is {base_shape(modules[name])}"
            )
    pattern = "|".join(re.escape(n) for n in names)  # exactly these modules
    apply_vera(model, pattern, r=config["r"], seed=config["seed"], d_initial=config["d_initial"],
               dropout=config["dropout"], use_dora=config.get("use_dora", False))


def load_adapter(model: nn.Module, directory: PathLike, adapter_name: Optional[str] = None) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` and return it.

    A model without VeRA layers gets the layers the config names (as
    ``apply_vera`` would: everything else frozen); a model with VeRA layers
    must have exactly those (same names, r, seed and shapes). Then the
    vectors are loaded. Atomic: the config and the tensors file are read and
    checked first, and on any problem (a ValueError naming it) the model is
    left as it was, layers added to a plain model included. With
    ``adapter_name`` (other than ``"default"``) they become a new adapter
    beside the others (``add_adapter``).
    """
    config = read_adapter_config(directory)
    state = _read_weights(directory)
    state[CONFIG_KEY] = config["layers"]
    if any(True for _ in vera_layers(model)):
        _load_state(model, state, adapter_name)
        return model
    with _undone_on_error(model):
        _apply_layers(model, config)
        _load_state(model, state, adapter_name)
    return model


def _load_state(model: nn.Module, state: dict, adapter_name: Optional[str]) -> None:
    if adapter_name in (None, DEFAULT_ADAPTER):
        load_vera_state_dict(model, state)
    else:
        add_adapter(model, adapter_name, state)


@contextlib.contextmanager
def _undone_on_error(model: nn.Module):
    """On an exception in the block, put back what ``apply_vera`` changed in a plain model:
    the base layers in place of the VeRA layers, every parameter's requires_grad, the
    trained extras."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    extras = trained_extras(model)
    try:
        yield
    except BaseException:
        layers = list(vera_layers(model))
        if layers:
            _put_base_layers_back(unwrap(model), layers)
        for param, flag in flags:
            param.requires_grad_(flag)
        _set_trained(unwrap(model), extras)
        raise
