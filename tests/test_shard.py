"""Tensor-parallel shards (``vk.ProjectionShard``): a shard regenerates exactly its block of
the full layer's A and B, so TP = 2 simulated here (no process group: the two shards run
one after the other) combines to the unsharded layer, forward and backward, on every
backend that runs here (Triton in the interpreter, the cuda backend emulated).

Column-parallel (the output features split): the shards' outputs concatenate, dx and dd
sum, db concatenates. Row-parallel (the input features split): the outputs and dd, db
sum, dx concatenates. Splits on and off a multiple of 4 columns: the spec's Philox call
serves four columns, so an unaligned input split is the case a local index gets wrong.
"""

import pytest
import torch

import vera_kernels as vk
from vera_kernels import ops as vk_ops
from vera_kernels.backends import cuda as cuda_backend
from vera_kernels.backends import strategy as projection_strategy
from vera_kernels.backends.contract import ProjectionSource
from vera_kernels.projection import WHOLE, projection, projection_bound
from helpers import EPS, assert_close_scaled, vera_inputs

SEED = 2**33 + 5
TOKENS, IN, OUT, R = 70, 30, 40, 12
IN_SPLITS = [16, 13]  # on / off a multiple of 4
OUT_SPLITS = [20, 7]


@pytest.fixture(params=projection_strategy.CHOICES[1:])
def strategy(request, monkeypatch):
    monkeypatch.setenv(projection_strategy.ENV_VAR, request.param)
    return request.param


def _dtype(backend: str) -> torch.dtype:
    # The torch backend in float64 (near-exact sums); the kernels in float32.
    return torch.float64 if backend == "torch" else torch.float32


def _case(target):
    """The layer's inputs on the target's device (x, d, b requiring grad), the upstream
    gradient, and the compute dtype."""
    backend, device = target
    dtype = _dtype(backend)
    x, d, b, base = vera_inputs((TOKENS,), IN, OUT, R, dtype=dtype, device=device)
    grad = torch.randn(TOKENS, OUT, dtype=torch.float64).to(dtype).to(device)
    return [t.requires_grad_() for t in (x, d, b)] + [base, grad], dtype


def _full_layer(x, d, b, base, grad):
    """y and (dx, dd, db) of the unsharded layer in float64 on the torch backend."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, d, b)]
    y = vk.vera_linear(*leaves, SEED, base.cpu().double(), backend="torch")
    y.backward(grad.cpu().double())
    return y.detach(), [t.grad for t in leaves]


def _check(y, grads, want_y, want_grads, dtype):
    tol = 64 * EPS[dtype]
    assert_close_scaled(y.cpu(), want_y, tol, "y")
    for name, got, want in zip(("dx", "dd", "db"), grads, want_grads):
        assert_close_scaled(got.cpu(), want, tol, name)


@pytest.mark.parametrize("split", OUT_SPLITS)
def test_column_parallel_shards_combine(target, strategy, split):
    backend = target[0]
    (x, d, b, base, grad), dtype = _case(target)
    outputs = []
    for lo, hi in ((0, split), (split, OUT)):
        b_shard = b.detach()[lo:hi].clone().requires_grad_()
        y = vk.vera_linear(x, d, b_shard, SEED, base[:, lo:hi], backend=backend,
                           shard=vk.ProjectionShard(out_offset=lo))
        y.backward(grad[:, lo:hi])
        outputs.append((y.detach(), b_shard.grad))
    want_y, want_grads = _full_layer(x, d, b, base, grad)
    y = torch.cat([o[0] for o in outputs], dim=1)
    db = torch.cat([o[1] for o in outputs])
    _check(y, (x.grad, d.grad, db), want_y, want_grads, dtype)


@pytest.mark.parametrize("split", IN_SPLITS)
def test_row_parallel_shards_combine(target, strategy, split):
    backend = target[0]
    (x, d, b, base, grad), dtype = _case(target)
    y = base.cpu().double()  # a row-parallel layer adds its bias (here: base) once, after the sum
    dx = []
    for lo, hi in ((0, split), (split, IN)):
        x_shard = x.detach()[:, lo:hi].clone().requires_grad_()
        y_shard = vk.vera_linear(x_shard, d, b, SEED, backend=backend,
                                 shard=vk.ProjectionShard(in_offset=lo, in_features=IN))
        y_shard.backward(grad)
        y = y + y_shard.detach().cpu().double()
        dx.append(x_shard.grad)
    want_y, want_grads = _full_layer(x, d, b, base, grad)
    _check(y, (torch.cat(dx, dim=1), d.grad, b.grad), want_y, want_grads, dtype)


def test_banks_of_adapters_shard_too(target, strategy):
    # The serving case: a column-parallel shard of a bank, rows of several adapters and none.
    backend, device = target
    dtype = _dtype(backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(TOKENS, IN, generator=gen, dtype=torch.float64).to(dtype)
    d_bank = torch.randn(3, R, generator=gen, dtype=torch.float64).to(dtype)
    b_bank = torch.randn(3, OUT, generator=gen, dtype=torch.float64).to(dtype)
    ids = torch.randint(-1, 3, (TOKENS,), generator=gen)
    want = vk.vera_linear_multi(x.double(), d_bank.double(), b_bank.double(), ids, SEED,
                                backend="torch")
    split = OUT_SPLITS[1]
    on = [t.to(device) for t in (x, d_bank, b_bank, ids)]
    got = torch.cat([
        vk.vera_linear_multi(on[0], on[1], on[2][:, lo:hi], on[3], SEED, backend=backend,
                             shard=vk.ProjectionShard(out_offset=lo))
        for lo, hi in ((0, split), (split, OUT))], dim=1)
    assert_close_scaled(got.cpu(), want, 64 * EPS[dtype], "y")


# ---------------------------------------------------------------------------
# The blocks themselves, bit for bit
# ---------------------------------------------------------------------------

BLOCKS = [("A", 12, 13, 0, 7, 30), ("A", 5, 16, 2, 12, 40), ("B", 21, 12, 9, 0, None),
          ("B", 3, 9, 100, 5, None)]


@pytest.mark.parametrize("matrix,rows,cols,row0,col0,fan", BLOCKS)
def test_projection_block_is_the_full_matrix_slice(matrix, rows, cols, row0, col0, fan):
    full = projection(matrix, row0 + rows, col0 + cols, SEED)
    same_fan = projection(matrix, rows, cols, SEED, row_offset=row0, col_offset=col0,
                          fan=col0 + cols)
    assert torch.equal(same_fan, full[row0:, col0:])
    # Another fan: the same raw values (in [-1, 1)) under that fan's bound.
    got = projection(matrix, rows, cols, SEED, row_offset=row0, col_offset=col0, fan=fan)
    raw = same_fan.double() / projection_bound(col0 + cols)
    assert torch.allclose(got.double() / projection_bound(fan or cols), raw, rtol=0,
                          atol=EPS[torch.float32])


@pytest.mark.parametrize("matrix,rows,cols,row0,col0,fan", BLOCKS)
def test_kernel_generators_match_the_block(target, matrix, rows, cols, row0, col0, fan):
    backend, device = target
    want = projection(matrix, rows, cols, SEED, row_offset=row0, col_offset=col0, fan=fan)
    if backend == "torch":
        pytest.skip("the torch backend generates with vk.projection itself")
    if backend == "triton":
        from vera_kernels.backends.triton.philox import generate_projection
        got = generate_projection(matrix, rows, cols, SEED, dtype=torch.float32, device=device,
                                  row_offset=row0, col_offset=col0, fan=fan)
    else:
        key = ProjectionSource.from_seed(SEED).key_words()
        got = cuda_backend._ops(torch.device(device)).projection(
            {"A": 0, "B": 1}[matrix], rows, cols, *key, torch.empty(0, device=device), row0, col0,
            fan or 0)
    assert torch.equal(got.cpu(), want)


def test_the_ops_carry_the_shard():
    # The torch.library ops (what torch.compile traces) take the shard as three ints.
    x, d, b, base = vera_inputs((4,), IN, OUT, R, dtype=torch.float64, device="cpu")
    source = ProjectionSource.from_seed(SEED, vk.ProjectionShard(in_offset=13, out_offset=3,
                                                                 in_features=50))
    want, _ = vk_ops.run_forward(x, d, b, source, base, "torch")
    got, _ = vk_ops.forward_op(x, d, b, source, base, "torch")
    assert torch.equal(got, want)
    unsharded, _ = vk_ops.forward_op(x, d, b, ProjectionSource.from_seed(SEED), base, "torch")
    assert not torch.equal(got, unsharded)


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------

def test_bad_shards_are_refused():
    x, d, b, _ = vera_inputs((4,), IN, OUT, R, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="needs in_features"):
        vk.ProjectionShard(in_offset=4)
    with pytest.raises(ValueError, match="in_offset"):
        vk.ProjectionShard(in_offset=-1, in_features=8)
    with pytest.raises(ValueError, match="in_features"):
        vk.ProjectionShard(in_features=0)
    with pytest.raises(ValueError, match="pass the full layer's in_features=40"):
        vk.vera_linear(x, d, b, SEED, shard=vk.ProjectionShard(in_offset=20, in_features=40))
    with pytest.raises(TypeError, match="ProjectionShard"):
        vk.vera_linear(x, d, b, SEED, shard=(0, 4, 0))
    sharded = vk.ProjectionShard(out_offset=8)
    with pytest.raises(ValueError, match="explicit projections"):
        vk.vera_linear(x, d, b, None, shard=sharded,
                       projections=(torch.zeros(R, IN), torch.zeros(OUT, R)))
    with pytest.raises(ValueError, match="dropout"):
        vk.vera_linear(x, d, b, SEED, shard=sharded, dropout=0.1)
    with pytest.raises(ValueError, match="counter range"):
        vk.vera_linear(x, d, b, SEED, shard=vk.ProjectionShard(out_offset=2**32 - OUT + 1))
    # The whole layer is no shard: accepted with everything.
    vk.vera_linear(x, d, b, SEED, shard=WHOLE, dropout=0.1)


def test_compiled_calls_keep_the_shard():
    # torch.compile traces the custom ops, whose shard travels as three ints.
    x, d, b, _ = vera_inputs((6,), IN, OUT, R, dtype=torch.float64, device="cpu")
    leaves = [t.requires_grad_() for t in (x, d, b)]
    shard = vk.ProjectionShard(in_offset=13, out_offset=7, in_features=50)

    def call(x, d, b):
        return vk.vera_linear(x, d, b, SEED, shard=shard, backend="torch")

    compiled = torch.compile(call, fullgraph=True)(*leaves)
    compiled.sum().backward()
    eager_leaves = [t.detach().requires_grad_() for t in leaves]
    eager = call(*eager_leaves)
    eager.sum().backward()
    assert torch.equal(compiled, eager)
    for got, want in zip(leaves, eager_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-12)
