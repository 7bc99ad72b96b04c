"""Switch between PEFT's VeRA and ours without retraining.

* ``from_peft``: PEFT VeRA layers (nn.Linear or transformers' Conv1D, active
  adapter) become ``VeRALinear`` layers in explicit-projection mode: PEFT drew
  A and B from ``torch.Generator``, not from our spec, so the converted layers
  keep PEFT's stored ``vera_A`` / ``vera_B`` (shared, sliced per layer as PEFT
  slices them) together with the trained vectors, dropout and base layer. PEFT's
  ``modules_to_save`` copies and trained biases (``bias="all"`` / ``"vera_only"``)
  come along and stay trained.
* ``save_peft_adapter``: writes PEFT's adapter format (adapter_config.json +
  adapter_model.safetensors, ``save_projection=True``) so that
  ``PeftModel.from_pretrained`` (or ``AutoPeftModel*``) reproduces our layers'
  outputs, modules to save and trained biases included.

PEFT keeps one A (r x max_in) for all layers and slices ``A[:, :in]``; our
spec scales each layer's A by ``sqrt(6 / in)`` of that layer instead. The
export therefore writes A for the largest ``in`` and folds the ratio of the
scales, ``c = sqrt(max_in / in)``, into each layer's ``lambda_d`` (exact up to
float32 rounding). B needs nothing: its scale depends on r only, and a smaller B
is the top rows of a larger one.

Training dynamics: folding keeps every output, but PEFT then trains
``lambda_d' = c * lambda_d``, whose gradient is ``1/c`` times ours (c = 1.64 for
Llama-7B's q_proj, in 4096, beside down_proj's 11008): continuing training in
PEFT is a different optimisation for the layers with ``in < max_in``.
``save_peft_adapter(..., exact_training=True)`` refuses unless nothing needs
folding (all seeded layers share one ``in_features``, or the projections are
PEFT's own after ``from_peft``); then PEFT continues training exactly as we would
(dropout masks aside: PEFT draws them from torch's generator).
"""

from __future__ import annotations

import os
from typing import Optional, Union

from torch import nn

from .base_layers import is_conv1d
from .model import CONFIG_KEY, CONVERTED_ATTR, _set_trained, replace_submodule, shared_value, \
    trained_extras, unwrap, vera_layers, vera_state_dict
from .module import SharedProjections, VeRALinear
from .projection import projection, projection_bound

__all__ = ["from_peft", "save_peft_adapter"]

PEFT_PREFIX = "base_model.model."  # PEFT's keys for the wrapped model's tensors

# PeftModel / tuner methods that would act on layers that are no longer PEFT's.
_RETIRED_METHODS = (
    "forward", "generate", "save_pretrained", "push_to_hub", "merge_and_unload", "unload",
    "merge_adapter", "unmerge_adapter", "disable_adapter", "enable_adapter_layers",
    "disable_adapter_layers", "load_adapter", "add_adapter", "set_adapter", "delete_adapter",
    "get_nb_trainable_parameters", "print_trainable_parameters",
)
_RETIRED_MESSAGE = ("this PeftModel was converted by vera_kernels.from_peft; use the returned "
                    "model (vk.save_peft_adapter(model, path) writes a PEFT adapter)")


def _retire(peft_model: nn.Module, model: nn.Module) -> None:
    """Make the PeftModel that from_peft converted refuse to be used as one.

    Its layers are ours now: its forward would run them, but ``disable_adapter()`` would
    not disable them and ``save_pretrained()`` would write the projections alone. The
    wrapper keeps the converted model, so our functions accept it (``unwrap``).
    """
    def refuse(*args, **kwargs):
        raise RuntimeError(_RETIRED_MESSAGE)

    for obj in (peft_model, vars(peft_model).get("_modules", {}).get("base_model")):
        for name in _RETIRED_METHODS:
            if obj is not None and hasattr(type(obj), name):
                # An instance attribute shadows the method (nn.Module's __setattr__ would
                # not register a plain function anyway).
                object.__setattr__(obj, name, refuse)
    object.__setattr__(peft_model, CONVERTED_ATTR, model)


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Replace every PEFT VeRA layer of ``peft_model`` by a ``VeRALinear``, in place.

    Returns the underlying model (``peft_model.get_base_model()``), whose
    outputs and gradients are PEFT's. The lambda parameters are PEFT's own
    tensors (moved, not copied); A and B stay PEFT's stored projections. Each
    ``modules_to_save`` wrapper is replaced by the active adapter's trained copy,
    and PEFT's ``bias`` option is kept: both stay trainable as in PEFT, and are
    remembered (``trained_extras``), so every adapter format carries them.

    The PeftModel wrapper is retired: its forward, ``save_pretrained`` and the like
    raise (use the returned model); ``vera_kernels`` functions accept it in place of
    the returned model.

    Raises:
        ValueError: no VeRA layer found, layers with several (or differing) active
            adapters, a merged layer (unmerge it in PEFT first), an auxiliary PEFT
            wrapper other than modules_to_save (e.g. trainable tokens), or no PEFT
            config to read the bias option from. Nothing is changed then.
    """
    from peft.tuners.vera.layer import VeraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    if vars(peft_model).get(CONVERTED_ATTR) is not None:
        raise ValueError("from_peft: this PeftModel was converted already; use the model "
                         "from_peft returned")
    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, VeraLayer)]
    if not found:
        raise ValueError("from_peft: the model has no PEFT VeRA layers")
    # Check everything first: a failed conversion leaves the PEFT model as it was.
    for name, layer in found:
        adapters = list(layer.active_adapters)
        if len(adapters) != 1:
            raise ValueError(f"from_peft: layer {name!r} has active adapters {adapters}; need one")
        if layer.merged:
            raise ValueError(f"from_peft: layer {name!r} is merged; unmerge it in PEFT first")
    active = {layer.active_adapters[0] for _, layer in found}
    if len(active) != 1:
        raise ValueError(f"from_peft: the layers' active adapters differ ({sorted(active)}); need one")
    adapter = active.pop()
    config = (getattr(model, "peft_config", None) or {}).get(adapter)
    if config is None:
        raise ValueError(f"from_peft: no PEFT config for adapter {adapter!r} (model.peft_config), "
                         "which says which biases PEFT trains")
    wrappers = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            wrappers.append((name, module))
        elif isinstance(module, AuxiliaryTrainingWrapper):
            raise ValueError(f"from_peft: {name!r} is a PEFT {type(module).__name__}, which "
                             "vera_kernels cannot carry")

    saved = []
    for name, wrapper in wrappers:
        # PEFT's forward uses the active adapter's copy, else the original module.
        trained = (not wrapper.disable_adapters and wrapper.active_adapters == [adapter]
                   and adapter in wrapper.modules_to_save)
        replace_submodule(model, name, wrapper.modules_to_save[adapter] if trained
                          else wrapper.original_module)
        if trained:
            saved.append(name)
    shared: dict = {}
    for name, layer in found:
        proj_a, proj_b = layer.vera_A[adapter], layer.vera_B[adapter]
        key = (proj_a.data_ptr(), proj_b.data_ptr())
        if key not in shared:
            shared[key] = SharedProjections(proj_a, proj_b)
        lambda_d = layer.vera_lambda_d[adapter]
        base = layer.get_base_layer()
        # from_linear freezes the base layer; PEFT may train its bias (bias="all"/"vera_only").
        flags = [(p, p.requires_grad) for p in base.parameters()]
        ours = VeRALinear.from_linear(base, lambda_d.shape[0])
        for param, flag in flags:
            param.requires_grad_(flag)
        ours.vera_lambda_d = lambda_d
        ours.vera_lambda_b = layer.vera_lambda_b[adapter]
        peft_dropout = layer.vera_dropout[adapter]
        ours.dropout = peft_dropout.p if isinstance(peft_dropout, nn.Dropout) else 0.0
        ours.projections = shared[key]
        replace_submodule(model, name, ours)
    _set_trained(model, {"modules_to_save": saved, "bias": getattr(config, "bias", "none")})
    vars(model).pop("peft_config", None)  # no PEFT layers left (PEFT's unload does the same)
    if peft_model is not model:
        _retire(peft_model, model)
    return model


def _one_value(layers: list, what: str, value_of) -> object:
    """The value all layers share (PEFT stores one per adapter); ValueError otherwise."""
    return shared_value((layer for _, layer in layers), value_of,
                        f"save_peft_adapter: PEFT needs one {what} for all layers, got {{values}}")


def _export_projections(layers: list, r: int, exact_training: bool):
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
    if exact_training and any(scale != 1.0 for scale in scales.values()):
        widths = sorted({layer.in_features for _, layer in layers})
        raise ValueError(
            f"save_peft_adapter(exact_training=True): the layers' in_features differ {widths}; "
            "PEFT shares one A, so each layer's sqrt(max_in / in) would be folded into lambda_d, "
            "which keeps outputs but divides PEFT's lambda_d gradients by it. Export layers of "
            "one in_features, or pass exact_training=False to accept that")
    return projection("A", r, max_in, seed), projection("B", max_out, r, seed), scales


def name_or_path(model: nn.Module) -> Optional[str]:
    # What PEFT records so that AutoPeftModel can load the base model itself.
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def save_peft_adapter(model: nn.Module, path: Union[str, os.PathLike], *,
                      exact_training: bool = False, task_type: Optional[str] = None) -> None:
    """Write the VeRA layers of ``model`` as a PEFT adapter directory at ``path``.

    Load it with ``PeftModel.from_pretrained(base_model, path)``, where
    ``base_model`` is the model without VeRA layers, or with
    ``AutoPeftModelForCausalLM.from_pretrained(path)`` (and the like for
    ``task_type``) when the model knows where it came from
    (``config._name_or_path``, written as ``base_model_name_or_path``). All
    layers must share r, the dropout probability and (for seeded layers) the
    seed, as PEFT requires. The "default" adapter is written, with the
    model's modules to save (PEFT's ``modules_to_save``) and trained biases
    (``bias``): PEFT reproduces our outputs exactly.

    ``model`` may also be the PeftModel that ``from_peft`` converted.

    Args:
        exact_training: seeded layers of several ``in_features`` get each layer's
            ``sqrt(max_in / in)`` folded into ``lambda_d`` (see the module docstring):
            outputs match, but PEFT's gradients of those ``lambda_d`` are divided by that
            factor, so training continued in PEFT is a different optimisation. With True,
            refuse (ValueError) unless nothing is folded; PEFT then trains exactly as we do.
        task_type: PEFT's task type ("CAUSAL_LM", "SEQ_CLS", ...) for ``AutoPeftModelFor*``;
            None writes PEFT's ``auto_mapping`` (the model's class) for ``AutoPeftModel``.
    """
    from peft import VeraConfig
    from safetensors.torch import save_file

    root = unwrap(model)
    layers = list(vera_layers(root))
    if not layers:
        raise ValueError("save_peft_adapter: the model has no VeRA layers")
    dora = [name for name, layer in layers if layer.use_dora]
    if dora:
        raise ValueError(f"save_peft_adapter: layers {dora[:3]} are DVoRA (use_dora), which PEFT's "
                         "VeRA cannot hold; vk.save_lora_adapter writes them as PEFT LoRA with "
                         "use_dora")
    r = _one_value(layers, "r", lambda layer: layer.r)
    dropout = _one_value(layers, "dropout probability", lambda layer: layer.dropout)
    proj_a, proj_b, scales = _export_projections(layers, r, exact_training)
    extras = trained_extras(root)
    config = VeraConfig(
        r=r,
        target_modules=[name for name, _ in layers],
        save_projection=True,
        vera_dropout=dropout,
        fan_in_fan_out=all(is_conv1d(layer.base_layer) for _, layer in layers),
        bias=extras["bias"],
        modules_to_save=extras["modules_to_save"] or None,
        base_model_name_or_path=name_or_path(root),
        task_type=task_type,
        inference_mode=True,  # as PeftModel.save_pretrained writes it
    )
    state = vera_state_dict(root)
    del state[CONFIG_KEY]
    for name, _ in layers:  # fold each layer's scale (in float64, rounded once)
        d = state[f"{name}.vera_lambda_d"]
        state[f"{name}.vera_lambda_d"] = (d.double() * scales[name]).to(d.dtype)
    tensors = {PEFT_PREFIX + key: value.detach().cpu().contiguous() for key, value in state.items()}
    tensors["base_model.vera_A"] = proj_a.detach().cpu().contiguous()
    tensors["base_model.vera_B"] = proj_b.detach().cpu().contiguous()
    auto_mapping = None
    if task_type is None:
        auto_mapping = {"base_model_class": type(root).__name__, "parent_library": type(root).__module__}
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(str(path), auto_mapping_dict=auto_mapping)
    save_file(tensors, os.path.join(str(path), "adapter_model.safetensors"))
