#!/usr/bin/env bash
# Everything a lent GPU must show, in one call sized for it (no network needed):
#
#     scripts/gpu_check.sh OUTDIR                       # every step, <= GPU_CHECK_BUDGET s
#     scripts/gpu_check.sh --only pytest_gpu,bench OUTDIR   # chosen steps (env, install too)
#     scripts/gpu_check.sh --plan                       # the steps and their caps (TSV)
#
# A lent machine gives ~15 minutes in all, its start included, and brings back
# 8 files from OUTDIR (16 MiB each, at most two folders deep). So the run has a
# budget (GPU_CHECK_BUDGET, default 290 s), every step a cap (STEPS below; the
# caps add up to no more than the budget), and OUTDIR receives 5 files:
#
#   summary.txt    the steps with exit codes and seconds, the test and check totals
#   results.json   the same, with the failing tests by name, per-backend / dtype
#                  tallies, the driver check and the benchmark numbers
#                  (scripts/gpu_check_report.py)
#   bench.png, serve.png   the plots, when those steps ran
#   logs.tar.gz    everything else: each step's log, the junit files, the
#                  compile check's prediction, the driver check, the benchmark JSONs
#
# summary.txt, results.json and logs.tar.gz are rewritten after every step, so a
# run cut short still brings back what it did. The steps, in this order (a step
# that would start with under 10 s of the budget left is skipped, rc 125):
#
#   env            versions, commit, the device
#   install        pip install --no-deps --no-build-isolation --no-index -e . without the
#                  CUDA build; on failure (an old setuptools) the checkout runs from
#                  PYTHONPATH, which is set either way
#   tile_sweep     tests/test_tile_sweep.py: every tile the autotuner may pick, every
#                  epilogue, bf16 and fp32, both strategies (compiles ahead on all cores)
#   pytest_gpu     pytest -m gpu (the rest), VERA_KERNELS_TUNE=0 (one tile per launch,
#                  no timing runs), across pytest-xdist workers when it is installed
#   driver_check   the registers / local / shared memory the driver reports for the
#                  autotuner's configs against the compile check's prediction
#   bench          Llama-7B projections, 8192 tokens, r 256, bf16: fused vs unfused vs PEFT
#   serve          1 / 16 / 256 adapters in one batch
#   dora           vera-bench --dora: DVoRA vs PEFT's LoRA DoRA vs our VeRA, 4096x4096,
#                  8192 tokens, r 256, bf16
#   decode_generate, decode_workspace
#                  each projection strategy forced at decode token counts
#
# and two background jobs started after install, at a lower priority: build_cuda
# (the CUDA extension for this GPU's arch, setup.py build_ext --inplace; if that
# cannot build, the cuda backend's JIT build, cached where later steps find it) and warm (scripts/compile_check.py for
# this arch: every kernel variant the later steps launch, plain, adapter banks,
# dropout and DVoRA's scaled base, compiled into Triton's cache; its records are the prediction the
# driver check compares with). pytest_gpu waits for build_cuda, driver_check for
# warm. pytest is stopped with SIGINT at its cap (30 s to finish), so it still
# writes its junit file and summary. Exit status: 0 when every step that ran exited 0, else 1.
# PYTHON picks the interpreter (default python3).
set -u

# name cap_seconds: the foreground steps, in order. The caps add up to
# BUDGET - RESERVE (the report and packing after each step).
STEPS="env 15
install 12
tile_sweep 65
pytest_gpu 55
driver_check 30
bench 32
serve 20
dora 14
decode_generate 15
decode_workspace 17"
BUDGET=${GPU_CHECK_BUDGET:-290}
RESERVE=10
BUILD_CAP=150 # background jobs: they end before the steps that wait for them
WARM_CAP=150

usage() {
    echo "usage: $0 [--only STEP,...] OUTDIR | --plan" >&2
    echo "steps: $(echo "$STEPS" | cut -d' ' -f1 | tr '\n' ' ')" >&2
    exit 2
}

ONLY=
case "${1:-}" in
    --plan) # what tests/test_gpu_check_script.py checks: name, seconds, kind
        printf 'budget\t%s\ttotal\nreserve\t%s\ttotal\n' "$BUDGET" "$RESERVE"
        printf 'build_cuda\t%s\tbackground\nwarm\t%s\tbackground\n' "$BUILD_CAP" "$WARM_CAP"
        echo "$STEPS" | awk '{ printf "%s\t%s\tstep\n", $1, $2 }'
        exit 0
        ;;
    --only)
        [ "$#" -eq 3 ] || usage
        ONLY=",$2,"
        for name in $(echo "$2" | tr ',' ' '); do
            echo "$STEPS" | cut -d' ' -f1 | grep -qx "$name" || usage
        done
        shift 2
        ;;
esac
[ "$#" -eq 1 ] || usage
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd) || exit 2
REPO=$(cd "$(dirname "$0")/.." && pwd) || exit 2
cd "$REPO" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
START=$SECONDS
printf 'step\trc\tseconds\n' > "$WORK/steps.tsv"

left() { echo $((BUDGET - RESERVE - (SECONDS - START))); }
cap_of() { echo "$STEPS" | awk -v n="$1" '$1 == n { print $2 }'; }
wanted() { [ -z "$ONLY" ] || [ "$1" = env ] || [ "$1" = install ] || case "$ONLY" in *",$1,"*) true ;; *) false ;; esac; }

# summary.txt, results.json and logs.tar.gz from what WORK holds now.
report() {
    {
        echo "gpu_check.sh: $((SECONDS - START))s so far (budget ${BUDGET}s)${ONLY:+, only $ONLY}"
        column -t -s "$(printf '\t')" "$WORK/steps.tsv" 2> /dev/null || cat "$WORK/steps.tsv"
        for name in tile_sweep pytest_gpu; do
            [ -f "$WORK/$name.log" ] &&
                echo "$name: $(grep -E '[0-9]+ (passed|failed|error)' "$WORK/$name.log" | tail -n 1)"
        done
        [ -f "$WORK/driver_check.log" ] &&
            echo "driver check: $(grep -E 'pairs checked|skipped' "$WORK/driver_check.log" | tail -n 1)"
    } > "$OUT/summary.txt"
    "$PYTHON" scripts/gpu_check_report.py "$WORK" "$OUT/results.json" > "$WORK/report.log" 2>&1
    for plot in bench.png serve.png; do
        [ -f "$WORK/$plot" ] && cp "$WORK/$plot" "$OUT/$plot"
    done
    # Background jobs may be writing: tar then exits 1 ("file changed"), which is fine.
    tar --warning=no-file-changed -czf "$OUT/logs.tar.gz.part" -C "$WORK" . 2> /dev/null
    if [ $? -le 1 ]; then mv -f "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"; else rm -f "$OUT/logs.tar.gz.part"; fi
}

record() { # name rc seconds
    echo "$2" > "$WORK/$1.rc"
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$WORK/steps.tsv"
}

# step NAME COMMAND...: run COMMAND with a timeout of min(its cap, time left).
# TIMEOUT_SIGNAL picks the signal (pytest: INT, so that it writes its results)
# and KILL_AFTER how long the command has to end after it (default 10 s).
step() {
    local name=$1
    shift
    wanted "$name" || return 0
    local limit cap
    limit=$(left)
    cap=$(cap_of "$name")
    if [ "$cap" -lt "$limit" ]; then limit=$cap; fi
    if [ "$limit" -lt 10 ]; then
        echo "skipped: the time budget (${BUDGET}s) is spent" > "$WORK/$name.log"
        record "$name" 125 0
        echo "== $name: skipped (time budget spent)"
        report
        return 0
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    if declare -F "$1" > /dev/null; then # a function of this script: it keeps to STEP_LIMIT
        STEP_LIMIT=$limit "$@" > "$WORK/$name.log" 2>&1
    else
        timeout -s "${TIMEOUT_SIGNAL:-TERM}" --kill-after="${KILL_AFTER:-10}" "$limit" "$@" \
            > "$WORK/$name.log" 2>&1
    fi
    rc=$?
    record "$name" "$rc" "$((SECONDS - t0))"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "   timed out after ${limit}s"; fi
    tail -n 3 "$WORK/$name.log" | sed 's/^/   /'
    report
}

# background NAME CAP COMMAND...: start COMMAND (a function of this script too), at a
# lower priority than the steps, with its log and rc in WORK.
background() {
    local name=$1 cap=$2
    shift 2
    echo "== $name (background, limit ${cap}s): $*"
    if declare -F "$1" > /dev/null; then
        export -f "$1"
        set -- bash -c "$(printf '%q ' "$@")"
    fi
    (
        t0=$SECONDS
        timeout --kill-after=10 "$cap" nice -n 10 "$@" > "$WORK/$name.log" 2>&1
        rc=$?
        echo "$rc" > "$WORK/$name.rc"
        printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" > "$WORK/$name.row"
    ) &
    eval "PID_$name=$!"
}

# await NAME: wait for a background job (it is bounded by its own cap).
await() {
    local pid
    eval "pid=\${PID_$1:-}"
    [ -n "$pid" ] || return 0
    wait "$pid"
    cat "$WORK/$1.row" >> "$WORK/steps.tsv" 2> /dev/null
    eval "PID_$1="
}

# shellcheck disable=SC2317  # called through step
env_facts() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2> /dev/null || echo unknown)"
    git status --short 2> /dev/null | sed 's/^/  changed: /'
    echo "python: $PYTHON"
    timeout $((STEP_LIMIT - 2)) "$PYTHON" - << 'EOF'
import importlib.metadata, platform
print("python", platform.python_version())
for name in ("torch", "triton", "peft", "pytest", "pytest-xdist", "transformers", "setuptools"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "not installed")
import torch
print("cuda available:", torch.cuda.is_available(), "torch cuda:", torch.version.cuda)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability:", torch.cuda.get_device_capability())
EOF
    command -v nvcc > /dev/null && nvcc --version | tail -n 2
    command -v nvidia-smi > /dev/null && nvidia-smi -q > "$WORK/nvidia_smi.txt" 2>&1
    echo "cpus: $(nproc)"
}

# shellcheck disable=SC2317  # called through step
install_package() {
    # The checkout runs from PYTHONPATH either way; the install adds the package's
    # metadata and console script. The CUDA extension builds in the background.
    if VERA_KERNELS_BUILD_CUDA=0 timeout "$STEP_LIMIT" "$PYTHON" -m pip install --no-deps \
        --no-build-isolation --no-index -e .; then
        echo "installed (editable)"
    else
        echo "install failed: running from the checkout on PYTHONPATH=$REPO"
    fi
}

# build_cuda: the extension for this GPU (setup.py; if that cannot build, e.g. an
# old setuptools, the cuda backend's JIT build, cached where the later steps look).
# shellcheck disable=SC2317  # run through background
build_extension() {
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$CAP}" VERA_KERNELS_BUILD_CUDA=1 \
        "$PYTHON" setup.py -q build_ext --inplace && return 0
    echo "setup.py could not build the extension: JIT-building it (TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR)"
    "$PYTHON" -c 'from vera_kernels.backends import cuda; cuda.load(); print("JIT build ok")'
}

# This GPU's arch (default sm_90): the extension build and the compile check.
CAP=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' \
      2> /dev/null | tail -n 1)
case "$CAP" in
    [0-9].[0-9] | [0-9][0-9].[0-9]) ;;
    *)
        echo "warning: $PYTHON could not tell the GPU's capability (no torch, or no GPU): assuming 9.0"
        CAP=9.0
        ;;
esac
JOBS=$(nproc 2> /dev/null || echo 4)
HALF=$((JOBS > 2 ? JOBS / 2 : 1))
export CAP PYTHON WORK TORCH_EXTENSIONS_DIR="$WORK/torch_extensions" MAX_JOBS="$HALF"
ARCH=${CAP/./}
case "$ARCH" in
    80 | 86 | 89 | 90) ;;
    *) ARCH=90 ;; # the archs compile_check knows
esac

step env env_facts
step install install_package

if wanted pytest_gpu || wanted bench || wanted serve; then # the sweep is Triton's alone
    background build_cuda "$BUILD_CAP" build_extension
fi
if wanted driver_check || wanted bench || wanted serve || wanted decode_generate \
    || wanted decode_workspace; then
    background warm "$WARM_CAP" "$PYTHON" scripts/compile_check.py --arch "$ARCH" \
        --dtypes bf16 --shapes 4096x4096 --tokens 8192 --variants plain banked dropout dora \
        --launchable-only --no-cuda --jobs "$HALF" --json "$WORK/compile_check.json"
fi

# pytest with SIGINT turned into KeyboardInterrupt even where the machine started this
# script with SIGINT ignored (Python then installs no handler): stopped at its cap, it
# still writes its junit file and summary.
PYTEST=(-c 'import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))')
TIMEOUT_SIGNAL=INT KILL_AFTER=30 step tile_sweep "$PYTHON" "${PYTEST[@]}" tests/test_tile_sweep.py \
    -m gpu -q -p no:cacheprovider --junitxml="$WORK/tile_sweep.xml"

await build_cuda
XDIST=()
if "$PYTHON" -c 'import xdist' 2> /dev/null; then XDIST=(-n "$HALF"); fi
TIMEOUT_SIGNAL=INT KILL_AFTER=30 step pytest_gpu env VERA_KERNELS_TUNE=0 "$PYTHON" "${PYTEST[@]}" \
    -m gpu -q -p no:cacheprovider --ignore=tests/test_tile_sweep.py ${XDIST[@]+"${XDIST[@]}"} \
    --junitxml="$WORK/pytest_gpu.xml"

await warm
if [ -s "$WORK/compile_check.json" ] || ! wanted driver_check; then
    step driver_check "$PYTHON" scripts/compile_check.py --against-driver "$WORK/compile_check.json" \
        --dtypes bf16 --shapes 4096x4096 --tokens 8192 --json "$WORK/driver_check.json"
else
    echo "skipped: the compile check wrote no prediction (see warm.log)" > "$WORK/driver_check.log"
    record driver_check 125 0
fi

step bench "$PYTHON" -m vera_kernels.bench --device cuda \
    --shapes 4096x4096,4096x11008,11008x4096 --tokens 8192 --ranks 256 --dtypes bf16 \
    --json "$WORK/bench.json" --plot "$WORK/bench.png"
step serve "$PYTHON" -m vera_kernels.bench --serve --device cuda --tokens 4096 \
    --adapters 1,16,256 --json "$WORK/serve.json" --plot "$WORK/serve.png"
step dora "$PYTHON" -m vera_kernels.bench --dora --device cuda --shapes 4096x4096 --tokens 8192 \
    --ranks 256 --dtypes bf16 --json "$WORK/dora.json"
# Where generating A / B in the kernel beats the per-launch workspace is a GPU
# question: the decode sizes under each strategy, side by side.
for strategy in generate workspace; do
    step "decode_$strategy" env VERA_KERNELS_PROJECTIONS="$strategy" "$PYTHON" -m vera_kernels.bench \
        --device cuda --backends triton --no-peft --shapes 4096x4096 --tokens 16,64,256,1024 \
        --ranks 256 --dtypes bf16 --json "$WORK/decode_$strategy.json"
done

await build_cuda
await warm
report
cat "$OUT/summary.txt"
STATUS=0
while IFS=$(printf '\t') read -r name rc _; do
    [ "$name" = step ] && continue
    [ "$rc" = 0 ] || STATUS=1
done < "$WORK/steps.tsv"
rm -rf "$WORK"
exit "$STATUS"
