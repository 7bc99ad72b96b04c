"""``vera-bench --serve``: one batch that mixes N adapters, against the ways to run it otherwise.

Per (tokens, N) on one layer shape, adapters assigned to tokens at random,
inference (no grad), the base layer's output given:

* ``mixed``:  ``vera_linear_multi`` over the whole batch (one call);
* ``single``: ``vera_linear`` with one adapter on the same batch (the target);
* ``loop``:   one ``vera_linear`` per adapter on its rows, gathered and scattered
  back, the way PEFT runs a mixed batch of LoRA adapters;
* ``base``:   the frozen base layer alone.

Also the memory of the banks (N · (r + out) numbers).
"""

from __future__ import annotations

import sys

import torch

from ..function import vera_linear, vera_linear_multi
from . import measure, report
from .cases import DTYPE_NAMES

# (in, out), r, dtype, token counts per device type.
SERVE_PRESETS = {
    "cpu": ((1024, 1024), 64, torch.float32, [1, 16, 256, 4096]),
    "cuda": ((4096, 4096), 256, torch.bfloat16, [1, 16, 256, 4096, 8192]),
}
ADAPTER_COUNTS = [1, 16, 256, 4096]
SEED = 0


def _loop_over_adapters(x, d_bank, b_bank, ids, base, backend):
    """PEFT's way: per adapter present, its rows through the single-adapter op."""
    out = base.clone()
    for adapter in torch.unique(ids).tolist():
        rows = (ids == adapter).nonzero().squeeze(1)
        out[rows] = vera_linear(x[rows], d_bank[adapter], b_bank[adapter], SEED, base[rows],
                                backend=backend)
    return out


def measure_serving(n_in, n_out, r, dtype, device, tokens, n_adapters, backend, reps) -> dict:
    """Times (ms) of the four ways for one (tokens, N) point, and the banks' bytes."""
    gen = torch.Generator().manual_seed(tokens * 7919 + n_adapters)

    def rand(*shape, scale=1.0, like=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device, like)

    weight = rand(n_out, n_in, scale=n_in**-0.5)
    x = rand(tokens, n_in)
    # The vectors as VeRALinear keeps them: float32 at least under half activations.
    vectors = torch.promote_types(dtype, torch.float32)
    d_bank = rand(n_adapters, r, scale=0.1, like=vectors)
    b_bank = rand(n_adapters, n_out, scale=0.01, like=vectors)
    ids = torch.randint(0, n_adapters, (tokens,), generator=gen).to(device)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, weight)

    def ways():
        return {
            "mixed": lambda: vera_linear_multi(x, d_bank, b_bank, ids, SEED, base, backend=backend,
                                               check_ids=False),
            "single": lambda: vera_linear(x, d_bank[0], b_bank[0], SEED, base, backend=backend),
            "loop": lambda: _loop_over_adapters(x, d_bank, b_bank, ids, base, backend),
            "base": lambda: torch.nn.functional.linear(x, weight),
        }

    with torch.no_grad():
        times = measure.time_interleaved(ways(), device, reps=reps)
    row = {"in_features": n_in, "out_features": n_out, "r": r, "dtype": DTYPE_NAMES[dtype],
           "tokens": tokens, "adapters": n_adapters, "backend": backend,
           "bank_bytes": n_adapters * (r + n_out) * d_bank.element_size()}
    for way, t in times.items():
        row[way] = t.as_dict()
    row["mixed_over_single"] = times["mixed"].median / times["single"].median
    row["loop_over_mixed"] = times["loop"].median / times["mixed"].median
    return row


def format_row(row: dict) -> str:
    ms = {way: row[way]["median_ms"] for way in ("mixed", "single", "loop", "base")}
    return (f"{row['tokens']:>6} {row['adapters']:>6} {ms['mixed']:>10.3f} {ms['single']:>10.3f} "
            f"{ms['loop']:>10.3f} {ms['base']:>10.3f} {row['mixed_over_single']:>9.2f} "
            f"{row['loop_over_mixed']:>9.1f} {row['bank_bytes'] / 2**20:>8.2f}")


HEADER = (f"{'tokens':>6} {'N':>6} {'mixed ms':>10} {'single ms':>10} {'loop ms':>10} "
          f"{'base ms':>10} {'mix/1':>9} {'loop/mix':>9} {'bank MB':>8}")


def run(device: torch.device, backend: str, reps: int, tokens=None, adapters=None) -> tuple:
    """Every (tokens, N) point of the device's preset; prints the table, returns (info, rows)."""
    (n_in, n_out), r, dtype, preset_tokens = SERVE_PRESETS["cuda" if device.type == "cuda" else "cpu"]
    info = report.device_info(device)
    print(f"vera-bench --serve on {info['device_name']} ({device}), backend {backend}: "
          f"{n_in}x{n_out}, r={r}, {DTYPE_NAMES[dtype]}, adapters assigned to tokens at random")
    print("mix/1: mixed batch over one adapter on the same batch; loop/mix: a call per adapter "
          "(PEFT's way) over the mixed batch")
    print(HEADER)
    rows = []
    for t in tokens or preset_tokens:
        for n in adapters or ADAPTER_COUNTS:
            print(f"[serve] tokens={t} N={n}", file=sys.stderr, flush=True)
            row = measure_serving(n_in, n_out, r, dtype, device, t, n, backend, reps)
            print(format_row(row), flush=True)
            rows.append(row)
    return info, rows


def write_plot(path: str, info: dict, rows: list) -> None:
    """Mixed-batch time against N, a line per token count, with the single-adapter time dashed."""
    with report.figure(path, f"vera-bench --serve on {info['device_name']}",
                       "adapters in the batch (N)", "ms per layer call", figsize=(8, 5)) as ax:
        ax.set_yscale("log")
        for t in sorted({row["tokens"] for row in rows}):
            points = sorted((row["adapters"], row) for row in rows if row["tokens"] == t)
            line, = ax.plot([n for n, _ in points], [r["mixed"]["median_ms"] for _, r in points],
                            marker="o", label=f"mixed, {t} tokens")
            ax.plot([n for n, _ in points], [r["single"]["median_ms"] for _, r in points],
                    linestyle="--", color=line.get_color(), label=f"one adapter, {t} tokens")
