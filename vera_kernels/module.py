"""``VeRALinear``: a frozen ``nn.Linear`` plus VeRA's two trainable vectors, a drop-in for it."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .function import vera_linear
from .projection import cached_projection, split_seed

__all__ = ["VeRALinear"]


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class VeRALinear(nn.Module):
    """``y = base_layer(x) + vera_lambda_b * (B @ (vera_lambda_d * (A @ x)))``.

    ``base_layer`` is a frozen ``nn.Linear``; A (r x in) and B (out x r) are the
    spec projections for ``seed``, regenerated rather than stored, so the module
    holds nothing beyond the base layer and ``r + out_features`` trainable
    numbers. With ``vera_lambda_b = 0`` (its initial value) the module computes
    exactly what the base layer does.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        r: rank of the shared random projections.
        seed: int in [0, 2**64) choosing A and B; use one seed per model.
        d_initial: initial value of every entry of ``vera_lambda_d``.

    Attributes:
        backend: the ``vera_linear`` backend this layer uses; ``None`` (the
            default) picks the fastest one for the input's device.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        *,
        seed: int = 0,
        bias: bool = True,
        d_initial: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base, r, seed, d_initial)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, *, seed: int = 0, d_initial: float = 0.1):
        """Wrap an existing ``nn.Linear`` (kept as ``base_layer``, frozen, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(linear, r, seed, d_initial)
        return module

    def _attach(self, base: nn.Linear, r: int, seed: int, d_initial: float) -> None:
        _check_positive("r", r)
        split_seed(seed)
        base.requires_grad_(False)
        self.base_layer = base
        self.r = r
        self.seed = seed
        self.merged = False
        self.backend = None
        weight = base.weight
        self.vera_lambda_d = nn.Parameter(
            torch.full((r,), float(d_initial), device=weight.device, dtype=weight.dtype)
        )
        self.vera_lambda_b = nn.Parameter(
            torch.zeros(base.out_features, device=weight.device, dtype=weight.dtype)
        )

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected input of shape (..., {self.in_features}), got {shape}")
        base = self.base_layer(x)
        if self.merged:
            return base
        # The vectors may be kept in a wider dtype than the activations.
        return vera_linear(
            x,
            self.vera_lambda_d.to(x.dtype),
            self.vera_lambda_b.to(x.dtype),
            self.seed,
            base,
            backend=self.backend,
        )

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """The adapter as a dense (out x in) float32 matrix: ``diag(b) B diag(d) A``."""
        device = self.base_layer.weight.device
        proj_a = cached_projection("A", self.r, self.in_features, self.seed, torch.float32, device)
        proj_b = cached_projection("B", self.out_features, self.r, self.seed, torch.float32, device)
        scaled_b = proj_b * self.vera_lambda_b.float()[:, None] * self.vera_lambda_d.float()
        return scaled_b @ proj_a

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight``; forward then runs the base layer only."""
        if self.merged:
            warnings.warn("VeRALinear.merge(): already merged, nothing done", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of ``base_layer.weight`` (exact up to the weight's rounding)."""
        if not self.merged:
            warnings.warn("VeRALinear.unmerge(): not merged, nothing done", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def get_extra_state(self) -> dict:
        # The seed is part of the module's state: the projections follow from it.
        return {"seed": self.seed, "r": self.r, "merged": self.merged}

    def set_extra_state(self, state: dict) -> None:
        if state["r"] != self.r:
            raise ValueError(f"state has r={state['r']} but this VeRALinear has r={self.r}")
        split_seed(state["seed"])
        self.seed = state["seed"]
        self.merged = bool(state["merged"])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"seed={self.seed}, merged={self.merged}"
        )
