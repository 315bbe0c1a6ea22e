#!/usr/bin/env bash
# Fetch the official SadTalker checkpoints (and the face-detector / enhancer weights) into a folder: the
# enhancers' files are GFPGANv1.4.pth, RestoreFormer.pth (--enhancer RestoreFormer, GFPGAN's v1.3.4 release) and
# RealESRGAN_x2plus.pth (--background_enhancer realesrgan, Real-ESRGAN's v0.2.1 release), 0.7 GB together.
#
#   bash scripts/download_models.sh [--legacy] [--pirender] [DIR]   # default DIR: checkpoints/ next to this repo
#
# --legacy also fetches the legacy per-network files that `--old_version` reads (auido2exp_00300-model.pth,
# auido2pose_00140-model.pth, facevid2vid_00189-model.pth.tar, epoch_20.pth; 0.85 GB), from the v0.0.2 release
# where upstream's download script listed them (upstream made SadTalker_V0.0.2_256.safetensors from them).
#
# --pirender also fetches PIRender's face model, epoch_00190_iteration_000400000_checkpoint.pt (`--facerender
# pirender`). Neither SadTalker nor PIRender publishes it at a stable direct link (PIRender's README points to a
# cloud-drive folder, result/face/), so give its address in XTALKER_PIRENDER_URL, or copy the file into DIR by hand.
#
# Needs internet access. Files already present are kept; each download goes to DIR/NAME.part and is
# renamed only when complete, so an interrupted run never leaves a truncated checkpoint behind.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
legacy=0
pirender=0
dest=""
for arg in "$@"; do
  case "$arg" in
    --legacy) legacy=1 ;;
    --pirender) pirender=1 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "error: unknown option $arg (known: --legacy, --pirender)" >&2; exit 2 ;;
    *) dest="$arg" ;;
  esac
done
dest="${dest:-$repo/checkpoints}"
mkdir -p "$dest"

sadtalker="https://github.com/OpenTalker/SadTalker/releases/download/v0.0.2-rc"
facexlib="https://github.com/xinntao/facexlib/releases/download"
gfpgan="https://github.com/TencentARC/GFPGAN/releases/download"
realesrgan="https://github.com/xinntao/Real-ESRGAN/releases/download"
legacy_release="https://github.com/Winfredy/SadTalker/releases/download/v0.0.2"  # upstream's legacy links

files=(
  "$sadtalker/SadTalker_V0.0.2_256.safetensors"
  "$sadtalker/SadTalker_V0.0.2_512.safetensors"
  "$sadtalker/mapping_00229-model.pth.tar"
  "$sadtalker/mapping_00109-model.pth.tar"
  "$facexlib/v0.1.0/detection_Resnet50_Final.pth"
  "$facexlib/v0.1.0/alignment_WFLW_4HG.pth"
  "$facexlib/v0.2.2/parsing_parsenet.pth"
  "$gfpgan/v1.3.0/GFPGANv1.4.pth"
  "$gfpgan/v1.3.4/RestoreFormer.pth"
  "$realesrgan/v0.2.1/RealESRGAN_x2plus.pth"
)
if [ "$legacy" = 1 ]; then
  files+=(
    "$legacy_release/auido2exp_00300-model.pth"
    "$legacy_release/auido2pose_00140-model.pth"
    "$legacy_release/facevid2vid_00189-model.pth.tar"
    "$legacy_release/epoch_20.pth"
  )
fi

pirender_name="epoch_00190_iteration_000400000_checkpoint.pt"
if [ "$pirender" = 1 ] && [ ! -s "$dest/$pirender_name" ]; then
  if [ -z "${XTALKER_PIRENDER_URL:-}" ]; then
    echo "error: --pirender: set XTALKER_PIRENDER_URL to the address of PIRender's $pirender_name (its README's" \
         "result/face/ download), or copy the file into $dest by hand" >&2
    exit 2
  fi
  files+=("$XTALKER_PIRENDER_URL")
fi

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
  [ "$url" = "${XTALKER_PIRENDER_URL:-}" ] && name="$pirender_name"
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
