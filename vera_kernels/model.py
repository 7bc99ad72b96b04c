"""Whole-model helpers: put VeRA layers into a model, save and load just the adapter."""

from __future__ import annotations

import re
from typing import Iterator, Union

import torch
from torch import nn

from .module import VeRALinear

__all__ = ["apply_vera", "vera_layers", "vera_state_dict", "load_vera_state_dict"]

CONFIG_KEY = "vera_config"


def _matches(name: str, target_modules: Union[str, list[str], tuple[str, ...]]) -> bool:
    # As PEFT: a string is a regex matched against the full name; a list holds
    # names matched exactly or as a dotted suffix.
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def vera_layers(model: nn.Module) -> Iterator[tuple[str, VeRALinear]]:
    """(qualified name, module) for every VeRALinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, VeRALinear):
            yield name, module


def apply_vera(
    model: nn.Module,
    target_modules: Union[str, list[str], tuple[str, ...]],
    r: int,
    *,
    seed: int = 0,
    d_initial: float = 0.1,
) -> nn.Module:
    """Replace the matching ``nn.Linear`` submodules by ``VeRALinear`` and freeze the rest.

    Args:
        model: modified in place (and returned).
        target_modules: a regex matched against full module names, or a list
            of names matched exactly or as a dotted suffix (``"q_proj"``
            matches ``"layers.0.attn.q_proj"``), as PEFT does.
        r, seed, d_initial: as for ``VeRALinear``; every layer shares the seed.

    Returns:
        ``model``, in which only the VeRA vectors require grad.

    Raises:
        ValueError: nothing matched. TypeError: a match is not an nn.Linear.
    """
    if not isinstance(target_modules, (str, list, tuple)) or not target_modules:
        raise ValueError(f"target_modules must be a regex or a non-empty list, got {target_modules!r}")
    inside_vera = tuple(f"{name}." for name, _ in vera_layers(model) if name)
    matched = []
    for name, module in model.named_modules():
        if not name or name.startswith(inside_vera) or not _matches(name, target_modules):
            continue
        if not isinstance(module, (nn.Linear, VeRALinear)):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; VeRA supports nn.Linear"
            )
        matched.append((name, module))
    if not matched:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in the model")

    for name, module in matched:
        if isinstance(module, VeRALinear):
            continue  # already adapted
        parent_name, _, child = name.rpartition(".")
        adapted = VeRALinear.from_linear(module, r, seed=seed, d_initial=d_initial)
        setattr(model.get_submodule(parent_name), child, adapted)

    model.requires_grad_(False)
    for _, layer in vera_layers(model):
        layer.vera_lambda_d.requires_grad_(True)
        layer.vera_lambda_b.requires_grad_(True)
    return model


def _layer_config(layer: VeRALinear) -> dict:
    return {
        "seed": layer.seed,
        "r": layer.r,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
    }


def vera_state_dict(model: nn.Module) -> dict:
    """The adapter alone: every layer's two vectors plus what rebuilds its projections.

    Keys are ``"<layer>.vera_lambda_d"`` / ``"<layer>.vera_lambda_b"`` (tensors)
    and ``"vera_config"``: ``{layer: {"seed", "r", "in_features", "out_features"}}``.
    Suitable for ``torch.save`` (and ``torch.load(weights_only=True)``).
    """
    state: dict = {}
    config = {}
    for name, layer in vera_layers(model):
        state[f"{name}.vera_lambda_d"] = layer.vera_lambda_d.detach()
        state[f"{name}.vera_lambda_b"] = layer.vera_lambda_b.detach()
        config[name] = _layer_config(layer)
    if not config:
        raise ValueError("model has no VeRALinear layers")
    state[CONFIG_KEY] = config
    return state


def load_vera_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Copy the vectors of ``vera_state_dict`` output into ``model``'s VeRA layers.

    Raises ValueError, naming the layer, when the model's VeRA layers differ
    from the saved ones (missing or extra layers, other seed, r or shape).
    """
    if CONFIG_KEY not in state_dict:
        raise ValueError(f"not a vera_state_dict: no {CONFIG_KEY!r} entry")
    saved = state_dict[CONFIG_KEY]
    layers = dict(vera_layers(model))
    missing, unexpected = sorted(set(layers) - set(saved)), sorted(set(saved) - set(layers))
    if missing or unexpected:
        raise ValueError(
            "VeRA layers differ between model and state dict: "
            f"missing from the state dict {missing}, not in the model {unexpected}"
        )
    for name, layer in layers.items():
        if saved[name] != _layer_config(layer):
            raise ValueError(
                f"VeRA layer {name!r}: state dict has {saved[name]}, model has {_layer_config(layer)}"
            )
    with torch.no_grad():
        for name, layer in layers.items():
            layer.vera_lambda_d.copy_(state_dict[f"{name}.vera_lambda_d"])
            layer.vera_lambda_b.copy_(state_dict[f"{name}.vera_lambda_b"])
