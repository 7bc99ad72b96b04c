"""pytest-benchmark suites for the vera-bench comparisons (not part of the default test run).

    pytest benchmarks/ --benchmark-group-by=param:case

Same implementations and cases as ``vera-bench``; pytest-benchmark adds its own
statistics, history (--benchmark-autosave) and comparisons (--benchmark-compare).
"""

import pytest
import torch

from vera_kernels import backends as ops
from vera_kernels.bench import cases, implementations as impl

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The vera-bench preset's cases for this device, at its largest token count.
_PRESET = cases.PRESETS[cases.preset_for(DEVICE)]
CASES = [c for c in cases.grid(cases.preset_for(DEVICE), DEVICE, dtypes=_PRESET[3][:1])
         if c.tokens == max(_PRESET[1]) and c.r in (64, 256)]
IMPLS = ["base", "unfused"] + (["peft"] if impl.peft_available() else []) + [
    f"ours-{b}" for b in ops.available_backends(DEVICE) if not (DEVICE.type == "cpu" and b == "triton")
]


@pytest.fixture(params=CASES, ids=cases.describe)
def case(request):
    return request.param


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("name", IMPLS)
def test_forward(benchmark, case, name):
    layer = impl.make_layer(name, case)
    x = torch.randn(case.tokens, case.in_features, device=DEVICE, dtype=case.dtype)

    def run():
        with torch.no_grad():
            layer(x)
        _sync()

    benchmark(run)


@pytest.mark.parametrize("name", IMPLS)
def test_forward_backward(benchmark, case, name):
    layer = impl.make_layer(name, case)
    x = torch.randn(case.tokens, case.in_features, device=DEVICE, dtype=case.dtype,
                    requires_grad=True)
    grad = torch.randn(case.tokens, case.out_features, device=DEVICE, dtype=case.dtype)
    inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]

    def run():
        torch.autograd.grad(layer(x), inputs, grad)
        _sync()

    benchmark(run)
