#!/usr/bin/env python3
"""Compile every kernel specialization vera-kernels launches, for sm_80 and sm_90, without a GPU.

    python scripts/compile_check.py [--arch 80 86 89 90] [--dtypes bf16 fp16 fp32 tf32 fp64]
                                    [--quick] [--jobs N] [--variants ...] [--launchable-only]
                                    --json PATH
    python scripts/compile_check.py --against-driver PREDICTED.json --json PATH   (on a GPU)

reports, per launch, dtype, projection strategy and autotune config:
registers, spill bytes, shared memory, whether the main loop uses tensor
cores, and (sm_90) whether it serializes its wgmma; and compiles the CUDA C++
kernels with nvcc. Defaults: Llama-7B projections (4096x4096, 4096x11008,
11008x4096) at 8192 and 16 tokens, r = 256, bf16 / fp16 / fp32 (IEEE) /
tf32 (fp32 under torch.set_float32_matmul_precision("high")) / fp64, both
projection strategies (VERA_KERNELS_PROJECTIONS=generate / workspace), every
autotune config. ``--quick``: 4096x4096 only, bf16 / fp32 / fp16 on sm_90 and
bf16 on sm_80 (~2 min with a warm Triton cache, ~5 min cold, on 2 cores).

How the specializations are found (robust to kernel signature changes)
----------------------------------------------------------------------
``main`` drops TRITON_INTERPRET before anything imports Triton, so kernels.py
builds its GPU autotune configs and BLOCK_M. Every kernel object the Triton
backend's modules launch (a module-level Autotuner / JITFunction whose name
the module's code subscripts, ``name[grid](...)``: ``kernels._vera_gemm`` and
``philox._generate_kernel`` today) is replaced by a recorder whose
``[grid](*args, **kwargs)`` records the call instead of launching it. The
backend's real forward and backward (``get_backend("triton")``, all
gradients needed, the base output given as VeRALinear does) are then called
with CPU tensors (``torch.empty``: never touched, so 8192-token shapes cost
no memory), once per (dtype, strategy, shape, token count). Each recorded
launch is named by its role from its arguments: h, y (forward), u+dd, dx, db
(backward), workspace_A / workspace_B (the workspace generator). The
vectors are passed as VeRALinear passes them: float32 under bf16 / fp16
activations (it keeps them at least float32), x's dtype otherwise;
``--variants same_dtype banked dropout dora`` adds the launches of vectors in x's
dtype, of adapter banks, of dropout and of DVoRA's scaled base (suffixed
``[same_dtype]`` etc.).

Each (launch, config, arch) is then specialized exactly as a launch would be:
Triton's own binder (``create_function_from_signature`` + ``_pack_args``,
the code ``JITFunction.run`` uses; the same in Triton 3.6 and 3.8) turns the
recorded arguments and the config's kwargs into (signature, constexprs,
attrs, options), pointer-alignment and divisibility-by-16 attributes
included, and ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))`` compiles it. Identical specializations (the same for every
shape here, as shapes are runtime integers) are compiled once and reported
for each (launch, dtype, strategy) that uses them (``shapes`` lists where).

What is read from each compiled kernel
--------------------------------------
* ``registers``: ``cuobjdump -res-usage`` on the cubin (REG), what the driver
  reports as ``n_regs``. ``local_bytes``: STACK + LOCAL there, the per-thread
  local memory (ptxas's "bytes stack frame"), which the driver reports as
  ``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES`` (Triton's ``n_spills`` is that / 4).
* ``spill_bytes``: bytes stored by spill instructions (STL) in the SASS, what
  ``ptxas -v`` calls "bytes spill stores" (checked equal); ``spill_load_bytes``
  likewise (LDL).
* ``shared_bytes``: ``compiled.metadata.shared``, the dynamic shared memory the
  launch requests, which Triton checks against the device's opt-in limit
  (227 KB sm_90, 163 KB sm_80). ptxas adds 1 KB static (reserved) shared
  memory on sm_90, kept apart as ``static_shared_bytes``.
* ``tensor_cores``: the PTX contains ``wgmma.mma_async`` or ``mma.sync``
  (``mma`` says which). ``computed_operand``: the main loop computes a dot
  operand in registers (kernels.has_computed_operand); on sm_90 the
  autotuner then has mma.sync tiles (only those for a generated tile, both
  kinds for a masked or per-row-scaled x: kernels.py, "Which tensor-core
  instruction"), and wgmma tiles otherwise.
* ``serialized_mma`` (sm_90 only; False elsewhere): the main loop waits for
  its wgmma to finish before the next iteration issues another. Decided on
  the innermost loop (a backward branch in the SASS / PTX) that contains the
  tensor-core instructions:
  - SASS: the loop contains ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` (wait until no
    wgmma group is outstanding); a pipelined loop waits with ``0x1`` or more.
    When every HGMMA of the loop (more than one) is followed by such a wait
    before the next HGMMA, ptxas serialized it (``serialized_by`` "ptxas",
    which Triton's PTX may not show); otherwise Triton did ("triton": one
    wait after the iteration's HGMMAs, ``wgmma.wait_group 0`` in the PTX).
  - PTX: the loop contains ``wgmma.wait_group.sync.aligned 0``.
  ``serialized_mma`` is the SASS verdict (the code that runs), or the PTX one
  where no SASS could be produced; both are kept (``serialized_sass``,
  ``serialized_ptx``).
* ``pruned``: the autotuner's own ``prune_configs`` (early_config_prune /
  perf_model), run on the recorded arguments with torch.cuda's device queries
  answering as an sm_<arch> GPU (opt-in shared memory 227 KB / 163 KB), drops
  the config: the launcher can then never pick it. ``None`` if the pruning
  hook could not be evaluated without a GPU.

CUDA C++ kernels: ``nvcc -Xptxas -v -arch=sm_XX -O3 -cubin csrc/vera_kernels.cu``;
registers, spill stores, stack frame and shared memory per entry function from
the ptxas log, tensor cores from the SASS (HMMA / HGMMA / DMMA); records
named ``cuda:<kernel>``, dtype ``tf32`` for fp32's TF32 instantiations.

``--against-driver`` (on a GPU) launches the same forward / backward for real
through the autotuner, then loads each config's compiled kernel and compares
the registers, local memory (Triton's ``n_spills`` x 4) and shared memory the
driver reports with an earlier prediction; it marks the autotuner's picks.

Output: ``{"versions", "settings", "records", "narrow_offsets"}`` and a
summary table on stdout. ``narrow_offsets`` lists every product of a 32-bit
index tensor with an integer argument in the kernels' TTIR (strides made
runtime values), which would wrap past 2^31 elements. Exit status 1 if some
kernel failed to compile or such a product exists. Nothing is cached in the repository (Triton's own
cache, ~/.triton/cache or TRITON_CACHE_DIR, makes a rerun fast; ``--fresh``
compiles into a temporary cache).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without an install
    sys.path.insert(0, str(REPO))

ARCHS = (80, 86, 89, 90)
DEFAULT_ARCHS = (80, 90)  # sm_86 / sm_89 on request: the sm_8x rules are sm_80's
DTYPES = ("bf16", "fp16", "fp32", "tf32", "fp64")
# Llama-7B projections (in x out), prefill and decode token counts.
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
TOKENS = (8192, 16)
RANK = 256
STRATEGIES = ("generate", "workspace")
QUICK_SHAPES = ((4096, 4096),)
QUICK_PLAN = ((90, "bf16"), (90, "fp32"), (90, "fp16"), (80, "bf16"))
# Shared memory a block may use (opt-in maximum), bytes.
# sm_86 / sm_89 (A10, L4, L40S, RTX 3090 / 4090): 99 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}  # A100, A40, RTX 4090, H100 (pruning hooks that ask)
SEED = 0  # seeds < 2**31 are passed as i32 (larger ones specialize to i64 / u64)
TRITON_PACKAGE = "vera_kernels.backends.triton"


# ----------------------------------------------------------------------------
# Recording the launches
# ----------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: object  # the original Autotuner or JITFunction
    args: tuple
    kwargs: dict
    phase: str  # forward / backward
    chosen: object = None  # the autotuner's pick (only when really launched)


class _Recorder:
    """Stands in for a kernel object: ``[grid](*args, **kwargs)`` records the call.

    By default instead of launching it; with ``passthrough`` it also launches
    it (on a GPU) and notes the config the autotuner picked.
    """

    phase = "?"

    def __init__(self, kernel, log, passthrough=False):
        self._kernel, self._log, self._passthrough = kernel, log, passthrough

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            entry = Launch(self._kernel, args, dict(kwargs), _Recorder.phase)
            self._log.append(entry)
            if self._passthrough:
                result = self._kernel[grid](*args, **kwargs)
                entry.chosen = getattr(self._kernel, "best_config", None)
                return result
            return None
        return launch

    def __getattr__(self, name):
        return getattr(self._kernel, name)


def _launchable(obj) -> bool:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    return isinstance(obj, (Autotuner, JITFunction))


def launched_kernels():
    """[(module, name, kernel object)]: the Triton backend's kernels that are launched.

    Those module-level Autotuner / JITFunction objects whose name the module's
    own source subscripts (``name[grid](...)``); device functions such as
    projection_tile are called, never subscripted, and stay untouched (a
    kernel compiled meanwhile still finds them).
    """
    import importlib
    import inspect
    import pkgutil
    package = importlib.import_module(TRITON_PACKAGE)
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{TRITON_PACKAGE}.{info.name}")
        subscripted = set(re.findall(r"\b(\w+)\s*\[", inspect.getsource(module)))
        for name, obj in list(vars(module).items()):
            if _launchable(obj) and name in subscripted:
                found.append((module, name, obj))
    return found


@contextlib.contextmanager
def _recording(log, passthrough=False):
    """Put recorders in place of the launched kernel objects, then restore them."""
    saved = launched_kernels()
    if not saved:
        raise RuntimeError(f"found no launched Triton kernel in {TRITON_PACKAGE}")
    for module, name, obj in saved:
        setattr(module, name, _Recorder(obj, log, passthrough))
    try:
        yield
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


@contextlib.contextmanager
def _setting(dtype_name: str, strategy: str):
    import torch
    old_env = os.environ.get("VERA_KERNELS_PROJECTIONS")
    old_precision = torch.get_float32_matmul_precision()
    os.environ["VERA_KERNELS_PROJECTIONS"] = strategy
    torch.set_float32_matmul_precision("high" if dtype_name == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old_precision)
        if old_env is None:
            os.environ.pop("VERA_KERNELS_PROJECTIONS", None)
        else:
            os.environ["VERA_KERNELS_PROJECTIONS"] = old_env


def torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "tf32": torch.float32, "fp64": torch.float64}[name]


VARIANTS = ("plain", "same_dtype", "banked", "dropout", "dora")
N_ADAPTERS = 4  # bank size of the "banked" variant


def run_layer(dtype_name, strategy, in_f, out_f, tokens, rank, device="cpu", seed=SEED,
              variant="plain"):
    """One forward and one backward (every gradient) of the triton backend, in this setting.

    variant: "plain" is VeRALinear's call: one adapter, the base output given,
    the vectors in float32 under bf16 / fp16 activations (VeRALinear keeps
    them at least float32) and in x's dtype otherwise; "same_dtype": the
    vectors in x's dtype (the functional API called with one dtype);
    "banked": adapter banks (vera_linear_multi, serving); "dropout": adapter
    dropout p = 0.1; "dora": DVoRA's forward, the base scaled and shifted in the
    epilogue (base_scale, base_bias).
    """
    import torch

    from vera_kernels.backends import NeededGrads, ProjectionSource, get_backend
    backend = get_backend("triton")
    dtype = torch_dtype(dtype_name)
    half = dtype in (torch.float16, torch.bfloat16)
    vector_dtype = torch.float32 if half and variant != "same_dtype" else dtype
    make = (torch.empty if device == "cpu"  # recording: never read, never touched
            else lambda *s, **k: torch.randn(*s, **k) * 0.1)
    extra, affine = {}, {}
    with _setting(dtype_name, strategy):
        x = make(tokens, in_f, dtype=dtype, device=device)
        bank = (N_ADAPTERS,) if variant == "banked" else ()
        lambda_d = make(*bank, rank, dtype=vector_dtype, device=device)
        lambda_b = make(*bank, out_f, dtype=vector_dtype, device=device)
        base = make(tokens, out_f, dtype=dtype, device=device)
        grad = make(tokens, out_f, dtype=dtype, device=device)
        if variant == "banked":
            extra["adapter_ids"] = torch.arange(tokens, device=device, dtype=torch.int32) % N_ADAPTERS
        elif variant == "dropout":
            from vera_kernels.dropout import DropoutMask, seed_words
            extra["dropout"] = DropoutMask(0.1, seed_words(seed + 1, device))
        elif variant == "dora":
            affine = {"base_scale": make(out_f, dtype=vector_dtype, device=device),
                      "base_bias": make(out_f, dtype=dtype, device=device)}
        source = ProjectionSource.from_seed(seed)
        _Recorder.phase = "forward"
        _, h = backend.forward(x, lambda_d, lambda_b, source, base, **extra, **affine)
        _Recorder.phase = "backward"
        backend.backward(grad, h, lambda_d, lambda_b, source, in_f,
                         NeededGrads(x=True, lambda_d=True, lambda_b=True), **extra)


def jit_function(kernel):
    """The JITFunction behind a kernel object (an Autotuner wraps one; so may heuristics)."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def named_args(kernel, args, kwargs) -> dict:
    fn = jit_function(kernel)
    named = dict(zip(fn.arg_names, args))
    named.update(kwargs)
    return named


def role(launch: Launch) -> str:
    """h, y, u+dd (u), dx, db (z when stored), workspace_A/B: what a launch computes."""
    named = named_args(launch.kernel, launch.args, launch.kwargs)
    fn = jit_function(launch.kernel)
    stream = named.get("STREAM")
    matrix = {0: "A", 1: "B"}.get(stream, str(stream))
    if "TRANSPOSED" not in named:  # the projection generator
        return f"workspace_{matrix}" if "generate" in fn.__name__ else f"{fn.__name__}_{matrix}"
    transposed, epilogue = bool(named["TRANSPOSED"]), named.get("EPILOGUE", 0)
    if launch.phase == "forward":
        return "h" if stream == 0 else "y"
    if stream == 1 and not transposed:
        return "u+dd" if epilogue == 1 else "u"
    if stream == 0:
        return "dx"
    return "db" if epilogue == 2 else "z"


def record(dtype_name, strategy, shapes, tokens_list, rank, variants=("plain",)):
    """[(role, Launch, shape string)] of every launch of forward + backward over the shapes."""
    out = []
    for variant in variants:
        suffix = "" if variant == "plain" else f"[{variant}]"
        for in_f, out_f in shapes:
            for tokens in tokens_list:
                log: list = []
                with _recording(log):
                    run_layer(dtype_name, strategy, in_f, out_f, tokens, rank, variant=variant)
                for launch in log:
                    out.append((role(launch) + suffix, launch, f"{tokens}x{in_f}x{out_f}"))
    return out


# ----------------------------------------------------------------------------
# Specializing and compiling (the one place that knows Triton's internals)
# ----------------------------------------------------------------------------

def specialize(kernel_fn, args, kwargs, arch):
    """(ASTSource, options dict) exactly as ``JITFunction.run`` would build them on ``arch``.

    Triton 3.6 and 3.8 share ``create_function_from_signature`` and
    ``JITFunction._pack_args``; anything else falls back to a plain
    signature (no alignment attributes).
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", getattr(kernel_fn, "debug", None) or knobs.runtime.debug)
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs.setdefault("instrumentation_mode", knobs.compilation.instrumentation_mode)
    if hasattr(jit, "create_function_from_signature") and hasattr(kernel_fn, "_pack_args"):
        binder = jit.create_function_from_signature(kernel_fn.signature, kernel_fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel_fn._pack_args(
            backend, kwargs, bound, specialization, options)
        return ASTSource(kernel_fn, signature, constexprs, attrs), dict(options.__dict__)
    return _plain_specialization(kernel_fn, args, kwargs, backend)  # pragma: no cover


def _plain_specialization(kernel_fn, args, kwargs, backend):  # pragma: no cover
    import torch
    from triton.compiler import ASTSource
    named = dict(zip(kernel_fn.arg_names, args))
    named.update({k: v for k, v in kwargs.items() if k in kernel_fn.arg_names})
    signature, constexprs = {}, {}
    const_names = {kernel_fn.arg_names[i] for i in kernel_fn.constexprs}
    for name in kernel_fn.arg_names:
        value = named[name]
        if name in const_names:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16",
                                     torch.float32: "fp32", torch.float64: "fp64",
                                     torch.int32: "i32", torch.int64: "i64"}[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    options = backend.parse_options({k: v for k, v in kwargs.items() if k not in named})
    return ASTSource(kernel_fn, signature, constexprs), dict(options.__dict__)


def _tool(name: str):
    """cuobjdump / nvdisasm: Triton's bundled copy, else the CUDA toolkit's."""
    try:
        from triton import knobs
        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001, S110  (older Triton: no knobs; use the toolkit's)
        pass
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(cuda_home, "bin", name)
    return candidate if os.path.exists(candidate) else shutil.which(name)


def cuobjdump(cubin_path: str, *options: str):
    """``cuobjdump <options> cubin`` output, or None without the tool."""
    tool = _tool("cuobjdump")
    if tool is None:
        return None
    result = subprocess.run([tool, *options, cubin_path], check=False, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def parse_res_usage(text: str) -> dict:
    """{function: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}} from ``-res-usage``."""
    usage, function = {}, None
    for line in text.splitlines():
        match = re.match(r"\s*Function (\S+):\s*$", line)
        if match:
            function = match.group(1)
            continue
        if function and "REG:" in line:
            usage[function] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            function = None
    return usage


# ----------------------------------------------------------------------------
# Reading the code
# ----------------------------------------------------------------------------

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.IGNORECASE)
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_LOCAL_SIZE = {"8": 1, "U8": 1, "S8": 1, "16": 2, "U16": 2, "S16": 2, "64": 8, "128": 16}


def parse_sass(text: str) -> list:
    """[(address, instruction text)] of the first function in ``cuobjdump -sass`` output."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_LINE.search(line)
        if match:
            address = int(match.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instructions.append([address, match.group(2)])
    for item in instructions:  # branch targets as addresses
        target = re.search(r"BRA(?:\.\w+)*\s+`?\(?(\.L_x_\d+|0x[0-9a-f]+)\)?", item[1],
                           re.IGNORECASE)
        item.append(None if target is None else
                    labels.get(target.group(1)) if target.group(1).startswith(".L")
                    else int(target.group(1), 16))
    return instructions


def _local_bytes(instructions, opcode: str) -> int:
    total = 0
    for _, text, _ in instructions:
        match = re.match(rf"(?:@!?U?P\w+\s+)?{opcode}((?:\.\w+)*)\s", text + " ")
        if match:
            sizes = [_LOCAL_SIZE[s] for s in match.group(1).split(".") if s in _LOCAL_SIZE]
            total += sizes[0] if sizes else 4
    return total


def _innermost_loop(items, is_mma, branch_target, position):
    """(start, end) indexes of the innermost backward-branch loop holding tensor-core code."""
    loops = []
    for i, item in enumerate(items):
        target = branch_target(item)
        if target is None:
            continue
        j = position(target)
        if j is not None and j <= i:
            loops.append((j, i))
    loops = [lp for lp in loops if any(is_mma(items[k]) for k in range(lp[0], lp[1] + 1))]
    return min(loops, key=lambda lp: lp[1] - lp[0]) if loops else None


def sass_facts(text: str) -> dict:
    instructions = parse_sass(text)
    facts = {"spill_bytes": _local_bytes(instructions, "STL"),
             "spill_load_bytes": _local_bytes(instructions, "LDL"),
             "sass_mma": sorted({m.group(1) for _, t, _ in instructions
                                 for m in [re.match(r"(?:@!?P\w+\s+)?(HGMMA|HMMA|DMMA|IMMA)", t)]
                                 if m})}
    index = {address: i for i, (address, _, _) in enumerate(instructions)}
    loop = _innermost_loop(instructions, lambda it: "HGMMA" in it[1], lambda it: it[2],
                           lambda address: index.get(address))
    facts["serialized_sass"] = None
    if loop is not None:
        body = instructions[loop[0]:loop[1] + 1]
        waits = [i for i, (_, t, _) in enumerate(body)
                 if re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", t)]
        hgmma = [i for i, (_, t, _) in enumerate(body) if "HGMMA" in t]
        facts["serialized_sass"] = bool(waits)
        after_each = all(any(w > h and all("HGMMA" not in body[k][1] for k in range(h + 1, w))
                             for w in waits) for h in hgmma)
        facts["serialized_by"] = ("ptxas" if waits and after_each and len(hgmma) > 1 else
                                  "triton" if waits else None)
        facts["loop_hgmma"], facts["loop_waits0"] = len(hgmma), len(waits)
    return facts


def ptx_facts(ptx: str) -> dict:
    lines = [line.strip() for line in ptx.splitlines()]
    facts = {"mma": ("wgmma" if "wgmma.mma_async" in ptx else
                     "mma.sync" if re.search(r"\bmma\.sync", ptx) else None)}
    labels = {}
    for i, line in enumerate(lines):
        match = re.match(r"(\$L__\w+):", line)
        if match:
            labels[match.group(1)] = i

    def target(line):
        match = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        return match.group(1) if match else None

    loop = _innermost_loop(lines, lambda line: "wgmma.mma_async" in line, target, labels.get)
    facts["serialized_ptx"] = (None if loop is None else any(
        re.search(r"wgmma\.wait_group\.sync\.aligned\s+0\s*;", line)
        for line in lines[loop[0]:loop[1] + 1]))
    return facts


def analyze(compiled, arch: int) -> dict:
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    facts = ptx_facts(ptx)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = cuobjdump(path, "-res-usage", "-sass")  # one call: both listings
    usage = parse_res_usage(sass or "")
    name = compiled.metadata.name
    use = usage.get(name) or (next(iter(usage.values())) if usage else {})
    local = None if not use else use.get("STACK", 0) + use.get("LOCAL", 0)
    facts.update({"kernel": name, "triton_hash": getattr(compiled, "hash", None),
                  "registers": use.get("REG"), "local_bytes": local,
                  "shared_bytes": compiled.metadata.shared,
                  "static_shared_bytes": use.get("SHARED")})
    if sass is not None:
        facts.update(sass_facts(sass))
    else:  # no cuobjdump: Triton's n_spills is unavailable without a driver
        facts.update({"spill_bytes": None, "spill_load_bytes": None, "serialized_sass": None})
    serial = facts["serialized_sass"]
    if serial is None:
        serial = facts["serialized_ptx"]
    facts["serialized_mma"] = bool(arch >= 90 and serial)
    facts["tensor_cores"] = facts["mma"] is not None
    return facts


# ----------------------------------------------------------------------------
# 64-bit offsets (read from the TTIR)
# ----------------------------------------------------------------------------

# An integer argument whose value is 1 or a multiple of 16 may be specialized
# into a constant; 3 keeps every stride a runtime i32 argument, as a strided
# operand's would be.
RUNTIME_STRIDE = 3
_TTIR_DEF = re.compile(r"^\s*(%[\w.#-]+) = ([\w.]+) (%[\w.#-]+)")
_TTIR_MULI = re.compile(r"^\s*%[\w.#-]+ = arith\.muli (%[\w.#-]+), (%[\w.#-]+) : tensor<[^>]*xi32>")


def kernel_ttir(kernel_fn, args, kwargs, arch: int = 90) -> str:
    """The kernel's TTIR as Triton first generates it (names kept), for this specialization."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    target = GPUTarget("cuda", arch, 32)
    source, options = specialize(kernel_fn, args, kwargs, arch)
    backend = make_backend(target)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    options = backend.parse_options(options)
    module = source.make_ir(target, options, backend.get_codegen_implementation(options),
                            backend.get_module_map(), context)
    return str(module)


def narrow_index_products(ttir: str) -> list:
    """Lines of ``ttir`` that multiply a 32-bit index tensor by an integer argument.

    Such a product wraps once it passes 2^31 (an operand whose
    ``(cols - 1) * stride`` does, with a stride that fits in 32 bits): the
    kernels widen every index to 64 bits before it meets a stride. An
    operand is traced back through splat / broadcast / expand_dims to a
    function argument.
    """
    arguments = set()
    for line in ttir.splitlines():
        if "tt.func public" in line:
            arguments |= {f"%{name}" for name in re.findall(r"%(\w+): i32", line)}
    defined = {}
    for line in ttir.splitlines():
        match = _TTIR_DEF.match(line)
        if match and match.group(2) in ("tt.splat", "tt.broadcast", "tt.expand_dims"):
            defined[match.group(1)] = match.group(3)

    def argument(value):
        while value in defined:
            value = defined[value]
        return value if value in arguments else None

    return [line.strip() for line in ttir.splitlines()
            if (m := _TTIR_MULI.match(line)) and (argument(m.group(1)) or argument(m.group(2)))]


def narrow_offsets(recorded) -> list:
    """[{"launch", "kernel", "line"}]: 32-bit index x argument products in the recorded launches.

    Each distinct (kernel, meta-parameters) is checked once, with every
    ``stride*`` argument a runtime value (RUNTIME_STRIDE) and the first
    autotune config.
    """
    from triton.runtime.autotuner import Autotuner
    found, seen = [], set()
    for role_name, launch, _ in recorded:
        kernel_fn = jit_function(launch.kernel)
        key = (kernel_fn.__name__, repr(sorted(launch.kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        args = tuple(RUNTIME_STRIDE if name.startswith("stride") and isinstance(value, int) else value
                     for name, value in zip(kernel_fn.arg_names, launch.args))
        config = launch.kernel.configs[0].all_kwargs() if isinstance(launch.kernel, Autotuner) else {}
        ttir = kernel_ttir(kernel_fn, args, dict(launch.kwargs, **config))
        found += [{"launch": role_name, "kernel": kernel_fn.__name__, "line": line}
                  for line in narrow_index_products(ttir)]
    return found


# ----------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------

@dataclass
class Job:
    arch: int
    kernel_fn: object = None
    source: object = None
    options: dict = field(default_factory=dict)
    cuda: bool = False
    records: list = field(default_factory=list)  # the records this compile fills
    analyze: bool = True  # read the compiled kernel (False: only fill Triton's cache)


_JOBS: list = []  # read by forked workers


def _config_dict(config, options) -> dict:
    if config is None:
        return {"num_warps": options.get("num_warps"), "num_stages": options.get("num_stages")}
    return {k: v for k, v in config.all_kwargs().items()}


@contextlib.contextmanager
def _as_device(arch: int):
    """torch.cuda's device queries answer as an sm_<arch> GPU would (for the autotuner's pruning)."""
    import types

    import torch
    props = types.SimpleNamespace(
        name=f"compile_check sm_{arch}", major=arch // 10, minor=arch % 10,
        shared_memory_per_block_optin=SMEM_LIMIT[arch], shared_memory_per_block=48 * 1024,
        shared_memory_per_multiprocessor=SMEM_LIMIT[arch] + 1024,
        multi_processor_count=SM_COUNT[arch], total_memory=80 * 2**30, warp_size=32,
        regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048)
    saved = torch.cuda.get_device_properties, torch.cuda.get_device_capability
    torch.cuda.get_device_properties = lambda *args, **kwargs: props
    torch.cuda.get_device_capability = lambda *args, **kwargs: (props.major, props.minor)
    try:
        yield
    finally:
        torch.cuda.get_device_properties, torch.cuda.get_device_capability = saved


def surviving_configs(kernel, launch, arch):
    """The configs the autotuner's own pruning (early_config_prune / perf_model) keeps for this
    launch on an sm_<arch> device; ``None`` if the pruning could not be evaluated here."""
    if not (getattr(kernel, "early_config_prune", None) or getattr(kernel, "perf_model", None)):
        return list(kernel.configs)
    kernel.nargs = dict(zip(kernel.arg_names, launch.args))
    try:
        with _as_device(arch):
            return list(kernel.prune_configs(dict(launch.kwargs)))
    except Exception as error:  # noqa: BLE001
        print(f"compile_check: cannot evaluate the autotuner's pruning here ({error!r}); "
              "pruned is reported as None", file=sys.stderr)
        return None
    finally:
        kernel.nargs = None


def _check_not_interpreting():
    from vera_kernels.backends.triton import kernels
    if getattr(kernels, "INTERPRETING", False):
        raise RuntimeError("the Triton kernels were imported with TRITON_INTERPRET=1: their GPU "
                           "configs do not exist; run compile_check.py in a fresh process")


def plan_triton(plan, shapes, tokens_list, rank, variants=("plain",), recorded=None,
                launchable_only=False):
    """The compile jobs for every (arch, dtype) of the plan; one job per distinct specialization.

    ``recorded``: a list that receives every (role, Launch, shape) recorded;
    ``launchable_only``: leave out the configs the autotuner's pruning drops."""
    from triton.runtime.autotuner import Autotuner

    from vera_kernels.backends.triton.kernels import has_computed_operand
    _check_not_interpreting()

    def computed(meta):  # None for the projection generator (no dot)
        return has_computed_operand(meta) if "GENERATE" in meta else None

    jobs: dict = {}
    for dtype_name in sorted({d for _, d in plan}, key=DTYPES.index):
        archs = sorted(a for a, d in plan if d == dtype_name)
        for strategy in STRATEGIES:
            launches = record(dtype_name, strategy, shapes, tokens_list, rank, variants)
            if recorded is not None:
                recorded += launches
            for role_name, launch, shape in launches:
                kernel = launch.kernel
                is_tuned = isinstance(kernel, Autotuner)
                kernel_fn = jit_function(kernel)
                kept = {arch: surviving_configs(kernel, launch, arch) if is_tuned else None
                        for arch in archs}
                for config in (kernel.configs if is_tuned else [None]):
                    kwargs = dict(launch.kwargs, **(config.all_kwargs() if config else {}))
                    for arch in archs:
                        pruned = (False if config is None else None if kept[arch] is None
                                  else all(c is not config for c in kept[arch]))
                        if pruned and launchable_only:
                            continue
                        source, options = specialize(kernel_fn, launch.args, kwargs, arch)
                        key = (arch, source.hash(), repr(sorted(options.items())))
                        job = jobs.setdefault(key, Job(arch, kernel_fn, source, options))
                        rec_key = (role_name, dtype_name, strategy)
                        for rec in job.records:
                            if (rec["launch"], rec["dtype"], rec["strategy"]) == rec_key:
                                if shape not in rec["shapes"]:
                                    rec["shapes"].append(shape)
                                break
                        else:
                            job.records.append({
                                "arch": arch, "launch": role_name, "dtype": dtype_name,
                                "strategy": strategy, "config": _config_dict(config, options),
                                "computed_operand": computed(launch.kwargs),
                                "pruned": pruned, "shapes": [shape]})
    return list(jobs.values())


def run_jobs(jobs: list, processes: int) -> list:
    """Each job's result, ``processes`` compiles at a time (forked workers, which touch no GPU)."""
    _JOBS[:] = jobs
    if processes > 1 and len(jobs) > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            return pool.map(_run_job, range(len(jobs)), chunksize=1)
    return [_run_job(i) for i in range(len(jobs))]


def precompile(launches, arch: int, processes: int) -> list:
    """Compile ``[(kernel, args, kwargs)]`` for sm_<arch> into Triton's cache, in parallel.

    Each distinct specialization once, specialized as its launch will be, so
    that launching it afterwards loads it from the cache. The errors, if any.
    """
    jobs: dict = {}
    for kernel, args, kwargs in launches:
        fn = jit_function(kernel)
        source, options = specialize(fn, args, kwargs, arch)
        key = (source.hash(), repr(sorted(options.items())))
        jobs.setdefault(key, Job(arch, fn, source, options, analyze=False))
    return [r["error"] for r in run_jobs(list(jobs.values()), processes) if "error" in r]


def _run_job(index: int) -> dict:
    job = _JOBS[index]
    start = time.perf_counter()
    try:
        if job.cuda:
            result = {"cuda": compile_cuda(job.arch)}
        else:
            import triton
            from triton.backends.compiler import GPUTarget
            compiled = triton.compile(job.source, target=GPUTarget("cuda", job.arch, 32),
                                      options=job.options)
            result = analyze(compiled, job.arch) if job.analyze else {}
    except Exception as error:  # noqa: BLE001  (a failed compile is a finding, not a crash)
        result = {"error": f"{type(error).__name__}: {str(error)[-2000:]}"}
    result["compile_seconds"] = round(time.perf_counter() - start, 2)
    return result


# ----------------------------------------------------------------------------
# CUDA C++
# ----------------------------------------------------------------------------

def nvcc_path():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(cuda_home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def nvcc_version():
    nvcc = nvcc_path()
    if nvcc is None:
        return None
    text = subprocess.run([nvcc, "--version"], check=False, capture_output=True, text=True).stdout
    match = re.search(r"release ([\d.]+), V([\d.]+)", text)
    return match.group(2) if match else text.strip().splitlines()[-1]


_CUDA_DTYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "double": "fp64"}


def _demangle(names):
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), check=False, capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def parse_ptxas_log(log: str) -> dict:
    """{mangled entry: {"registers", "spill_bytes", "spill_load_bytes", "local_bytes", "shared_bytes"}}."""
    entries, current = {}, None
    for line in log.splitlines():
        match = re.search(r"Compiling entry function '(\S+)'", line)
        if match:
            current = entries.setdefault(match.group(1), {})
            continue
        match = re.search(r"Function properties for (\S+)", line)
        if match:
            current = entries.get(match.group(1))
            continue
        if current is None:
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                          line)
        if match:
            current.update(local_bytes=int(match.group(1)), spill_bytes=int(match.group(2)),
                           spill_load_bytes=int(match.group(3)))
        match = re.search(r"Used (\d+) registers", line)
        if match:
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(registers=int(match.group(1)),
                           shared_bytes=int(smem.group(1)) if smem else 0)
            current = None
    return entries


def compile_cuda(arch: int) -> list:
    """Records for every entry function of csrc/vera_kernels.cu on sm_<arch>."""
    nvcc = nvcc_path()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "vera_kernels.cubin")
        cmd = [nvcc, "-Xptxas", "-v", f"-arch=sm_{arch}", "-O3", "-std=c++17",
               "-I", str(REPO / "csrc"), "-cubin", "-o", cubin, str(REPO / "csrc" / "vera_kernels.cu")]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
        entries = parse_ptxas_log(result.stdout + result.stderr)
        sass = cuobjdump(cubin, "-sass") or ""
    mma_by_function, function = {}, None
    for line in sass.splitlines():
        match = re.search(r"Function : (\S+)", line)
        if match:
            function = match.group(1)
        elif function and re.search(r"\b(HGMMA|HMMA|DMMA|IMMA)\b", line):
            mma_by_function[function] = True
    names = _demangle(list(entries))
    records = []
    for mangled, facts in sorted(entries.items(), key=lambda kv: names[kv[0]]):
        pretty = names[mangled]
        match = re.search(r"(\w+)<([^>]*)>\(", pretty) or re.search(r"(\w+)\(", pretty)
        kernel = match.group(1)
        targs = [a.strip() for a in match.group(2).split(",")] if match.lastindex == 2 else []
        dtype = _CUDA_DTYPES.get(targs[0]) if targs else None
        if dtype == "fp32" and "(vera::Precision)1" in targs:  # Precision::kTf32
            dtype = "tf32"  # as the Triton launches of fp32 under "high" are named
        shown = [re.sub(r"\((?:\w+::)*(\w+)\)(-?\d+)", r"\1=\2", _CUDA_DTYPES.get(a, a))
                 for a in targs]
        records.append({
            "arch": arch, "launch": f"cuda:{kernel}" + (f"<{','.join(shown)}>" if shown else ""),
            "dtype": dtype, "strategy": "runtime", "config": None, "pruned": False,
            "registers": facts.get("registers"), "spill_bytes": facts.get("spill_bytes"),
            "spill_load_bytes": facts.get("spill_load_bytes"),
            "local_bytes": facts.get("local_bytes"), "shared_bytes": facts.get("shared_bytes"),
            "tensor_cores": bool(mma_by_function.get(mangled)), "serialized_mma": False,
            "mma": None, "kernel": mangled, "shapes": [],
        })
    return records


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

RECORD_FIELDS = ("kernel", "triton_hash", "registers", "spill_bytes", "spill_load_bytes",
                 "local_bytes", "shared_bytes", "static_shared_bytes", "tensor_cores", "mma",
                 "serialized_mma", "serialized_sass", "serialized_ptx", "serialized_by", "loop_hgmma", "loop_waits0", "error",
                 "compile_seconds")


def versions() -> dict:
    import platform
    out = {"python": platform.python_version(), "nvcc": nvcc_version()}
    for name in ("triton", "torch"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _fmt_range(values, scale=1, suffix=""):
    values = [v for v in values if v is not None]
    if not values:
        return "?"
    lo, hi = min(values) / scale, max(values) / scale
    fmt = (lambda v: f"{v:.0f}{suffix}") if scale != 1 else (lambda v: f"{v:g}")
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def summary(records) -> str:
    """One row per (arch, dtype, strategy, launch); the columns after ``pruned`` describe
    the configs the autotuner can pick (pruned ones are in the JSON)."""
    groups: dict = {}
    for rec in records:
        key = (rec["arch"], rec["dtype"] or "-", rec["strategy"], rec["launch"])
        groups.setdefault(key, []).append(rec)
    order = {d: i for i, d in enumerate(DTYPES)}
    rows = [("arch", "dtype", "strategy", "launch", "cfgs", "pruned", "regs", "spill", "local",
             "smem", "tc", "serial", "errors")]
    for (arch, dtype, strategy, launch), recs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9), kv[0][2],
                                            kv[0][3].startswith("cuda:"), kv[0][3])):
        ok = [r for r in recs if not r.get("error")]
        live = [r for r in ok if r.get("pruned") is not True]
        mmas = sorted({r["mma"] for r in live if r.get("mma")})
        rows.append((
            f"sm_{arch}", dtype, strategy, launch, str(len(recs)),
            str(sum(bool(r.get("pruned")) for r in recs)),
            _fmt_range([r["registers"] for r in live]),
            _fmt_range([r["spill_bytes"] for r in live]),
            _fmt_range([r["local_bytes"] for r in live]),
            _fmt_range([r["shared_bytes"] for r in live], 1024, "K"),
            f"{sum(r['tensor_cores'] for r in live)}/{len(live)}"
            + (f" {'+'.join(mmas)}" if mmas else ""),
            f"{sum(r['serialized_mma'] for r in live)}/{len(live)}" if arch >= 90 else "-",
            str(len(recs) - len(ok)) if len(recs) > len(ok) else "",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def limit_violations(records):
    return [r for r in records if not r["pruned"] and r.get("shared_bytes") is not None
            and r["shared_bytes"] > SMEM_LIMIT.get(r["arch"], 0)]


def _config_key(config) -> tuple:
    return tuple(sorted((config or {}).items()))


def against_driver(args) -> int:
    """On a GPU: launch forward + backward for real, read what the driver reports, compare.

    For every launch of the predicted settings (dtypes on this device's arch,
    both strategies, the shapes and token counts), the kernels are launched
    through the real autotuner; then, for each of its configs, the compiled
    kernel is fetched from the JIT cache (``JITFunction.warmup``) and loaded:
    ``n_regs``, ``n_spills`` (local bytes / 4) and ``metadata.shared`` are
    compared with the prediction for the same (launch, dtype, strategy,
    config); ``chosen`` marks the config the autotuner picked.
    """
    import torch
    from triton.runtime.autotuner import Autotuner
    if not torch.cuda.is_available():
        print("compile_check --against-driver: no CUDA device", file=sys.stderr)
        return 2
    predicted = json.loads(Path(args.against_driver).read_text())
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    settings = predicted["settings"]
    index = {(r["launch"], r["dtype"], r["strategy"], _config_key(r["config"])): r
             for r in predicted["records"] if r["arch"] == arch}
    dtypes = args.dtypes or sorted({d for a, d in settings["plan"] if a == arch}, key=DTYPES.index)
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
              if args.shapes else [tuple(s) for s in settings["shapes"]])
    tokens_list = ([int(t) for t in args.tokens.split(",")] if args.tokens
                   else settings["tokens"])
    variants = settings.get("variants", ["plain"])
    _check_not_interpreting()
    rows = []
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for dtype_name in dtypes:
        for strategy in STRATEGIES:
            for variant in variants:
                suffix = "" if variant == "plain" else f"[{variant}]"
                for in_f, out_f in shapes:
                    for tokens in tokens_list:
                        log: list = []
                        with _recording(log, passthrough=True):
                            run_layer(dtype_name, strategy, in_f, out_f, tokens,
                                      settings["rank"], device="cuda", variant=variant)
                        torch.cuda.synchronize()
                        for launch in log:
                            rows += _driver_rows(launch, role(launch) + suffix, dtype_name,
                                                 strategy, f"{tokens}x{in_f}x{out_f}", index,
                                                 Autotuner)
                        # After every launch: a run stopped at its time limit keeps its rows.
                        payload = _driver_payload(rows, arch, args)
                        out.write_text(json.dumps(payload, indent=1, default=str))
    payload = _driver_payload(rows, arch, args)
    out.write_text(json.dumps(payload, indent=1, default=str))
    bad = [r for r in rows if r["status"] not in ("ok", "pruned")]
    table = [("launch", "dtype", "strategy", "shape", "config (chosen)", "regs pred/drv",
              "local pred/drv", "smem pred/drv", "same binary", "status")]
    for r in rows:
        if r["status"] == "pruned" or (r["status"] == "ok" and not r["chosen"]):
            continue
        c = r["config"]
        cfg = f"w{c.get('num_warps')} s{c.get('num_stages')}"
        if "BLOCK_N" in c:
            cfg = f"N{c['BLOCK_N']} K{c.get('BLOCK_K')} " + cfg
        table.append((r["launch"], r["dtype"], r["strategy"], r["shape"],
                      cfg + (" *" if r["chosen"] else ""),
                      f"{r.get('predicted_registers')}/{r.get('driver_registers')}",
                      f"{r.get('predicted_local_bytes')}/{r.get('driver_local_bytes')}",
                      f"{r.get('predicted_shared_bytes')}/{r.get('driver_shared_bytes')}",
                      str(r.get("same_binary")), r["status"]))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    print("\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                    for row in table))
    print(f"\n{len(rows)} (launch, config) pairs checked on {payload['device']} (sm_{arch}); "
          f"{len(bad)} not ok (mismatch / missing prediction / error); the autotuner's picks "
          "are marked *; versions " + json.dumps(payload["versions"]))
    return 1 if bad else 0


def _driver_payload(rows: list, arch: int, args) -> dict:
    import torch
    bad = [r for r in rows if r["status"] not in ("ok", "pruned")]
    return {"device": torch.cuda.get_device_name(), "arch": arch, "versions": versions(),
            "predicted": str(args.against_driver), "rows": rows,
            "checked": len(rows), "not_ok": len(bad)}


def _driver_rows(launch, name, dtype_name, strategy, shape, index, autotuner_cls) -> list:
    kernel = launch.kernel
    fn = jit_function(kernel)
    tuned = isinstance(kernel, autotuner_cls)
    rows = []
    if tuned:  # the configs the autotuner can pick on this device; the others never load
        kernel.nargs = dict(zip(kernel.arg_names, launch.args))
        try:
            kept = kernel.prune_configs(dict(launch.kwargs))
        finally:
            kernel.nargs = None
    for config in (kernel.configs if tuned else [None]):
        row = {"launch": name, "dtype": dtype_name, "strategy": strategy, "shape": shape}
        if tuned and all(c is not config for c in kept):
            rows.append(dict(row, config=config.all_kwargs(), chosen=False, status="pruned"))
            continue
        kwargs = dict(launch.kwargs, **(config.all_kwargs() if config else {}))
        picked = launch.chosen
        row["chosen"] = (picked is not None and config.all_kwargs() == picked.all_kwargs()
                         if tuned else True)
        try:
            compiled = fn.warmup(*launch.args, grid=(1,), **kwargs)
            compiled._init_handles()
            row.update(driver_registers=compiled.n_regs, driver_local_bytes=compiled.n_spills * 4,
                       driver_shared_bytes=compiled.metadata.shared)
            row["config"] = (config.all_kwargs() if config else
                             {"num_warps": compiled.metadata.num_warps,
                              "num_stages": compiled.metadata.num_stages})
            hash_now = getattr(compiled, "hash", None)
        except Exception as error:  # noqa: BLE001  (e.g. a pruned config that cannot load)
            row["config"] = config.all_kwargs() if config else {}
            pred = index.get((name, dtype_name, strategy, _config_key(row["config"])))
            pruned = bool(pred and pred.get("pruned"))  # never launched: not loading is fine
            row.update(status="pruned" if pruned else "error",
                       error=f"{type(error).__name__}: {str(error)[:300]}")
            rows.append(row)
            continue
        pred = index.get((name, dtype_name, strategy, _config_key(row["config"])))
        if pred is None:
            row["status"] = "no prediction"
        else:
            row.update(predicted_registers=pred.get("registers"),
                       predicted_local_bytes=pred.get("local_bytes"),
                       predicted_shared_bytes=pred.get("shared_bytes"),
                       predicted_pruned=pred.get("pruned"),
                       same_binary=(pred.get("triton_hash") == hash_now) if hash_now else None)
            same = (row["predicted_registers"] == row["driver_registers"]
                    and row["predicted_local_bytes"] == row["driver_local_bytes"]
                    and row["predicted_shared_bytes"] == row["driver_shared_bytes"])
            row["status"] = "ok" if same else "mismatch"
        rows.append(row)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS,
                        help="SM architectures (default: 80 90)")
    parser.add_argument("--launchable-only", action="store_true",
                        help="compile only the configs the autotuner can pick (to warm Triton's "
                             "cache on a GPU machine)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES,
                        help=f"default: {' '.join(DTYPES)}")
    parser.add_argument("--quick", action="store_true",
                        help="one shape (4096x4096), tokens 8192 and 16, bf16/fp32/fp16 on sm_90 "
                             "and bf16 on sm_80 (unless --arch / --dtypes say otherwise)")
    parser.add_argument("--shapes", help="INxOUT,... (default: Llama-7B projections)")
    parser.add_argument("--tokens", help="comma-separated token counts (default: 8192,16)")
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compiles (default: all CPUs)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels")
    parser.add_argument("--fresh", action="store_true",
                        help="compile into a temporary Triton cache (cold-cache timing)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["plain"],
                        help="launch families to record: plain (VeRALinear: one adapter, "
                             "float32 vectors under bf16/fp16), same_dtype (vectors in x's "
                             "dtype), banked (adapter banks, serving), dropout, dora (DVoRA's "
                             "scaled base) (default: plain)")
    parser.add_argument("--against-driver", metavar="PREDICTED_JSON",
                        help="on a GPU: launch for real and compare the registers / local / shared "
                             "memory the driver reports with this earlier compile_check output "
                             "(--dtypes / --shapes / --tokens narrow what is launched)")
    parser.add_argument("--json", required=True, metavar="PATH", help="where to write the records")
    return parser.parse_args(argv)


def make_plan(args):
    if args.quick and args.arch is None and args.dtypes is None:
        return list(QUICK_PLAN)
    archs = args.arch or list(DEFAULT_ARCHS)
    dtypes = args.dtypes or (["bf16", "fp32", "fp16"] if args.quick else list(DTYPES))
    return [(a, d) for a in archs for d in dtypes]


def main(argv=None) -> int:
    # Before Triton is imported: kernels.py reads it at import time, and in
    # the interpreter it builds CPU-only configs and BLOCK_M = 16.
    os.environ.pop("TRITON_INTERPRET", None)
    args = parse_args(argv)
    if args.against_driver:
        return against_driver(args)
    start = time.perf_counter()
    plan = make_plan(args)
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
              if args.shapes else list(QUICK_SHAPES if args.quick else SHAPES))
    tokens_list = [int(t) for t in args.tokens.split(",")] if args.tokens else list(TOKENS)
    fresh_cache = None
    if args.fresh:
        fresh_cache = tempfile.mkdtemp(prefix="vera-compile-check-")
        os.environ["TRITON_CACHE_DIR"] = fresh_cache
    try:
        return _compile_all(args, start, plan, shapes, tokens_list)
    finally:
        if fresh_cache:
            shutil.rmtree(fresh_cache, ignore_errors=True)


def _compile_all(args, start, plan, shapes, tokens_list) -> int:
    """Plan, compile (in parallel), write the JSON, print the summary; 1 if a compile failed."""
    jobs = []
    if not args.no_cuda and nvcc_path() is not None:
        jobs += [Job(arch, cuda=True) for arch in sorted({a for a, _ in plan})]
    elif not args.no_cuda:
        print("compile_check: nvcc not found (CUDA_HOME / PATH): CUDA kernels skipped",
              file=sys.stderr)
    narrow = []
    if not args.no_triton:
        recorded: list = []
        jobs += plan_triton(plan, shapes, tokens_list, args.rank, args.variants, recorded,
                            args.launchable_only)
        narrow = narrow_offsets(recorded)
    recorded = time.perf_counter()
    print(f"compile_check: {len(jobs)} compiles ({sum(j.cuda for j in jobs)} nvcc), "
          f"{args.jobs} at a time; launches recorded in {recorded - start:.1f}s", file=sys.stderr)

    results = run_jobs(jobs, args.jobs)

    records = []
    for job, result in zip(jobs, results):
        if job.cuda:
            if "cuda" in result:
                records += result["cuda"]
            else:
                records.append({"arch": job.arch, "launch": "cuda:*", "dtype": None,
                                "strategy": "runtime", "config": None, "pruned": False,
                                "registers": None, "spill_bytes": None, "shared_bytes": None,
                                "tensor_cores": False, "serialized_mma": False,
                                "error": result["error"], "shapes": []})
            continue
        for rec in job.records:
            rec.update({k: result.get(k) for k in RECORD_FIELDS})
            rec["tensor_cores"] = bool(rec["tensor_cores"])
            rec["serialized_mma"] = bool(rec["serialized_mma"])
            records.append(rec)
    elapsed = time.perf_counter() - start
    payload = {
        "versions": versions(),
        "settings": {"plan": [list(p) for p in plan], "shapes": [list(s) for s in shapes],
                     "tokens": tokens_list, "rank": args.rank, "strategies": list(STRATEGIES),
                     "variants": args.variants,
                     "seed": SEED, "quick": args.quick, "smem_limit": SMEM_LIMIT,
                     "seconds": round(elapsed, 1), "jobs": args.jobs},
        "records": records,
        "narrow_offsets": narrow,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    print(summary(records))
    errors = [r for r in records if r.get("error")]
    over = limit_violations(records)
    print(f"\n{len(records)} records from {len(jobs)} compiles in {elapsed:.0f}s; "
          f"{len(errors)} failed; {len(over)} over the shared-memory limit; "
          f"{len(narrow)} 32-bit index x stride products; versions {payload['versions']}")
    for found in narrow[:5]:
        print(f"  32-bit index product in {found['kernel']} ({found['launch']}): {found['line']}")
    for rec in errors[:5]:
        print(f"  error sm_{rec['arch']} {rec['launch']} {rec['dtype']} {rec['config']}: "
              f"{rec['error'].splitlines()[0] if rec['error'] else ''}")
    return 1 if errors or narrow else 0


if __name__ == "__main__":
    sys.exit(main())
