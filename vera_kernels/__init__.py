"""vera-kernels: fused VeRA (Vector-based Random Matrix Adaptation) layers.

A and B, the frozen random projections VeRA shares across layers, are
regenerated from a seed (Philox4x32-10, see DESIGN.md §2) instead of stored.
"""

from . import torch_backend  # noqa: F401  (registers the "torch" backend)
from . import triton as _triton_backend  # noqa: F401  (registers "triton"; kernels load lazily)
from . import cuda as _cuda_backend  # noqa: F401  (registers "cuda"; the extension loads lazily)
from .function import vera_linear
from .model import (
    apply_vera,
    disable_vera,
    load_vera_state_dict,
    merge_vera,
    unmerge_vera,
    vera_state_dict,
)
from .module import VeRALinear
from .peft_interop import from_peft, save_peft_adapter
from .ops import available_backends
from .projection import projection

__version__ = "0.1.0"

__all__ = [
    "projection",
    "vera_linear",
    "VeRALinear",
    "apply_vera",
    "vera_state_dict",
    "load_vera_state_dict",
    "available_backends",
    "disable_vera",
    "merge_vera",
    "unmerge_vera",
    "from_peft",
    "save_peft_adapter",
]
