"""Adapter dropout under torch.compile and CUDA graphs: the per-call seed is a device tensor.

Drawn with ``torch.randint`` on x's device inside the traced or captured
region, it is an ordinary op there: no graph break, no recompilation, and a
new mask per call or replay. Given the same seed tensor, compiled and eager
calls compute the same mask.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import vera_kernels as vk
from vera_kernels import call
from vera_kernels.dropout import draw_call_seed
from helpers import vera_inputs

SEED = 2**33 + 1
P = 0.25


def _training_layer(device="cpu", backend=None) -> vk.VeRALinear:
    torch.manual_seed(0)
    layer = vk.VeRALinear(24, 20, r=6, seed=SEED, dropout=P).to(device)
    layer.backend = backend
    with torch.no_grad():
        layer.vera_lambda_b.normal_()  # b = 0 would hide the adapter, and its mask, entirely
    return layer.train()


def _step(model, x: torch.Tensor, grad: torch.Tensor) -> list:
    """y and the gradients of x and the vectors after one forward and backward."""
    layer = model._orig_mod if hasattr(model, "_orig_mod") else model
    vectors = [layer.vera_lambda_d, layer.vera_lambda_b]
    for t in (x, *vectors):
        t.grad = None
    y = model(x)
    y.backward(grad)
    return [y.detach().clone()] + [t.grad.clone() for t in (x, *vectors)]


def test_compiled_layer_draws_a_new_mask_per_call_without_recompiling():
    torch._dynamo.reset()
    layer = _training_layer()  # the torch backend: CPU's default
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    x = torch.randn(7, 24, requires_grad=True)
    grad = torch.randn(7, 20)
    steps = [_step(compiled, x, grad) for _ in range(5)]
    assert counter.frame_count == 1, "recompiled"
    outputs = [step[0] for step in steps]
    for i, y in enumerate(outputs):
        assert all(not torch.equal(y, other) for other in outputs[i + 1:]), "a mask came back"
    layer.eval()  # no dropout: the same output every call (and one more graph)
    with torch.no_grad():
        assert torch.equal(compiled(x), compiled(x))


def test_compiled_call_matches_eager_for_the_same_seed_tensor():
    torch._dynamo.reset()

    def adapter(x, d, b, base, dropout_seed):
        return vk.vera_linear(x, d, b, SEED, base, backend="torch", dropout=P,
                              dropout_seed=dropout_seed)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(adapter, fullgraph=True, backend=counter)
    inputs = vera_inputs((9,), 29, 23, 6, dtype=torch.float64, device="cpu")
    grad = torch.randn(9, 23, dtype=torch.float64)
    results = []
    for _ in range(3):
        seed = draw_call_seed("cpu")
        for fn in (compiled, adapter):
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            y = fn(*leaves, seed)
            results.append([y, *torch.autograd.grad(y, leaves, grad)])
        for name, got, expected in zip(["y", "dx", "dd", "db", "dbase"], *results[-2:]):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)
    assert counter.frame_count == 1, "a new seed tensor recompiled"
    assert not torch.equal(results[0][0], results[2][0])  # another seed, another mask


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_cuda_graph_replays_draw_new_masks(backend, monkeypatch):
    if backend not in vk.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here")
    monkeypatch.setenv("VERA_KERNELS_TUNE", "0")  # no autotuner timing runs inside the capture
    layer = _training_layer("cuda", backend)
    x = torch.randn(33, 24, device="cuda", requires_grad=True)
    grad = torch.randn(33, 20, device="cuda")
    drawn = []  # the seed tensors the layer draws (inside the capture: the graph's)
    draw = call.draw_call_seed
    monkeypatch.setattr(call, "draw_call_seed",
                        lambda device: drawn.append(draw(device)) or drawn[-1])

    side = torch.cuda.Stream()  # warm-up (compilation, caches) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _step(layer, x, grad)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    vectors = [layer.vera_lambda_d, layer.vera_lambda_b]
    for t in (x, *vectors):
        t.grad = None  # allocated in the graph's pool, rewritten by each replay
    with torch.cuda.graph(graph):
        y = layer(x)
        y.backward(grad)
    seed = drawn[-1]

    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append((seed.clone(), [y.clone()] + [t.grad.clone() for t in (x, *vectors)]))
    assert not torch.equal(replays[0][0], replays[1][0]), "a replay drew the same seed"
    assert not torch.equal(replays[0][1][0], replays[1][1][0]), "a replay reused the mask"
    for replay_seed, got in replays:
        monkeypatch.setattr(call, "draw_call_seed", lambda device: replay_seed)
        expected = _step(layer, x, grad)
        for name, g, e in zip(["y", "dx", "dd", "db"], got, expected):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, msg=name)
