"""scripts/gpu_check.sh runs its steps in order and records each one (no GPU needed).

The script is meant for a borrowed GPU machine, where a broken step costs the
run: here every Python call goes to a stub interpreter that logs its
arguments, so what is checked is the orchestration: the steps, their order,
their exit codes and logs, the time budget, the summary.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ["env", "install", "nvidia_smi", "pytest_gpu", "compile_check", "driver_check", "bench",
         "serve", "decode_generate", "decode_workspace"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

STUB = """#!/usr/bin/env bash
echo "VERA_KERNELS_PROJECTIONS=${VERA_KERNELS_PROJECTIONS:-} $*" >> "$STUB_LOG"
case "$*" in *--help*) echo "--serve --adapters" ;; esac
exit 0
"""


def _run(tmp_path, budget=None):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(stub), STUB_LOG=str(log))
    if budget is not None:
        env["GPU_CHECK_BUDGET"] = str(budget)
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    return proc, out, rows, log.read_text().splitlines()


def test_every_step_runs_in_order_and_is_recorded(tmp_path):
    proc, out, rows, calls = _run(tmp_path)
    assert [r[0] for r in rows] == STEPS
    for name, rc, _ in rows:
        assert (out / f"{name}.log").exists() and (out / f"{name}.rc").read_text().strip() == rc
    rcs = dict((r[0], r[1]) for r in rows)
    # The stub writes no compile_check.json, so the driver check is skipped, and
    # a skipped step makes the whole run report failure.
    assert rcs["driver_check"] == "125" and proc.returncode == 1
    assert all(rcs[name] == "0" for name in ("pytest_gpu", "bench", "serve", "decode_generate"))
    assert (out / "summary.txt").read_text().startswith("gpu_check.sh:")
    assert any("-m pytest -m gpu" in c for c in calls)
    assert any("-m pip install --no-deps --no-build-isolation -e ." in c for c in calls)
    for strategy in ("generate", "workspace"):
        assert any(c.startswith(f"VERA_KERNELS_PROJECTIONS={strategy} -m vera_kernels.bench")
                   and "--device cuda" in c for c in calls)


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    proc, out, rows, _ = _run(tmp_path, budget=5)
    assert [r[0] for r in rows] == STEPS
    assert all(rc == "125" for _, rc, _ in rows)  # under 10 s left: nothing starts
    assert "time budget" in (out / "bench.log").read_text() and proc.returncode == 1
