"""ONNX export (vera_kernels.onnx_export): the dynamo exporter with VeRA's translation table,
the result run in onnxruntime on CPU against the PyTorch forward."""

import pytest
import torch
from torch import nn

import vera_kernels as vk
from helpers import EPS, assert_close_scaled

_NEEDS = ("ONNX export needs onnx, onnxscript and onnxruntime "
          "(pip install onnx onnxscript onnxruntime)")
pytest.importorskip("onnx", reason=_NEEDS)
pytest.importorskip("onnxscript", reason=_NEEDS)
ort = pytest.importorskip("onnxruntime", reason=_NEEDS)

from vera_kernels.onnx_export import (  # noqa: E402
    DROPOUT_EXPORT_ERROR, export_onnx, onnx_translation_table)
from vera_kernels.projection import projection  # noqa: E402

SEED = 2**40 + 3  # both Philox key words non-zero
TOL = 16 * EPS[torch.float32]


def _vera(in_features, out_features, r=4, seed=SEED):
    """A VeRALinear whose adapter path matters (lambda_b starts at zero)."""
    layer = vk.VeRALinear(in_features, out_features, r, seed=seed)
    with torch.no_grad():
        layer.vera_lambda_d.normal_()
        layer.vera_lambda_b.normal_()
    return layer



def _run(program, tmp_path, *inputs):
    """The saved program's outputs from onnxruntime on CPU."""
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feed)]


def _vera_initializers(graph) -> dict:
    return {name: value for name, value in graph.initializers.items() if name.startswith("vera_")}


def test_export_runs_in_onnxruntime_and_shares_projections(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(_vera(16, 16), _vera(16, 16), _vera(16, 8)).eval()
    x = torch.randn(2, 5, 16)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                custom_translation_table=onnx_translation_table())
    (actual,) = _run(program, tmp_path, x)
    with torch.no_grad():
        assert_close_scaled(actual, model(x), TOL, "onnxruntime vs PyTorch")

    graph = program.model.graph
    custom = {(node.domain, node.op_type) for node in graph if node.domain not in ("", "ai.onnx")}
    assert not custom, f"custom-domain nodes left in the graph: {custom}"
    # One A (every layer is 4 x 16) and one B per output size, each an exact spec matrix.
    projections = _vera_initializers(graph)
    a_name = f"vera_A_4x16_seed{SEED}_float"
    b_names = {(16, 4): f"vera_B_16x4_seed{SEED}_float", (8, 4): f"vera_B_8x4_seed{SEED}_float"}
    assert set(projections) == {a_name, *b_names.values()}
    assert len(projections[a_name].uses()) == 3
    assert len(projections[b_names[16, 4]].uses()) == 2  # the two 16 -> 16 layers
    for matrix, shape, name in [("A", (4, 16), a_name),
                                *(("B", shape, name) for shape, name in b_names.items())]:
        stored = torch.from_numpy(projections[name].const_value.numpy())
        assert torch.equal(stored, projection(matrix, *shape, SEED)), name


def test_no_grad_mlp_with_dynamic_batch(tmp_path):
    # Under no_grad eager VeRALinear adds into the base output in place; the exported
    # graph must take the functional op, which the table translates.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 16), _vera(16, 16, r=8), nn.ReLU(), _vera(16, 3, r=8))
    model.eval()
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = export_onnx(model, (torch.randn(4, 12),), dynamic_shapes=({0: batch},),
                              verbose=False)
        for rows in (1, 7):
            x = torch.randn(rows, 12)
            (actual,) = _run(program, tmp_path, x)
            assert_close_scaled(actual, model(x), TOL, f"batch {rows}")


class _Banks(nn.Module):
    """Three adapters sharing one seed, chosen per token (-1: none)."""

    def __init__(self):
        super().__init__()
        self.d_bank = nn.Parameter(torch.randn(3, 4))
        self.b_bank = nn.Parameter(torch.randn(3, 6))

    def forward(self, x, adapter_ids, base):
        return vk.vera_linear_multi(x, self.d_bank, self.b_bank, adapter_ids, SEED, base,
                                    check_ids=False)


def test_adapter_banks_gather_each_tokens_vectors(tmp_path):
    torch.manual_seed(2)
    model = _Banks().eval()
    x, base = torch.randn(6, 8), torch.randn(6, 6)
    ids = torch.tensor([0, 2, -1, 1, 2, -1], dtype=torch.int32)
    program = export_onnx(model, (x, ids, base), verbose=False)
    (actual,) = _run(program, tmp_path, x, ids, base)
    with torch.no_grad():
        assert_close_scaled(actual, model(x, ids, base), TOL, "banks")


class _ScaledBanks(_Banks):
    """DVoRA's scaled base (a scale row per adapter, a bias) and a column-parallel shard."""

    def __init__(self):
        super().__init__()
        self.scale_bank = nn.Parameter(torch.rand(3, 6) + 0.5)
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x, adapter_ids, base):
        return vk.vera_linear_multi(x, self.d_bank, self.b_bank, adapter_ids, SEED, base,
                                    check_ids=False, base_scale=self.scale_bank,
                                    base_bias=self.bias, shard=vk.ProjectionShard(out_offset=5))


def test_dvora_layers_and_shards_export(tmp_path):
    torch.manual_seed(4)
    layer = vk.VeRALinear(12, 10, 4, seed=SEED, use_dora=True)
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
        layer.vera_magnitude.mul_(torch.rand(10) + 0.5)
    x = torch.randn(3, 12)
    (actual,) = _run(export_onnx(layer.eval(), (x,), verbose=False), tmp_path, x)
    with torch.no_grad():
        assert_close_scaled(actual, layer(x), TOL, "DVoRA layer")
    model = _ScaledBanks().eval()
    x, base = torch.randn(6, 8), torch.randn(6, 6)
    ids = torch.tensor([0, 2, -1, 1, 2, -1], dtype=torch.int32)
    (actual,) = _run(export_onnx(model, (x, ids, base), verbose=False), tmp_path, x, ids, base)
    with torch.no_grad():
        assert_close_scaled(actual, model(x, ids, base), TOL, "scaled banks, shard")


class _Explicit(nn.Module):
    """Explicit projections (as PEFT stores them) instead of a seed."""

    def __init__(self):
        super().__init__()
        self.lambda_d = nn.Parameter(torch.randn(4))
        self.lambda_b = nn.Parameter(torch.randn(6))
        self.register_buffer("proj_a", torch.randn(4, 8))
        self.register_buffer("proj_b", torch.randn(6, 4))

    def forward(self, x):
        return vk.vera_linear(x, self.lambda_d, self.lambda_b, None,
                              projections=(self.proj_a, self.proj_b))


def test_explicit_projections_are_used_as_given(tmp_path):
    torch.manual_seed(3)
    model = _Explicit().eval()
    x = torch.randn(2, 3, 8)
    program = export_onnx(model, (x,), verbose=False)
    (actual,) = _run(program, tmp_path, x)
    with torch.no_grad():
        assert_close_scaled(actual, model(x), TOL, "explicit projections")
    assert not _vera_initializers(program.model.graph)  # nothing generated from a seed


def test_dropout_names_the_limitation():
    # VeRALinear in training mode draws its mask seed on the host, which torch.export
    # refuses before any translation; vera_linear's explicit mask seed reaches the table.
    class Dropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lambda_d, self.lambda_b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(8))

        def forward(self, x):
            return vk.vera_linear(x, self.lambda_d, self.lambda_b, SEED, dropout=0.1,
                                  dropout_seed=7)

    with pytest.raises(torch.onnx.OnnxExporterError) as error:
        export_onnx(Dropped().eval(), (torch.randn(3, 8),), verbose=False)
    assert DROPOUT_EXPORT_ERROR in str(error.value)


def test_export_without_the_table_fails():
    # Why the table is needed: the exporter has no translation of the custom op.
    model = nn.Sequential(_vera(8, 8)).eval()
    with pytest.raises(torch.onnx.OnnxExporterError, match="No ONNX function found for "
                       r".*vera_kernels\.vera_forward"):
        torch.onnx.export(model, (torch.randn(3, 8),), dynamo=True, verbose=False)
