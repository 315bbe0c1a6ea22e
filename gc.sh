#!/usr/bin/env bash
# Remove finished or stale XTalker job folders: ./gc.sh [--all] [--older-than HOURS] [--dry-run] [--jobs-dir DIR]
# Runs from any directory, with this checkout's .venv when it has one.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$repo/.venv/bin/python"
[ -x "$py" ] || py=python3
# a checkout that was never `pip install`ed still finds its package
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m xtalker.parallel.gc "$@"
