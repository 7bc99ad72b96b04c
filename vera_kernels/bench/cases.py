"""What vera-bench measures: one case per (layer shape, tokens, r, dtype), and the preset grids.

The CLI (``cli.py``) and the pytest-benchmark suites (``benchmarks/``) take
their cases from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# (shapes as (in, out), tokens, ranks, dtypes) per preset.
PRESETS = {
    "quick": ([(96, 80)], [64], [8], ["fp32"]),
    "cpu": ([(1024, 1024), (1024, 2816)], [256, 1024], [64, 256], ["fp32"]),
    # Llama-7B decoder projections.
    "gpu": ([(4096, 4096), (4096, 11008), (11008, 4096)], [512, 2048, 8192, 16384],
            [64, 256, 1024], ["bf16", "fp16"]),
}


@dataclass
class Case:
    """One benchmark configuration."""

    in_features: int
    out_features: int
    tokens: int
    r: int
    dtype: torch.dtype
    device: torch.device
    seed: int = 0
    dropout: float = 0.0  # adapter dropout of every VeRA implementation (training mode)
    dora: bool = False  # DVoRA against PEFT's LoRA DoRA and our VeRA (``--dora``)


def preset_for(device: torch.device, quick: bool = False) -> str:
    return "quick" if quick else ("gpu" if device.type == "cuda" else "cpu")


def grid(preset: str, device: torch.device, *, shapes=None, tokens=None, ranks=None, dtypes=None,
         seed: int = 0, dropout: float = 0.0, dora: bool = False) -> list:
    """The cases of ``preset`` on ``device``, with any of its axes replaced."""
    p_shapes, p_tokens, p_ranks, p_dtypes = PRESETS[preset]
    cases = [
        Case(n_in, n_out, t, r, DTYPES[dt], device, seed, dropout, dora)
        for dt in dtypes or p_dtypes for (n_in, n_out) in shapes or p_shapes
        for r in ranks or p_ranks for t in tokens or p_tokens
    ]
    if preset == "gpu" and not (dtypes or ranks):
        # The full grid at fp16 too would not fit in a few minutes: fp16 at r = 256 only.
        cases = [c for c in cases if c.dtype == torch.bfloat16 or c.r == 256]
    return cases


def describe(case: Case) -> str:
    dropout = f" dropout={case.dropout:g}" if case.dropout else ""
    return (f"{case.in_features}x{case.out_features} tokens={case.tokens} r={case.r} "
            f"{DTYPE_NAMES[case.dtype]}{dropout}{' dora' if case.dora else ''}")
