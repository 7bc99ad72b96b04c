"""pytest-benchmark suites for the vera-bench comparisons (not part of the default test run).

    pytest benchmarks/ --benchmark-group-by=param:case

Same implementations and cases as ``vera-bench``; pytest-benchmark adds its own
statistics, history (--benchmark-autosave) and comparisons (--benchmark-compare).
"""

import pytest
import torch

from vera_kernels import ops
from vera_kernels.bench import implementations as impl

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = {
    "cuda": [(4096, 4096, 8192, 256), (4096, 11008, 8192, 256), (11008, 4096, 8192, 256)],
    "cpu": [(1024, 1024, 1024, 64), (1024, 2816, 1024, 256)],
}[DEVICE.type]
IMPLS = ["base", "unfused"] + (["peft"] if impl.peft_available() else []) + [
    f"ours-{b}" for b in ops.available_backends(DEVICE) if not (DEVICE.type == "cpu" and b == "triton")
]


def _case_id(case):
    n_in, n_out, tokens, r = case
    return f"{n_in}x{n_out}-t{tokens}-r{r}"


@pytest.fixture(params=CASES, ids=_case_id)
def case(request):
    n_in, n_out, tokens, r = request.param
    return impl.Case(n_in, n_out, tokens, r, DTYPE, DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("name", IMPLS)
def test_forward(benchmark, case, name):
    layer = impl.make_layer(name, case)
    x = torch.randn(case.tokens, case.in_features, device=DEVICE, dtype=DTYPE)

    def run():
        with torch.no_grad():
            layer(x)
        _sync()

    benchmark(run)


@pytest.mark.parametrize("name", IMPLS)
def test_forward_backward(benchmark, case, name):
    layer = impl.make_layer(name, case)
    x = torch.randn(case.tokens, case.in_features, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad = torch.randn(case.tokens, case.out_features, device=DEVICE, dtype=DTYPE)
    inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]

    def run():
        torch.autograd.grad(layer(x), inputs, grad)
        _sync()

    benchmark(run)
