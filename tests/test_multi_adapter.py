"""Many adapters in one batch: vera_linear_multi on every backend, adapter banks in models,
and mixed-batch generation with transformers."""

import pytest
import torch
from torch import nn

import vera_kernels as vk
from helpers import EPS, assert_close_scaled, backend_device_params, tiny_llama

SEED = 2**63 + 5

# (ids as a list per token, or a name) for 12 tokens over 4 adapters.
ID_PATTERNS = {
    "mixed-with-none": [0, 3, -1, 1, 1, 2, -1, 0, 3, 3, 2, 1],
    "one-adapter": [2] * 12,
    "all-none": [-1] * 12,
    "unsorted-distinct": [3, 1, 0, 2, 3, 0, 1, 2, 2, 1, 0, 3],
}


def _inputs(n_tokens, n_in, n_out, r, n_adapters, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    return (rand(n_tokens, n_in), rand(n_adapters, r), rand(n_adapters, n_out),
            rand(n_tokens, n_out), rand(n_tokens, n_out))


def _per_token(x, d_bank, b_bank, ids, base, grad, backend):
    """The oracle: one vera_linear call per token, with that token's adapter (float64)."""
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (x, d_bank, b_bank, base)]
    rows = []
    for t, a in enumerate(ids.tolist()):
        if a < 0:
            rows.append(leaves[3][t])
        else:
            rows.append(vk.vera_linear(leaves[0][t:t + 1], leaves[1][a], leaves[2][a], SEED,
                                       leaves[3][t:t + 1], backend="torch")[0])
    y = torch.stack(rows)
    return [y, *torch.autograd.grad(y, leaves, grad.double().cpu(), allow_unused=True)]


def _multi(x, d_bank, b_bank, ids, base, grad, backend):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, d_bank, b_bank, base)]
    y = vk.vera_linear_multi(leaves[0], leaves[1], leaves[2], ids, SEED, leaves[3],
                             backend=backend)
    return [y, *torch.autograd.grad(y, leaves, grad)]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("pattern", list(ID_PATTERNS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_multi_equals_per_token_vera_linear(backend, device, pattern, dtype):
    x, d_bank, b_bank, base, grad = _inputs(12, 19, 23, 6, 4, dtype, device)
    ids = torch.tensor(ID_PATTERNS[pattern], device=device)
    got = _multi(x, d_bank, b_bank, ids, base, grad, backend)
    expected = _per_token(x, d_bank, b_bank, ids, base, grad, backend)
    tol = {torch.float64: 1e-12, torch.float32: 64 * EPS[torch.float32],
           torch.float16: 16 * EPS[torch.float16]}[dtype]
    for name, g, e in zip(["y", "dx", "dd_bank", "db_bank", "dbase"], got, expected):
        assert g.dtype == dtype, name
        if e is None:  # a bank no token used at all
            e = torch.zeros_like(g, dtype=torch.float64)
        if e.abs().max() == 0:
            assert g.abs().max() == 0, f"{name} must be exactly zero"
            continue
        assert_close_scaled(g.cpu(), e, tol, f"{backend} {pattern} {dtype} {name}")


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_unused_bank_rows_get_zero_gradient_and_results_are_deterministic(backend, device):
    x, d_bank, b_bank, base, grad = _inputs(40, 11, 9, 5, 6, torch.float32, device, seed=3)
    ids = torch.tensor([0, 2, 5, -1] * 10, device=device)
    first = _multi(x, d_bank, b_bank, ids, base, grad, backend)
    second = _multi(x, d_bank, b_bank, ids, base, grad, backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for bank_grad in first[2:4]:
        assert torch.equal(bank_grad[[1, 3, 4]], torch.zeros_like(bank_grad[[1, 3, 4]]))
        assert bank_grad[[0, 2, 5]].abs().min() > 0


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_leading_dims_and_zero_tokens(backend, device):
    x, d_bank, b_bank, _, _ = _inputs(6, 8, 7, 3, 2, torch.float64, device)
    ids = torch.tensor([1, 0, -1], device=device)[:, None].expand(3, 2)  # per sequence
    y = vk.vera_linear_multi(x.view(3, 2, 8), d_bank, b_bank, ids, SEED, backend=backend)
    flat = vk.vera_linear_multi(x, d_bank, b_bank, ids.reshape(-1), SEED, backend=backend)
    assert torch.equal(y.reshape(6, 7), flat)
    assert torch.equal(y[2], torch.zeros_like(y[2]))
    empty = torch.empty(0, 5, 8, dtype=torch.float64, device=device, requires_grad=True)
    d = d_bank.clone().requires_grad_(True)
    out = vk.vera_linear_multi(empty, d, b_bank, torch.empty(0, 5, dtype=torch.long, device=device),
                               SEED, backend=backend)
    assert out.shape == (0, 5, 7)
    out.sum().backward()
    assert torch.equal(d.grad, torch.zeros_like(d))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_gradcheck_float64(backend, device):
    x, d_bank, b_bank, base, _ = _inputs(7, 5, 4, 3, 3, torch.float64, device)
    ids = torch.tensor([2, -1, 0, 0, 2, 1, 2], device=device)
    leaves = [t.requires_grad_(True) for t in (x, d_bank, b_bank, base)]
    assert torch.autograd.gradcheck(
        lambda x, d, b, base: vk.vera_linear_multi(x, d, b, ids, SEED, base, backend=backend),
        leaves,
    )


@pytest.mark.parametrize("ids,error,match", [
    (torch.tensor([0, 4, 1]), ValueError, r"in \[-1, 4\).*\[0, 4\]"),
    (torch.tensor([0, -2, 1]), ValueError, r"in \[-1, 4\)"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer dtype"),
    (torch.tensor([0, 1]), ValueError, r"leading shape \(3,\)"),
    ([0, 1, 2], TypeError, "integer torch.Tensor"),
])
def test_bad_ids(ids, error, match):
    x, d_bank, b_bank, _, _ = _inputs(3, 5, 4, 2, 4, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        vk.vera_linear_multi(x, d_bank, b_bank, ids, SEED)


def test_banks_must_agree():
    x, d_bank, b_bank, _, _ = _inputs(3, 5, 4, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="the banks hold 4 and 3 adapters"):
        vk.vera_linear_multi(x, d_bank, b_bank[:3], torch.zeros(3, dtype=torch.long), SEED)
    with pytest.raises(ValueError, match="2-D"):
        vk.vera_linear_multi(x, d_bank[0], b_bank, torch.zeros(3, dtype=torch.long), SEED)


# --- model level ---------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    return vk.apply_vera(model, ["0", "2"], r=4, seed=SEED)


def _randomize(model, adapter):
    with torch.no_grad():
        for _, layer in vk.model.vera_layers(model):
            for vector in layer.adapter_vectors(adapter):
                vector.normal_()


def test_add_set_delete_list_and_per_adapter_state():
    model = _mlp()
    _randomize(model, "default")
    vk.add_adapter(model, "fresh")
    vk.add_adapter(model, "copy", vk.vera_state_dict(model))
    assert vk.list_adapters(model) == ["default", "fresh", "copy"]
    x = torch.randn(5, 9, dtype=torch.float64)
    with torch.no_grad():
        default_out = model(x)
        vk.set_adapter(model, "copy")
        assert torch.equal(model(x), default_out)
        vk.set_adapter(model, "fresh")  # b = 0: the base model
        fresh_out = model(x)
        vk.set_adapter(model, None)
        assert torch.equal(model(x), fresh_out)
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        vk.set_adapter(model, "nope")
    vk.set_adapter(model, "copy")
    with pytest.raises(ValueError, match="'copy' is active"):
        vk.delete_adapter(model, "copy")
    vk.delete_adapter(model, "fresh")
    assert vk.list_adapters(model) == ["default", "copy"]
    with pytest.raises(ValueError, match="exists already"):
        vk.add_adapter(model, "copy")
    # Each adapter saves on its own, and the copy's vectors train on their own.
    state = vk.vera_state_dict(model, adapter="copy")
    assert torch.equal(state["0.vera_lambda_b"], vk.vera_state_dict(model)["0.vera_lambda_b"])
    # The active adapter alone trains (as in PEFT).
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {f"{i}.vera_adapters.copy.vera_lambda_{v}" for i in (0, 2) for v in "db"}


def test_adapters_of_another_seed_or_r_are_refused():
    model = _mlp()
    other = nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    vk.apply_vera(other, ["0", "2"], r=4, seed=SEED + 1)
    with pytest.raises(ValueError, match="VeRA layer '0'"):
        vk.add_adapter(model, "other", vk.vera_state_dict(other))
    assert vk.list_adapters(model) == ["default"]


def test_adapter_batch_rows_and_merge_refused():
    model = _mlp()
    _randomize(model, "default")
    vk.add_adapter(model, "b")
    _randomize(model, "b")
    x = torch.randn(3, 4, 9, dtype=torch.float64)
    names = ["b", None, "default"]
    with torch.no_grad():
        with vk.adapter_batch(model, names):
            mixed = model(x)
            with pytest.raises(RuntimeError, match="adapter_batch"):
                model[0].merge()
        for row, name in enumerate(names):
            vk.set_adapter(model, name)
            torch.testing.assert_close(mixed[row], model(x[row:row + 1])[0], rtol=1e-12, atol=1e-12)
    vk.set_adapter(model, "default")
    # Training through a mixed batch reaches each adapter's own vectors, once they
    # are named trainable (set_adapter trains the active one alone).
    vk.set_trainable_adapters(model, ["b", "default"])
    with vk.adapter_batch(model, ["b", "default", "b"]):
        model(x).square().sum().backward()
    assert model[0].adapter_vectors("b")[1].grad.abs().max() > 0
    assert model[0].vera_lambda_b.grad.abs().max() > 0
    with pytest.raises(ValueError, match="names 2 batch rows"):
        with vk.adapter_batch(model, ["b", None]):
            model(x)


def test_load_adapter_beside_the_others(tmp_path):
    model = _mlp()
    _randomize(model, "default")
    vk.save_adapter(model, tmp_path)
    other = _mlp()
    vk.load_adapter(other, tmp_path, adapter_name="trained")
    assert vk.list_adapters(other) == ["default", "trained"]
    x = torch.randn(2, 9, dtype=torch.float64)
    vk.set_adapter(other, "trained")
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


# --- mixed-batch generation -----------------------------------------------------------------

transformers = pytest.importorskip("transformers")
VOCAB = 32


def _tiny_llama():
    return tiny_llama(VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _train_task(model, shift, steps=60):
    """Teach the active adapter: next token = (token + shift) mod (VOCAB - 3) + 3."""
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-2)
    gen = torch.Generator().manual_seed(shift)
    for _ in range(steps):
        start = torch.randint(3, VOCAB, (16, 1), generator=gen)
        seq = (start - 3 + shift * torch.arange(10)) % (VOCAB - 3) + 3
        loss = model(input_ids=seq, labels=seq).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.slow
def test_mixed_batch_generate_equals_each_row_alone():
    model = vk.apply_vera(_tiny_llama(), ["q_proj", "v_proj", "up_proj", "down_proj"], r=16,
                          seed=SEED)
    for name, shift in (("default", 1), ("two", 2), ("five", 5)):
        if name != "default":
            vk.add_adapter(model, name)
        vk.set_adapter(model, name)
        model.requires_grad_(False)  # only the active adapter learns
        for _, layer in vk.model.vera_layers(model):
            for vector in layer.adapter_vectors(name):
                vector.requires_grad_(True)
        _train_task(model, shift)
    model.eval()
    # Left-padded prompts of different lengths, one adapter (or none) per row.
    prompts = torch.tensor([[0, 0, 7, 8], [0, 5, 6, 7], [4, 5, 6, 7], [0, 0, 0, 9]])
    mask = (prompts != 0).long()
    names = ["two", "default", "five", None]
    gen_args = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with vk.adapter_batch(model, names):
        mixed = model.generate(input_ids=prompts, attention_mask=mask, **gen_args)
    outputs = set()
    for row, name in enumerate(names):
        vk.set_adapter(model, name)
        alone = model.generate(input_ids=prompts[row:row + 1], attention_mask=mask[row:row + 1],
                               **gen_args)
        assert torch.equal(mixed[row, -6:], alone[0, -6:]), f"row {row} ({name})"
        outputs.add(tuple(alone[0, -6:].tolist()))
    assert len(outputs) >= 3  # the adapters learned different things


# --- regressions found by an adversarial review -------------------------------------------

def _two_adapter_mlp():
    model = _mlp()
    _randomize(model, "default")
    vk.add_adapter(model, "fr")
    _randomize(model, "fr")
    return model


def _weights(model):
    return [layer.base_layer.weight.detach().clone() for _, layer in vk.model.vera_layers(model)]


@pytest.mark.parametrize("keys", ["all vectors", "fr only"])
def test_loading_the_merged_non_default_adapter_keeps_the_weight_in_step(keys):
    model = _two_adapter_mlp()
    original = _weights(model)
    vk.set_adapter(model, "fr")
    vk.merge_vera(model)
    new = {k: v * 2 for k, v in model.state_dict().items() if "vera_lambda" in k
           and (keys == "all vectors" or "vera_adapters.fr" in k)}
    model.load_state_dict(new, strict=False)
    fresh = _two_adapter_mlp()
    fresh.load_state_dict(new, strict=False)
    vk.set_adapter(fresh, "fr")
    x = torch.randn(4, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=1e-12, atol=1e-12)
    vk.unmerge_vera(model)
    for got, want in zip(_weights(model), original):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_merged_state_remembers_which_adapter_is_merged():
    model = _two_adapter_mlp()
    original = _weights(model)
    vk.set_adapter(model, "fr")
    vk.merge_vera(model)
    other = _two_adapter_mlp()  # active adapter: "default"
    other.load_state_dict(model.state_dict())
    assert other[0].merged_adapter == "fr"
    vk.unmerge_vera(other)
    for got, want in zip(_weights(other), original):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Without the merged adapter (and its vectors) the merged weight is refused at load:
    # it could never be unmerged.
    plain = _mlp()
    before = _weights(plain)
    with pytest.raises(RuntimeError, match="holds adapter 'fr', which this layer does not have"):
        plain.load_state_dict({k: v for k, v in model.state_dict().items()
                               if "vera_adapters" not in k})
    assert all(torch.equal(a, b) for a, b in zip(_weights(plain), before))


def test_bank_gradients_do_not_leak_between_adapters():
    from vera_kernels.backends.banks import per_adapter_sum

    values = torch.randn(64, 5, dtype=torch.float64)
    values[:32] *= 1e8
    ids = torch.tensor([0] * 32 + [1] * 32)
    totals = per_adapter_sum(values, ids, 3)
    torch.testing.assert_close(totals[1], values[32:].sum(0), rtol=1e-14, atol=0)
    assert torch.equal(totals[2], torch.zeros(5, dtype=torch.float64))


def test_adapter_batch_of_no_adapters_is_the_base_model():
    model = _two_adapter_mlp()
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    with torch.no_grad():
        vk.set_adapter(model, None)
        base = model(x)
        with vk.adapter_batch(model, [None, None]):
            assert torch.equal(model(x), base)


def test_save_adapter_and_trainer_save_the_active_adapter(tmp_path):
    model = _two_adapter_mlp()
    vk.set_adapter(model, "fr")
    vk.save_adapter(model, tmp_path)
    loaded = vk.load_adapter(_mlp(), tmp_path)
    for (_, got), (_, want) in zip(vk.model.vera_layers(loaded), vk.model.vera_layers(model)):
        assert torch.equal(got.vera_lambda_b, want.adapter_vectors("fr")[1])


def _with_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 8), nn.BatchNorm1d(8), nn.Linear(8, 6))
    return vk.apply_vera(model, ["0", "2"], r=4, seed=SEED, modules_to_save=["1"])


def test_other_adapters_never_overwrite_the_shared_modules_to_save(tmp_path):
    model, other = _with_head(), _with_head()
    with torch.no_grad():
        other[1].weight.add_(1.0)
    vk.add_adapter(model, "fr")
    before = model[1].weight.detach().clone()
    with pytest.raises(ValueError, match="once for all its adapters"):
        vk.load_vera_state_dict(model, vk.vera_state_dict(other), adapter="fr")
    assert torch.equal(model[1].weight, before)
    # Half-size adapter files round the vectors only, never the module's tensors.
    model(torch.randn(4, 9))  # BatchNorm counts a batch
    vk.save_adapter(model, tmp_path, dtype=torch.bfloat16)
    fresh = torch.nn.Sequential(nn.Linear(9, 8), nn.BatchNorm1d(8), nn.Linear(8, 6))
    vk.load_adapter(fresh, tmp_path)
    assert fresh[1].num_batches_tracked.dtype == torch.int64
    assert torch.equal(fresh[1].running_mean, model[1].running_mean)
