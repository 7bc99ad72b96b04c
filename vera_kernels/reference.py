"""The unfused oracle: materialize A and B, apply VeRA's formula, let autograd differentiate.

The simplest correct code, for tests and benchmarks only. It is what PEFT's
VeRA layer computes (and what it keeps alive for backward: x, h, d * h and
the tokens x out product).
"""

from __future__ import annotations

from typing import Optional

import torch

from .projection import projection


def vera_projections(
    in_features: int, out_features: int, r: int, seed: int, *, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's A (r x in) and B (out x r), materialized in ``dtype`` on ``device``."""
    a = projection("A", r, in_features, seed, dtype=dtype, device=device)
    b = projection("B", out_features, r, seed, dtype=dtype, device=device)
    return a, b


def _projections_for(x: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's A and B for a layer of these vectors on x, in x's dtype and device."""
    return vera_projections(x.shape[-1], lambda_b.shape[0], lambda_d.shape[0], seed,
                            dtype=x.dtype, device=x.device)


def vera_linear_with_projections(
    x: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    proj_a: torch.Tensor,
    proj_b: torch.Tensor,
    base_output: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``base_output + lambda_b * ((lambda_d * (x @ A.T)) @ B.T)`` with explicit A and B."""
    adapter = lambda_b * ((lambda_d * (x @ proj_a.T)) @ proj_b.T)
    return adapter if base_output is None else base_output + adapter


def vera_linear_reference(
    x: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    seed: int,
    base_output: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Unfused ``vera_linear``: A and B materialized in x's dtype, plain autograd."""
    proj_a, proj_b = _projections_for(x, lambda_d, lambda_b, seed)
    return vera_linear_with_projections(x, lambda_d, lambda_b, proj_a, proj_b, base_output)


def dvora_linear_with_projections(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    magnitude: torch.Tensor,
    proj_a: torch.Tensor,
    proj_b: torch.Tensor,
    dropped_x: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Unfused DVoRA as DoRA implementations compute it: ``W0 + ΔW`` (out x in)
    materialized, ``y = m / ‖W0 + ΔW‖ ⊙ (x (W0 + ΔW)ᵀ) + bias``, the row norms
    detached. ``weight`` is (out, in). With ``dropped_x`` (the adapter's input under
    dropout), PEFT's DoRA: ``x W0ᵀ + (s - 1) ⊙ dropped_x W0ᵀ + s ⊙ dropped_x ΔWᵀ + bias``."""
    delta = (lambda_b[:, None] * proj_b * lambda_d) @ proj_a
    combined = weight + delta
    scale = magnitude / combined.norm(dim=1).detach()
    if dropped_x is None:
        y = scale * (x @ combined.T)
    else:
        y = x @ weight.T + (scale - 1) * (dropped_x @ weight.T) + scale * (dropped_x @ delta.T)
    return y if bias is None else y + bias


def dvora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    magnitude: torch.Tensor,
    seed: int,
    dropped_x: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`dvora_linear_with_projections` with the seed's A and B, in x's dtype."""
    proj_a, proj_b = _projections_for(x, lambda_d, lambda_b, seed)
    return dvora_linear_with_projections(x, weight, bias, lambda_d, lambda_b, magnitude, proj_a,
                                         proj_b, dropped_x)
