"""The ``vera-bench`` command line: parse and check, pick cases and implementations, run, report.

Every argument is checked before the first timing, so that a bad value (or
an output path that cannot be written) costs a one-line error, not a run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import textwrap
from pathlib import Path

import torch

from .. import __version__, backends
from . import cases as bench_cases
from . import implementations as impl
from . import report
from . import serve
from .runner import measure_case

DESCRIPTION = "vera-bench: the fused VeRA layer against unfused PyTorch, PEFT and the bare base layer."
EXAMPLES = """examples:
  vera-bench --quick --device cpu
  vera-bench --shapes 4096x4096 --tokens 8192 --ranks 256 --dtypes bf16 --json out.json --plot out.png"""


def _split(text: str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ints(text: str) -> list:
    return [_positive(item) for item in _split(text)]


def _shapes(text: str) -> list:
    shapes = []
    for item in _split(text):
        match = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", item, re.IGNORECASE)
        if match is None:
            raise argparse.ArgumentTypeError(
                f"shapes are INxOUT with positive integers (e.g. 4096x11008), got {item!r}")
        shapes.append((int(match[1]), int(match[2])))
    return shapes


def _dtypes(text: str) -> list:
    names = _split(text)
    unknown = [n for n in names if n not in bench_cases.DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown dtypes {unknown}: choose from {sorted(bench_cases.DTYPES)}")
    return names


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"dropout is a probability in [0, 1), got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seeds are integers in [0, 2**64), got {text!r}")
    return value


def _presets_help() -> str:
    """The default grid of each preset, from cases.PRESETS."""
    when = {"quick": "with --quick", "cpu": "the default on CPU", "gpu": "the default on CUDA"}
    lines = ["default grids (--shapes, --tokens, --ranks, --dtypes replace an axis):"]
    for name, (shapes, tokens, ranks, dtypes) in bench_cases.PRESETS.items():
        lines += [f"  {name} ({when[name]}):",
                  f"    shapes {', '.join(f'{n_in}x{n_out}' for n_in, n_out in shapes)}",
                  f"    tokens {', '.join(map(str, tokens))}; ranks {', '.join(map(str, ranks))}; "
                  f"dtypes {', '.join(dtypes)}"]
    lines.append("    (fp16 at r = 256 only, unless --ranks or --dtypes is given)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    dtypes = sorted(bench_cases.DTYPES)
    p = argparse.ArgumentParser(prog="vera-bench", description=DESCRIPTION,
                                epilog=f"{_presets_help()}\n\n{EXAMPLES}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--quick", action="store_true", help="tiny cases that finish in seconds")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    p.add_argument("--shapes", type=_shapes, help="layer shapes INxOUT, comma-separated")
    p.add_argument("--tokens", type=_ints, help="token counts, comma-separated")
    p.add_argument("--ranks", type=_ints, help="ranks r, comma-separated")
    p.add_argument("--dtypes", type=_dtypes, help=f"comma-separated, from {dtypes}")
    p.add_argument("--backends", type=_split,
                   help=f"our backends to time, comma-separated, from {backends.registered_backends()} "
                   "(default: those usable on the device)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT even if installed")
    p.add_argument("--reps", type=_positive, default=None,
                   help="timed repetitions per implementation (CPU; default 7, 5 with --quick)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the projections A and B")
    p.add_argument("--wide", action="store_true",
                   help="print every column, also those that mean nothing on a CPU")
    p.add_argument("--dropout", type=_probability, default=0.0,
                   help="adapter dropout of every VeRA implementation (PEFT's vera_dropout)")
    p.add_argument("--dora", action="store_true",
                   help="DVoRA: our DVoRA layer against PEFT's LoRA with use_dora at the same "
                        "rank, DoRA's unfused way over VeRA, and our VeRA layer (vera-<backend>)")
    p.add_argument("--serve", action="store_true",
                   help="serving: a batch mixing N adapters vs one adapter, a call per adapter and "
                        "the base layer (--tokens and --adapters replace the grid)")
    p.add_argument("--adapters", type=_ints, help="with --serve: adapter counts N, comma-separated")
    p.add_argument("--json", metavar="PATH", help="write every measurement and the device facts")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speedup over unfused vs tokens")
    return p


def _device(name: str) -> torch.device:
    """The device to time on; ValueError saying why ``name`` cannot be one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _backends(names, device: torch.device) -> list:
    """Our backends to time; ValueError saying why a named one cannot run on ``device``."""
    if names:
        for name in names:
            try:
                backends.resolve_backend(name, device)
            except (ValueError, RuntimeError) as error:  # unknown name / cannot run here, and why
                raise ValueError(str(error)) from None
        return names
    # The Triton interpreter is a test vehicle, not something to time.
    return [b for b in backends.available_backends(device)
            if not (device.type == "cpu" and b == "triton")]


def _check_writable(flag: str, path: str) -> None:
    """ValueError unless ``path`` can be written (checked first: after a long run, results would be lost)."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a directory")
    if not target.parent.is_dir():
        raise ValueError(f"{flag} {path}: directory {target.parent} does not exist")
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        raise ValueError(f"{flag} {path}: not writable")


def _check_outputs(args) -> None:
    if args.json:
        _check_writable("--json", args.json)
    if args.plot:
        _check_writable("--plot", args.plot)
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install matplotlib (or vera-kernels[bench])")


def cases_from(args, device: torch.device) -> list:
    preset = bench_cases.preset_for(device, args.quick)
    return bench_cases.grid(preset, device, shapes=args.shapes, tokens=args.tokens,
                            ranks=args.ranks, dtypes=args.dtypes, seed=args.seed,
                            dropout=args.dropout, dora=args.dora)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = _device(args.device)
        names = ["base", "unfused"]
        if not args.no_peft and impl.peft_available():
            names.append("peft")
        ours = _backends(args.backends, device)
        names += [f"ours-{b}" for b in ours]
        if args.dora:
            if args.serve:
                raise ValueError("--dora and --serve: serving mixes VeRA adapters only")
            names += [f"vera-{b}" for b in ours]
        _check_outputs(args)
    except ValueError as error:
        parser.error(str(error))  # exits 2
    reps = args.reps or (5 if args.quick else 7)
    if args.serve:
        return _serve(args, argv, device, names, reps)
    cases = cases_from(args, device)
    info = report.device_info(device)
    cols = report.columns(device, args.wide)

    for prose in (f"vera-bench on {info['device_name']} ({device}); torch {info['torch']}, "
                  f"triton {info['triton']}, CUDA {info['cuda']}; {len(cases)} cases x "
                  f"{', '.join(names)}", report.LEGEND):
        print(textwrap.fill(prose, report.TABLE_WIDTH, break_on_hyphens=False))
    print(report.table_header(cols))
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {bench_cases.describe(case)}", file=sys.stderr, flush=True)
        case_rows = measure_case(case, names, info, reps)
        for row in case_rows:
            print(report.table_row(row, cols), flush=True)
        rows += case_rows
    return _write_outputs(args, argv, device, reps, info, rows, report.write_plot)


def _serve(args, argv: list, device: torch.device, names: list, reps: int) -> int:
    """``--serve``: the mixed-adapter batch on our fastest backend for the device."""
    ours = [n.removeprefix("ours-") for n in names if n.startswith("ours-")]
    info, rows = serve.run(device, ours[0], reps, tokens=args.tokens, adapters=args.adapters)
    return _write_outputs(args, argv, device, reps, info, rows, serve.write_plot)


def _write_outputs(args, argv: list, device: torch.device, reps: int, info: dict, rows: list,
                   write_plot) -> int:
    if args.json:
        # On CUDA, do_bench times by a time budget, not by a number of repetitions.
        report.write_json(args.json, info, ["vera-bench", *argv], rows,
                          reps if device.type == "cpu" else None)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, info, rows)
        print(f"wrote {args.plot}")
    return 0
