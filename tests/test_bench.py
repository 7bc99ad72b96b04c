"""vera-bench runs end to end (--quick), writes what it promises, and refuses bad values up front."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vera_kernels
from vera_kernels.bench import cases, cli, report
from vera_kernels.bench import implementations as impl, measure


def _vera_bench() -> list:
    # The console script next to this interpreter (installed by pip), else the module.
    script = Path(sys.executable).parent / "vera-bench"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vera_kernels.bench"]


def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=report.CHECKOUT, capture_output=True, text=True)


def test_quick_run_writes_json_and_plot(tmp_path):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TORCH_CUDA_ARCH_LIST")}
    env["VERA_KERNELS_PROJECTIONS"] = "generate"  # recorded; the torch backend ignores it
    proc = subprocess.run(
        [*_vera_bench(), "--quick", "--device", "cpu", "--json", str(json_path), "--plot", str(plot_path),
         "--reps", "3"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ours-torch" in proc.stdout and "[1/1]" in proc.stderr
    # The table fits 120 columns on a CPU, without the columns only a GPU fills.
    assert max(len(line) for line in proc.stdout.splitlines()) <= 120
    header = next(line for line in proc.stdout.splitlines() if line.split()[:1] == ["shape"])
    assert "x unfused" in header and "A/B from" in header
    assert not any(name in header for name in report.GPU_COLUMNS)

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

    # What else the numbers depend on.
    assert doc["vera_kernels"] == vera_kernels.__version__
    assert doc["reps"] == 3
    assert doc["environment"] == {k: env[k] for k in report.BEHAVIOUR_ENV if k in env}
    assert doc["environment"]["VERA_KERNELS_PROJECTIONS"] == "generate"
    try:
        assert doc["peft"] == importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        assert doc["peft"] is None
    if _git("rev-parse", "HEAD").returncode == 0:  # a checkout (others may commit meanwhile)
        assert re.fullmatch("[0-9a-f]{40}", doc["git_commit"])
        assert _git("cat-file", "-e", f"{doc['git_commit']}^{{commit}}").returncode == 0
    else:
        assert doc["git_commit"] is None


def test_git_commit_only_of_this_package_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "CHECKOUT", tmp_path / "pkg")
    (tmp_path / "pkg").mkdir()
    assert report._git_commit() is None  # no repository at all
    # An installed copy inside some other project's repository.
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    if subprocess.run([*git, "init", "-q"]).returncode != 0:
        pytest.skip("git is not available")
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "other"], check=True)
    assert report._git_commit() is None
    monkeypatch.setattr(report, "CHECKOUT", tmp_path)
    assert re.fullmatch("[0-9a-f]{40}", report._git_commit())


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


@pytest.fixture
def no_timing(monkeypatch):
    """Fails a test that gets as far as timing a case."""
    def measure_case(*args):
        raise AssertionError("timed a case despite a bad argument")
    monkeypatch.setattr(cli, "measure_case", measure_case)


def _usage_error(argv, capsys) -> str:
    """main(argv)'s error message; asserts it is argparse's one line and exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("vera-bench: error: ")]
    return line


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "0"], "argument --tokens: expected a positive integer, got '0'"),
    (["--tokens", "-64"], "argument --tokens: expected a positive integer, got '-64'"),
    (["--ranks", "8,x"], "argument --ranks: expected a positive integer, got 'x'"),
    (["--ranks", ","], "argument --ranks: expected a comma-separated list, got ','"),
    (["--reps", "0"], "argument --reps: expected a positive integer, got '0'"),
    (["--shapes", "4096"], "argument --shapes: shapes are INxOUT with positive integers"),
    (["--shapes", "ax4"], "got 'ax4'"),
    (["--shapes", "4096x"], "got '4096x'"),
    (["--shapes", "64x64,0x16"], "got '0x16'"),
    (["--dtypes", "fp8"], "unknown dtypes ['fp8']"),
    (["--seed", "-1"], "argument --seed: seeds are integers in [0, 2**64)"),
    (["--device", "cpu", "--backends", "nope"], "unknown backend 'nope'"),
    (["--device", "cpu", "--backends", "torch,cuda"], "backend 'cuda' cannot run on cpu: "),
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
])
def test_bad_values_are_one_line_errors_before_any_timing(argv, message, capsys, no_timing):
    assert message in _usage_error(argv, capsys)


def test_cuda_device_without_a_gpu(monkeypatch, capsys, no_timing):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: no CUDA device is available" in _usage_error(["--device", "cuda"], capsys)


@pytest.mark.parametrize("where, message", [
    ("missing/out", "directory {tmp}/missing does not exist"),
    ("", "{tmp}: is a directory"),
])
@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_output_paths_are_checked_before_the_run(flag, where, message, tmp_path, capsys, no_timing):
    path = tmp_path / where
    argv = ["--quick", "--device", "cpu", flag, str(path)]
    line = _usage_error(argv, capsys)
    assert f"{flag} {path}: " in line and message.format(tmp=tmp_path) in line


def test_unwritable_output_path(monkeypatch, tmp_path, capsys, no_timing):
    # Permissions do not bind root, so os.access reports the directory read-only.
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    argv = ["--quick", "--device", "cpu", "--backends", "torch", "--json", str(tmp_path / "out.json")]
    assert "not writable" in _usage_error(argv, capsys)


def test_plot_without_matplotlib(monkeypatch, tmp_path, capsys, no_timing):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec("matplotlib") -> None
    argv = ["--quick", "--device", "cpu", "--plot", str(tmp_path / "out.png")]
    assert "--plot needs matplotlib" in _usage_error(argv, capsys)


def test_help_shows_each_preset_grid_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for name, (shapes, tokens, ranks, dtypes) in cases.PRESETS.items():
        grid = re.search(rf"^  {name} \(.*\n(    .*\n)+", out, re.MULTILINE)[0]  # its indented lines
        assert all(f"{n_in}x{n_out}" in grid for n_in, n_out in shapes), name
        assert f"tokens {', '.join(map(str, tokens))}; ranks {', '.join(map(str, ranks))}" in grid
        assert f"dtypes {', '.join(dtypes)}" in grid
    assert "examples:\n  vera-bench --quick" in out and "--wide" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vera-bench {vera_kernels.__version__}"


def _row(**overrides) -> dict:
    """A table row with values as wide as a long CPU run gives."""
    timing = {"median_ms": 1234.5678, "p20_ms": 1000.0, "p80_ms": 9000.0}
    row = {"in_features": 11008, "out_features": 4096, "tokens": 16384, "r": 1024, "dtype": "bf16",
           "impl": "ours-torch", "forward": timing, "backward": timing, "forward_backward": timing,
           "speedup_vs_unfused": 12.345, "speedup_vs_peft": 12.345, "overhead_vs_base_pct": 1234.5,
           "saved_bytes": 1234 * 2**20, "peak_bytes": None, "adapter_GBps": 12.3,
           "adapter_TFLOPps": 0.123, "strategy": "cached A, B"}
    return {**row, **overrides}


def test_table_fits_120_columns_on_cpu_and_wide_shows_all():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    narrow = report.columns(cpu)
    for line in (report.table_header(narrow), report.table_row(_row(), narrow)):
        assert len(line) <= report.TABLE_WIDTH, line
    # Small, noisy timings: 3 significant digits, the spread capped at 99%.
    fast = {"median_ms": 0.0123456, "p20_ms": 0.001, "p80_ms": 0.1}
    line = report.table_row(_row(forward_backward=fast, backward=_row()["forward"]),
                            report.columns(cpu, wide=True))
    assert "0.0123±99%" in line and "1235±99%" in line
    assert [name for name, _ in report.columns(cpu, wide=True)] == [name for name, _ in report.COLUMNS]
    assert report.columns(cuda, wide=True) == report.COLUMNS
    # On CUDA too, with the GPU columns filled and the longest strategy name.
    gpu_row = _row(peak_bytes=123456 * 2**20, roofline_fraction=0.999, impl="ours-triton",
                   strategy="Philox, workspace")
    for line in (report.table_header(report.columns(cuda)),
                 report.table_row(gpu_row, report.columns(cuda))):
        assert len(line) <= report.TABLE_WIDTH, line
    assert "%roof" in report.table_header(report.columns(cuda))
    wide_header = report.table_header(report.columns(cpu, wide=True))
    assert all(name in wide_header for name in report.GPU_COLUMNS)
    assert not any(name in report.table_header(narrow) for name in report.GPU_COLUMNS)


def test_serve_mode_writes_rows_for_every_point(tmp_path):
    from vera_kernels.bench import cli

    path = tmp_path / "serve.json"
    assert cli.main(["--serve", "--device", "cpu", "--tokens", "5", "--adapters", "1,3",
                     "--reps", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["tokens"], r["adapters"]) for r in rows] == [(5, 1), (5, 3)]
    for row in rows:
        assert row["backend"] == "torch"
        assert row["bank_bytes"] == row["adapters"] * (row["r"] + row["out_features"]) * 4
        for way in ("mixed", "single", "loop", "base"):
            assert row[way]["median_ms"] > 0
        assert row["mixed_over_single"] == pytest.approx(
            row["mixed"]["median_ms"] / row["single"]["median_ms"])


def test_dropout_rows_keep_ours_lean(tmp_path):
    from vera_kernels.bench import cli

    path = tmp_path / "dropout.json"
    assert cli.main(["--quick", "--device", "cpu", "--dropout", "0.1", "--reps", "1",
                     "--json", str(path)]) == 0
    rows = {r["impl"]: r for r in json.loads(path.read_text())["results"]}
    assert all(r["dropout"] == 0.1 for r in rows.values())
    # Quick case: 64 tokens, 96 -> 80, r = 8, fp32. Ours keeps h and the mask's seed (two
    # int64 key words: the mask is regenerated); the unfused layer also keeps the dropped
    # input and the mask.
    assert rows["ours-torch"]["saved_bytes"] == 64 * 8 * 4 + 2 * 8
    assert rows["unfused"]["saved_bytes"] >= 64 * 8 * 4 + 64 * 96 * 4


def test_dora_rows_compare_dvora_with_peft_lora_dora_and_vera(tmp_path):
    from vera_kernels.bench import cli

    path = tmp_path / "dora.json"
    argv = ["--quick", "--device", "cpu", "--dora", "--reps", "1", "--json", str(path)]
    if not impl.peft_available():
        argv.append("--no-peft")
    assert cli.main(argv) == 0
    rows = {r["impl"]: r for r in json.loads(path.read_text())["results"]}
    assert {"base", "unfused", "ours-torch", "vera-torch"} <= set(rows)
    assert all(r["dora"] for r in rows.values())
    # Quick case: 64 tokens, 96 -> 80, r = 8, fp32. DVoRA keeps h, the base output (for
    # the magnitude's gradient) and three vectors of out (s, n, s ⊙ b); VeRA h alone;
    # DoRA's unfused way x, h, d ⊙ h and more.
    assert rows["ours-torch"]["saved_bytes"] == 64 * 8 * 4 + 64 * 80 * 4 + 3 * 80 * 4
    assert rows["vera-torch"]["saved_bytes"] == 64 * 8 * 4
    assert rows["unfused"]["saved_bytes"] > rows["ours-torch"]["saved_bytes"]
    if "peft" in rows:
        assert rows["peft"]["saved_bytes"] > rows["ours-torch"]["saved_bytes"]
