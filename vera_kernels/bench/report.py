"""What vera-bench reports: device facts, roofline figures, the table, JSON and the plot."""

from __future__ import annotations

import datetime
import importlib.util
import json
import platform
from typing import Optional

import torch

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
    for pattern, bandwidth, peak in DEVICE_PEAKS:
        if device.type == "cuda" and pattern in info["device_name"]:
            info["peak_bandwidth_Bps"], info["peak_half_flops"] = bandwidth, peak
            break
    return info


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
    if t is None:
        return "-"
    spread = (t["p80_ms"] - t["p20_ms"]) / 2
    return f"{t['median_ms']:.3f}±{spread:.3f}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = [
    ("shape", 13), ("tokens", 6), ("r", 5), ("dtype", 8), ("impl", 12), ("fwd ms", 14),
    ("bwd ms", 14), ("fwd+bwd ms", 14), ("x unfused", 9), ("x peft", 7), ("+% base", 8),
    ("saved MB", 9), ("peak MB", 8), ("GB/s", 7), ("TFLOP/s", 8), ("%roof", 6), ("A/B from", 30),
]


def table_header() -> str:
    return " ".join(name.rjust(width) for name, width in COLUMNS)


def table_row(row: dict) -> str:
    mb = lambda b: None if b is None else b / 2**20  # noqa: E731
    cells = [
        f"{row['in_features']}x{row['out_features']}",
        str(row["tokens"]),
        str(row["r"]),
        row["dtype"],
        row["impl"],
        _fmt_ms(row["forward"]),
        _fmt_ms(row["backward"]),
        _fmt_ms(row["forward_backward"]),
        _fmt(row.get("speedup_vs_unfused"), ".2f"),
        _fmt(row.get("speedup_vs_peft"), ".2f"),
        _fmt(row.get("overhead_vs_base_pct"), ".1f"),
        _fmt(mb(row["saved_bytes"]), ".2f"),
        _fmt(mb(row["peak_bytes"]), ".1f"),
        _fmt(row.get("adapter_GBps"), ".1f"),
        _fmt(row.get("adapter_TFLOPps"), ".3f"),
        _fmt(row.get("roofline_fraction") and 100 * row["roofline_fraction"], ".0f"),
        row["strategy"],
    ]
    return " ".join(cell.rjust(width) for cell, (_, width) in zip(cells, COLUMNS))


def write_json(path: str, info: dict, command: list, rows: list) -> None:
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(command),
        **info,
        "results": rows,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def write_plot(path: str, info: dict, rows: list) -> None:
    """Speedup over unfused (forward+backward) against tokens: a line per shape, r, dtype and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict = {}
    for row in rows:
        if not row["impl"].startswith("ours-") or row.get("speedup_vs_unfused") is None:
            continue
        label = f"{row['in_features']}x{row['out_features']} r={row['r']} {row['dtype']} {row['impl']}"
        lines.setdefault(label, []).append((row["tokens"], row["speedup_vs_unfused"]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("speedup over unfused PyTorch (forward+backward)")
    ax.set_title(f"vera-bench on {info['device_name']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
