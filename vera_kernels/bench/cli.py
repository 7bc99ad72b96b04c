"""The ``vera-bench`` command line: parse, pick cases and implementations, run, report."""

from __future__ import annotations

import argparse
import sys

import torch

from .. import backends
from . import cases as bench_cases
from . import implementations as impl
from . import report
from .runner import measure_case

DESCRIPTION = "vera-bench: the fused VeRA layer against unfused PyTorch, PEFT and the bare base layer."


def _ints(text: str) -> list:
    return [int(v) for v in text.split(",") if v]


def _shapes(text: str) -> list:
    try:
        return [tuple(int(n) for n in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are INxOUT[,INxOUT...], got {text!r}") from None


def _dtypes(text: str) -> list:
    names = [v for v in text.split(",") if v]
    unknown = [n for n in names if n not in bench_cases.DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown dtypes {unknown}: choose from {sorted(bench_cases.DTYPES)}")
    return names


def parse_args(argv):
    dtypes = sorted(bench_cases.DTYPES)
    p = argparse.ArgumentParser(prog="vera-bench", description=DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="tiny cases that finish in seconds")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    p.add_argument("--shapes", type=_shapes, help="layer shapes INxOUT, comma-separated")
    p.add_argument("--tokens", type=_ints, help="token counts, comma-separated")
    p.add_argument("--ranks", type=_ints, help="ranks r, comma-separated")
    p.add_argument("--dtypes", type=_dtypes, help=f"comma-separated, from {dtypes}")
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
            backends.resolve_backend(name, device)  # raises with the reason if it cannot run
        return names
    # The Triton interpreter is a test vehicle, not something to time.
    return [b for b in backends.available_backends(device)
            if not (device.type == "cpu" and b == "triton")]


def cases_from(args, device: torch.device) -> list:
    preset = bench_cases.preset_for(device, args.quick)
    return bench_cases.grid(preset, device, shapes=args.shapes, tokens=args.tokens,
                            ranks=args.ranks, dtypes=args.dtypes, seed=args.seed)


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
        print(f"[{i}/{len(cases)}] {bench_cases.describe(case)}", file=sys.stderr, flush=True)
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
