#!/usr/bin/env bash
# Everything GPU-side that can be verified, in one call on a lent GPU machine (no network; CPython 3.12 with a
# CUDA build of PyTorch): a virtualenv over the machine's PyTorch with the wheels `make gpu-wheels` put in
# gpu-wheels/ installed offline, compress installed from this tree, `pytest -m gpu`, and benchmarks/gpu.py.
# Each part has a time limit, and a part that fails or times out does not stop the later ones: every part
# writes its own file under $OUT, and summary.txt says what each part did, in what time, and what could
# not run at all (TensorRT). About 8 minutes at most (GPU_CHECK_SECONDS).
#
# Run from the repository root: bash benchmarks/gpu_check.sh        (docs/SERVING.md gives the device call)
# Writes to $OUT (default ./gpu-check): summary.txt, env.txt, install.log, pytest-gpu.log, junit-gpu.xml,
# gpu-benchmark.json, benchmark.log.

set -u
export PYTHONUNBUFFERED=1
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-check}"
WHEELS="${GPU_WHEELS:-$ROOT/gpu-wheels}"
VENV="${GPU_VENV:-/tmp/compress-gpu-venv}"
TOTAL="${GPU_CHECK_SECONDS:-470}"
STARTED=$(date +%s)
mkdir -p "$OUT"
: > "$OUT/summary.txt"

left() { echo $(( TOTAL - ($(date +%s) - STARTED) )); }

# part NAME CAP_SECONDS LOG COMMAND...: run COMMAND with at most min(CAP, time left), output appended to LOG,
# and one line in summary.txt: exit code (124: timed out) and seconds.
part() {
    local name=$1 cap=$2 log=$3 limit start rc
    shift 3
    limit=$(left)
    (( limit > cap )) && limit=$cap
    if (( limit < 10 )); then
        echo "$name: skipped, the check's ${TOTAL} s are spent" | tee -a "$OUT/summary.txt"
        return 1
    fi
    start=$(date +%s)
    echo "### $name (limit ${limit} s): $*" >> "$log"
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    local verdict="ok"
    (( rc == 124 || rc == 137 )) && verdict="TIMED OUT after ${limit} s" || { (( rc != 0 )) && verdict="FAILED"; }
    echo "$name: $verdict (exit $rc, $(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
    return $rc
}

# 1. What machine this is.
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "no nvidia-smi"
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
        "| CUDA", torch.version.cuda, "| GPU", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1
} > "$OUT/env.txt"

# 2. The virtualenv over the machine's PyTorch, and the wheels, offline.
PY=python3
if part "virtualenv" 60 "$OUT/install.log" python3 -m venv --system-site-packages "$VENV"; then
    PY="$VENV/bin/python"
fi
if [ -d "$WHEELS" ]; then
    part "wheels (resolved)" 120 "$OUT/install.log" "$PY" -m pip install --no-index --find-links "$WHEELS" \
        -r "$WHEELS/requirements.txt" \
    || part "wheels (one at a time, --no-deps)" 120 "$OUT/install.log" bash -c \
        'failed=0; for wheel in "${@:2}"; do "$1" -m pip install -q --no-index --no-deps "$wheel" || failed=1; done
         exit $failed' _ "$PY" $(ls "$WHEELS"/*.whl | grep -v '/pytest-')
    "$PY" -c 'import pytest' 2>/dev/null \
        || part "pytest (the image has none)" 60 "$OUT/install.log" "$PY" -m pip install --no-index \
            --find-links "$WHEELS" -r "$WHEELS/pytest.txt"
else
    echo "wheels: none ($WHEELS missing: run make gpu-wheels on the CPU machine and carry gpu-wheels)" \
        | tee -a "$OUT/summary.txt"
fi
# compress itself, from this tree; where the image's setuptools cannot build it, straight from the source.
part "compress (editable)" 90 "$OUT/install.log" "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . \
    || export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
{
    echo "### versions in the virtualenv"
    "$PY" -m pip check 2>&1
    "$PY" -c 'import importlib.metadata as m
for p in ("torch", "transformers", "onnx", "onnxruntime", "pydantic", "compressed-tensors", "triton", "tensorrt",
          "bitsandbytes", "pytest"):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, "not installed")' 2>&1
} >> "$OUT/env.txt"

# 3. What compress itself says this machine can run.
part "compress doctor" 60 "$OUT/env.txt" "$PY" -m compressor doctor --json

# 4. The GPU tests. Plugins of the image's pytest stay off: the tests need none, and one built for another
# pytest must not stop the run.
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 part "pytest -m gpu" 170 "$OUT/pytest-gpu.log" "$PY" -m pytest -m gpu -rs -q \
    -p no:cacheprovider --junitxml="$OUT/junit-gpu.xml" tests

# 5. The benchmark: it writes its JSON after every variant, so a timeout keeps what was measured.
BUDGET=$(( $(left) - 25 ))
part "benchmark" "$(( BUDGET + 15 ))" "$OUT/benchmark.log" "$PY" benchmarks/gpu.py --out "$OUT/gpu-benchmark.json" \
    --budget-s "$BUDGET"

# 6. What could not run here at all.
if "$PY" -c 'import tensorrt' 2>/dev/null; then
    echo "TensorRT: installed; its tests ran with pytest -m gpu above" >> "$OUT/summary.txt"
else
    echo "TensorRT: NOT RUN - the tensorrt package is not installed on this machine (it cannot be fetched here), so" \
         "build_engine, TensorRT engines and the minilm-sentiment-trt-* recipes were not executed; their tests" \
         "skipped" >> "$OUT/summary.txt"
fi
echo "total: $(( $(date +%s) - STARTED )) s of ${TOTAL} s" >> "$OUT/summary.txt"
tail -n 2 "$OUT/summary.txt"
[ -f "$OUT/gpu-benchmark.json" ] && tail -n 12 "$OUT/benchmark.log"

exit 0
