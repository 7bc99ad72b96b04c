"""How the Triton launcher picks a tile: autotuned, fixed (VERA_KERNELS_TUNE=0) or named.

Runs on CPU in the Triton interpreter: the launcher is made to believe it
drives a GPU (device properties answered as an sm_90 would, INTERPRETING off)
while the kernel itself still runs interpreted, and the autotuner is replaced
by a stand-in that does what Triton's does to the output buffer: it runs the
launch once per config before the real run.
"""

import types

import pytest
import torch

import vera_kernels as vk
from vera_kernels.projection import projection_bound

pytest.importorskip("triton")
from vera_kernels.backends.triton import kernels  # noqa: E402

SEED = 2**33 + 5
SM90 = types.SimpleNamespace(major=9, minor=0, shared_memory_per_block_optin=227 * 1024)


class _Recorder:
    """Stands in for the bare kernel: runs it, keeps each launch's tile and output buffer."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((meta, args[kernels._OUT]))
            return self.kernel[grid](*args, **meta)
        return launch


class _TimingTuner:
    """Stands in for the autotuner: a new key runs ``configs`` timing launches into the
    buffers it was given (as Triton's tuner does), then the real one; a known key one."""

    def __init__(self, configs=3):
        self.configs, self.keys, self.outputs = configs, set(), []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            key = kernels._tuning_key(args, meta)
            runs = 1 if key in self.keys else self.configs + 1
            self.keys.add(key)
            for _ in range(runs):
                self.outputs.append(args[kernels._OUT])
                kernels._vera_gemm_kernel[grid](*args, **meta, **kernels.INTERPRETER_TILE)
        return launch


@pytest.fixture
def as_gpu(monkeypatch):
    """The launcher takes the GPU paths (device queries answer as an sm_90)."""
    monkeypatch.setattr(kernels, "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: SM90)
    monkeypatch.setattr(kernels, "_tuned_in_place", set())


def _operands(tokens=37, n_in=21, n_out=19, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, n_in, generator=gen, dtype=dtype)
    d = torch.randn(n_in, generator=gen, dtype=dtype)
    b = torch.randn(n_out, generator=gen, dtype=dtype)
    base = torch.randn(tokens, n_out, generator=gen, dtype=dtype)
    return x, d, b, base


def _proj(n_out, n_in):
    # B (out x in here): generated in the kernel, transposed as the y launch uses it.
    return kernels.Projection(1, n_out, n_in, SEED, projection_bound(n_in))


def _expected(x, d, b, base):
    proj = vk.projection("B", base.shape[1], x.shape[1], SEED, dtype=torch.float64)
    return ((x.double() * d.double()) @ proj.T * b.double() + base.double()).to(x.dtype)


def test_tune_0_launches_the_first_tile_that_fits(as_gpu, monkeypatch):
    monkeypatch.setenv(kernels.TUNE_ENV_VAR, "0")
    recorder = _Recorder(kernels._vera_gemm_kernel)
    monkeypatch.setattr(kernels, "_vera_gemm_kernel", recorder)
    monkeypatch.setattr(kernels, "_vera_gemm", None)  # the autotuner must not be reached
    x, d, b, base = _operands()
    out = kernels.gemm(x, _proj(19, 21), transposed=True, x_scale=d, out_scale=b, base=base).out
    meta = recorder.launches[0][0]
    (fixed,) = {tuple(m[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
                for m, _ in recorder.launches}
    assert len(recorder.launches) == 1
    # fp32 at IEEE precision: the FMA tiles, the first of them fits sm_90.
    assert fixed == kernels.device_tiles(meta, torch.float32, x.device)[0] == kernels.FMA_TILES[0]
    torch.testing.assert_close(out, _expected(x, d, b, base), rtol=1e-5, atol=1e-5)


def test_tune_rejects_other_values(monkeypatch):
    monkeypatch.setenv(kernels.TUNE_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="VERA_KERNELS_TUNE must be 0 or 1, got 'yes'"):
        kernels.tuning()


def test_an_in_place_launch_is_tuned_out_of_place(as_gpu, monkeypatch):
    tuner = _TimingTuner()
    monkeypatch.setattr(kernels, "_vera_gemm", tuner)
    x, d, b, base = _operands()
    expected = _expected(x, d, b, base)
    y = kernels.gemm(x, _proj(19, 21), transposed=True, x_scale=d, out_scale=b, base=base,
                     out=base).out
    assert y is base
    # The timing runs went to a scratch buffer, the real run into base: the
    # product is added once, as with one config.
    assert [o is base for o in tuner.outputs] == [False] * 4 + [True]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # Tuned once: the next in-place launch of that key runs once, in place.
    again = base.clone()
    kernels.gemm(x, _proj(19, 21), transposed=True, x_scale=d, out_scale=b, base=again, out=again)
    assert tuner.outputs[-1] is again and len(tuner.outputs) == 6
    torch.testing.assert_close(again, _expected(x, d, b, expected), rtol=1e-5, atol=1e-5)


def test_an_out_of_place_launch_copies_nothing(as_gpu, monkeypatch):
    tuner = _TimingTuner()
    monkeypatch.setattr(kernels, "_vera_gemm", tuner)
    allocations = []
    real_empty_strided = torch.empty_strided
    monkeypatch.setattr(torch, "empty_strided",
                        lambda *a, **k: allocations.append(a) or real_empty_strided(*a, **k))
    x, d, b, base = _operands()
    y = kernels.gemm(x, _proj(19, 21), transposed=True, x_scale=d, out_scale=b, base=base).out
    assert allocations == [] and all(o is y for o in tuner.outputs) and len(tuner.outputs) == 4
    torch.testing.assert_close(y, _expected(x, d, b, base), rtol=1e-5, atol=1e-5)
    # Nor does Triton's tuner: no buffer is saved and restored around its timing runs.
    tuned = kernels.triton.autotune(kernels._configs(), **kernels.AUTOTUNE_OPTIONS)(
        kernels._vera_gemm_kernel)
    assert tuned.restore_value == [] and tuned.reset_to_zero == []
