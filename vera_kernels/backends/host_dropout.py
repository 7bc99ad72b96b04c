"""The adapter dropout mask on the CPU, compiled (csrc/dropout_cpu.cpp).

The torch backend masks x (forward) and dx (backward) with the spec's mask
(``vera_kernels/dropout.py``). In torch integer ops that is ~20 passes over
the Philox counters, which a small CPU pays in full (a training step with
dropout cost 1.2-1.4x PEFT's ``nn.Dropout`` there). The same mask from
``csrc/philox.cuh``, compiled for the host, is one pass over all cores.

It is built on first use with the machine's C++ compiler
(``torch.utils.cpp_extension``, cached under ``TORCH_EXTENSIONS_DIR``; a few
seconds) and registers the ``vera_kernels_host::apply_dropout_`` op. Where it
cannot be built (no compiler, no source checkout), :func:`library` says why
and the torch implementation runs instead, with the same bits.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
SOURCE = CSRC / "dropout_cpu.cpp"


@functools.lru_cache(maxsize=1)
def _build() -> Optional[str]:
    """Build and load the op library once; why it failed, or None."""
    if not SOURCE.exists():
        return f"no source at {SOURCE}"
    try:
        from torch.utils.cpp_extension import load

        load(name="vera_kernels_host", sources=[str(SOURCE)], extra_include_paths=[str(CSRC)],
             extra_cflags=["-O3"], is_python_module=False)
    except Exception as error:  # noqa: BLE001  (a compiler's failure comes in many types)
        return f"the compiled CPU dropout could not be built: {error}"
    torch.library.register_fake("vera_kernels_host::apply_dropout_")(lambda *args: None)
    return None


def library() -> Optional[str]:
    """Load the compiled CPU dropout (building it the first time); None when it is ready,
    else why it is not (the torch implementation then runs)."""
    return _build()


def apply_dropout_(t: torch.Tensor, key: torch.Tensor, row_start: int, threshold: int,
                   scale: float) -> None:
    """Mask contiguous ``t`` (tokens x features, rows from ``row_start``) in place with the
    spec's mask for Philox key ``key`` (int64[2]); ``library()`` must have returned None."""
    torch.ops.vera_kernels_host.apply_dropout_(t, key, row_start, threshold, scale)
