"""Where the fused backends take A and B from, per launch (the trade-off: docs/design.md, "Projection strategies").

* ``generate``: tiles are generated in registers / shared memory from the seed,
  once per block of token rows; cheapest for few tokens, nothing materialized.
* ``workspace``: the same generator first writes A and B once per launch into a
  small transient buffer (r · (in + out) elements, L2-resident) that the
  kernels read; Philox cost no longer grows with the token count.

``VERA_KERNELS_PROJECTIONS`` = ``auto`` (default) | ``generate`` | ``workspace``.
"""

from __future__ import annotations

import abc
import os

from .contract import Backend

ENV_VAR = "VERA_KERNELS_PROJECTIONS"
CHOICES = ("auto", "generate", "workspace")
# auto generates in-kernel while a launch covers at most this many row blocks.
GENERATE_MAX_BLOCKS = 4
# Philox4x32-10: ~100 integer ops per call, four 32-bit words per call.
PHILOX_INT_OPS_PER_ELEMENT = 25


def strategy_for(tokens: int, block_m: int) -> str:
    """``"generate"`` or ``"workspace"`` for a launch over ``tokens`` rows in blocks of ``block_m``."""
    choice = os.environ.get(ENV_VAR, "auto")
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {CHOICES}")
    if choice == "auto":
        return "generate" if tokens <= GENERATE_MAX_BLOCKS * block_m else "workspace"
    return choice


class RegeneratingBackend(Backend):
    """A backend whose kernels regenerate A and B from the seed (triton, cuda)."""

    @property
    @abc.abstractmethod
    def reuse_factor(self) -> int:
        """Token rows that share each generated tile: the kernels' BLOCK_M."""

    def generates(self, tokens: int) -> bool:
        """Whether a launch over ``tokens`` rows generates tiles in the kernel."""
        return strategy_for(tokens, self.reuse_factor) == "generate"

    def projection_strategy(self, tokens: int) -> str:
        return f"Philox, {strategy_for(tokens, self.reuse_factor)}"

    def generation_int_ops(self, tokens: int, r: int, in_features: int, out_features: int) -> int:
        passes = -(-tokens // self.reuse_factor) if self.generates(tokens) else 1
        return PHILOX_INT_OPS_PER_ELEMENT * r * (in_features + out_features) * passes
