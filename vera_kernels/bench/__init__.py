"""vera-bench: the fused VeRA layer against unfused PyTorch, PEFT and the bare base layer.

For each case (layer shape, tokens, r, dtype) it times forward (inference),
backward and forward+backward of every implementation side by side on one
device (``implementations.py``), and reports speedups, VeRA's overhead over
the frozen base layer, the activation bytes kept for backward, peak memory
(GPU), and for our adapter op alone the achieved GB/s, TFLOP/s and fraction
of the roofline bound (docs/design.md).

    vera-bench                 # default cases for the device (GPU if present)
    vera-bench --quick         # tiny cases, seconds
    vera-bench --shapes 4096x4096 --tokens 8192 --ranks 256 --dtypes bf16 --json out.json

Modules:

    cases.py            the cases and preset grids (shared with benchmarks/)
    implementations.py  the layers compared
    measure.py          timing and memory primitives
    runner.py           one case: timings -> rows
    report.py           device facts, roofline, table, JSON, plot
    cli.py              the command line
"""

from .cli import main

__all__ = ["main"]
