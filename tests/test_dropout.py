"""Adapter dropout regenerated from Philox: the mask spec, every backend, autograd, the module."""

import pytest
import torch
from torch import nn

import vera_kernels as vk
from vera_kernels.dropout import DropoutMask, keep_mask, seed_words
from vera_kernels.reference import vera_linear_reference
from helpers import backend_device_params, vera_inputs

SEED = 2**33 + 1
P = 0.3


def _philox_model_mask(dropout: DropoutMask, rows: int, cols: int):
    """The spec written out element by element with the independent Python Philox model."""
    from philox_model import philox4x32_10

    key = tuple(dropout.seed.tolist())  # the seed tensor holds the two key words
    mask = torch.empty(rows, cols, dtype=torch.bool)
    for t in range(rows):
        for j in range(cols):
            word = philox4x32_10((j >> 3, t, 2, 0), key)[(j >> 1) & 3]
            draw = (word >> (16 * (j & 1))) & 0xFFFF
            mask[t, j] = draw >= dropout.threshold
    return mask


def test_mask_follows_the_spec_and_its_rate():
    dropout = DropoutMask(P, seed_words(2**63 + 17, "cpu"))
    assert dropout.seed.tolist() == [17, 2**31]
    got = keep_mask(dropout, 0, 5, 21, "cpu")
    assert torch.equal(got, _philox_model_mask(dropout, 5, 21))
    big = keep_mask(dropout, 0, 400, 500, "cpu")
    assert abs(big.float().mean().item() - (1 - P)) < 0.005
    # Rows are independent of where a chunk starts.
    assert torch.equal(keep_mask(dropout, 3, 2, 21, "cpu"), got[3:5])
    assert dropout.scale == pytest.approx(1 / (1 - dropout.threshold / 65536), rel=1e-7)


def _with_mask(x, d, b, base, dropout):
    """The reference: the spec's mask applied to x, then the unfused formula."""
    mask = keep_mask(dropout, 0, x.shape[0], x.shape[1], x.device).to(x.dtype) * dropout.scale
    return vera_linear_reference(x * mask, d, b, SEED, base)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_backend_applies_the_same_mask(backend, device, dtype):
    x, d, b, base = vera_inputs((37,), 29, 23, 6, dtype=dtype, device=device)
    leaves = [t.requires_grad_(True) for t in (x, d, b, base)]
    y = vk.vera_linear(*leaves[:3], SEED, leaves[3], backend=backend, dropout=P, dropout_seed=99)
    grad = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, leaves, grad)]
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    y_ref = _with_mask(*ref_leaves, DropoutMask(P, seed_words(99, "cpu")))
    expected = [y_ref, *torch.autograd.grad(y_ref, ref_leaves, grad.double().cpu())]
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, g, e in zip(["y", "dx", "dd", "db", "dbase"], got, expected):
        torch.testing.assert_close(g.double().cpu(), e, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_seed_as_int_or_as_its_key_word_tensor(backend, device):
    x, d, b, base = vera_inputs((5, 3), 21, 11, 4, dtype=torch.float32, device=device)
    seed = 2**63 + 2**32 + 7
    run = lambda s: vk.vera_linear(x, d, b, SEED, base, backend=backend, dropout=P,  # noqa: E731
                                   dropout_seed=s)
    expected = run(seed)
    assert torch.equal(run(seed_words(seed, device)), expected)
    # Only each word's low 32 bits count (kernels read them as uint32).
    assert torch.equal(run(seed_words(seed, device) + torch.tensor([0, 2**32], device=device)),
                       expected)
    # A strided view is made contiguous: the kernels read words 0 and 1 from memory.
    strided = torch.stack([seed_words(seed, device), seed_words(1, device)], dim=1)[:, 0]
    assert torch.equal(run(strided), expected)
    assert not torch.equal(run(seed_words(seed + 1, device)), expected)


def test_bad_seed_tensors():
    x, d, b, _ = vera_inputs((2,), 4, 3, 2, dtype=torch.float32, device="cpu")
    cases = [(torch.tensor([1, 2], dtype=torch.int32), TypeError, "int64"),
             (torch.tensor([1, 2, 3]), ValueError, r"shape \(2,\)"),
             (torch.tensor([1, 2], device="meta"), ValueError, "is on meta but x is on cpu"),
             (1.5, TypeError, "seed must be an int"), (-1, ValueError, "seed must be in")]
    for seed, error, message in cases:
        with pytest.raises(error, match=message):
            vk.vera_linear(x, d, b, SEED, dropout=P, dropout_seed=seed)


def test_dx_with_a_fixed_mask_against_finite_differences():
    x, d, b, base = vera_inputs((9,), 7, 5, 3, dtype=torch.float64, device="cpu")
    leaves = [t.requires_grad_(True) for t in (x, d, b, base)]
    assert torch.autograd.gradcheck(
        lambda *a: vk.vera_linear(*a[:3], SEED, a[3], dropout=P, dropout_seed=5), leaves)


def test_unbiased_and_reproducible_with_manual_seed():
    x, d, b, _ = vera_inputs((6,), 16, 8, 4, dtype=torch.float64, device="cpu")
    torch.manual_seed(0)
    first = vk.vera_linear(x, d, b, SEED, dropout=P)
    torch.manual_seed(0)
    assert torch.equal(vk.vera_linear(x, d, b, SEED, dropout=P), first)
    assert not torch.equal(vk.vera_linear(x, d, b, SEED, dropout=P), first)  # a fresh mask
    mean = torch.stack([vk.vera_linear(x, d, b, SEED, dropout=P) for _ in range(2000)]).mean(0)
    expected = vera_linear_reference(x, d, b, SEED)
    # The standard error of the mean is ~ std / sqrt(2000): a few percent of the scale.
    assert (mean - expected).abs().max() < 0.05 * expected.abs().max()


def test_bad_probability():
    x, d, b, _ = vera_inputs((2,), 4, 3, 2, dtype=torch.float32, device="cpu")
    for p in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="dropout must be a probability"):
            vk.vera_linear(x, d, b, SEED, dropout=p)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_saved_for_backward_is_what_is_saved_without_dropout_and_the_seed(backend, device):
    x = torch.randn(64, 48, device=device, requires_grad=True)
    d, b = torch.randn(8, device=device), torch.randn(40, device=device)
    saved = {}
    for p in (0.0, 0.5):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.append(t.untyped_storage().nbytes()) or t, lambda t: t):
            vk.vera_linear(x, d, b, SEED, backend=backend, dropout=p)
        saved[p] = sum(sizes)
    assert saved[0.0] == 64 * 8 * 4 + (8 + 40) * 4  # h and the two vectors
    assert saved[0.5] == saved[0.0] + 2 * 8  # and the mask's seed: two int64 key words


def test_module_dropout_trains_and_is_identity_in_eval():
    torch.manual_seed(0)
    layer = vk.VeRALinear(12, 10, r=4, seed=SEED, dropout=0.2).double()
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    layer.eval()
    with torch.no_grad():
        no_dropout = layer.base_layer(x) + vera_linear_reference(
            x, layer.vera_lambda_d, layer.vera_lambda_b, SEED)
        torch.testing.assert_close(layer(x), no_dropout, rtol=1e-12, atol=1e-12)
    layer.train()
    with torch.no_grad():
        assert not torch.allclose(layer(x), no_dropout)
    linear = nn.Linear(12, 10)
    assert vk.VeRALinear.from_linear(linear, r=4, dropout=0.1).dropout == 0.1
    model = vk.apply_vera(nn.Sequential(nn.Linear(12, 10)), ["0"], r=4, dropout=0.25)
    assert model[0].dropout == 0.25
    with pytest.raises(ValueError, match="dropout"):
        vk.VeRALinear(12, 10, r=4, dropout=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_compiled_host_mask_is_the_torch_mask_bit_for_bit(dtype, monkeypatch):
    # The CPU mask compiled from csrc/philox.cuh (backends/host_dropout.py) and the
    # torch implementation give the same bits, across chunk boundaries too.
    from vera_kernels import dropout as spec
    from vera_kernels.backends import host_dropout
    reason = host_dropout.library()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setattr(spec, "_CHUNK_ELEMENTS", 7 * 37)  # several chunks, ragged ones
    x = torch.randn(53, 37, dtype=torch.float64).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), -1.5])
    for p, seed in ((0.3, 2**40 + 9), (0.9, 7), (1e-6, 2**64 - 1)):
        mask = DropoutMask(p, seed_words(seed, "cpu"))
        compiled = [(a, b, c) for a, b, c in spec.dropped_chunks(x, mask)]
        in_place = spec.drop_rows_(x.clone(), mask)
        monkeypatch.setattr(host_dropout, "library", lambda: "the torch implementation")
        torch_chunks = list(spec.dropped_chunks(x, mask))
        torch_in_place = spec.drop_rows_(x.clone(), mask)
        monkeypatch.undo()
        monkeypatch.setattr(spec, "_CHUNK_ELEMENTS", 7 * 37)
        assert [(a, b) for a, b, _ in compiled] == [(a, b) for a, b, _ in torch_chunks]
        for (_, _, got), (_, _, want) in zip(compiled, torch_chunks):
            _assert_same_bits(got, want)
        _assert_same_bits(in_place, torch_in_place)


def _assert_same_bits(got, want):
    # Bit for bit (signed zeros included), NaN payloads aside.
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan])
