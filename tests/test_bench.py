"""vera-bench runs end to end (--quick) and writes what it promises."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vera_kernels.bench import implementations as impl, measure


def _vera_bench() -> list:
    # The console script next to this interpreter (installed by pip), else the module.
    script = Path(sys.executable).parent / "vera-bench"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vera_kernels.bench"]


def test_quick_run_writes_json_and_plot(tmp_path):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [*_vera_bench(), "--quick", "--device", "cpu", "--json", str(json_path), "--plot", str(plot_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ours-torch" in proc.stdout and "[1/1]" in proc.stderr

    doc = json.loads(json_path.read_text())
    assert doc["device_type"] == "cpu" and doc["device_name"]
    assert doc["torch"] == torch.__version__
    assert doc["command"].startswith("vera-bench --quick")
    impls = {row["impl"] for row in doc["results"]}
    assert {"base", "unfused", "ours-torch"} <= impls
    for row in doc["results"]:
        for mode in ("forward", "backward", "forward_backward"):
            t = row[mode]
            assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
    ours = next(r for r in doc["results"] if r["impl"] == "ours-torch")
    unfused = next(r for r in doc["results"] if r["impl"] == "unfused")
    # Quick case: 64 tokens, 96 -> 80, r = 8, fp32. We keep h (64 x 8 floats);
    # the unfused layer keeps h and the 64 x 80 product as well.
    assert ours["saved_bytes"] == 64 * 8 * 4
    assert unfused["saved_bytes"] >= 64 * 8 * 4 + 64 * 80 * 4
    assert ours["speedup_vs_unfused"] == pytest.approx(
        unfused["forward_backward"]["median_ms"] / ours["forward_backward"]["median_ms"]
    )
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_bytes_count_activations_not_parameters():
    case = impl.Case(16, 12, 10, 4, torch.float32, torch.device("cpu"))
    x = torch.randn(10, 16, requires_grad=True)
    assert measure.saved_activation_bytes(impl.make_layer("base", case), x) == 0
    assert measure.saved_activation_bytes(impl.make_layer("ours-torch", case), x) == 10 * 4 * 4


def test_bad_arguments_are_reported():
    proc = subprocess.run(
        [*_vera_bench(), "--dtypes", "fp8"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "unknown dtypes ['fp8']" in proc.stderr
