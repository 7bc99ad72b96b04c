"""Triton-specific checks: the tile generator, precision setting, backend choice.

Strategies, determinism and bf16 are in test_fused.py, shared with the cuda backend.

On a machine without a GPU these run in the Triton interpreter on CPU tensors
(conftest.py sets TRITON_INTERPRET=1); with a GPU the `gpu` variants run too.
"""

import pytest
import torch

import vera_kernels as vk
from vera_kernels import backends as ops
from helpers import DEVICES

pytest.importorskip("triton")
from vera_kernels.backends.triton import kernels  # noqa: E402
from vera_kernels.backends.triton.philox import generate_projection  # noqa: E402

SEED = 2**32 + 12345


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 2**32 + 3, 2**64 - 2])
@pytest.mark.parametrize("matrix,rows,cols", [("A", 5, 13), ("B", 70, 3), ("A", 33, 130), ("B", 1, 1)])
def test_tile_generator_bit_exact(matrix, rows, cols, seed, device):
    got = generate_projection(matrix, rows, cols, seed, dtype=torch.float32, device=device)
    expected = vk.projection(matrix, rows, cols, seed, device=device)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_tile_generator_rounds_like_projection(dtype, device):
    got = generate_projection("B", 19, 7, SEED, dtype=dtype, device=device)
    assert torch.equal(got, vk.projection("B", 19, 7, SEED, dtype=dtype, device=device))


def test_fp32_follows_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kernels._input_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kernels._input_precision(torch.float32) == "tf32"
        assert kernels._input_precision(torch.bfloat16) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_cpu_default_stays_torch_even_when_interpreting():
    # The interpreter is for testing: backend=None never picks it.
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", torch.device("cpu"))


@pytest.mark.gpu
def test_triton_is_the_default_for_cuda_tensors():
    assert ops.resolve_backend(None, torch.device("cuda")) == "triton"




def test_tiles_that_cannot_launch_are_pruned():
    # fp64 operands of the big tiles need more shared memory than sm_90 (227 KB)
    # or sm_80 (163 KB) have.
    tiles = [(64, n, k, 4, s) for n, k, s in [(32, 64, 3), (64, 128, 3), (256, 32, 3), (128, 64, 3)]]
    scratch = kernels.SHARED_SCRATCH
    assert kernels.shared_bytes(tiles[1], 8) == 2 * (64 * 128 + 128 * 64) * 8 + scratch  # 2 in flight
    assert kernels.shared_bytes((64, 128, 32, 8, 2), 2) == 64 * 128 * 4 + scratch  # the accumulator
    for limit in (227 * 1024, 163 * 1024, 99 * 1024):
        kept = kernels.fitting_tiles(tiles, 8, limit)
        assert kept and all(kernels.shared_bytes(t, 8) <= limit for t in kept)
        assert tiles[1] not in kept
    assert kernels.fitting_tiles(tiles, 2, 227 * 1024) == tiles  # bf16: all fit
    assert kernels.fitting_tiles(tiles, 8, 1024) == [tiles[0]]  # none fits: the smallest


class _LaunchRecorder:
    """Stands in for kernels._vera_gemm_kernel: launches it and keeps each launch's meta-parameters."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _recorded_launches(monkeypatch, strategy):
    from vera_kernels.backends import strategy as projection_strategy
    monkeypatch.setenv(projection_strategy.ENV_VAR, strategy)
    # In the interpreter every launch names its tile: the bare kernel runs.
    recorder = _LaunchRecorder(kernels._vera_gemm_kernel)
    monkeypatch.setattr(kernels, "_vera_gemm_kernel", recorder)
    return recorder.launches


def _fp16_leaves(*shapes):
    return [torch.randn(*shape, dtype=torch.float16).requires_grad_(True) for shape in shapes]


@pytest.mark.parametrize("strategy", ["generate", "workspace"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_launches_with_a_computed_operand_are_recognized(strategy, dropout, monkeypatch):
    # A generated tile or a dropout-masked x is computed in the main loop
    # (kernels.tiles_for: generated -> mma.sync only, a masked x -> both kinds).
    launches = _recorded_launches(monkeypatch, strategy)
    x, d, b = _fp16_leaves((9, 24), (8,), (40,))
    y = vk.vera_linear(x, d, b, SEED, backend="triton", dropout=dropout, dropout_seed=3)
    y.float().sum().backward()
    assert len(launches) == 5  # h, y; u+dd, dx, db
    computed = [kernels.has_computed_operand(kw) for kw in launches]
    if strategy == "generate":
        assert all(computed)
    else:  # only h = dropout(x) Aᵀ masks its x in the loop
        assert computed == [dropout > 0, False, False, False, False]


@pytest.mark.parametrize("strategy", ["generate", "workspace"])
def test_adapter_bank_launches_scale_x_in_the_loop(strategy, monkeypatch):
    # Each row takes its own vectors: x is scaled per row wherever it meets one (y, u, dx, z).
    launches = _recorded_launches(monkeypatch, strategy)
    x, d_bank, b_bank = _fp16_leaves((9, 24), (2, 8), (2, 40))
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, 1, 0], dtype=torch.int32)
    vk.vera_linear_multi(x, d_bank, b_bank, ids, SEED, backend="triton").float().sum().backward()
    computed = [kernels.has_computed_operand(kw) for kw in launches]
    if strategy == "generate":
        assert computed and all(computed)
    else:
        assert computed == [False, True, True, True, True]  # h; y; u, dx, z


def test_tiles_by_unit_and_arch():
    meta = {"GENERATE": False, "DROPOUT": 0, "SCALE_X": True, "ROW_IDS": False,
            "INPUT_PRECISION": "ieee"}
    generated = dict(meta, GENERATE=True)
    banked = dict(meta, ROW_IDS=True)  # a per-row scale on x
    bf16, tf32 = torch.bfloat16, dict(meta, INPUT_PRECISION="tf32")
    dropped = dict(meta, SCALE_X=False, DROPOUT=kernels.DROP_X.value)
    assert kernels.tiles_for(meta, bf16, (9, 0)) == kernels.TENSOR_CORE_TILES
    assert all(warps >= 4 for _, _, _, warps, _ in kernels.TENSOR_CORE_TILES)  # wgmma
    assert all(warps < 4 for _, _, _, warps, _ in kernels.SYNC_MMA_TILES)  # mma.sync
    # Generated tiles: mma.sync only; a masked or per-row-scaled x: both, timed.
    assert kernels.tiles_for(generated, bf16, (9, 0)) == kernels.SYNC_MMA_TILES
    for m in (banked, dropped):
        assert kernels.tiles_for(m, bf16, (9, 0)) == (
            kernels.TENSOR_CORE_TILES + kernels.SYNC_MMA_TILES)
    # Registers scarcest (tf32 operands; a generated tile next to a per-row-scaled
    # x): the smallest 2-warp tile only.
    assert kernels.tiles_for(dict(generated, INPUT_PRECISION="tf32"), torch.float32,
                             (9, 0)) == kernels.SYNC_MMA_TILES[:1]
    assert kernels.tiles_for(dict(banked, GENERATE=True), bf16, (9, 0)) == (
        kernels.SYNC_MMA_TILES[:1])
    assert kernels.tiles_for(dict(dropped, INPUT_PRECISION="tf32"), torch.float32, (9, 0)) == (
        kernels.TENSOR_CORE_TILES + kernels.SYNC_MMA_TILES[:1])
    assert kernels.tiles_for(tf32, torch.float32, (9, 0)) == kernels.TENSOR_CORE_TILES
    # sm_80: every dot is mma.sync already; the tiles ptxas spills there are dropped.
    sm80 = kernels.tiles_for(generated, bf16, (8, 0))
    assert sm80 and set(sm80) == set(kernels.TENSOR_CORE_TILES) - kernels.SM80_SPILLING_TILES
    assert kernels.tiles_for(meta, torch.float64, (9, 0)) == kernels.FMA_TILES
    assert set(kernels.tiles_for(meta, torch.float64, (8, 0))) == (
        set(kernels.FMA_TILES) - kernels.SM80_SPILLING_TILES)


def test_the_autotuner_prunes_to_those_tiles(monkeypatch):
    import types
    every = [kernels._config(t) for t in kernels.ALL_TILES]
    x = torch.empty(1, 1, dtype=torch.bfloat16)
    meta = {"GENERATE": True, "DROPOUT": 0, "SCALE_X": False, "ROW_IDS": False,
            "INPUT_PRECISION": "ieee"}
    for major, limit in ((9, 227 * 1024), (8, 163 * 1024)):
        props = types.SimpleNamespace(major=major, minor=0, shared_memory_per_block_optin=limit)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, p=props, **k: p)
        kept = kernels._prune(every, {"x_ptr": x}, **meta)
        assert {kernels._tile(c) for c in kept} == set(kernels.tiles_for(meta, x.dtype, (major, 0)))


def test_reductions_do_not_depend_on_the_block_m_picked(monkeypatch):
    # The autotuner may pick BLOCK_M 64 or 128 while the partial-sum buffer has
    # a row per MIN_BLOCK_M rows: a program covering several groups writes each.
    x, d, b, base = (t.requires_grad_(True) for t in
                     vk_inputs(70, 23, 19, 6))
    results = []
    for block_m in (kernels.MIN_BLOCK_M, 2 * kernels.MIN_BLOCK_M, 4 * kernels.MIN_BLOCK_M):
        monkeypatch.setitem(kernels.INTERPRETER_TILE, "BLOCK_M", block_m)
        y = vk.vera_linear(x, d, b, SEED, base, backend="triton")
        results.append(torch.autograd.grad(y, (x, d, b), torch.ones_like(y)))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def vk_inputs(tokens, n_in, n_out, r):
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(tokens, n_in, generator=gen, dtype=torch.float64),
            torch.randn(r, generator=gen, dtype=torch.float64),
            torch.randn(n_out, generator=gen, dtype=torch.float64),
            torch.randn(tokens, n_out, generator=gen, dtype=torch.float64))
