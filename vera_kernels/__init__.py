"""vera-kernels: fused VeRA (Vector-based Random Matrix Adaptation) layers.

A and B, the frozen random projections VeRA shares across layers, are
regenerated from a seed (Philox4x32-10, see docs/design.md) instead of stored.
"""

from .adapter_files import load_adapter, save_adapter
from .adapters import (adapter_batch, add_adapter, delete_adapter, list_adapters, set_adapter,
                       set_trainable_adapters)
from .backends import available_backends
from .function import vera_linear, vera_linear_multi
from .lora_export import save_lora_adapter
from .model import (
    apply_vera,
    disable_vera,
    load_vera_state_dict,
    merge_and_unload,
    merge_vera,
    unload,
    unmerge_vera,
    vera_state_dict,
)
from .module import VeRALinear
from .peft_compat import get_nb_trainable_parameters, print_trainable_parameters
from .peft_interop import from_peft, save_peft_adapter
from .projection import ProjectionShard, projection

__version__ = "0.1.0"

__all__ = [
    "projection",
    "ProjectionShard",
    "vera_linear",
    "vera_linear_multi",
    "VeRALinear",
    "apply_vera",
    "vera_state_dict",
    "load_vera_state_dict",
    "available_backends",
    "disable_vera",
    "merge_vera",
    "unmerge_vera",
    "merge_and_unload",
    "unload",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "from_peft",
    "save_peft_adapter",
    "save_lora_adapter",
    "save_adapter",
    "load_adapter",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "list_adapters",
    "adapter_batch",
    "set_trainable_adapters",
    "VeRATrainerCallback",
]


def __getattr__(name):
    # The Trainer callback imports transformers: only when asked for.
    if name == "VeRATrainerCallback":
        from .trainer import VeRATrainerCallback

        return VeRATrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
