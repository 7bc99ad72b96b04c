"""PEFT's rules under PEFT's names, without importing peft: which modules ``apply_vera``
targets, and how parameters are counted.

Target selection follows ``peft.tuners.tuners_utils.check_target_module_exists`` and
``_maybe_include_all_linear_layers`` (peft 0.21):

* ``target_modules``: a regex fully matched against the module name, a list of names
  matched exactly or as a dotted suffix, or ``"all-linear"`` (every linear layer but the
  model's output head, ``get_output_embeddings()``);
* ``exclude_modules``: the same forms (regex or list), checked first;
* ``layers_to_transform`` / ``layers_pattern``: keep a suffix-matched module only if the
  index after its first numbered segment (or after ``<layers_pattern>.``) is one of these.
  As in PEFT, a name given in full is taken as it is.
"""

from __future__ import annotations

import re
import warnings
from typing import Optional, Sequence, Union

from torch import nn

from .base_layers import is_adaptable
from .module import VeRALinear

__all__ = ["ALL_LINEAR", "matches", "select_targets", "get_nb_trainable_parameters",
           "print_trainable_parameters"]

ALL_LINEAR = "all-linear"

Names = Union[str, Sequence[str]]


def matches(name: str, patterns: Names) -> bool:
    """PEFT's name rule: a string is a regex matched against the whole name; a list holds
    names matched exactly or as a dotted suffix (``"q_proj"`` matches ``"layers.0.q_proj"``)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _layer_index(name: str, layers_pattern: Optional[Names]) -> Optional[int]:
    # PEFT's regexes: the lazy ".*?" takes the first numbered segment (the layer), not a
    # nested one such as an expert index ("layers.1.experts.0.w1").
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _in_layers(name: str, layers_to_transform, layers_pattern) -> bool:
    index = _layer_index(name, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def _check_options(target_modules, exclude_modules, layers_to_transform, layers_pattern) -> None:
    if not isinstance(target_modules, (str, list, tuple, set)) or not target_modules \
            or (not isinstance(target_modules, str) and not all(isinstance(t, str) for t in target_modules)):
        raise ValueError(f"target_modules must be a regex, 'all-linear' or a non-empty list of names, "
                         f"got {target_modules!r}")
    if exclude_modules is not None and not isinstance(exclude_modules, (str, list, tuple, set)):
        raise ValueError(f"exclude_modules must be a regex or a list of names, got {exclude_modules!r}")
    if layers_pattern and layers_to_transform is None:
        raise ValueError("layers_pattern needs layers_to_transform (as in PEFT)")
    if layers_to_transform is None:
        return
    indices = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    if isinstance(layers_to_transform, bool) or not isinstance(indices, (list, tuple)) \
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"layers_to_transform must be an int or a list of ints, got {layers_to_transform!r}")
    if isinstance(target_modules, str):
        # PEFT silently ignores layers_to_transform for a regex (and for "all-linear"):
        # refuse rather than adapt layers the caller meant to leave out.
        raise ValueError("layers_to_transform applies to a list of target names (PEFT ignores it for "
                         f"a regex or 'all-linear', here {target_modules!r}); pass names such as "
                         "['q_proj', 'v_proj'], or put the layer numbers in the regex")


def output_head(model: nn.Module) -> Optional[nn.Module]:
    # transformers models name their output embedding (lm_head); others have none.
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def select_targets(model: nn.Module, target_modules: Union[str, Sequence[str]], *,
                   exclude_modules: Optional[Names] = None, layers_to_transform=None,
                   layers_pattern: Optional[Names] = None,
                   skip: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module of ``model`` that the options target, by PEFT's rules.

    Modules inside VeRA layers are never candidates (their base layers), nor the modules
    named in ``skip`` or inside them (``modules_to_save``, which PEFT never adapts).

    Raises:
        ValueError: bad options, or nothing targeted.
        TypeError: a targeted module is neither an ``nn.Linear`` nor a ``Conv1D``.
    """
    _check_options(target_modules, exclude_modules, layers_to_transform, layers_pattern)
    blocked = tuple(f"{n}." for n, m in model.named_modules() if n and isinstance(m, VeRALinear))
    blocked += tuple(f"{s}." for s in skip)
    skipped = set(skip)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    if all_linear:
        head = output_head(model)
        target_modules = {n for n, m in model.named_modules()
                          if n and (is_adaptable(m) or isinstance(m, VeRALinear)) and m is not head}
    by_layer = layers_to_transform is not None and layers_to_transform != []  # PEFT: [] = all
    matched, excluded = [], []
    for name, module in model.named_modules():
        if not name or name in skipped or name.startswith(blocked):
            continue
        if exclude_modules and matches(name, exclude_modules):
            excluded.append(name)
            continue
        if isinstance(target_modules, str) or name in target_modules:
            hit = matches(name, target_modules)  # a regex, or a name given in full (as PEFT)
        else:
            hit = matches(name, target_modules) and (
                not by_layer or _in_layers(name, layers_to_transform, layers_pattern))
        if not hit:
            continue
        if not (is_adaptable(module) or isinstance(module, VeRALinear)):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; "
                            "VeRA supports nn.Linear and transformers' Conv1D")
        matched.append((name, module))
    if exclude_modules and not excluded:
        warnings.warn(f"exclude_modules={exclude_modules!r} excluded nothing", stacklevel=3)
    if not matched:
        raise ValueError(f"target_modules {target_modules if not all_linear else ALL_LINEAR!r} "
                         "matched no nn.Linear in the model (after exclude_modules, "
                         "layers_to_transform and modules_to_save)")
    return matched


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, as PEFT's ``get_nb_trainable_parameters``.

    Shared parameters count once; a bitsandbytes 4-bit weight counts two values per byte of
    its packed storage; a DeepSpeed ZeRO-3 placeholder counts its full size.
    """
    trainable = total = 0
    for _, param in model.named_parameters():
        count = param.numel()
        if count == 0 and hasattr(param, "ds_numel"):
            count = param.ds_numel  # ZeRO-3 keeps an empty placeholder on each rank
        if type(param).__name__ == "Params4bit":
            count *= 2 * param.element_size()  # two 4-bit values per byte of storage
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: N || all params: M || trainable%: P`` (PEFT's line)."""
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / total:.4f}")
