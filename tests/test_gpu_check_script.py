"""scripts/gpu_check.sh fits a lent GPU machine and records every step (no GPU needed).

The script is meant for a borrowed machine: ~15 minutes in all, its start
included, and 8 files back from the output folder (16 MiB each, at most two
folders deep). Here every Python call goes to a stub interpreter that logs
its arguments and writes what the real command would (junit files, JSONs,
plots), except the report script, which runs for real: what is checked is the
orchestration (steps, order, caps, budget, --only, signals) and what comes
back.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ["env", "install", "tile_sweep", "pytest_gpu", "driver_check", "bench", "serve", "dora",
         "decode_generate", "decode_workspace"]
MAX_FILES, MAX_BYTES = 8, 16 * 2**20  # what a lent machine brings back
NAME = re.compile(r"^[A-Za-z0-9._-]+$")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

STUB = """#!/usr/bin/env bash
echo "TUNE=${VERA_KERNELS_TUNE:-} PROJECTIONS=${VERA_KERNELS_PROJECTIONS:-} $*" >> "$STUB_LOG"
case "$1" in scripts/gpu_check_report.py) exec "$REAL_PYTHON" "$@" ;; esac
if [ -n "${STUB_HANG:-}" ] && [[ "$*" == *"$STUB_HANG"* ]]; then
    trap 'echo "got SIGINT" >> "$STUB_LOG"; exit 2' INT
    trap 'echo "got SIGTERM" >> "$STUB_LOG"; exit 3' TERM
    sleep 60 & wait
fi
previous=
for arg in "$@"; do
    case "$arg" in
        --junitxml=*)
            printf '<testsuite><testcase classname="t" name="test_a[triton-cuda-bfloat16]"/>%s</testsuite>' \\
                '<testcase classname="t" name="test_b[cuda-float32]"><failure message="boom"/></testcase>' \\
                > "${arg#--junitxml=}" ;;
    esac
    case "$previous" in
        --json) echo '{"checked": 3, "not_ok": 0, "rows": []}' > "$arg" ;;
        --plot) printf 'PNG' > "$arg" ;;
    esac
    previous=$arg
done
exit 0
"""


def _run(tmp_path, *args, budget=None, hang=None, timeout=120):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(stub), STUB_LOG=str(log), REAL_PYTHON=sys.executable)
    if budget is not None:
        env["GPU_CHECK_BUDGET"] = str(budget)
    if hang is not None:
        env["STUB_HANG"] = hang
    proc = subprocess.run(["bash", str(SCRIPT), *args, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    results = json.loads((out / "results.json").read_text())
    return proc, out, results, log.read_text().splitlines()


def _plan():
    lines = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    rows = [line.split("\t") for line in lines]
    return {name: (int(seconds), kind) for name, seconds, kind in rows}


def test_the_caps_fit_the_budget_and_a_rerun_fits_three_minutes():
    plan = _plan()
    budget, reserve = plan.pop("budget")[0], plan.pop("reserve")[0]
    steps = {name: cap for name, (cap, kind) in plan.items() if kind == "step"}
    assert list(steps) == STEPS
    assert budget <= 300 and sum(steps.values()) + reserve <= budget  # the whole run <= 5 minutes
    assert all(cap <= budget for cap, kind in plan.values() if kind == "background")
    # --only reruns one step (env and install again: a retry may be a fresh machine).
    for name in STEPS[2:]:
        assert steps["env"] + steps["install"] + steps[name] + reserve <= 180, name


def test_every_step_runs_in_order_and_at_most_eight_files_come_back(tmp_path):
    proc, out, results, calls = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    order = [s["step"] for s in results["steps"]]
    assert [s for s in order if s in STEPS] == STEPS
    assert set(order) - set(STEPS) == {"build_cuda", "warm"}  # the background jobs
    assert order.index("build_cuda") < order.index("pytest_gpu")  # the tests wait for the build
    assert order.index("warm") < order.index("driver_check")  # the driver check for the prediction
    assert all(s["rc"] == "0" for s in results["steps"])
    files = list(out.rglob("*"))
    assert all(f.is_file() for f in files) and len(files) <= MAX_FILES
    assert all(NAME.match(f.name) and f.stat().st_size <= MAX_BYTES for f in files)
    assert {f.name for f in files} == {"summary.txt", "results.json", "logs.tar.gz", "bench.png",
                                       "serve.png"}
    with tarfile.open(out / "logs.tar.gz") as tar:
        packed = {Path(name).name for name in tar.getnames()}
    assert {f"{name}.log" for name in STEPS} <= packed
    assert {"pytest_gpu.xml", "tile_sweep.xml", "compile_check.json", "bench.json",
            "dora.json"} <= packed
    # The report reads the junit files: totals, failures by name, tallies per backend / dtype.
    assert results["pytest_gpu"]["totals"] == {"passed": 1, "failed": 1}
    assert results["pytest_gpu"]["failing"] == [{"test": "t::test_b[cuda-float32]",
                                                 "message": "boom"}]
    assert results["pytest_gpu"]["by_backend_dtype"] == {"triton/bf16": {"passed": 1},
                                                         "cuda/fp32": {"failed": 1}}
    assert results["driver_check"]["checked"] == 3
    assert "pytest_gpu" in (out / "summary.txt").read_text()
    # What each step ran.
    assert any("-m pip install --no-deps --no-build-isolation --no-index -e ." in c for c in calls)
    # pytest through a wrapper that makes SIGINT a KeyboardInterrupt whatever the parent did
    pytest = "signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main("
    assert any(c.startswith("TUNE=0 ") and pytest in c and " -m gpu -q" in c
               and "--ignore=tests/test_tile_sweep.py" in c and " -n " in c for c in calls)
    assert any(pytest in c and "tests/test_tile_sweep.py -m gpu" in c for c in calls)
    assert any("setup.py -q build_ext --inplace" in c for c in calls)
    assert any("--dora --device cuda" in c and "dora.json" in c for c in calls)
    assert any("compile_check.py --arch 90" in c and "--variants plain banked dropout dora" in c
               and "--launchable-only" in c for c in calls)
    assert any("--against-driver" in c and "--dtypes bf16" in c for c in calls)
    for strategy in ("generate", "workspace"):
        assert any(f"PROJECTIONS={strategy} -m vera_kernels.bench" in c and "--device cuda" in c
                   for c in calls)


def test_only_runs_the_chosen_steps(tmp_path):
    proc, out, results, calls = _run(tmp_path, "--only", "tile_sweep")
    assert proc.returncode == 0
    # env and install run again (a retry may land on a fresh machine); the sweep
    # needs neither the CUDA extension nor the compile check's warm-up.
    assert [s["step"] for s in results["steps"]] == ["env", "install", "tile_sweep"]
    assert not any("vera_kernels.bench" in c or "compile_check.py" in c or "setup.py" in c
                   for c in calls)
    proc, out, results, calls = _run(tmp_path, "--only", "pytest_gpu,bench")
    assert [s["step"] for s in results["steps"]] == ["env", "install", "build_cuda", "pytest_gpu",
                                                     "warm", "bench"]
    bad = subprocess.run(["bash", str(SCRIPT), "--only", "nonsense", str(tmp_path / "x")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "steps: env install" in bad.stderr


def test_pytest_is_stopped_with_sigint_so_that_it_writes_its_results(tmp_path):
    # Budget: env, install and the sweep take no time here; pytest_gpu gets the
    # 10 s floor and is stopped then.
    proc, out, results, calls = _run(tmp_path, "--only", "pytest_gpu", budget=21,
                                     hang="--ignore=tests/test_tile_sweep.py", timeout=90)
    assert "got SIGINT" in calls and "got SIGTERM" not in calls
    rows = {s["step"]: s["rc"] for s in results["steps"]}
    assert rows["pytest_gpu"] == "124" and proc.returncode == 1  # timeout(1)'s "timed out"


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    proc, out, results, _ = _run(tmp_path, budget=5)
    rows = [(s["step"], s["rc"]) for s in results["steps"] if s["step"] in STEPS]
    assert [name for name, _ in rows] == STEPS
    assert all(rc == "125" for _, rc in rows)  # under 10 s left: nothing starts
    assert proc.returncode == 1 and (out / "summary.txt").exists()
