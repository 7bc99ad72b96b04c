"""Timing and memory measurements for vera-bench.

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) with
its 20/50/80% quantiles. CPU: the median of repeated runs after warm-up.
Either way the compared implementations are interleaved, so drift in clock
or load hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


# do_bench budget per measurement (ms): the default GPU preset has ~50 cases
# x 5-6 implementations x 3 modes x 2 rounds, and should finish in minutes.
GPU_WARMUP_MS = 10
GPU_REP_MS = 50


@dataclass
class Timing:
    """Milliseconds: the median and the 20% / 80% quantiles."""

    median: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"median_ms": self.median, "p20_ms": self.low, "p80_ms": self.high}


def _quantile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cpu_time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_interleaved(fns: dict, device: torch.device, *, reps: int, warmup: int = 2) -> dict:
    """``{name: Timing}`` for each zero-argument callable in ``fns``."""
    if device.type == "cuda":
        import triton.testing

        rounds: dict = {name: [] for name in fns}
        order = list(fns)
        for round_index in range(2):  # second round in reverse order
            for name in order if round_index == 0 else reversed(order):
                rounds[name].append(triton.testing.do_bench(
                    fns[name], warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, quantiles=[0.5, 0.2, 0.8]
                ))
        return {
            name: Timing(
                statistics.fmean(q[0] for q in qs), min(q[1] for q in qs), max(q[2] for q in qs)
            )
            for name, qs in rounds.items()
        }
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_cpu_time(fn))
    return {
        name: Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8))
        for name, s in samples.items()
    }


def saved_activation_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes a training forward keeps for backward, beyond the layer's own parameters and buffers.

    Counted by storage, so views of one tensor (or of a buffer) count once.
    """
    owned = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    seen: dict = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def peak_training_bytes(step: Callable[[], object], device: torch.device):
    """Peak CUDA memory of one training step above what was allocated before; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
