#!/usr/bin/env bash
# One command for a CUDA machine without network (torch, triton, peft, pytest
# preinstalled):
#
#     scripts/gpu_check.sh OUTDIR
#
# installs the checkout (pip install --no-deps --no-build-isolation -e .), then
# runs, each step with its log (OUTDIR/<step>.log) and exit code
# (OUTDIR/<step>.rc), going on after failures:
#
#   env             versions, commit, the device
#   install         the editable install (builds the CUDA extension for this GPU's arch)
#   nvidia_smi      nvidia-smi -q: device facts
#   compile_check   scripts/compile_check.py --arch <this GPU's> --quick (CPU only,
#                   in the background while pytest runs): the predicted registers,
#                   spills, shared memory, wgmma serialization (compile_check.json)
#   pytest_gpu      python -m pytest -m gpu (junit: pytest_gpu.xml)
#   driver_check    the kernels the autotuner really compiled and picked on this GPU:
#                   registers / local / shared memory the driver reports against the
#                   prediction (driver_check.json)
#   bench           vera-bench on a reduced GPU grid (bench.json, bench.png)
#   serve           vera-bench --serve on a reduced grid, if the CLI has --serve
#   decode_generate, decode_workspace
#                   vera-bench (triton only) at decode token counts with each
#                   projection strategy forced (VERA_KERNELS_PROJECTIONS): the data
#                   that sets where `auto` switches (decode_<strategy>.json); last,
#                   so a tight GPU_CHECK_BUDGET skips these first
#
# and a summary (OUTDIR/summary.txt). Every step runs under a timeout and the
# whole run under GPU_CHECK_BUDGET seconds (default 345, i.e. under 6 minutes):
# a step that would start with less than 10 s left is skipped (rc 125).
# Exit status: 0 when every step exited 0, else 1. PYTHON picks the interpreter.
set -u

if [ "$#" -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd) || exit 2
REPO=$(cd "$(dirname "$0")/.." && pwd) || exit 2
cd "$REPO" || exit 2

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${GPU_CHECK_BUDGET:-345}
START=$SECONDS
STEPS="$OUT/steps.tsv"
printf 'step\trc\tseconds\n' > "$STEPS"

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME CAP_SECONDS COMMAND...: run COMMAND with a timeout of min(CAP, time left).
step() {
    local name=$1 cap=$2
    shift 2
    local limit
    limit=$(left)
    if [ "$cap" -lt "$limit" ]; then limit=$cap; fi
    if [ "$limit" -lt 10 ]; then
        echo "skipped: the time budget (${BUDGET}s) is spent" > "$OUT/$name.log"
        echo 125 > "$OUT/$name.rc"
        printf '%s\t%s\t%s\n' "$name" 125 0 >> "$STEPS"
        echo "== $name: skipped (time budget spent)"
        return 0
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    if declare -F "$1" > /dev/null; then # a function of this script: no timeout(1) for it
        "$@" > "$OUT/$name.log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    fi
    rc=$?
    echo "$rc" > "$OUT/$name.rc"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "   timed out after ${limit}s"
    fi
    tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
}

# shellcheck disable=SC2317  # called through step
env_facts() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    git status --short 2>/dev/null | sed 's/^/  changed: /'
    echo "python: $PYTHON"
    "$PYTHON" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "peft", "pytest", "transformers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "unavailable:", error)
import torch
print("cuda available:", torch.cuda.is_available(), "torch cuda:", torch.version.cuda)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability:", torch.cuda.get_device_capability())
EOF
    command -v nvcc > /dev/null && nvcc --version | tail -n 2
    nproc
}

# The GPU's arch, for the extension build and the compile check (default sm_90).
CAP=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' \
      2> /dev/null | tail -n 1)
case "$CAP" in
    [0-9].[0-9] | [0-9][0-9].[0-9]) ;;
    *) CAP=9.0 ;;
esac
ARCH=${CAP/./}
case "$ARCH" in
    80 | 90) ;;
    *) ARCH=90 ;; # compile_check knows sm_80 and sm_90 only
esac
JOBS=$(nproc 2> /dev/null || echo 4)
CC_JOBS=$((JOBS > 2 ? JOBS / 2 : 1))

step env 20 env_facts
step install 110 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$CAP}" MAX_JOBS="$JOBS" \
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
step nvidia_smi 20 nvidia-smi -q

# The compile check needs only CPUs: it runs while pytest does.
CC_T0=$SECONDS
CC_LIMIT=$(left)
if [ "$CC_LIMIT" -gt 200 ]; then CC_LIMIT=200; fi
CC_PID=
if [ "$CC_LIMIT" -lt 10 ]; then # as step() does
    echo "skipped: the time budget (${BUDGET}s) is spent" > "$OUT/compile_check.log"
    echo 125 > "$OUT/compile_check.rc"
    echo "== compile_check: skipped (time budget spent)"
else
    echo "== compile_check (background, limit ${CC_LIMIT}s)"
    (
        timeout --kill-after=10 "$CC_LIMIT" "$PYTHON" scripts/compile_check.py --arch "$ARCH" \
            --quick --jobs "$CC_JOBS" --json "$OUT/compile_check.json" \
            > "$OUT/compile_check.log" 2>&1
        echo $? > "$OUT/compile_check.rc"
    ) &
    CC_PID=$!
fi

step pytest_gpu 100 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml"

if [ -n "$CC_PID" ]; then wait "$CC_PID"; fi
printf '%s\t%s\t%s\n' compile_check "$(cat "$OUT/compile_check.rc" 2> /dev/null || echo '?')" \
    "$((SECONDS - CC_T0))" >> "$STEPS"
tail -n 3 "$OUT/compile_check.log" | sed 's/^/   /'

if [ -s "$OUT/compile_check.json" ]; then
    step driver_check 60 "$PYTHON" scripts/compile_check.py \
        --against-driver "$OUT/compile_check.json" --dtypes bf16 fp32 --tokens 8192 \
        --json "$OUT/driver_check.json"
else
    echo "skipped: compile_check.json was not written (see compile_check.log)" \
        > "$OUT/driver_check.log"
    echo 125 > "$OUT/driver_check.rc"
    printf '%s\t%s\t%s\n' driver_check 125 0 >> "$STEPS"
fi

step bench 90 "$PYTHON" -m vera_kernels.bench --device cuda \
    --shapes 4096x4096,4096x11008 --tokens 2048,8192 --ranks 256 --dtypes bf16 \
    --json "$OUT/bench.json" --plot "$OUT/bench.png"

if "$PYTHON" -m vera_kernels.bench --help 2> /dev/null | grep -q -- '--serve'; then
    step serve 45 "$PYTHON" -m vera_kernels.bench --serve --device cuda \
        --tokens 4096 --adapters 1,16,256 --json "$OUT/serve.json" --plot "$OUT/serve.png"
else
    echo "skipped: vera-bench has no --serve" > "$OUT/serve.log"
    echo 0 > "$OUT/serve.rc"
    printf '%s\t%s\t%s\n' serve "skipped(no --serve)" 0 >> "$STEPS"
fi

# Where generating A / B in the kernel beats the per-launch workspace is a
# GPU question (generation runs on as few SMs as the launch has programs):
# the same decode cases under each strategy, side by side.
for strategy in generate workspace; do
    step "decode_$strategy" 30 env VERA_KERNELS_PROJECTIONS="$strategy" \
        "$PYTHON" -m vera_kernels.bench --device cuda --backends triton --no-peft \
        --shapes 4096x4096 --tokens 16,256 --ranks 256 --dtypes bf16 \
        --json "$OUT/decode_$strategy.json"
done

{
    echo "gpu_check.sh: $((SECONDS - START))s in all (budget ${BUDGET}s), outputs in $OUT"
    column -t -s "$(printf '\t')" "$STEPS" 2> /dev/null || cat "$STEPS"
    if [ -f "$OUT/pytest_gpu.log" ]; then
        echo "pytest: $(grep -E '(passed|failed|error|skipped)' "$OUT/pytest_gpu.log" | tail -n 1)"
    fi
    if [ -f "$OUT/compile_check.log" ]; then
        echo "compile check: $(grep -E 'records from' "$OUT/compile_check.log" | tail -n 1)"
    fi
    if [ -f "$OUT/driver_check.log" ]; then
        echo "driver check: $(grep -E 'pairs checked|skipped' "$OUT/driver_check.log" | tail -n 1)"
    fi
} | tee "$OUT/summary.txt"

STATUS=0
while IFS=$(printf '\t') read -r name rc _; do
    [ "$name" = step ] && continue
    case "$rc" in
        0 | "skipped(no --serve)") ;;
        *) STATUS=1 ;;
    esac
done < "$STEPS"
exit "$STATUS"
