"""vera-bench: the fused VeRA layer against unfused PyTorch, PEFT and the bare base layer.

For each case (layer shape, tokens, r, dtype) it times forward (inference),
backward and forward+backward of every implementation side by side on one
device (``implementations.py``), and reports speedups, VeRA's overhead over
the frozen base layer, the activation bytes kept for backward, peak memory
(GPU), and for our adapter op alone the achieved GB/s, TFLOP/s and fraction
of the roofline bound (DESIGN.md §5).

    vera-bench                 # default cases for the device (GPU if present)
    vera-bench --quick         # tiny cases, seconds
    vera-bench --shapes 4096x4096 --tokens 8192 --ranks 256 --dtypes bf16 --json out.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from .. import ops
from ..function import vera_linear
from . import implementations as impl
from . import measure, report

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# (shapes as (in, out), tokens, ranks, dtypes) per preset.
PRESETS = {
    "quick": ([(96, 80)], [64], [8], ["fp32"]),
    "cpu": ([(1024, 1024), (1024, 2816)], [256, 1024], [64, 256], ["fp32"]),
    # Llama-7B decoder projections.
    "gpu": ([(4096, 4096), (4096, 11008), (11008, 4096)], [512, 2048, 8192, 16384],
            [64, 256, 1024], ["bf16", "fp16"]),
}


def _ints(text: str) -> list:
    return [int(v) for v in text.split(",") if v]


def _shapes(text: str) -> list:
    try:
        return [tuple(int(n) for n in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are INxOUT[,INxOUT...], got {text!r}") from None


def _dtypes(text: str) -> list:
    names = [v for v in text.split(",") if v]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtypes {unknown}: choose from {sorted(DTYPES)}")
    return names


def parse_args(argv):
    p = argparse.ArgumentParser(prog="vera-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny cases that finish in seconds")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    p.add_argument("--shapes", type=_shapes, help="layer shapes INxOUT, comma-separated")
    p.add_argument("--tokens", type=_ints, help="token counts, comma-separated")
    p.add_argument("--ranks", type=_ints, help="ranks r, comma-separated")
    p.add_argument("--dtypes", type=_dtypes, help=f"comma-separated, from {sorted(DTYPES)}")
    p.add_argument("--backends", help="our backends to time (default: those usable on the device)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT even if installed")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per implementation (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every measurement and the device facts")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speedup over unfused vs tokens")
    return p.parse_args(argv)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vera-bench: --device cuda asked for, but no CUDA device is available")
    return device


def _backends(text, device: torch.device) -> list:
    if text:
        names = [b for b in text.split(",") if b]
        for name in names:
            ops.resolve_backend(name, device)  # raises with the reason if it cannot run
        return names
    # The Triton interpreter is a test vehicle, not something to time.
    return [b for b in ops.available_backends(device) if not (device.type == "cpu" and b == "triton")]


def cases_from(args, device: torch.device) -> list:
    preset = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    shapes, tokens, ranks, dtypes = PRESETS[preset]
    shapes, tokens, ranks, dtypes = (
        args.shapes or shapes, args.tokens or tokens, args.ranks or ranks, args.dtypes or dtypes
    )
    cases = [
        impl.Case(n_in, n_out, t, r, DTYPES[dt], device, args.seed)
        for dt in dtypes for (n_in, n_out) in shapes for r in ranks for t in tokens
    ]
    if preset == "gpu" and not (args.dtypes or args.ranks):
        # The full grid at fp16 too would not fit in a few minutes: fp16 at r = 256 only.
        cases = [c for c in cases if c.dtype == torch.bfloat16 or c.r == 256]
    return cases


def _trainable(layer) -> list:
    return [p for p in layer.parameters() if p.requires_grad]


def measure_case(case: impl.Case, names: list, info: dict, reps: int) -> list:
    """One row per implementation for ``case``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.tokens, case.in_features, generator=gen).to(case.device, case.dtype)
    grad = torch.randn(case.tokens, case.out_features, generator=gen).to(case.device, case.dtype)
    x_train = x.clone().requires_grad_(True)  # inside a network, dx is needed too
    layers = {name: impl.make_layer(name, case) for name in names}
    inputs = {name: [x_train, *_trainable(layer)] for name, layer in layers.items()}

    def forward(name):
        def run():
            with torch.no_grad():
                return layers[name](x)
        return run

    def forward_backward(name):
        return lambda: torch.autograd.grad(layers[name](x_train), inputs[name], grad)

    outputs = {name: layers[name](x_train) for name in names}

    def backward(name):
        return lambda: torch.autograd.grad(outputs[name], inputs[name], grad, retain_graph=True)

    timings = {
        mode: measure.time_interleaved({n: make(n) for n in names}, case.device, reps=reps)
        for mode, make in (("forward", forward), ("backward", backward),
                           ("forward_backward", forward_backward))
    }
    outputs.clear()  # free the graphs kept for the backward timing

    ours = [n for n in names if n.startswith("ours-")]
    with torch.no_grad():
        base_out = layers["base"](x)
    adapter = {}
    if ours:
        def adapter_fn(name):
            layer = layers[name]
            d, b = layer.vera_lambda_d.detach(), layer.vera_lambda_b.detach()
            return lambda: vera_linear(x, d, b, case.seed, base_out, backend=layer.backend)
        adapter = measure.time_interleaved({n: adapter_fn(n) for n in ours}, case.device, reps=reps)
    bound = report.roofline(case, info)

    base_saved = measure.saved_activation_bytes(layers["base"], x_train)
    rows = []
    for name in names:
        row = {
            "in_features": case.in_features, "out_features": case.out_features,
            "tokens": case.tokens, "r": case.r, "dtype": DTYPE_NAMES[case.dtype], "impl": name,
            "strategy": impl.strategy(name, case),
            "generation_int_ops": impl.generation_int_ops(name, case),
            "saved_bytes": measure.saved_activation_bytes(layers[name], x_train) - base_saved,
            "peak_bytes": measure.peak_training_bytes(forward_backward(name), case.device),
        }
        for mode, per_impl in timings.items():
            row[mode] = per_impl[name].as_dict()
        mine = timings["forward_backward"][name].median
        for other in ("unfused", "peft"):
            if other in timings["forward_backward"] and name != other:
                row[f"speedup_vs_{other}"] = timings["forward_backward"][other].median / mine
                row[f"forward_speedup_vs_{other}"] = (
                    timings["forward"][other].median / timings["forward"][name].median
                )
        if name != "base":
            base_t = timings["forward_backward"]["base"].median
            row["overhead_vs_base_pct"] = 100 * (mine - base_t) / base_t
        if name in adapter:
            t = adapter[name]
            row["adapter_forward"] = t.as_dict()
            row["adapter_GBps"] = bound["bytes"] / (t.median * 1e-3) / 1e9
            row["adapter_TFLOPps"] = bound["flops"] / (t.median * 1e-3) / 1e12
            if bound["bound_ms"] is not None:
                row["roofline_fraction"] = bound["bound_ms"] / t.median
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = _device(args.device)
    names = ["base", "unfused"]
    if not args.no_peft and impl.peft_available():
        names.append("peft")
    names += [f"ours-{b}" for b in _backends(args.backends, device)]
    reps = args.reps or (5 if args.quick else 7)
    cases = cases_from(args, device)
    info = report.device_info(device)

    print(f"vera-bench on {info['device_name']} ({device}); torch {info['torch']}, "
          f"triton {info['triton']}, CUDA {info['cuda']}; {len(cases)} cases x {names}")
    print("x unfused / x peft: forward+backward speedup; +% base: forward+backward overhead over "
          "the frozen nn.Linear; saved MB: activations kept for backward beyond the base layer; "
          "GB/s, TFLOP/s, %roof: our adapter forward alone.")
    print(report.table_header())
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.in_features}x{case.out_features} tokens={case.tokens} "
              f"r={case.r} {DTYPE_NAMES[case.dtype]}", file=sys.stderr, flush=True)
        case_rows = measure_case(case, names, info, reps)
        for row in case_rows:
            print(report.table_row(row), flush=True)
        rows += case_rows
    command = ["vera-bench", *(sys.argv[1:] if argv is None else argv)]
    if args.json:
        report.write_json(args.json, info, command, rows)
        print(f"wrote {args.json}")
    if args.plot:
        report.write_plot(args.plot, info, rows)
        print(f"wrote {args.plot}")
    return 0
