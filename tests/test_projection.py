"""The projection spec in PyTorch against an independent model of it."""

import importlib

import numpy as np
import pytest
import torch

import vera_kernels as vk
from helpers import DEVICES
from philox_model import KNOWN_ANSWERS, philox4x32_10 as model_philox, spec_matrix

# vk.projection is the function; the module of the same name holds the internals.
proj_mod = importlib.import_module("vera_kernels.projection")

SEEDS = [0, 1234, 2**32 + 5, 2**63 + 987654321, 2**64 - 1]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    assert tuple(model_philox(counter, key)) == expected  # the model itself is right
    words = proj_mod.philox4x32_10(tuple(torch.tensor(c, dtype=torch.int64) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


def test_philox_vectorized_matches_model():
    gen = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**32, (4, 50), generator=gen, dtype=torch.int64)
    key = (0x89ABCDEF, 0x01234567)
    words = torch.stack(proj_mod.philox4x32_10(tuple(counters), key))
    for n in range(counters.shape[1]):
        expected = model_philox(tuple(int(c) for c in counters[:, n]), key)
        assert words[:, n].tolist() == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("matrix,rows,cols", [("A", 5, 13), ("B", 11, 3), ("A", 1, 1), ("B", 3, 9)])
def test_projection_bit_exact(matrix, rows, cols, seed, device):
    got = vk.projection(matrix, rows, cols, seed, device=device)
    assert got.dtype == torch.float32 and got.device.type == device
    expected = spec_matrix(matrix, rows, cols, seed)
    np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), expected.view(np.uint32))


def test_matrices_and_seeds_give_distinct_values():
    a = vk.projection("A", 4, 8, 3)
    assert not torch.equal(a, vk.projection("B", 4, 8, 3))
    assert not torch.equal(a, vk.projection("A", 4, 8, 3 + 2**32))  # the high key word matters


def test_values_uniform_within_bound():
    a = vk.projection("A", 64, 1000, 42)
    bound = (6.0 / 1000) ** 0.5
    assert a.abs().max() <= bound
    # Kaiming-uniform: variance bound^2 / 3; 64000 samples pin it to ~1%.
    assert abs(a.var().item() / (bound**2 / 3) - 1) < 0.03
    assert abs(a.mean().item()) < 0.01 * bound


def test_top_left_block_across_shapes():
    seed = 2**40 + 17
    big_a = vk.projection("A", 9, 29, seed)
    # Same fan (cols): the smaller matrix is exactly the top rows.
    assert torch.equal(vk.projection("A", 4, 29, seed), big_a[:4])
    # Fewer columns: same raw values, only the float32 bound differs.
    small_a = vk.projection("A", 4, 10, seed)
    raw_big = big_a[:4, :10].double() / proj_mod.projection_bound(29)
    raw_small = small_a.double() / proj_mod.projection_bound(10)
    torch.testing.assert_close(raw_small, raw_big, rtol=2.0**-22, atol=0)
    assert torch.equal(vk.projection("B", 5, 7, seed), vk.projection("B", 40, 7, seed)[:5])


def test_bound_is_float32_of_float64_sqrt():
    for fan in (1, 3, 37, 4096, 11008):
        assert proj_mod.projection_bound(fan) == float(np.float32(np.sqrt(6.0 / fan)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_round_the_float32_values(dtype):
    full = vk.projection("B", 7, 6, 99)
    got = vk.projection("B", 7, 6, 99, dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got, full.to(dtype))


def test_chunking_does_not_change_values(monkeypatch):
    whole = vk.projection("A", 13, 22, 5)
    monkeypatch.setattr(proj_mod, "_CHUNK_GROUPS", 7)  # several rows' worth of groups per chunk
    assert torch.equal(vk.projection("A", 13, 22, 5), whole)
    monkeypatch.setattr(proj_mod, "_CHUNK_GROUPS", 1)  # fewer groups than one row: one row a chunk
    assert torch.equal(vk.projection("A", 13, 22, 5), whole)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\)"),
        (dict(seed=2**64), ValueError, r"seed must be in \[0, 2\*\*64\)"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(seed=True), TypeError, "seed must be an int"),
        (dict(matrix="C"), ValueError, "unknown matrix 'C'"),
        (dict(rows=0), ValueError, "rows must be a positive int"),
        (dict(cols=-3), ValueError, "cols must be a positive int"),
        (dict(dtype=torch.int32), TypeError, "dtype must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(matrix="A", rows=2, cols=3, seed=0)
    args.update(kwargs)
    dtype = args.pop("dtype", torch.float32)
    with pytest.raises(error, match=match):
        vk.projection(args["matrix"], args["rows"], args["cols"], args["seed"], dtype=dtype)


def test_temporaries_stay_bounded(monkeypatch):
    # Every Philox call works on at most _CHUNK_GROUPS counters (or one row's
    # groups, if a single row has more), whatever the matrix size.
    monkeypatch.setattr(proj_mod, "_CHUNK_GROUPS", 1000)
    sizes = []
    real = proj_mod.philox4x32_10

    def recording(counter, key):
        sizes.append(torch.broadcast_shapes(*(c.shape for c in counter)).numel())
        return real(counter, key)

    monkeypatch.setattr(proj_mod, "philox4x32_10", recording)
    full = vk.projection("A", 300, 64, 9)  # 16 groups a row: 62 rows a chunk
    assert max(sizes) <= 1000 and len(sizes) == -(-300 // (1000 // 16))
    sizes.clear()
    vk.projection("B", 3, 8192, 9)  # 2048 groups a row > 1000: one row a chunk
    assert sizes == [2048, 2048, 2048]
    monkeypatch.setattr(proj_mod, "_CHUNK_GROUPS", 1 << 20)
    assert torch.equal(vk.projection("A", 300, 64, 9), full)
