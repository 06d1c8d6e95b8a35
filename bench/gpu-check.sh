#!/usr/bin/env bash
# The prepared GPU run (issue 17). On a machine with one CUDA GPU, PyTorch with CUDA, CuPy and
# pytest installed, it runs, each step under its own time limit:
#   1. the CuPy backend's conformance suite;
#   2. the PyTorch backend's conformance suite on CUDA;
#   3. `normkit check` on cupy and numpy;
#   4. `normkit bench --backend cupy`: CuPy against PyTorch's CUDA ops and the device's peak
#      bandwidth.
# Logs, the GPU's name and the bench's JSON go to $OUT (default bench/results/gpu). Nothing is
# fetched: without normkit installed, it installs the wheels in .whl/ (build them here with
# `pip wheel --no-deps -w .whl . backends/cupy backends/torch`). Without a GPU, or with
# --dry-run, every GPU step is skipped with the reason, so the script runs end to end anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

if ! "$python" -c "import normkit, normkit_cupy, normkit_torch" 2>/dev/null && [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --target /tmp/normkit-site .whl/*.whl \
        && export PYTHONPATH="/tmp/normkit-site${PYTHONPATH:+:$PYTHONPATH}"
fi

reason=""
if [ "${1:-}" = "--dry-run" ]; then
    reason="--dry-run was given"
else
    reason="$("$python" - <<'PY'
try:
    import cupy
    if not cupy.is_available():
        print(f"no CUDA device (cupy.is_available() is False, CuPy {cupy.__version__})")
except Exception as error:
    print(f"no usable CuPy: {type(error).__name__}: {error}")
PY
)"
fi
note "normkit GPU check, $(date -u +%Y-%m-%dT%H:%MZ), $("$python" -c 'import normkit; print("normkit", normkit.__version__)')"
if [ -n "$reason" ]; then
    note "dry run: every GPU step skipped: $reason"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv >"$out/gpu.txt" 2>&1
"$python" - >>"$out/gpu.txt" 2>&1 <<'PY'
import cupy, torch, numpy
print("cupy", cupy.__version__, "torch", torch.__version__, "numpy", numpy.__version__, "cuda", torch.version.cuda)
PY
note "$(head -2 "$out/gpu.txt" | tail -1)"

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log it, note the verdict
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    note "$name: exit $rc in $((SECONDS - start)) s (limit $limit s): $(grep -E 'passed|failed|FAILED|Error' "$out/$name.log" | tail -1)"
}

step cupy-tests 170 bash -c "cd backends/cupy && $python -m pytest -q -p no:cacheprovider -rfE --normkit-xfails xfails.txt tests"
step torch-cuda-tests 150 bash -c "cd backends/torch && $python -m pytest -q -p no:cacheprovider -rfE --normkit-device cuda --normkit-xfails xfails.txt tests/test_conformance.py"
step check 60 "$python" -m normkit check --backend cupy --backend numpy
step bench 110 "$python" -m normkit bench --backend cupy --rounds 20 --json "$out/bench.json"
note "done in $SECONDS s"
