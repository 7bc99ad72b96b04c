"""Whole-model helpers: put VeRA layers into a model, save and load just the adapter.

Beside the VeRA vectors a model may train, as in PEFT, whole modules (``modules_to_save``,
e.g. a classifier head) and biases (``bias="all"`` / ``"vera_only"``). The model remembers
them (``trained_extras``), and the adapter carries them: ``vera_state_dict`` /
``load_vera_state_dict``, ``save_adapter`` and ``save_peft_adapter`` include their tensors.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Mapping
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .module import DEFAULT_ADAPTER, VeRALinear, tensor_problem
from .peft_compat import matches, output_head, select_targets
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
    "merge_and_unload",
    "unload",
    "trained_extras",
]

CONFIG_KEY = "vera_config"
# The entry of CONFIG_KEY's mapping that names what is trained beside the vectors. No
# module path starts with a dot, so it can never be a layer's name.
TRAINED_KEY = ".trained"
# Where a model remembers its trained extras, and where a PeftModel converted by from_peft
# keeps the model it became (plain attributes: they are not state).
TRAINED_ATTR = "_vera_trained_extras"
CONVERTED_ATTR = "_vera_kernels_converted_to"
FSDP1_SEGMENT = "_fsdp_wrapped_module"
# Marks the module apply_vera adapted: layer names are relative to it (unwrap).
ROOT_ATTR = "_vera_kernels_root"
BIAS_OPTIONS = ("none", "all", "vera_only")
NO_EXTRAS = {"modules_to_save": [], "bias": "none"}


def unwrap(model: nn.Module) -> nn.Module:
    """The model the VeRA layers were applied to: inside DDP / torch.compile wrappers
    (which prefix its names), inside a PeftModel that ``from_peft`` converted, and inside
    any other wrapper (e.g. a PEFT LoRA model around it) that holds the module
    ``apply_vera`` marked, so that layer names never carry the wrapper's prefix.

    FSDP2's ``fully_shard`` works in place and needs no unwrapping.
    """
    model = _unwrap_wrappers(model)
    if vars(model).get(ROOT_ATTR):
        return model
    # A wrapper of another kind around the adapted model: the one marked module,
    # when every VeRA layer lies inside it (several adapted submodules: the model).
    marked = [m for m in model.modules() if vars(m).get(ROOT_ATTR)]
    if len(marked) != 1:
        return model
    inside = {id(m) for m in marked[0].modules()}
    layers = [m for m in model.modules() if isinstance(m, VeRALinear)]
    return marked[0] if all(id(layer) in inside for layer in layers) else model


def _unwrap_wrappers(model: nn.Module) -> nn.Module:
    """``model`` inside DDP, FSDP1, torch.compile and from_peft wrappers."""
    fsdp1 = _fsdp1_class()
    while True:
        converted = vars(model).get(CONVERTED_ATTR)
        if isinstance(model, nn.parallel.DistributedDataParallel) or (
                fsdp1 is not None and isinstance(model, fsdp1)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        elif converted is not None:
            model = converted
        else:
            return model


def _fsdp1_class():
    # FSDP1 is imported by the models that use it: look, don't import (it is slow).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return getattr(fsdp, "FullyShardedDataParallel", None)


def _without_wrappers(name: str) -> str:
    # FSDP1 puts a "_fsdp_wrapped_module" segment into the names of what it wraps.
    return ".".join(part for part in name.split(".") if part != FSDP1_SEGMENT)


@contextlib.contextmanager
def gathered(model: nn.Module, modify: bool = False):
    """Within the block, parameters sharded by FSDP1 (``FullyShardedDataParallel``) or
    DeepSpeed ZeRO-3 hold their whole values, read-only unless ``modify`` (changes are then
    sharded again at the end: FSDP1 writes back, ZeRO-3 takes rank 0's); it yields whether
    any did (then what is read must be copied before the block ends). A collective: every
    rank enters it. FSDP2's DTensors need nothing here (``_full`` gathers them)."""
    with contextlib.ExitStack() as stack:
        entered = False
        fsdp1 = _fsdp1_class()
        if fsdp1 is not None:
            wrapped = [m for m in model.modules() if isinstance(m, fsdp1)]
            inner = {id(d) for m in wrapped for d in m.modules() if d is not m}
            for m in wrapped:
                if id(m) not in inner:  # the outermost ones gather their subtrees
                    stack.enter_context(fsdp1.summon_full_params(m, writeback=modify))
                    entered = True
        # ZeRO-3 gathers what it is given: the adapted layers and the trained extras,
        # not the whole model. Without deepspeed imported no parameter is partitioned:
        # nothing to look for (disable_vera enters this twice a block).
        deepspeed = sys.modules.get("deepspeed")
        partitioned = [p for p in _adapter_params(model) if hasattr(p, "ds_id")] if deepspeed else []
        if partitioned:
            stack.enter_context(deepspeed.zero.GatheredParameters(
                partitioned, modifier_rank=0 if modify else None))
            entered = True
        yield entered


def _adapter_params(model: nn.Module) -> list:
    """The VeRA layers' parameters (vectors, base weight and bias) and the trained extras'."""
    root = unwrap(model)
    params = {id(p): p for _, layer in vera_layers(root) for p in layer.parameters()}
    for tensor in _trained_tensors(root, trained_extras(root)).values():
        if isinstance(tensor, nn.Parameter):
            params.setdefault(id(tensor), tensor)
    return list(params.values())


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule called ``name`` (dotted path) was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def vera_layers(model: nn.Module) -> Iterator[tuple[str, VeRALinear]]:
    """(qualified name, module) for every VeRALinear in ``model`` (wrappers unwrapped)."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, VeRALinear):
            yield _without_wrappers(name), module


def shared_value(layers, value_of, message: str):
    """The one value ``value_of`` gives every layer; ValueError(``message``) when they differ
    (``{values}`` in the message becomes the sorted values found)."""
    values = {value_of(layer) for layer in layers}
    if len(values) != 1:
        raise ValueError(message.format(values=sorted(values, key=repr)))
    return values.pop()


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


# What a model trains beside the vectors ------------------------------------------------

def trained_extras(model: nn.Module) -> dict:
    """``{"modules_to_save": [full names], "bias": "none" | "all" | "vera_only"}``: what
    ``model`` trains beside its VeRA vectors (set by ``apply_vera`` or ``from_peft``)."""
    extras = vars(unwrap(model)).get(TRAINED_ATTR) or NO_EXTRAS
    return {"modules_to_save": list(extras["modules_to_save"]), "bias": extras["bias"]}


def _set_trained(root: nn.Module, extras: dict) -> None:
    value = {"modules_to_save": sorted(extras["modules_to_save"]), "bias": extras["bias"]}
    if value == NO_EXTRAS:
        vars(root).pop(TRAINED_ATTR, None)
    else:
        vars(root)[TRAINED_ATTR] = value


def _describe(extras: dict) -> str:
    return f"modules_to_save={extras['modules_to_save']}, bias={extras['bias']!r}"


def _bias_params(root: nn.Module, bias: str) -> dict:
    """The biases PEFT's ``bias`` option trains, by parameter name."""
    if bias == "all":  # every bias of the model
        return {n: p for n, p in root.named_parameters() if n == "bias" or n.endswith(".bias")}
    if bias == "vera_only":  # the biases of the adapted layers
        return {f"{n}.base_layer.bias" if n else "base_layer.bias": layer.base_layer.bias
                for n, layer in vera_layers(root) if layer.base_layer.bias is not None}
    return {}


def _check_saved_modules(root: nn.Module, saved: Sequence[str]) -> None:
    """Each module to save exists, holds no VeRA layer, and shares no parameter with a
    module outside it (training it would silently change that one too, which PEFT's
    modules_to_save, a separate copy, does not)."""
    modules = dict(root.named_modules())
    in_vera = tuple(f"{n}." for n, m in modules.items() if n and isinstance(m, VeRALinear))
    owner = {}
    for name in saved:
        if name not in modules:
            raise ValueError(f"module to save {name!r} is not in the model")
        if name.startswith(in_vera) or any(isinstance(m, VeRALinear) for m in modules[name].modules()):
            raise ValueError(f"module to save {name!r} is, holds or lies inside a VeRA layer; "
                             "a module is either adapted or saved whole")
        owner.update({id(p): name for p in modules[name].parameters()})
    inside = tuple(f"{n}." for n in saved)
    for pname, param in root.named_parameters(remove_duplicate=False):
        if id(param) in owner and not pname.startswith(inside):
            raise ValueError(
                f"module to save {owner[id(param)]!r} shares a parameter with {pname!r} (tied "
                "weights): training it would change both, which PEFT (a separate copy) would "
                "not reproduce; untie them first (e.g. tie_word_embeddings=False)")


def _trained_tensors(root: nn.Module, extras: dict) -> dict:
    """The live tensors ``extras`` names, by state-dict key: every module to save's state
    (parameters and buffers) and the trained biases."""
    _check_saved_modules(root, extras["modules_to_save"])
    tensors = {}
    for name in extras["modules_to_save"]:
        for key, value in root.get_submodule(name).state_dict(keep_vars=True).items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"module to save {name!r} has non-tensor state {key!r}, "
                                 "which an adapter file cannot hold")
            tensors[f"{name}.{key}"] = value
    for key, param in _bias_params(root, extras["bias"]).items():
        tensors.setdefault(key, param)  # a saved module's bias is already there
    return tensors


def _mark_trainable(root: nn.Module) -> None:
    # Exactly the active adapter's vectors and the trained extras require grad.
    root.requires_grad_(False)
    for _, layer in vera_layers(root):
        layer.set_trainable([] if layer.active_adapter is None else [layer.active_adapter])
    for tensor in _trained_tensors(root, trained_extras(root)).values():
        if isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(True)


def _combined_extras(root: nn.Module, modules_to_save, bias: str) -> dict:
    """The model's extras plus those asked for (apply_vera adds; it never un-trains)."""
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias must be one of {BIAS_OPTIONS}, got {bias!r}")
    if modules_to_save is None:
        modules_to_save = []
    if isinstance(modules_to_save, str) or not all(isinstance(m, str) and m for m in modules_to_save):
        raise ValueError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    current = trained_extras(root)
    if bias != "none" and current["bias"] not in ("none", bias):
        raise ValueError(f"apply_vera(bias={bias!r}): the model already trains bias={current['bias']!r}")
    saved = set(current["modules_to_save"])
    names = [n for n, _ in root.named_modules() if n]
    for wanted in modules_to_save:
        hits = [n for n in names if matches(n, [wanted])]
        if not hits:
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module of the model")
        saved.update(hits)
    # A module inside another saved module is saved with it.
    outermost = [n for n in saved if not any(n.startswith(o + ".") for o in saved)]
    return {"modules_to_save": sorted(outermost), "bias": bias if bias != "none" else current["bias"]}


def _warn_kept_extras(root: nn.Module, action: str) -> None:
    extras = trained_extras(root)
    if extras != NO_EXTRAS:
        warnings.warn(f"{action}: the model also trains {_describe(extras)}; those keep their "
                      "trained values (the model holds no other copy), so this is not the base "
                      "model's output", stacklevel=3)


def apply_vera(
    model: nn.Module,
    target_modules: Union[str, list[str], tuple[str, ...]],
    r: int,
    *,
    seed: int = 0,
    d_initial: float = 0.1,
    dropout: float = 0.0,
    use_dora: bool = False,
    modules_to_save: Optional[Sequence[str]] = None,
    bias: str = "none",
    exclude_modules: Optional[Union[str, Sequence[str]]] = None,
    layers_to_transform: Optional[Union[int, list[int]]] = None,
    layers_pattern: Optional[Union[str, list[str]]] = None,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` (or ``Conv1D``) submodules by ``VeRALinear``; freeze the rest.

    Targets are chosen by PEFT's rules and option names (see ``peft_compat``).

    Args:
        model: modified in place (and returned).
        target_modules: a regex matched against full module names, a list of names
            matched exactly or as a dotted suffix (``"q_proj"`` matches
            ``"layers.0.attn.q_proj"``), or ``"all-linear"``: every linear layer but the
            output head (``model.get_output_embeddings()``).
        r, seed, d_initial, dropout, use_dora: as for ``VeRALinear``; every layer shares
            the seed (``use_dora=True``: DVoRA, a trainable magnitude per output feature).
        modules_to_save: names (exact or dotted suffix) of modules trained whole beside
            the adapter, e.g. ``["lm_head"]`` or a classifier: they become trainable, are
            never adapted, and every adapter format carries their weights.
        bias: ``"none"``, ``"all"`` (every bias of the model trains) or ``"vera_only"``
            (the biases of the adapted layers), as PEFT's ``bias``.
        exclude_modules: a regex or list of names never adapted.
        layers_to_transform, layers_pattern: adapt suffix-matched names only in these
            layer indices (PEFT's rule: the index after ``<layers_pattern>.``, or after the
            first numbered segment).

    Returns:
        ``model``, in which only the VeRA vectors and the extras above require grad.

    Raises:
        ValueError: nothing matched, a bad option, a ``modules_to_save`` entry matching
            nothing or tied to a module outside it. TypeError: a match is not an nn.Linear.
    """
    root = _unwrap_wrappers(model)  # the model asked for, not a marked submodule of it
    extras = _combined_extras(root, modules_to_save, bias)
    matched = select_targets(root, target_modules, exclude_modules=exclude_modules,
                             layers_to_transform=layers_to_transform,
                             layers_pattern=layers_pattern, skip=extras["modules_to_save"])
    _check_same_adapter(root, r, check_seed(seed), use_dora)
    _check_saved_modules(root, extras["modules_to_save"])

    for name, module in matched:
        if isinstance(module, VeRALinear):
            continue  # already adapted
        replace_submodule(root, name, VeRALinear.from_linear(
            module, r, seed=seed, d_initial=d_initial, dropout=dropout, use_dora=use_dora))
    _set_trained(root, extras)
    _mark_trainable(root)
    for module in root.modules():  # layer names are relative to this root from now on
        vars(module).pop(ROOT_ATTR, None)
    vars(root)[ROOT_ATTR] = True
    return model


def _check_same_adapter(model: nn.Module, r: int, seed: int, use_dora: bool) -> None:
    # One model, one r, one seed and one kind (VeRA or DVoRA): applying again must not mix them.
    for name, layer in vera_layers(model):
        if layer.r != r or (layer.projections is None and layer.seed != seed) \
                or layer.use_dora != use_dora:
            raise ValueError(
                f"apply_vera(r={r}, seed={seed}, use_dora={use_dora}): the model already has "
                f"VeRA layer {name!r} with r={layer.r}, seed={layer.seed}, "
                f"use_dora={layer.use_dora}; one model shares one r, seed and use_dora "
                "(unload the existing layers first, or apply with the same ones)"
            )


@contextlib.contextmanager
def disable_vera(model: nn.Module):
    """Within the block, every VeRA layer computes its base layer alone (e.g. a DPO reference).

    Merged layers are unmerged for the duration and afterwards hold again the adapter they
    held (``VeRALinear.suspend`` / ``resume``): the state after the block is the state before.
    Modules to save and trained biases (``trained_extras``) keep their trained values: a
    warning says so.
    """
    _warn_kept_extras(unwrap(model), "disable_vera")
    layers = [layer for _, layer in vera_layers(model)]
    with gathered(model, modify=True):  # a merged adapter leaves sharded weights whole
        saved = [layer.suspend() for layer in layers]
    try:
        yield model
    finally:
        with gathered(model, modify=True):
            for layer, state in zip(reversed(layers), reversed(saved)):
                layer.resume(state)


def merge_vera(model: nn.Module) -> nn.Module:
    """Fold every VeRA layer's adapter into its base weight (see ``VeRALinear.merge``).
    Every layer is checked first (none merges if one cannot). Sharded weights (FSDP1,
    ZeRO-3) are gathered for it: call it on every rank."""
    root = unwrap(model)
    layers = [(name, layer) for name, layer in vera_layers(root) if not layer.merged]
    _check_mergeable(root, layers)
    with gathered(model, modify=True):
        for _, layer in layers:
            layer.merge()
    return model


def _check_mergeable(root: nn.Module, layers: list) -> None:
    """ValueError / RuntimeError before anything merges: a layer that cannot merge now, or
    whose base weight is tied to another module (merging would change that one too)."""
    owners: dict = {}
    for pname, param in root.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    for name, layer in layers:
        problem = layer.merge_problem()
        if problem is not None:
            raise RuntimeError(f"layer {name!r}: {problem}")
        inside = f"{name}." if name else ""
        tied = [n for n in owners.get(id(layer.base_layer.weight), []) if not n.startswith(inside)]
        if tied:
            raise ValueError(f"layer {name!r}'s base weight is tied to {tied[:2]}: merging would "
                             "change them too; untie them first (e.g. tie_word_embeddings=False) "
                             "or keep the adapter unmerged")


def unmerge_vera(model: nn.Module) -> nn.Module:
    """Undo ``merge_vera`` (on every rank, as it)."""
    with gathered(model, modify=True):
        for _, layer in vera_layers(model):
            if layer.merged:
                layer.unmerge()
    return model


def _vera_layer_list(root: nn.Module) -> list:
    layers = list(vera_layers(root))
    if not layers:
        raise ValueError("model has no VeRALinear layers")
    return layers


def _layers_to_remove(root: nn.Module, action: str) -> list:
    # An open block would put its state back into base layers that left the model.
    layers = _vera_layer_list(root)
    busy = [name for name, layer in layers if layer.in_block]
    if busy:
        raise RuntimeError(f"{action} inside a disable_vera or adapter_batch block (layers "
                           f"{busy[:3]}...): leave the block first")
    return layers


def _put_base_layers_back(root: nn.Module, layers: list) -> nn.Module:
    for name, layer in layers:
        if not name:  # the model is a single VeRA layer
            return layer.base_layer
        replace_submodule(root, name, layer.base_layer)
    _set_trained(root, NO_EXTRAS)  # a plain model from here on
    vars(root).pop(ROOT_ATTR, None)
    return root


def merge_and_unload(model: nn.Module) -> nn.Module:
    """A plain model computing what ``model`` computes now: each VeRA layer's active
    adapter folded into its base weight, and the base layer put back in its place.

    In place; returns the unwrapped model, of the original architecture (its
    ``save_pretrained`` output loads with e.g. ``LlamaForCausalLM.from_pretrained``).
    Modules to save and trained biases stay as trained. A quantized base weight is
    requantized (lossy, warned), as ``VeRALinear.merge``. Sharded weights (FSDP1,
    ZeRO-3) are gathered to merge: call it on every rank.
    """
    root = unwrap(model)
    layers = _layers_to_remove(root, "merge_and_unload")
    to_merge = [(name, layer) for name, layer in layers
                if not (layer.merged or layer.disabled or layer.active_adapter is None)]
    _check_mergeable(root, to_merge)
    with gathered(model, modify=True):
        for _, layer in to_merge:
            layer.merge()
    _untie_diverged_embeddings(root)
    return _put_base_layers_back(root, layers)


def _untie_diverged_embeddings(root: nn.Module) -> None:
    # PEFT's rule on merging: an output head trained apart from the input embedding (a
    # modules_to_save copy of a tied lm_head) must not be re-tied when the saved model
    # loads, which a config still saying tie_word_embeddings=True would do.
    config = getattr(root, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        head, embedding = output_head(root), root.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a model with embeddings
        return
    weights = [getattr(m, "weight", None) for m in (head, embedding)]
    if all(isinstance(w, torch.Tensor) for w in weights) and weights[0].data_ptr() != weights[1].data_ptr():
        config.tie_word_embeddings = False
        warnings.warn("merge_and_unload: the output head is no longer tied to the input "
                      "embedding; set tie_word_embeddings=False in the model's config", stacklevel=3)


def unload(model: nn.Module) -> nn.Module:
    """The base model back: every VeRA layer replaced by its base layer, adapters dropped.

    Base weights are left as they were (a merged layer is unmerged first, exact up to the
    weight's rounding). Modules to save and trained biases keep their trained values (the
    model holds no other copy; warned). In place; returns the unwrapped model.
    """
    root = unwrap(model)
    layers = _layers_to_remove(root, "unload")
    _warn_kept_extras(root, "unload")
    for _, layer in layers:
        if layer.merged:
            layer.unmerge()
    return _put_base_layers_back(root, layers)


def _layer_config(layer: VeRALinear) -> dict:
    config = {
        # Explicit projections belong to the model, not to the adapter file.
        "seed": layer.seed if layer.projections is None else None,
        "r": layer.r,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
    }
    if layer.use_dora:  # absent for VeRA: older state dicts stay valid
        config["use_dora"] = True
    return config


def vera_state_dict(model: nn.Module, adapter: str = "default") -> dict:
    """One adapter alone (``"default"``: the one apply_vera made): every layer's vectors
    plus what rebuilds its projections, and the tensors the model trains beside them.

    Keys are ``"<layer>.vera_lambda_d"`` / ``"<layer>.vera_lambda_b"`` (tensors;
    DVoRA layers add ``"<layer>.vera_magnitude"``) and ``"vera_config"``:
    ``{layer: {"seed", "r", "in_features", "out_features"}}`` (DVoRA layers add
    ``"use_dora": True``).
    A model with modules to save or trained biases (``trained_extras``) adds their
    tensors under the model's own keys (``"lm_head.weight"``,
    ``"<layer>.base_layer.bias"``) and ``vera_config[".trained"]``:
    ``{"modules_to_save": [...], "bias": ...}``; those are shared by all the model's
    adapters, so every adapter's state dict carries them.
    Suitable for ``torch.save`` (and ``torch.load(weights_only=True)``). Layer
    names are those of the unwrapped model, so a checkpoint taken under DDP or
    FSDP2 (whole vectors, gathered; a collective there, so call it on every
    rank) loads into a plain single-process model. Under FSDP1 and DeepSpeed ZeRO-3
    the vectors are gathered too (``gathered``; also a collective): whole vectors,
    under the model's own names, never a rank's shard.
    """
    root = unwrap(model)
    state: dict = {}
    config: dict = {}
    with gathered(model) as temporary:
        def take(tensor):
            whole = _full(tensor.detach())
            return whole.clone() if temporary else whole

        for name, layer in _vera_layer_list(root):
            for attr, vector in layer.adapter_parameters(adapter).items():
                state[f"{name}.{attr}"] = take(vector)
            config[name] = _layer_config(layer)
        extras = trained_extras(root)
        if extras != NO_EXTRAS:
            config[TRAINED_KEY] = extras
            for key, tensor in _trained_tensors(root, extras).items():
                state[_without_wrappers(key)] = take(tensor)
    state[CONFIG_KEY] = config
    return state


def _config_of(state_dict) -> Mapping:
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get(CONFIG_KEY), Mapping):
        raise ValueError(f"not a vera_state_dict: no {CONFIG_KEY!r} mapping")
    return state_dict[CONFIG_KEY]


def _saved_extras(state_dict) -> dict:
    """The trained extras a state dict carries (checked), as ``trained_extras`` gives them."""
    extras = _config_of(state_dict).get(TRAINED_KEY, NO_EXTRAS)
    names = extras.get("modules_to_save") if isinstance(extras, Mapping) else None
    if not isinstance(extras, Mapping) or set(extras) != set(NO_EXTRAS) \
            or extras["bias"] not in BIAS_OPTIONS or not isinstance(names, (list, tuple)) \
            or not all(isinstance(n, str) for n in names):
        raise ValueError(f"state dict entry {CONFIG_KEY}[{TRAINED_KEY!r}]: expected "
                         f"{{'modules_to_save': [names], 'bias': one of {BIAS_OPTIONS}}}, got {extras!r}")
    return {"modules_to_save": sorted(names), "bias": extras["bias"]}


def _check_vera_state_dict(layers: dict, state_dict, strict: bool,
                           extras: Optional[dict] = None) -> None:
    """Raise ValueError naming the first problem of ``state_dict`` for ``layers`` (and the
    ``extras`` tensors, by key); copy nothing. ``extras=None``: the state dict must carry
    vectors alone (``add_adapter``: extras are the model's, not an adapter's)."""
    saved = _config_of(state_dict)
    if extras is None and TRAINED_KEY in saved:
        raise ValueError(
            f"this state dict also carries {_describe(_saved_extras(state_dict))}, which a model "
            "holds once for all its adapters, not per adapter: add_adapter takes vectors alone")
    extras = extras or {}
    saved_layers = set(saved) - {TRAINED_KEY}
    missing, unexpected = sorted(set(layers) - saved_layers), sorted(saved_layers - set(layers))
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
    expected = {f"{n}.{attr}": vector for n, layer in layers.items()
                for attr, vector in layer.adapter_parameters(DEFAULT_ADAPTER).items()}
    expected.update(extras)
    for key, tensor in expected.items():
        if key not in state_dict:
            raise ValueError(f"state dict has no {key!r}")
        problem = tensor_problem(state_dict[key], tensor)
        if problem is not None:
            raise ValueError(f"state dict entry {key!r}: {problem}")
    unknown = sorted(str(k) for k in state_dict if k != CONFIG_KEY and k not in expected)
    if unknown and strict:
        raise ValueError(f"state dict has unknown keys {unknown} (strict=False loads without them)")
    if unknown:
        warnings.warn(f"load_vera_state_dict: ignoring unknown keys {unknown}", stacklevel=3)


def _check_shared_extras_unchanged(state_dict, extras: dict, adapter: str) -> None:
    # Modules to save and trained biases exist once per model, for every
    # adapter: loading another adapter must not overwrite them.
    changed = [key for key, tensor in extras.items()
               if not torch.equal(state_dict[key].to(tensor.device, tensor.dtype), tensor.detach())]
    if changed:
        raise ValueError(
            f"loading adapter {adapter!r} would overwrite {changed[:3]}..., which the model holds "
            "once for all its adapters (modules to save, trained biases); load vectors alone "
            "into other adapters")


def load_vera_state_dict(model: nn.Module, state_dict: dict, *, strict: bool = True,
                         adapter: str = "default") -> None:
    """Copy the vectors of ``vera_state_dict`` output into ``model``'s VeRA layers (into
    ``adapter``'s vectors), and the tensors of its modules to save and trained biases.

    Atomic: every layer, key, tensor type and exact shape (and each layer's
    seed, r and shape) is checked before anything is copied; on any problem
    a ValueError names it and the model is left untouched. Unknown keys are
    an error, or a warning with ``strict=False``. The state dict's modules to
    save and bias option must be the model's; a model without any takes them
    on (they become trainable and remembered, as ``apply_vera`` would make them).
    Merged layers stay merged,
    with the loaded vectors: the old adapter is taken out of the base weight
    and the new one folded in, so the base weight never drifts. Under FSDP1 and
    ZeRO-3, call it on every rank (the vectors are gathered, then sharded again).
    """
    layers = dict(vera_layers(model))
    root = unwrap(model)
    saved, current = _saved_extras(state_dict), trained_extras(root)
    adopt = current == NO_EXTRAS and saved != NO_EXTRAS
    if current != saved and not adopt:
        raise ValueError(f"the model trains {_describe(current)} beside its vectors, the state "
                         f"dict carries {_describe(saved)}: they must be the same")
    # Sharded vectors (FSDP1, ZeRO-3) are whole within: checked and written back.
    with gathered(model, modify=True):
        extras = _trained_tensors(root, saved)
        _check_vera_state_dict(layers, state_dict, strict, extras)
        for layer in layers.values():
            layer.adapter_vectors(adapter)  # KeyError naming the adapters if absent
        if adapter != DEFAULT_ADAPTER:
            _check_shared_extras_unchanged(state_dict, extras, adapter)
        with torch.no_grad():
            for name, layer in layers.items():
                merged = layer.merged_adapter == adapter  # the weight holds the vectors we replace
                if merged:
                    layer.unmerge()
                for attr, vector in layer.adapter_parameters(adapter).items():
                    _copy_into(vector, state_dict[f"{name}.{attr}"])
                if merged:
                    layer.merge(adapter)
            for key, tensor in extras.items():
                _copy_into(tensor, state_dict[key])
        if adopt:
            _set_trained(root, saved)
            for tensor in extras.values():
                if isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(True)
