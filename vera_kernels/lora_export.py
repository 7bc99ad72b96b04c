"""A VeRA adapter written as the rank-r LoRA it is, for engines that serve LoRA only.

A VeRA layer adds ``diag(b) B diag(d) A x``: a LoRA with

    lora_A = A                   (r x in)
    lora_B = diag(b) B diag(d)   (out x r)
    lora_alpha = r               (scaling alpha / r = 1)

and a DVoRA layer is that LoRA with ``use_dora=True`` and its magnitude as
``lora_magnitude_vector``: PEFT's DoRA takes the same detached row norms of
``W0 + lora_B lora_A``.

:func:`save_lora_adapter` writes that as a PEFT LoRA adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's key names),
which PEFT, vLLM, SGLang, LoRAX and TGI load. The factors are computed in
float64 from the seed (or the explicit projections) and rounded once.

What it costs: a LoRA stores ``r (in + out)`` numbers per layer where VeRA
stores ``r + out``. For Llama-7B's q_proj and v_proj at r = 256 that is
268 MB in bf16 against VeRA's 0.56 MB (482x), so an engine holds few such
adapters at once. vLLM refuses adapters of rank above its ``max_lora_rank``
(at most 512): start the engine with ``max_lora_rank >= r``.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import torch
from torch import nn

from .adapters import active_adapter
from .base_layers import is_conv1d
from .model import CONFIG_KEY, shared_value, trained_extras, unwrap, vera_layers, vera_state_dict
from .peft_interop import PEFT_PREFIX, name_or_path

__all__ = ["save_lora_adapter", "VLLM_MAX_LORA_RANK"]

VLLM_MAX_LORA_RANK = 512  # the largest max_lora_rank vLLM accepts
# PEFT's LoRA calls VeRA's "vera_only" bias option "lora_only": the adapted layers' biases.
_LORA_BIAS = {"none": "none", "all": "all", "vera_only": "lora_only"}


def save_lora_adapter(model: nn.Module, directory: Union[str, os.PathLike],
                      adapter: Optional[str] = None, dtype: Optional[torch.dtype] = None, *,
                      task_type: Optional[str] = None) -> None:
    """Write one VeRA adapter of ``model`` (default: the active one) as a PEFT LoRA adapter.

    ``PeftModel.from_pretrained(base_model, directory)`` (``base_model``: the
    model without VeRA layers) then computes what ``model`` computes with that
    adapter; so do LoRA serving engines. Conv1D layers get ``fan_in_fan_out``;
    modules to save and trained biases are written as PEFT writes them. A DVoRA
    adapter becomes a LoRA with ``use_dora=True``, which PEFT loads (serving
    engines that take no DoRA adapters, vLLM among them, refuse it). Under
    torch.distributed call it on every rank (sharded vectors are gathered); rank 0 writes.

    Args:
        adapter: which adapter; None for the active one.
        dtype: the factors' floating dtype in the file (default: the adapter's vectors').
        task_type: PEFT's task type ("CAUSAL_LM", ...) for ``AutoPeftModelFor*``.

    Raises:
        ValueError: no VeRA layers, layers of different r or dropout (one LoRA
            config holds one), Conv1D layers mixed with linear ones.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    root = unwrap(model)
    layers = list(vera_layers(root))
    if not layers:
        raise ValueError("save_lora_adapter: the model has no VeRA layers")
    adapter = adapter or active_adapter(root)
    r = _one(layers, "r", lambda layer: layer.r)
    if r > VLLM_MAX_LORA_RANK:
        warnings.warn(f"save_lora_adapter: rank {r} is above vLLM's largest max_lora_rank "
                      f"({VLLM_MAX_LORA_RANK}); vLLM will refuse this adapter", stacklevel=2)
    extras = trained_extras(root)
    config = LoraConfig(
        r=r,
        lora_alpha=r,  # scaling 1: the factors hold the whole delta
        target_modules=[name for name, _ in layers],
        lora_dropout=_one(layers, "dropout probability", lambda layer: layer.dropout),
        fan_in_fan_out=_one(layers, "layer kind (Conv1D or linear)",
                            lambda layer: is_conv1d(layer.base_layer)),
        bias=_LORA_BIAS[extras["bias"]],
        modules_to_save=extras["modules_to_save"] or None,
        base_model_name_or_path=name_or_path(root),
        task_type=task_type,
        inference_mode=True,
        # DVoRA is DoRA over this LoRA: the same magnitude and detached row norms of W0 + ΔW.
        use_dora=_one(layers, "use_dora", lambda layer: layer.use_dora),
    )
    # Whole vectors (gathered under FSDP / ZeRO-3: a collective), and the extras under the
    # model's own keys.
    state = vera_state_dict(model, adapter)
    del state[CONFIG_KEY]
    tensors = {}
    for name, layer in layers:
        vectors = state.pop(f"{name}.vera_lambda_d"), state.pop(f"{name}.vera_lambda_b")
        lora_a, lora_b = layer.lora_factors(adapter, torch.float64, vectors)
        factors = {"lora_A.weight": lora_a, "lora_B.weight": lora_b}
        if layer.use_dora:  # PEFT's key for a DoRA magnitude (no ".weight")
            factors["lora_magnitude_vector"] = state.pop(f"{name}.vera_magnitude")
        for factor, value in factors.items():
            # A copy each: layers of one shape share their cached A, and a file cannot.
            tensors[f"{PEFT_PREFIX}{name}.{factor}"] = value.to(dtype or vectors[0].dtype,
                                                                copy=True)
    tensors.update({PEFT_PREFIX + key: value for key, value in state.items()})
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_rank() != 0:
        return  # every rank gathered; rank 0 writes
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              os.path.join(str(directory), "adapter_model.safetensors"))


def _one(layers: list, what: str, value_of):
    return shared_value((layer for _, layer in layers), value_of,
                        f"save_lora_adapter: one LoRA config holds one {what} for all layers, "
                        "got {values}")
