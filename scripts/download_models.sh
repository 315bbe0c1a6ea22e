#!/usr/bin/env bash
# Fetch the official SadTalker checkpoints (and the face-detector / enhancer weights) into a folder.
#
#   bash scripts/download_models.sh [DIR]        # default: checkpoints/ next to this script's repo
#
# Needs internet access. Files already present are kept; each download goes to DIR/NAME.part and is
# renamed only when complete, so an interrupted run never leaves a truncated checkpoint behind.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo/checkpoints}"
mkdir -p "$dest"

sadtalker="https://github.com/OpenTalker/SadTalker/releases/download/v0.0.2-rc"
facexlib="https://github.com/xinntao/facexlib/releases/download"
gfpgan="https://github.com/TencentARC/GFPGAN/releases/download"

files=(
  "$sadtalker/SadTalker_V0.0.2_256.safetensors"
  "$sadtalker/SadTalker_V0.0.2_512.safetensors"
  "$sadtalker/mapping_00229-model.pth.tar"
  "$sadtalker/mapping_00109-model.pth.tar"
  "$facexlib/v0.1.0/detection_Resnet50_Final.pth"
  "$facexlib/v0.1.0/alignment_WFLW_4HG.pth"
  "$facexlib/v0.2.2/parsing_parsenet.pth"
  "$gfpgan/v1.3.0/GFPGANv1.4.pth"
)

fetch() {
  if command -v curl >/dev/null 2>&1; then
    curl -fL --retry 3 -o "$2" "$1"
  elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$2" "$1"
  else
    echo "error: neither curl nor wget is installed; install one of them and run again" >&2
    exit 1
  fi
}

for url in "${files[@]}"; do
  name="${url##*/}"
  if [ -s "$dest/$name" ]; then
    echo "have $name"
    continue
  fi
  echo "downloading $name"
  if ! fetch "$url" "$dest/$name.part"; then
    rm -f "$dest/$name.part"
    echo "error: could not download $url (no internet access?); copy $name into $dest by hand" >&2
    exit 1
  fi
  mv "$dest/$name.part" "$dest/$name"
done
echo "checkpoints are in $dest"
