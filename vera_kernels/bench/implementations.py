"""The layers vera-bench compares, all with the same frozen base nn.Linear.

* ``ours-<backend>``: ``VeRALinear`` forced onto one of our backends.
* ``unfused``: PEFT's formula with A and B stored as buffers, plain autograd.
* ``peft``: PEFT's own VeRA layer (``get_peft_model`` with ``VeraConfig``,
  default configuration), when peft is installed.
* ``base``: the frozen nn.Linear alone, to express VeRA's overhead.

With ``--dora`` (``case.dora``) the same names are DVoRA's: ``ours-<backend>``
our DVoRA layer, ``unfused`` DoRA's way over VeRA (W0 + ΔW built every step),
``peft`` PEFT's LoRA with ``use_dora=True`` at the same rank; ``vera-<backend>``
is our VeRA layer beside them, the cost the magnitude adds.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings

import torch
from torch import nn

from ..backends import get_backend
from ..module import VeRALinear
from ..reference import (dvora_linear_with_projections, vera_linear_with_projections,
                         vera_projections)
from .cases import Case

PROJECTION_STRATEGY = {"unfused": "stored A, B", "peft": "stored A, B", "base": "-"}


class UnfusedVeRA(nn.Module):
    """PEFT's formula with A and B materialized once and stored as buffers."""

    def __init__(self, base: nn.Linear, r: int, seed: int, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.vera_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        weight = base.weight
        proj_a, proj_b = vera_projections(
            base.in_features, base.out_features, r, seed, dtype=weight.dtype, device=weight.device
        )
        self.register_buffer("vera_A", proj_a)
        self.register_buffer("vera_B", proj_b)
        self.vera_lambda_d = nn.Parameter(torch.full((r,), 0.1, dtype=weight.dtype, device=weight.device))
        self.vera_lambda_b = nn.Parameter(torch.zeros(base.out_features, dtype=weight.dtype, device=weight.device))

    def forward(self, x):
        return vera_linear_with_projections(
            self.vera_dropout(x), self.vera_lambda_d, self.vera_lambda_b, self.vera_A, self.vera_B,
            self.base_layer(x),
        )


class UnfusedDVoRA(UnfusedVeRA):
    """DVoRA as DoRA implementations compute it: W0 + ΔW (out x in) built on every step for
    its row norms; A and B stored; PEFT's dropout semantics."""

    def __init__(self, base: nn.Linear, r: int, seed: int, dropout: float = 0.0):
        super().__init__(base, r, seed, dropout)
        self.vera_magnitude = nn.Parameter(base.weight.detach().norm(dim=1))

    def forward(self, x):
        dropped = None if isinstance(self.vera_dropout, nn.Identity) else self.vera_dropout(x)
        return dvora_linear_with_projections(
            x, self.base_layer.weight, self.base_layer.bias, self.vera_lambda_d,
            self.vera_lambda_b, self.vera_magnitude, self.vera_A, self.vera_B, dropped)


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


@functools.lru_cache(maxsize=1)
def _quiet_peft():
    # Importing peft imports torchao and bitsandbytes, which log and warn (deprecations,
    # a kernel hub's "could not verify publisher trust") into the benchmark's table.
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import peft
    finally:
        logging.disable(level)
    return peft


def _peft_layer(base: nn.Linear, case: Case) -> nn.Module:
    peft = _quiet_peft()
    if case.dora:  # LoRA DoRA at VeRA's rank, scaling 1
        config = peft.LoraConfig(r=case.r, lora_alpha=case.r, target_modules=["0"],
                                 lora_dropout=case.dropout, use_dora=True)
    else:
        config = peft.VeraConfig(r=case.r, target_modules=["0"], vera_dropout=case.dropout)
    model = peft.get_peft_model(nn.Sequential(base), config)
    return model.to(case.dtype)


def _nonzero_vectors(layer: nn.Module) -> None:
    # b = 0 (LoRA's B = 0) at init would let a backend skip work; benchmark a trained state.
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lambda_b" in name or "lora_B" in name:
                p.fill_(0.01)


def make_layer(name: str, case: Case) -> nn.Module:
    """A fresh layer of implementation ``name`` for ``case`` (same base weights for all)."""
    gen = torch.Generator().manual_seed(1234)
    base = nn.Linear(case.in_features, case.out_features, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen) * case.in_features**-0.5)
        base.bias.zero_()
    base = base.to(device=case.device, dtype=case.dtype).requires_grad_(False)
    if name == "base":
        return base
    if name == "unfused":
        layer = (UnfusedDVoRA if case.dora else UnfusedVeRA)(base, case.r, case.seed, case.dropout)
    elif name == "peft":
        layer = _peft_layer(base, case)
    elif name.startswith(("ours-", "vera-")):
        dora = case.dora and name.startswith("ours-")
        layer = VeRALinear.from_linear(base, case.r, seed=case.seed, dropout=case.dropout,
                                       use_dora=dora)
        layer.backend = name.split("-", 1)[1]
    else:
        raise ValueError(f"unknown implementation {name!r}")
    _nonzero_vectors(layer)
    return layer


def _our_backend(name: str):
    return get_backend(name.split("-", 1)[1]) if name.startswith(("ours-", "vera-")) else None


def strategy(name: str, case: Case) -> str:
    """How implementation ``name`` obtains A and B for ``case``."""
    backend = _our_backend(name)
    return backend.projection_strategy(case.tokens) if backend else PROJECTION_STRATEGY[name]


def generation_int_ops(name: str, case: Case) -> int:
    """Integer ops spent regenerating A and B per forward (0: generated once and kept)."""
    backend = _our_backend(name)
    if backend is None:
        return 0
    return backend.generation_int_ops(case.tokens, case.r, case.in_features, case.out_features)
