"""What vera-bench reports: device facts, roofline figures, the table, JSON and the plot."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .. import __version__

# The checkout the package runs from, when it runs from one (an editable install).
CHECKOUT = Path(__file__).resolve().parents[2]
# Environment variables that change what is measured: the backend and the
# projection strategy chosen, Triton's interpreter, the GPUs and architectures.
BEHAVIOUR_ENV = ("VERA_KERNELS_BACKEND", "VERA_KERNELS_PROJECTIONS", "TRITON_INTERPRET",
                 "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST")

# Vendor datasheet figures: (memory bandwidth in B/s, dense fp16/bf16
# tensor-core flop/s). Matched by substring of the device name, first match wins.
DEVICE_PEAKS = [
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),
    ("A100", 2.0e12, 312e12),
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def device_info(device: torch.device) -> dict:
    """Name, versions and (where known) peak figures of ``device``."""
    info = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if importlib.util.find_spec("triton") is not None:
        import triton

        info["triton"] = triton.__version__
    try:  # from its metadata: importing peft would load transformers
        info["peft"] = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        info["peft"] = None
    for pattern, bandwidth, peak in DEVICE_PEAKS:
        if device.type == "cuda" and pattern in info["device_name"]:
            info["peak_bandwidth_Bps"], info["peak_half_flops"] = bandwidth, peak
            break
    return info


def _git_commit() -> Optional[str]:
    """HEAD of the checkout the package runs from; None for an installed copy or without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=CHECKOUT,
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    # An installed copy can sit inside another repository (a venv in some
    # project): only a checkout of this package counts.
    return out[1] if Path(out[0]).resolve() == CHECKOUT else None


def provenance(reps: Optional[int]) -> dict:
    """What else the numbers depend on: the package's version and commit, the environment, the repetitions."""
    return {
        "vera_kernels": __version__,
        "git_commit": _git_commit(),
        "environment": {name: os.environ[name] for name in BEHAVIOUR_ENV if name in os.environ},
        "reps": reps,
    }


def roofline(case, info: dict) -> dict:
    """The roofline bound for the fused forward (docs/design.md): bytes, flops and the time they imply."""
    elem = torch.finfo(case.dtype).bits // 8
    bytes_moved = case.tokens * (case.in_features + 2 * case.out_features) * elem
    flops = 2 * case.tokens * case.r * (case.in_features + case.out_features)
    result = {"bytes": bytes_moved, "flops": flops, "bound_ms": None}
    if "peak_bandwidth_Bps" in info:
        bound_s = bytes_moved / info["peak_bandwidth_Bps"]
        if case.dtype in (torch.float16, torch.bfloat16):
            bound_s = max(bound_s, flops / info["peak_half_flops"])
        result["bound_ms"] = bound_s * 1e3
    return result


def _fmt_ms(t: Optional[dict]) -> str:
    """``median±spread%``: the median to 3 significant digits (the noise is in the percents; the
    JSON keeps every digit) and half its 20-80% quantile range in % of it, shown as 99 at most
    so that the cell keeps its width on a noisy machine."""
    if t is None:
        return "-"
    median = t["median_ms"]
    decimals = max(0, 2 - math.floor(math.log10(median)))  # fixed point: 1234, 12.3, 0.0123
    spread = min(99, round(50 * (t["p80_ms"] - t["p20_ms"]) / median))
    return f"{median:.{decimals}f}±{spread}%"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# (header, width); cells are right-aligned, but the last column's are left as they
# are: the strategy names vary most in length, and only a GPU run has long ones.
COLUMNS = [
    ("shape", 10), ("tokens", 6), ("r", 4), ("dtype", 5), ("impl", 11), ("fwd ms", 10),
    ("bwd ms", 10), ("fwd+bwd ms", 10), ("x unfused", 9), ("x peft", 6), ("+% base", 7),
    ("saved MB", 8), ("peak MB", 8), ("GB/s", 7), ("TFLOP/s", 8), ("%roof", 5), ("A/B from", 0),
]
# Columns that mean something on a GPU only: peak memory is the CUDA
# allocator's figure, and the adapter's throughput and roofline fraction are
# figures of GPU kernels against the vendor's peaks.
GPU_COLUMNS = {"peak MB", "GB/s", "TFLOP/s", "%roof"}
# Shown with --wide only: forward and backward alone (in the JSON either way)
# on any device, and the rates behind %roof on CUDA, so the table fits 120 columns.
WIDE_ONLY = {"fwd ms", "bwd ms", "GB/s", "TFLOP/s"}
TABLE_WIDTH = 120  # what the table fits on a CPU; prose is wrapped to it too
LEGEND = (
    "ms: median ± half the 20-80% spread, in % of the median (99: that or more); x unfused / "
    "x peft: forward+backward speedup (> 1: ours faster); +% base: forward+backward overhead "
    "over the frozen nn.Linear; saved MB: activations kept for backward beyond the base layer; "
    "on CUDA (or with --wide): peak MB of a training step, and GB/s, TFLOP/s, %roof of our "
    "adapter forward alone."
)


def columns(device: torch.device, wide: bool = False) -> list:
    """The table's columns on ``device`` (all of them when ``wide``): without the ones only
    a GPU fills on a CPU, and without the ``WIDE_ONLY`` details."""
    if wide:
        return list(COLUMNS)
    return [c for c in COLUMNS
            if c[0] not in WIDE_ONLY and (device.type == "cuda" or c[0] not in GPU_COLUMNS)]


def _line(cells: list, cols: list) -> str:
    """One table line: ``cells`` right-aligned to the widths of ``cols``, the last one as it is."""
    *body, last = cells
    return " ".join([*(cell.rjust(width) for cell, (_, width) in zip(body, cols)), last])


def table_header(cols: list) -> str:
    """The header line for the columns ``cols`` (from ``columns``)."""
    return _line([name for name, _ in cols], cols)


def table_row(row: dict, cols: list) -> str:
    """One result row (runner.measure_case) as a table line with the columns ``cols``."""
    mb = lambda b: None if b is None else b / 2**20  # noqa: E731
    cells = {
        "shape": f"{row['in_features']}x{row['out_features']}",
        "tokens": str(row["tokens"]),
        "r": str(row["r"]),
        "dtype": row["dtype"],
        "impl": row["impl"],
        "fwd ms": _fmt_ms(row["forward"]),
        "bwd ms": _fmt_ms(row["backward"]),
        "fwd+bwd ms": _fmt_ms(row["forward_backward"]),
        "x unfused": _fmt(row.get("speedup_vs_unfused"), ".2f"),
        "x peft": _fmt(row.get("speedup_vs_peft"), ".2f"),
        "+% base": _fmt(row.get("overhead_vs_base_pct"), ".1f"),
        "saved MB": _fmt(mb(row["saved_bytes"]), ".2f"),
        "peak MB": _fmt(mb(row["peak_bytes"]), ".1f"),
        "GB/s": _fmt(row.get("adapter_GBps"), ".1f"),
        "TFLOP/s": _fmt(row.get("adapter_TFLOPps"), ".3f"),
        "%roof": _fmt(row.get("roofline_fraction") and 100 * row["roofline_fraction"], ".0f"),
        "A/B from": row["strategy"],
    }
    return _line([cells[name] for name, _ in cols], cols)


def write_json(path: str, info: dict, command: list, rows: list, reps: Optional[int]) -> None:
    """Every row, with the device facts and ``provenance(reps)``."""
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(command),
        **info,
        **provenance(reps),
        "results": rows,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


@contextlib.contextmanager
def figure(path: str, title: str, xlabel: str, ylabel: str, figsize=(9, 5.5)):
    """The axes of a figure (log2 x axis, a legend) that is saved as a PNG at ``path`` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def write_plot(path: str, info: dict, rows: list) -> None:
    """Speedup over unfused (forward+backward) against tokens: a line per shape, r, dtype and backend."""
    lines: dict = {}
    for row in rows:
        if not row["impl"].startswith("ours-") or row.get("speedup_vs_unfused") is None:
            continue
        label = f"{row['in_features']}x{row['out_features']} r={row['r']} {row['dtype']} {row['impl']}"
        lines.setdefault(label, []).append((row["tokens"], row["speedup_vs_unfused"]))
    with figure(path, f"vera-bench on {info['device_name']}", "tokens",
                "speedup over unfused PyTorch (forward+backward)") as ax:
        for label, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
