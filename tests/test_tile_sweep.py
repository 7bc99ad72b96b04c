"""Every tile the autotuner may pick, launched on the GPU against torch (`gpu`).

The fused GEMM (``kernels.gemm``) is launched directly with each tile of
``kernels.device_tiles`` for the launch on this GPU, and compared with a
float64 evaluation of the same product on the same (rounded) operands,
element by element within the dtype's budget (README, "Guarantees").

The matrix:

    shape       333 tokens, in 200, out 328, r 40: ragged against every block size
    dtypes      bf16; fp32 at IEEE precision (FMA tiles)
    strategies  generate (projection tiles from the seed), workspace (loaded)
    launches    h      x Aᵀ                                   STORE
                y      ((d ⊙ h) Bᵀ) ⊙ b + base                STORE, scales and base
                y=     the same into base's buffer             STORE in place
                u+dd   (b ⊙ g) B, Σ_rows u ⊙ h                STORE_AND_REDUCE
                dx=    (d ⊙ u) A added into dx's buffer        STORE in place
                db     Σ_rows g ⊙ ((d ⊙ h) Bᵀ)                REDUCE
                bf16 also: h with dropout (x masked in the loop), dx= with dropout
                (output masked), y with adapter banks (x scaled per row)

Every specialization is compiled ahead, in parallel on the machine's cores
(scripts/compile_check.py's ``precompile``), so the sweep costs launches,
not hundreds of serial compiles.
"""

import itertools
import os
import sys
import zlib
from dataclasses import dataclass, field

import pytest
import torch

import vera_kernels as vk
from vera_kernels.dropout import DropoutMask, keep_mask, seed_words
from vera_kernels.projection import projection_bound
from helpers import EPS, load_compile_check

TOKENS, IN, OUT, R = 333, 200, 328, 40
SEED = 2**35 + 11
DEVICE = "cuda"  # the CPU check below runs the sweep's logic in the interpreter
N_ADAPTERS = 3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {"bf16": 8 * EPS[torch.bfloat16], "fp32": 32 * EPS[torch.float32]}  # README budgets
STRATEGIES = ("generate", "workspace")
LAUNCHES = ("h", "y", "y=", "u+dd", "dx=", "db")
BF16_ONLY = ("h[dropout]", "dx=[dropout]", "y[banked]")


@dataclass
class Sweep:
    """One (dtype, strategy, launch) of the matrix: gemm's arguments and what it must give."""

    dtype_name: str
    strategy: str
    launch: str
    kwargs: dict = field(default_factory=dict)
    x: torch.Tensor = None
    matrix: str = "A"
    reduce: bool = False

    @property
    def id(self):
        return f"{self.dtype_name}-{self.strategy}-{self.launch}"


def _rand(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def _projection(matrix, dtype, strategy):
    from vera_kernels.backends.triton import kernels
    rows, cols = (R, IN) if matrix == "A" else (OUT, R)
    workspace = None
    if strategy == "workspace":
        workspace = vk.projection(matrix, rows, cols, SEED, dtype=dtype, device=DEVICE)
    return kernels.Projection({"A": 0, "B": 1}[matrix], rows, cols, SEED,
                              projection_bound(cols), workspace)


def make_sweep(dtype_name, strategy, launch) -> Sweep:
    """The launch's operands (fresh buffers: the in-place launches write into theirs)."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype_name}-{strategy}-{launch}".encode()))
    name, _, variant = launch.partition("[")
    s = Sweep(dtype_name, strategy, launch)
    d, b = _rand(gen, R, dtype=dtype), _rand(gen, OUT, dtype=dtype)
    dropout = DropoutMask(0.25, seed_words(SEED + 1, DEVICE)) if variant == "dropout]" else None
    if name == "h":
        s.x, s.matrix = _rand(gen, TOKENS, IN, dtype=dtype), "A"
        s.kwargs = dict(transposed=True, dropout=dropout, dropout_on="x")
    elif name in ("y", "y="):
        s.x, s.matrix = _rand(gen, TOKENS, R, dtype=dtype), "B"
        base = _rand(gen, TOKENS, OUT, dtype=dtype)
        s.kwargs = dict(transposed=True, x_scale=d, out_scale=b, base=base,
                        out=base if name == "y=" else None)
        if variant == "banked]":
            ids = torch.randint(-1, N_ADAPTERS, (TOKENS,), generator=gen, dtype=torch.int32)
            s.kwargs.update(x_scale=_rand(gen, N_ADAPTERS, R, dtype=dtype),
                            out_scale=_rand(gen, N_ADAPTERS, OUT, dtype=dtype), row_ids=ids.to(DEVICE))
    elif name == "u+dd":
        s.x, s.matrix, s.reduce = _rand(gen, TOKENS, OUT, dtype=dtype), "B", True
        s.kwargs = dict(transposed=False, x_scale=b, reduce_with=_rand(gen, TOKENS, R, dtype=dtype))
    elif name == "dx=":
        s.x, s.matrix = _rand(gen, TOKENS, R, dtype=dtype), "A"
        dx = _rand(gen, TOKENS, IN, dtype=dtype)
        s.kwargs = dict(transposed=False, x_scale=d, base=dx, out=dx, dropout=dropout,
                        dropout_on="out")
    elif name == "db":
        s.x, s.matrix, s.reduce = _rand(gen, TOKENS, R, dtype=dtype), "B", True
        s.kwargs = dict(transposed=True, x_scale=d, store=False,
                        reduce_with=_rand(gen, TOKENS, OUT, dtype=dtype))
    s.kwargs["proj"] = _projection(s.matrix, dtype, strategy)
    return s


def reference(s: Sweep, absolute: bool):
    """(stored result, column sums of the reduction) in float64, or with every operand's
    magnitude (``absolute``): the size of the terms each element sums."""
    f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
    kw = s.kwargs
    rows, cols = (R, IN) if s.matrix == "A" else (OUT, R)
    p = vk.projection(s.matrix, rows, cols, SEED, dtype=DTYPES[s.dtype_name], device=DEVICE)
    t = f(p.T if kw["transposed"] else p)
    x = f(s.x)
    dropout = kw.get("dropout")
    if dropout is not None:
        cols = x.shape[1] if kw["dropout_on"] == "x" else t.shape[1]
        factor = keep_mask(dropout, 0, TOKENS, cols, DEVICE).double() * dropout.scale
    ids = kw.get("row_ids")
    if kw.get("x_scale") is not None:
        if ids is None:
            t = f(kw["x_scale"])[:, None] * t
        else:
            x = x * (f(kw["x_scale"])[ids.long()] * (ids >= 0)[:, None])
    if dropout is not None and kw["dropout_on"] == "x":
        x = x * factor
    acc = x @ t
    sums = (acc * f(kw["reduce_with"])).sum(0) if s.reduce else None
    if dropout is not None and kw["dropout_on"] == "out":
        acc = acc * factor
    if kw.get("out_scale") is not None:
        scale = f(kw["out_scale"])
        acc = acc * (scale if ids is None else scale[ids.long()] * (ids >= 0)[:, None])
    if kw.get("base") is not None:
        acc = acc + f(kw["base"])
    return acc, sums


def cases():
    for dtype_name, strategy in itertools.product(DTYPES, STRATEGIES):
        extra = BF16_ONLY if dtype_name == "bf16" else ()
        for launch in LAUNCHES + extra:
            yield dtype_name, strategy, launch


def _launch_of(s: Sweep) -> tuple:
    """(tiles, args, meta): the launch's arguments, recorded instead of run, and the tiles
    ``kernels.device_tiles`` gives it on this GPU."""
    from vera_kernels.backends.triton import kernels
    seen = []
    real = kernels._launch
    kernels._launch = lambda grid, args, meta, tile, in_place: seen.append((args, meta))
    try:
        kernels.gemm(s.x, **s.kwargs)
    finally:
        kernels._launch = real
    (args, meta), = seen
    return kernels.device_tiles(meta, s.x.dtype, s.x.device), args, meta


@pytest.fixture(scope="module")
def matrix():
    """{case: (tiles, operands)}, every (case, tile) specialization compiled ahead in parallel."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from vera_kernels.backends.triton import kernels
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 at IEEE precision
    found, launches = {}, []
    for case in cases():
        tiles, args, meta = _launch_of(make_sweep(*case))
        found[case] = tiles
        launches += [(kernels._vera_gemm_kernel, args, {**meta, **kernels.tile_kwargs(t)})
                     for t in tiles]
    major, minor = torch.cuda.get_device_capability()
    errors = load_compile_check().precompile(launches, 10 * major + minor,
                                             len(os.sched_getaffinity(0)))
    assert not errors, errors[:3]
    yield found
    torch.set_float32_matmul_precision(previous)


def _failures(case, tiles) -> list:
    from vera_kernels.backends.triton import kernels
    tol = TOL[case[0]]
    failures = []
    for tile in tiles:
        s = make_sweep(*case)
        want, want_sums = reference(s, absolute=False)
        size, size_sums = reference(s, absolute=True)
        got, partials = kernels.gemm(s.x, tile=tile, **s.kwargs)
        pairs = []
        if s.reduce:
            pairs.append(("sums", partials.sum(0), want_sums, size_sums))
        if s.kwargs.get("store", True):
            pairs.append(("out", got, want, size))
        for what, value, expected, magnitude in pairs:
            err = (value.double() - expected).abs()
            bound = tol * magnitude + 1e-30
            if not bool((err <= bound).all()):
                worst = (err / bound).argmax()
                failures.append(f"{tile} {what}: error {err.flatten()[worst]:.3e} > bound "
                                f"{bound.flatten()[worst]:.3e} at flat index {int(worst)}")
    return failures


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(cases()), ids=lambda c: "-".join(c))
def test_every_tile(matrix, case):
    failures = _failures(case, matrix[case])
    assert not failures, f"{len(failures)} of {len(matrix[case])} tiles wrong:\n" + "\n".join(failures)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the sweep itself")
def test_the_sweep_passes_in_the_interpreter(monkeypatch):
    # The GPU run is rare: its matrix, operands and reference are checked here,
    # in fp32 (the interpreter's bf16 is unreliable), one tile per launch, both
    # strategies, the dropout and bank launches included.
    monkeypatch.setattr(sys.modules[__name__], "DEVICE", "cpu")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        failures = [f for strategy in STRATEGIES for launch in LAUNCHES + BF16_ONLY
                    for f in _failures(("fp32", strategy, launch), [(64, 32, 32, 4, 2)])]
    finally:
        torch.set_float32_matmul_precision(previous)
    assert not failures, failures
