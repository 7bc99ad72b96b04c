"""Whole-model helpers: put VeRA layers into a model, save and load just the adapter."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Mapping
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .base_layers import is_adaptable
from .module import VeRALinear
from .projection import check_seed

__all__ = [
    "apply_vera",
    "unwrap",
    "vera_layers",
    "vera_state_dict",
    "load_vera_state_dict",
    "disable_vera",
    "merge_vera",
    "unmerge_vera",
]

CONFIG_KEY = "vera_config"


def _matches(name: str, target_modules: Union[str, list[str], tuple[str, ...]]) -> bool:
    # As PEFT: a string is a regex matched against the full name; a list holds
    # names matched exactly or as a dotted suffix.
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile wrappers (which prefix its names).

    FSDP2's ``fully_shard`` works in place and needs no unwrapping.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule called ``name`` (dotted path) was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def vera_layers(model: nn.Module) -> Iterator[tuple[str, VeRALinear]]:
    """(qualified name, module) for every VeRALinear in ``model`` (wrappers unwrapped)."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, VeRALinear):
            yield name, module


def _is_dtensor(t: torch.Tensor) -> bool:
    # FSDP2 shards parameters as DTensors. Imported on demand: the module costs
    # ~0.4 s to import, and only sharded models need it.
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    # The adapter file holds whole vectors.
    return t.full_tensor() if _is_dtensor(t) else t


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    value = value.to(device=param.device, dtype=param.dtype)
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, param.device_mesh, param.placements)
    param.copy_(value)


def apply_vera(
    model: nn.Module,
    target_modules: Union[str, list[str], tuple[str, ...]],
    r: int,
    *,
    seed: int = 0,
    d_initial: float = 0.1,
    dropout: float = 0.0,
) -> nn.Module:
    """Replace the matching ``nn.Linear`` (or ``Conv1D``) submodules by ``VeRALinear``; freeze the rest.

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
        if not (is_adaptable(module) or isinstance(module, VeRALinear)):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; "
                "VeRA supports nn.Linear and transformers' Conv1D"
            )
        matched.append((name, module))
    if not matched:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in the model")
    _check_same_adapter(model, r, check_seed(seed))

    for name, module in matched:
        if isinstance(module, VeRALinear):
            continue  # already adapted
        replace_submodule(model, name, VeRALinear.from_linear(module, r, seed=seed, d_initial=d_initial,
                                                              dropout=dropout))

    model.requires_grad_(False)
    for _, layer in vera_layers(model):
        for adapter in layer.adapter_names():
            for vector in layer.adapter_vectors(adapter):
                vector.requires_grad_(True)
    return model


def _check_same_adapter(model: nn.Module, r: int, seed: int) -> None:
    # One model, one r and one seed: applying VeRA again must not mix them.
    for name, layer in vera_layers(model):
        if layer.r != r or (layer.projections is None and layer.seed != seed):
            raise ValueError(
                f"apply_vera(r={r}, seed={seed}): the model already has VeRA layer {name!r} with "
                f"r={layer.r}, seed={layer.seed}; one model shares one r and seed "
                "(unload the existing layers first, or apply with the same r and seed)"
            )


@contextlib.contextmanager
def disable_vera(model: nn.Module):
    """Within the block, every VeRA layer computes its base layer alone (e.g. a DPO reference).

    Merged layers are unmerged for the duration and merged again afterwards.
    """
    layers = [layer for _, layer in vera_layers(model)]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
        for layer in merged:
            layer.merge()


def merge_vera(model: nn.Module) -> nn.Module:
    """Fold every VeRA layer's adapter into its base weight (see ``VeRALinear.merge``)."""
    for _, layer in vera_layers(model):
        if not layer.merged:
            layer.merge()
    return model


def unmerge_vera(model: nn.Module) -> nn.Module:
    """Undo ``merge_vera``."""
    for _, layer in vera_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


def _layer_config(layer: VeRALinear) -> dict:
    return {
        # Explicit projections belong to the model, not to the adapter file.
        "seed": layer.seed if layer.projections is None else None,
        "r": layer.r,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
    }


def vera_state_dict(model: nn.Module, adapter: str = "default") -> dict:
    """One adapter alone (``"default"``: the one apply_vera made): every layer's two vectors
    plus what rebuilds its projections.

    Keys are ``"<layer>.vera_lambda_d"`` / ``"<layer>.vera_lambda_b"`` (tensors)
    and ``"vera_config"``: ``{layer: {"seed", "r", "in_features", "out_features"}}``.
    Suitable for ``torch.save`` (and ``torch.load(weights_only=True)``). Layer
    names are those of the unwrapped model, so a checkpoint taken under DDP or
    FSDP2 (whole vectors, gathered; a collective there, so call it on every
    rank) loads into a plain single-process model.
    """
    state: dict = {}
    config = {}
    for name, layer in vera_layers(model):
        lambda_d, lambda_b = layer.adapter_vectors(adapter)
        state[f"{name}.vera_lambda_d"] = _full(lambda_d.detach())
        state[f"{name}.vera_lambda_b"] = _full(lambda_b.detach())
        config[name] = _layer_config(layer)
    if not config:
        raise ValueError("model has no VeRALinear layers")
    state[CONFIG_KEY] = config
    return state


def _vector_problem(value, expected: torch.Tensor) -> Optional[str]:
    if not isinstance(value, torch.Tensor):
        return f"expected a tensor, got {type(value).__name__}"
    if not value.is_floating_point():
        return f"expected a floating-point tensor, got {value.dtype}"
    if tuple(value.shape) != tuple(expected.shape):
        return f"expected shape {tuple(expected.shape)}, got {tuple(value.shape)}"
    return None


def _check_vera_state_dict(layers: dict, state_dict, strict: bool) -> None:
    """Raise ValueError naming the first problem of ``state_dict`` for ``layers``; copy nothing."""
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get(CONFIG_KEY), Mapping):
        raise ValueError(f"not a vera_state_dict: no {CONFIG_KEY!r} mapping")
    saved = state_dict[CONFIG_KEY]
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
        for vector in ("vera_lambda_d", "vera_lambda_b"):
            key = f"{name}.{vector}"
            if key not in state_dict:
                raise ValueError(f"state dict has no {key!r}")
            problem = _vector_problem(state_dict[key], getattr(layer, vector))
            if problem is not None:
                raise ValueError(f"state dict entry {key!r}: {problem}")
    known = {CONFIG_KEY} | {f"{n}.{v}" for n in layers for v in ("vera_lambda_d", "vera_lambda_b")}
    unknown = sorted(str(k) for k in state_dict if k not in known)
    if unknown and strict:
        raise ValueError(f"state dict has unknown keys {unknown} (strict=False loads without them)")
    if unknown:
        warnings.warn(f"load_vera_state_dict: ignoring unknown keys {unknown}", stacklevel=3)


def load_vera_state_dict(model: nn.Module, state_dict: dict, *, strict: bool = True,
                         adapter: str = "default") -> None:
    """Copy the vectors of ``vera_state_dict`` output into ``model``'s VeRA layers (into
    ``adapter``'s vectors).

    Atomic: every layer, key, tensor type and exact shape (and each layer's
    seed, r and shape) is checked before anything is copied; on any problem
    a ValueError names it and the model is left untouched. Unknown keys are
    an error, or a warning with ``strict=False``. Merged layers stay merged,
    with the loaded vectors: the old adapter is taken out of the base weight
    and the new one folded in, so the base weight never drifts.
    """
    layers = dict(vera_layers(model))
    _check_vera_state_dict(layers, state_dict, strict)
    for layer in layers.values():
        layer.adapter_vectors(adapter)  # KeyError naming the adapters if absent
    with torch.no_grad():
        for name, layer in layers.items():
            merged = layer.merged
            if merged:
                layer.unmerge()
            lambda_d, lambda_b = layer.adapter_vectors(adapter)
            _copy_into(lambda_d, state_dict[f"{name}.vera_lambda_d"])
            _copy_into(lambda_b, state_dict[f"{name}.vera_lambda_b"])
            if merged:
                layer.merge()
