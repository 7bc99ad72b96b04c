"""The contract between the autograd layer and the kernels: what every backend implements.

A backend computes, for 2-D activations (tokens x in),

    forward:  h = x Aᵀ  (tokens x r, saved for backward)
              y = base + b ⊙ ((d ⊙ h) Bᵀ)
              (with base_scale s, DVoRA's: base is s ⊙ (base - base_bias) + base_bias,
              in the same pass; its gradients are plain torch in function.py)
    backward: dx = (d ⊙ ((b ⊙ g) B)) A,  dd = Σ_tokens ((b ⊙ g) B) ⊙ h,
              db = Σ_tokens g ⊙ ((d ⊙ h) Bᵀ)

with A and B described by a :class:`ProjectionSource` (docs/design.md, "Backward").
With ``adapter_ids`` (tokens,) int32, d and b are banks (n_adapters, r) and
(n_adapters, out) and row t uses bank row ``adapter_ids[t]`` (-1: none); the
vector gradients are then bank gradients (``banks.py``).
Callers guarantee: at least one token, contiguous vectors (banks: contiguous
rows), ids in [-1, n_adapters), every tensor on a device the backend
accepted, one dtype, autocast off.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..dropout import DropoutMask
from ..projection import WHOLE, ProjectionShard, check_seed, join_key, split_seed

__all__ = ["ProjectionSource", "NeededGrads", "Grads", "Backend"]


@dataclass(frozen=True)
class ProjectionSource:
    """Where A (r x in) and B (out x r) come from.

    Either the spec matrices of ``seed`` (regenerated, never stored), their
    block for a tensor-parallel ``shard``, or explicit matrices ``a`` and ``b``
    in the compute dtype (e.g. PEFT's stored projections), frozen, any strides.
    """

    seed: Optional[int] = None
    a: Optional[Tensor] = None
    b: Optional[Tensor] = None
    shard: ProjectionShard = WHOLE

    @classmethod
    def from_seed(cls, seed, shard: ProjectionShard = WHOLE) -> "ProjectionSource":
        return cls(seed=check_seed(seed), shard=shard)

    @classmethod
    def explicit(cls, a: Tensor, b: Tensor) -> "ProjectionSource":
        return cls(a=a.detach(), b=b.detach())

    @classmethod
    def from_key_words(cls, key0: int, key1: int, a: Optional[Tensor], b: Optional[Tensor],
                       shard: tuple = (0, 0, 0)) -> "ProjectionSource":
        """The inverse of :meth:`key_words` (with the explicit pair, if any, and the shard's
        :meth:`ProjectionShard.op_args`)."""
        if a is not None:
            return cls.explicit(a, b)
        return cls(seed=join_key((key0, key1)), shard=ProjectionShard.from_op_args(*shard))

    @property
    def is_explicit(self) -> bool:
        return self.a is not None

    def key_words(self) -> tuple[int, int]:
        """The seed as two 32-bit Philox key words (zeros for explicit projections).

        Only for interfaces whose integers are int64 (torch.library ops,
        the CUDA extension): a 64-bit seed does not fit one.
        """
        return (0, 0) if self.is_explicit else split_seed(self.seed)


@dataclass(frozen=True)
class NeededGrads:
    """Which gradients a backward must compute."""

    x: bool
    lambda_d: bool
    lambda_b: bool

    def any(self) -> bool:
        return self.x or self.lambda_d or self.lambda_b


class Grads(NamedTuple):
    """A backward's result; ``None`` where the gradient was not needed."""

    x: Optional[Tensor]
    lambda_d: Optional[Tensor]
    lambda_b: Optional[Tensor]


def tf32_allowed(dtype: torch.dtype) -> bool:
    """Whether float32 products may run at TF32 precision: torch's float32 matmul precision
    is below "highest", the setting torch.mm follows too."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"


class Backend(abc.ABC):
    """One implementation of VeRA's forward and backward.

    Attributes:
        name: what ``backend=`` and ``VERA_KERNELS_BACKEND`` call it.
        priority: lower wins when ``backend=None`` picks the fastest usable one.
        auto_devices: device types on which ``backend=None`` may pick it
            (``None``: all); e.g. Triton's CPU interpreter only when asked for.
    """

    name: str
    priority: int
    auto_devices: Optional[tuple[str, ...]] = None

    @abc.abstractmethod
    def unavailable_on(self, device: torch.device) -> Optional[str]:
        """``None`` when the backend can run on ``device`` now, else a sentence saying why not."""

    @abc.abstractmethod
    def forward(self, x: Tensor, lambda_d: Tensor, lambda_b: Tensor, source: ProjectionSource,
                base: Optional[Tensor], *, into_base: bool = False,
                adapter_ids: Optional[Tensor] = None,
                dropout: Optional[DropoutMask] = None, base_scale: Optional[Tensor] = None,
                base_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(y, h)``; with ``into_base`` y is ``base`` itself, written in place.

        With ``dropout``, h = dropout(x) Aᵀ with the mask of ``vera_kernels/dropout.py``.
        With ``base_scale`` ((out,), or a bank like lambda_b; base given), the base
        term is ``base_scale ⊙ (base - base_bias) + base_bias`` (base_bias (out,) or
        None; a bank row of id -1 scales by 1).
        """

    @abc.abstractmethod
    def backward(self, grad: Tensor, h: Tensor, lambda_d: Tensor, lambda_b: Tensor,
                 source: ProjectionSource, in_features: int, needed: NeededGrads,
                 adapter_ids: Optional[Tensor] = None,
                 dropout: Optional[DropoutMask] = None,
                 dx_into: Optional[Tensor] = None) -> Grads:
        """The gradients ``needed`` asks for, from the upstream gradient and the saved h
        (dx through the forward's dropout mask, regenerated). With ``dx_into``
        (tokens x in, e.g. the base layer's dx) dx is added into it in place
        and returned as the x gradient: no separate tokens x in tensor."""

    # What the benchmark reports about a backend.

    def projection_strategy(self, tokens: int) -> str:
        """How a call over ``tokens`` rows obtains A and B."""
        return "cached A, B"

    def generation_int_ops(self, tokens: int, r: int, in_features: int, out_features: int) -> int:
        """Integer ops spent regenerating A and B in one forward over ``tokens`` rows."""
        return 0
