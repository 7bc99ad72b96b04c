"""One benchmark case, end to end: time every implementation, then turn the timings into rows."""

from __future__ import annotations

import torch

from ..function import vera_linear
from . import implementations as impl
from . import measure, report
from .cases import DTYPE_NAMES, Case

MODES = ("forward", "backward", "forward_backward")


def _trainable(layer) -> list:
    return [p for p in layer.parameters() if p.requires_grad]


class _Workload:
    """The layers of one case and the zero-argument callables that time them."""

    def __init__(self, case: Case, names: list):
        gen = torch.Generator().manual_seed(0)
        self.case = case
        self.x = torch.randn(case.tokens, case.in_features, generator=gen).to(case.device, case.dtype)
        self.grad = torch.randn(case.tokens, case.out_features, generator=gen).to(case.device,
                                                                                 case.dtype)
        self.x_train = self.x.clone().requires_grad_(True)  # inside a network, dx is needed too
        self.layers = {name: impl.make_layer(name, case) for name in names}
        self.inputs = {n: [self.x_train, *_trainable(layer)] for n, layer in self.layers.items()}

    def forward(self, name):
        def run():
            with torch.no_grad():
                return self.layers[name](self.x)
        return run

    def forward_backward(self, name):
        return lambda: torch.autograd.grad(self.layers[name](self.x_train), self.inputs[name],
                                           self.grad)

    def backward(self, name, outputs: dict):
        return lambda: torch.autograd.grad(outputs[name], self.inputs[name], self.grad,
                                           retain_graph=True)

    def adapter_forward(self, name, base_out):
        """Our adapter op alone, given the base output (what the roofline bounds)."""
        layer = self.layers[name]
        d, b = layer.vera_lambda_d.detach(), layer.vera_lambda_b.detach()
        return lambda: vera_linear(self.x, d, b, self.case.seed, base_out, backend=layer.backend)


def _time_modes(work: _Workload, names: list, reps: int) -> dict:
    """``{mode: {name: Timing}}`` for the three modes, implementations interleaved."""
    device = work.case.device
    outputs = {name: work.layers[name](work.x_train) for name in names}
    timings = {
        "forward": measure.time_interleaved({n: work.forward(n) for n in names}, device, reps=reps),
        "backward": measure.time_interleaved({n: work.backward(n, outputs) for n in names}, device,
                                             reps=reps),
        "forward_backward": measure.time_interleaved(
            {n: work.forward_backward(n) for n in names}, device, reps=reps),
    }
    outputs.clear()  # free the graphs kept for the backward timing
    return timings


def _time_adapters(work: _Workload, names: list, reps: int) -> dict:
    ours = [n for n in names if n.startswith("ours-")]
    if not ours or work.case.dora:  # the op alone is VeRA's; its roofline is not DVoRA's
        return {}
    with torch.no_grad():
        base_out = work.layers["base"](work.x)
    return measure.time_interleaved({n: work.adapter_forward(n, base_out) for n in ours},
                                    work.case.device, reps=reps)


def _row(name: str, work: _Workload, timings: dict, adapter: dict, bound: dict,
         base_saved: int) -> dict:
    case = work.case
    row = {
        "in_features": case.in_features, "out_features": case.out_features,
        "tokens": case.tokens, "r": case.r, "dtype": DTYPE_NAMES[case.dtype], "impl": name,
        "dropout": case.dropout,
        "dora": case.dora,
        "strategy": impl.strategy(name, case),
        "generation_int_ops": impl.generation_int_ops(name, case),
        "saved_bytes": measure.saved_activation_bytes(work.layers[name], work.x_train) - base_saved,
        "peak_bytes": measure.peak_training_bytes(work.forward_backward(name), case.device),
    }
    for mode in MODES:
        row[mode] = timings[mode][name].as_dict()
    mine = timings["forward_backward"][name].median
    for other in ("unfused", "peft"):
        if other in timings["forward_backward"] and name != other:
            row[f"speedup_vs_{other}"] = timings["forward_backward"][other].median / mine
            row[f"forward_speedup_vs_{other}"] = (
                timings["forward"][other].median / timings["forward"][name].median
            )
    if name != "base":
        base_t = timings["forward_backward"]["base"].median
        row["overhead_vs_base_pct"] = 100 * (mine - base_t) / base_t
    if name in adapter:
        t = adapter[name]
        row["adapter_forward"] = t.as_dict()
        row["adapter_GBps"] = bound["bytes"] / (t.median * 1e-3) / 1e9
        row["adapter_TFLOPps"] = bound["flops"] / (t.median * 1e-3) / 1e12
        if bound["bound_ms"] is not None:
            row["roofline_fraction"] = bound["bound_ms"] / t.median
    return row


def measure_case(case: Case, names: list, info: dict, reps: int) -> list:
    """One row per implementation for ``case`` (``names`` must include ``"base"``)."""
    work = _Workload(case, names)
    timings = _time_modes(work, names, reps)
    adapter = _time_adapters(work, names, reps)
    bound = report.roofline(case, info)
    base_saved = measure.saved_activation_bytes(work.layers["base"], work.x_train)
    return [_row(name, work, timings, adapter, bound, base_saved) for name in names]
