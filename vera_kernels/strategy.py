"""Where the fused backends take A and B from, per launch (the trade-off: DESIGN.md §5).

* ``generate``: tiles are generated in registers / shared memory from the seed,
  once per block of token rows; cheapest for few tokens, nothing materialized.
* ``workspace``: the same generator first writes A and B once per launch into a
  small transient buffer (r · (in + out) elements, L2-resident) that the
  kernels read; Philox cost no longer grows with the token count.

``VERA_KERNELS_PROJECTIONS`` = ``auto`` (default) | ``generate`` | ``workspace``.
"""

import os

ENV_VAR = "VERA_KERNELS_PROJECTIONS"
CHOICES = ("auto", "generate", "workspace")
# auto generates in-kernel while a launch covers at most this many row blocks.
GENERATE_MAX_BLOCKS = 4


def strategy_for(tokens: int, block_m: int) -> str:
    """``"generate"`` or ``"workspace"`` for a launch over ``tokens`` rows in blocks of ``block_m``."""
    choice = os.environ.get(ENV_VAR, "auto")
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {CHOICES}")
    if choice == "auto":
        return "generate" if tokens <= GENERATE_MAX_BLOCKS * block_m else "workspace"
    return choice
