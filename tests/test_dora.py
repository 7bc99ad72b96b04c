"""DVoRA (``use_dora=True``): DoRA's magnitude over VeRA.

Checked against the unfused float64 reference (``dvora_linear_reference``: W0 + ΔW
materialized, row norms detached) on every backend that runs here: the output and
the gradients of x, d, b and m, one adapter and mixed batches, with and without
bias, Conv1D layouts and adapter dropout (PEFT's DoRA semantics). ``gradcheck``
holds the fused op's ``base_scale`` / ``base_bias`` gradients and the layer's x / m
gradients (the norms depend on d and b alone). A training step after the first
allocates nothing of size out x in (PEFT's LoRA DoRA does: the same check fails
there). Merge / unmerge round trips, state dicts, adapter files, a quantized base.
The PEFT LoRA-DoRA export is in test_lora_export.py, the lifecycle state machine
over DVoRA layers in test_lifecycle_machine.py.
"""

import pytest
import torch
from torch import nn

import vera_kernels as vk
from vera_kernels import dora
from vera_kernels.dropout import DropoutMask, keep_mask
from vera_kernels.projection import _cached_block
from vera_kernels.reference import dvora_linear_reference, vera_projections
from helpers import EPS, assert_close_scaled

SEED = 2**40 + 3
IN, OUT, R = 24, 20, 8


def _dtype(backend: str) -> torch.dtype:
    # The torch backend in float64 (near-exact sums); the kernels in float32.
    return torch.float64 if backend == "torch" else torch.float32


def _layer(dtype, device="cpu", *, bias=True, conv1d=False, dropout=0.0, seed=0):
    """A DVoRA layer on a random base, its vectors random (m scaled in [0.5, 1.5))."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias).to(dtype)
    with torch.no_grad():
        for p in linear.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    base = linear
    if conv1d:
        transformers = pytest.importorskip("transformers")
        base = transformers.pytorch_utils.Conv1D(OUT, IN).to(dtype)
        with torch.no_grad():
            base.weight.copy_(linear.weight.T)
            base.bias.copy_(linear.bias)
    layer = vk.VeRALinear.from_linear(base.to(device), R, seed=SEED, dropout=dropout,
                                      use_dora=True)
    with torch.no_grad():
        layer.vera_lambda_d.copy_(torch.randn(R, generator=gen, dtype=torch.float64))
        layer.vera_lambda_b.copy_(torch.randn(OUT, generator=gen, dtype=torch.float64))
        layer.vera_magnitude.mul_(0.5 + torch.rand(OUT, generator=gen, dtype=torch.float64).to(
            layer.vera_magnitude.device))
    return layer


def _weight(layer):
    """The base weight as (out, in)."""
    weight = layer.base_layer.weight
    return weight.T if layer.fan_in_fan_out else weight


def _leaves(layer, adapter="default"):
    return list(layer.adapter_parameters(adapter).values())  # d, b, m


def _reference(layer, x, grad, adapter="default"):
    """y and (dx, dd, db, dm) of the float64 reference for the layer's base and ``adapter``."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in [x, *_leaves(layer, adapter)]]
    bias = layer.base_layer.bias
    y = dvora_linear_reference(leaves[0], _weight(layer).detach().cpu().double(),
                               None if bias is None else bias.detach().cpu().double(),
                               *leaves[1:], SEED)
    return y.detach(), torch.autograd.grad(y, leaves, grad.cpu().double())


def _check(y, grads, want_y, want_grads, dtype):
    tol = 64 * EPS[dtype]
    assert_close_scaled(y.detach().cpu(), want_y, tol, "y")
    for name, got, want in zip(("dx", "dd", "db", "dm"), grads, want_grads):
        assert_close_scaled(got.cpu(), want, tol, name)


@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True)],
                         ids=["linear", "linear-no-bias", "conv1d"])  # Conv1D always has one
def test_layer_matches_the_reference(target, conv1d, bias):
    backend, device = target
    dtype = _dtype(backend)
    layer = _layer(dtype, device, bias=bias, conv1d=conv1d)
    layer.backend = backend
    x = torch.randn(3, 11, IN, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    grad = torch.randn(3, 11, OUT, dtype=torch.float64).to(dtype).to(device)
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *_leaves(layer)], grad)
    _check(y, grads, *_reference(layer, x, grad), dtype)


def test_mixed_batch_matches_each_rows_adapter(target):
    backend, device = target
    dtype = _dtype(backend)
    model = nn.Sequential(_layer(dtype, device, seed=1))
    layer = model[0]
    layer.backend = backend
    vk.add_adapter(model, "fr")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for name, vector in layer.adapter_parameters("fr").items():
            factor = torch.randn(vector.shape, generator=gen, dtype=torch.float64)
            vector.copy_(vector * (1 + factor.abs()) if name == "vera_magnitude" else factor)
    vk.set_trainable_adapters(model, ["default", "fr"])
    x = torch.randn(3, 5, IN, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    grad = torch.randn(3, 5, OUT, dtype=torch.float64).to(dtype).to(device)
    rows = ["fr", None, "default"]
    with vk.adapter_batch(model, rows):
        y = model(x)
    params = {name: list(layer.adapter_parameters(name).values()) for name in ("default", "fr")}
    grads = torch.autograd.grad(y, [x, *params["default"], *params["fr"]], grad)
    # Each row against the reference of its own adapter (None: the base layer alone).
    want_dx, want_vectors = [], {name: [0, 0, 0] for name in params}
    for row, name in enumerate(rows):
        if name is None:
            base_x = x[row:row + 1].detach().cpu().double().requires_grad_()
            want = layer.base_layer.double().cpu()(base_x)
            layer.base_layer.to(dtype).to(device)
            (dx,) = torch.autograd.grad(want, [base_x], grad[row:row + 1].cpu().double())
            assert_close_scaled(y[row].detach().cpu(), want[0].detach(), 64 * EPS[dtype], "y")
            want_dx.append(dx[0])
            continue
        want, (dx, *vector_grads) = _reference(layer, x[row:row + 1], grad[row:row + 1], name)
        assert_close_scaled(y[row].detach().cpu(), want[0], 64 * EPS[dtype], f"y row {row}")
        want_dx.append(dx[0])
        want_vectors[name] = [a + b for a, b in zip(want_vectors[name], vector_grads)]
    assert_close_scaled(grads[0].cpu(), torch.stack(want_dx), 64 * EPS[dtype], "dx")
    for got, want in zip(grads[1:], want_vectors["default"] + want_vectors["fr"]):
        assert_close_scaled(got.cpu(), want, 64 * EPS[dtype], "bank gradient")


def test_adapter_dropout_follows_peft_dora(monkeypatch):
    """In training, ``base(x) + (s - 1) ⊙ W0 dropout(x) + s ⊙ ΔW dropout(x)``: the mask is
    the call's regenerated one, the same for both terms."""
    layer = _layer(torch.float64, dropout=0.4).train()
    call_seed = torch.tensor([12345, 678], dtype=torch.int64)
    monkeypatch.setattr("vera_kernels.module.draw_call_seed", lambda device: call_seed)
    x = torch.randn(2, 9, IN, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 9, OUT, dtype=torch.float64)
    y = layer(x)
    got = torch.autograd.grad(y, [x, *_leaves(layer)], grad)

    mask = DropoutMask(0.4, call_seed)
    keep = keep_mask(mask, 0, 18, IN, "cpu").reshape(2, 9, IN).double() * mask.scale
    leaves = [t.detach().clone().requires_grad_() for t in [x, *_leaves(layer)]]
    want = dvora_linear_reference(leaves[0], _weight(layer).detach(),
                                  layer.base_layer.bias.detach(), *leaves[1:], SEED,
                                  dropped_x=leaves[0] * keep)
    want_grads = torch.autograd.grad(want, leaves, grad)
    _check(y, got, want.detach(), want_grads, torch.float64)


def test_the_layer_starts_as_its_base_layer():
    linear = nn.Linear(IN, OUT)
    layer = vk.VeRALinear.from_linear(linear, R, seed=SEED, use_dora=True)
    torch.testing.assert_close(layer.vera_magnitude.detach(), linear.weight.detach().norm(dim=1))
    x = torch.randn(4, IN)
    with torch.no_grad():
        assert torch.equal(layer(x), linear(x))  # s = m / n = 1 exactly while b = 0


def test_norm_terms_give_the_row_norms_of_w0_plus_delta():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    d, b = torch.randn(R, generator=gen, dtype=torch.float64), torch.randn(OUT, generator=gen,
                                                                             dtype=torch.float64)
    proj_a, proj_b = vera_projections(IN, OUT, R, SEED, dtype=torch.float64, device="cpu")
    want = (weight + (b[:, None] * proj_b * d) @ proj_a).norm(dim=1)
    got = dora.row_norms(dora.norm_terms(weight, proj_a, torch.float64), proj_b, d, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_rows_whose_norm_is_zero_stay_finite():
    layer = _layer(torch.float64)
    with torch.no_grad():
        layer.base_layer.weight[3] = 0
        layer.vera_lambda_b[3] = 0  # W0_3 + ΔW_3 = 0: n_3 = 0
    x = torch.randn(5, IN, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grads = torch.autograd.grad(y.sum(), [x, *_leaves(layer)])
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(y[:, 3], layer.base_layer.bias[3].expand(5).detach())
    assert grads[3][3] == 0  # y_3 is the bias whatever m_3 is


def test_fused_op_gradcheck():
    """``vera_linear`` with ``base_scale`` / ``base_bias``, one adapter and banks, float64."""
    gen = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, base = rand(6, IN), rand(6, OUT)
    d, b, s, bias = rand(R), rand(OUT), rand(OUT), rand(OUT)
    assert torch.autograd.gradcheck(
        lambda *t: vk.vera_linear(t[0], t[1], t[2], SEED, t[3], base_scale=t[4], base_bias=t[5]),
        (x, d, b, base, s, bias))
    ids = torch.tensor([1, -1, 0, 1, 0, -1])
    banks = rand(2, R), rand(2, OUT), rand(2, OUT)
    assert torch.autograd.gradcheck(
        lambda *t: vk.vera_linear_multi(t[0], t[1], t[2], ids, SEED, t[3], base_scale=t[4],
                                        base_bias=t[5]),
        (x, banks[0], banks[1], base, banks[2], bias))


def test_layer_gradcheck_in_x_and_m():
    # The norms depend on d and b only (detached): in x and m the layer is a plain function.
    layer = _layer(torch.float64)
    d, b = layer.vera_lambda_d.detach(), layer.vera_lambda_b.detach()
    x = torch.randn(4, IN, dtype=torch.float64, requires_grad=True)

    def f(x, m):
        with torch.no_grad():
            layer.vera_magnitude.copy_(m)
        scale = dora.magnitude_scale(m, layer._dora_norms(["default"])[0])
        return vk.vera_linear(x, d, scale * b, SEED, layer.base_layer(x), base_scale=scale,
                              base_bias=layer.base_layer.bias)

    assert torch.autograd.gradcheck(f, (x, layer.vera_magnitude.detach().clone().requires_grad_()))
    # ... and the layer's own gradients are that function's.
    m = layer.vera_magnitude.detach().clone().requires_grad_()
    want = torch.autograd.grad(f(x, m).sum(), [x, m])
    got = torch.autograd.grad(layer(x).sum(), [x, layer.vera_magnitude])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_fused_op_validates_the_scale():
    x, base = torch.randn(3, IN), torch.randn(3, OUT)
    d, b = torch.randn(R), torch.randn(OUT)
    with pytest.raises(ValueError, match="base_scale must have shape"):
        vk.vera_linear(x, d, b, SEED, base, base_scale=torch.ones(OUT + 1))
    with pytest.raises(ValueError, match="pass base_output too"):
        vk.vera_linear(x, d, b, SEED, base_scale=torch.ones(OUT))
    with pytest.raises(ValueError, match="together with base_scale"):
        vk.vera_linear(x, d, b, SEED, base, base_bias=torch.ones(OUT))
    with pytest.raises(TypeError, match="base_scale has dtype"):
        vk.vera_linear(x, d, b, SEED, base, base_scale=torch.ones(OUT, dtype=torch.float64))


def _allocations(step) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


def _largest_step_allocation(layer, params, x) -> int:
    def step():
        y = layer(x)
        torch.autograd.grad(y.sum(), [x, *params])
        with torch.no_grad():  # an optimizer step: the vectors change, the norms are stale
            for p in params:
                p.mul_(1.01)

    step()  # the first step takes the norm terms
    return max(_allocations(step))


def test_a_training_step_allocates_nothing_of_size_out_by_in():
    tokens, n_in, n_out, r = 8, 512, 384, 4  # out x in (768 KB) >> tokens x (in + out)
    linear = nn.Linear(n_in, n_out)
    layer = vk.VeRALinear.from_linear(linear, r, seed=SEED, use_dora=True)
    x = torch.randn(tokens, n_in, requires_grad=True)
    out_by_in = n_out * n_in * 4
    largest = _largest_step_allocation(layer, _leaves(layer), x)
    assert largest < out_by_in / 8, f"a {largest}-byte allocation in a DVoRA training step"
    # The check can fail: PEFT's LoRA DoRA builds W0 + ΔW (out x in) on every step.
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(nn.Sequential(nn.Linear(n_in, n_out)),
                                peft.LoraConfig(r=r, target_modules=["0"], use_dora=True))
    params = [p for p in model.parameters() if p.requires_grad]
    assert _largest_step_allocation(model, params, x) >= out_by_in


def _unmerged_case():
    """A float64 layer, its original weight, an input and the layer's output for it."""
    layer = _layer(torch.float64)
    x = torch.randn(5, IN, dtype=torch.float64)
    with torch.no_grad():
        return layer, layer.base_layer.weight.detach().clone(), x, layer(x)


def test_merge_round_trip_and_zero_magnitudes():
    layer, original, x, want = _unmerged_case()
    with torch.no_grad():
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, original, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
        layer.vera_magnitude[2] = 0
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"magnitude is 0 in output rows \[2\]"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)


def test_a_merged_checkpoint_unmerges_in_a_fresh_model():
    """The norms taken at merge time travel with a merged weight (``vera_merged_norm``)."""
    layer, original, x, want = _unmerged_case()
    layer.merge()
    fresh = vk.VeRALinear(IN, OUT, R, seed=SEED, use_dora=True).double()
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged
    fresh.unmerge()
    torch.testing.assert_close(fresh.base_layer.weight, original, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-12, atol=1e-12)


def _model(use_dora=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 12)).double()


def test_state_dicts_and_adapter_files_carry_the_magnitude(tmp_path):
    model = vk.apply_vera(_model(), ["0", "2"], r=R, seed=SEED, use_dora=True)
    for layer in (model[0], model[2]):
        with torch.no_grad():
            layer.vera_lambda_b.normal_()
            layer.vera_magnitude.mul_(1.3)
    x = torch.randn(4, IN, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    state = vk.vera_state_dict(model)
    assert "0.vera_magnitude" in state and state["vera_config"]["0"]["use_dora"] is True
    fresh = vk.apply_vera(_model(), ["0", "2"], r=R, seed=SEED, use_dora=True)
    vk.load_vera_state_dict(fresh, state)
    vk.save_adapter(model, tmp_path)
    loaded = vk.load_adapter(_model(), tmp_path)
    assert loaded[0].use_dora
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loaded(x), want, rtol=1e-12, atol=1e-12)
    # A VeRA model is not a DVoRA one: the state dict says which it is.
    plain = vk.apply_vera(_model(), ["0", "2"], r=R, seed=SEED)
    with pytest.raises(ValueError, match="use_dora"):
        vk.load_vera_state_dict(plain, state)
    with pytest.raises(ValueError, match="use_dora"):
        vk.apply_vera(model, ["0"], r=R, seed=SEED)  # one model, one kind


def test_norms_follow_the_base_weight_and_the_vectors():
    layer = _layer(torch.float64)
    x = torch.randn(3, IN, dtype=torch.float64)

    def expected():
        return dvora_linear_reference(x, layer.base_layer.weight, layer.base_layer.bias,
                                      *_leaves(layer), SEED)

    with torch.no_grad():
        layer(x)  # caches the norm terms and the adapter's norms
        layer.base_layer.weight.mul_(1.5)  # e.g. loaded: the version changes
        torch.testing.assert_close(layer(x), expected(), rtol=1e-12, atol=1e-12)
        layer.vera_lambda_d.add_(0.5)  # an optimizer step
        torch.testing.assert_close(layer(x), expected(), rtol=1e-12, atol=1e-12)
    # .to() replaces each tensor's .data without a version bump: the dtype and storage tell.
    layer = _layer(torch.float32)
    x = x.float()
    with torch.no_grad():
        layer(x)
        layer.double()
        x = x.double()
        torch.testing.assert_close(layer(x), expected(), rtol=1e-12, atol=1e-12)


def test_quantized_base_takes_the_dequantized_weight():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from vera_kernels.base_layers import dense_weight

    linear = nn.Linear(64, 48)
    quantized = bnb.nn.Linear4bit(64, 48, quant_type="nf4", compute_dtype=torch.float32)
    quantized.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                         quant_type="nf4")
    quantized.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    quantized = quantized.to("cpu")  # quantizes
    layer = vk.VeRALinear.from_linear(quantized, 8, seed=SEED, use_dora=True)
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
        layer.vera_magnitude.mul_(1.2)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        got = layer(x)
        dense = dense_weight(quantized).float()
        want = dvora_linear_reference(x, dense, quantized.bias, *_leaves(layer), SEED)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiled_layer_matches_eager():
    # The norms run eagerly (their caches key on version counters); the rest is traced.
    layer = _layer(torch.float32)
    x = torch.randn(5, IN, requires_grad=True)
    leaves = [x, *_leaves(layer)]
    want = layer(x)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    got = torch.compile(layer)(x)
    got_grads = torch.autograd.grad(got.square().sum(), leaves)
    assert_close_scaled(got.detach(), want.detach(), 16 * EPS[torch.float32], "y")
    for name, g, w in zip(("dx", "dd", "db", "dm"), got_grads, want_grads):
        assert_close_scaled(g, w, 16 * EPS[torch.float32], name)


def test_peft_vera_export_refuses_dvora(tmp_path):
    pytest.importorskip("peft")
    model = vk.apply_vera(_model(), ["0"], r=R, seed=SEED, use_dora=True)
    with pytest.raises(ValueError, match="save_lora_adapter"):
        vk.save_peft_adapter(model, tmp_path)


def test_torch_export_matches_and_leaves_the_caches_clean():
    # Exported before any eager call: the trace must neither cache traced tensors (the
    # projections' LRU, the norm terms) nor compute with stale ones.
    layer = _layer(torch.float32).eval()
    x = torch.randn(3, IN)
    want = dvora_linear_reference(x, layer.base_layer.weight, layer.base_layer.bias,
                                  *_leaves(layer), SEED).detach()
    _cached_block.cache_clear()
    program = torch.export.export(layer, (x,))
    with torch.no_grad():
        assert_close_scaled(program.module()(x), want, 16 * EPS[torch.float32], "exported")
        assert_close_scaled(layer(x), want, 16 * EPS[torch.float32], "eager after export")


def test_the_scale_is_not_rounded_to_half_precision(target):
    # s = 1 + 4e-4 is 1.0 in float16: rounded, every base element would be off by 4e-4
    # in the same direction; kept in float32 the output errs by its own rounding alone.
    backend, device = target
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(64, IN, generator=gen).half().to(device)
    base = (torch.randn(64, OUT, generator=gen) * 8).half().to(device)
    scale = torch.full((OUT,), 1 + 4e-4, device=device)
    y = vk.vera_linear(x, torch.ones(R, device=device), torch.zeros(OUT, device=device), SEED,
                       base, backend=backend, base_scale=scale)
    want = base.double() * (1 + 4e-4)
    bias = ((y.double() - want) / want).mean().item()
    assert abs(bias) < 2e-4, f"mean relative error {bias:.2e}: the scale was rounded"  # -4e-4


def test_training_with_a_fused_optimizer_keeps_the_norms_current():
    # Fused optimizers (the transformers Trainer's default), FSDP2 and ZeRO-3 change the
    # vectors without bumping their version counters: the norms of a training call are
    # computed afresh, and an evaluation between steps must not leave stale ones behind.
    layer = _layer(torch.float32)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2,
                            fused=True)
    x, target = torch.randn(32, IN), torch.randn(32, OUT)
    for step in range(6):
        if step % 2 == 0:
            with torch.no_grad():
                layer(x)
        (layer(x) - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        want = dvora_linear_reference(x, layer.base_layer.weight, layer.base_layer.bias,
                                      *_leaves(layer), SEED)
        assert_close_scaled(layer(x), want, 16 * EPS[torch.float32], "after training")


def test_pickling_and_empty_batches():
    import io

    layer = _layer(torch.float32, dropout=0.2).train()
    layer(torch.randn(4, IN))  # fills the caches (weak references)
    copy = torch.load(io.BytesIO(_pickled(layer)), weights_only=False)
    with torch.no_grad():
        x = torch.randn(3, IN)
        assert torch.equal(copy.eval()(x), layer.eval()(x))
    layer.train()
    model = nn.Sequential(layer)
    with vk.adapter_batch(model, ["default"]):  # one row of no tokens
        assert model(torch.randn(1, 0, IN)).shape == (1, 0, OUT)


def _pickled(module) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def test_a_merged_checkpoint_without_its_norms_is_refused():
    layer = _layer(torch.float64)
    layer.merge()
    state = layer.state_dict()
    del state["vera_merged_norm"]
    fresh = vk.VeRALinear(IN, OUT, R, seed=SEED, use_dora=True).double()
    before = fresh.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="vera_merged_norm"):
        fresh.load_state_dict(state, strict=False)
    assert not fresh.merged and torch.equal(fresh.base_layer.weight, before)
