"""The optional restorers in the finish stage: RealESRGAN x2plus as GFPGANer's background upsampler, and
RestoreFormer as the face restorer (`--enhancer RestoreFormer`).

- `BackgroundUpsampler`: upstream's `bg_upsampler.enhance(img, outscale=2)[0]` (RealESRGANer, tile 400, tile_pad 10,
  pre_pad 0) on the whole BGR frame, then the paste canvas at the output size (LANCZOS4, which at equal size is an
  exact copy). Pass it as `background` to `finish.enhance.enhance_detected`: faces are pasted on it instead of on
  the Lanczos upscale; a frame without faces comes out as the RealESRGAN image. Upstream (SadTalker) only builds
  the upsampler when CUDA is available (on CPU `--background_enhancer realesrgan` does nothing); whether to follow
  that is the caller's decision.
- `StillBackground`: the same for frames that are one still picture outside a box (the full modes): the picture is
  upscaled once per video and only the box region per frame.
- `RestoreFormerRestorer`: same call as `finish.enhance.Restorer` (aligned BGR crops and (frame, face) keys ->
  restored crops), RestoreFormer through its fast plan. It draws no noise, so the keys do not matter.

Precision: "fp32" matches the golden cases; any other value runs RestoreFormer's decoder and the RRDBNet in bf16
(RestoreFormer's encoder and codebook lookup stay fp32; see `models.restoreformer`, `models.rrdbnet`). "int8" does
too: measured, int8 costs RestoreFormer's decoder time and the RRDBNet fidelity (`finish.int8`); should
`finish.int8.ENHANCER_INT8` say otherwise, they run as int8 graphs compiled once and cached in `cache_dir`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from xtalker.finish.int8 import WHOLE_FRAME_MAX_SIDE, enhancer_precision, int8_restoreformer, int8_rrdbnet
from xtalker.models.rrdbnet import SADTALKER_PRE_PAD, SADTALKER_TILE, SADTALKER_TILE_PAD, RealESRGANer, RRDBNet
from xtalker.warm import network_key, shared


class BackgroundUpsampler:
    """`(frame_bgr_u8, (out_w, out_h)) -> canvas` for `enhance_detected(background=...)` (see the module docstring)."""

    def __init__(self, path: Path | None = None, precision: str = "fp32", device: str = "cpu",
                 tile: int = SADTALKER_TILE, tile_pad: int = SADTALKER_TILE_PAD, pre_pad: int = SADTALKER_PRE_PAD,
                 net: RRDBNet | None = None, cache_dir: Path | None = None):
        from xtalker.models.rrdbnet import load_rrdbnet

        if net is None:
            if path is None:
                raise ValueError("BackgroundUpsampler needs the RealESRGAN_x2plus.pth path or a loaded network")
            net = shared("realesrgan_x2plus", network_key(path, device),
                         lambda: load_rrdbnet(path).to(torch.device(device)))
        self.precision = enhancer_precision("realesrgan", precision, device)
        run = None
        if self.precision == "int8":
            max_side = tile + 2 * tile_pad if tile else WHOLE_FRAME_MAX_SIDE
            run = int8_rrdbnet(net, max_side, cache_dir)
        # The int8 graph runs the tiles that fit it, the bf16 network the others.
        self.upsampler = RealESRGANer(net, tile, tile_pad, pre_pad, "fp32" if self.precision == "fp32" else "bf16", run)

    def upsample(self, frame_bgr: np.ndarray) -> np.ndarray:
        """RealESRGANer.enhance(frame, outscale=scale): (2H, 2W, 3) BGR uint8."""
        return self.upsampler.enhance(frame_bgr).image

    def __call__(self, frame_bgr: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
        return paste_canvas(self.upsample(frame_bgr), size_wh)


class StillBackground:
    """The background of frames that are one still picture except inside `box` (the full modes after paste-back):
    the picture goes through RealESRGAN once; per frame only the box, with `margin` pixels of context on each side
    (a tile's pad), and its upscale replaces that part of the canvas. Same call as `BackgroundUpsampler`."""

    def __init__(self, upsampler: BackgroundUpsampler, picture_bgr: np.ndarray, box: tuple[int, int, int, int],
                 margin: int = SADTALKER_TILE_PAD):
        self.upsampler, self.box, self.margin = upsampler, box, margin
        self.shape = picture_bgr.shape
        self.canvas = upsampler.upsample(picture_bgr)
        self.scale = self.canvas.shape[0] // picture_bgr.shape[0]

    def __call__(self, frame_bgr: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
        if frame_bgr.shape != self.shape:
            raise ValueError(f"frame is {frame_bgr.shape}, the still background is {self.shape}")
        h, w = self.shape[:2]
        y1, y2, x1, x2 = self.box
        if y2 <= y1 or x2 <= x1:
            return paste_canvas(self.canvas, size_wh)
        # The region is cut at even offsets so its 2x output lands on whole canvas pixels.
        ry1, rx1 = max(0, y1 - self.margin) // 2 * 2, max(0, x1 - self.margin) // 2 * 2
        ry2, rx2 = min(h, y2 + self.margin), min(w, x2 + self.margin)
        up = self.upsampler.upsample(frame_bgr[ry1:ry2, rx1:rx2])
        s = self.scale
        canvas = self.canvas.copy()
        canvas[y1 * s : y2 * s, x1 * s : x2 * s] = up[(y1 - ry1) * s : (y2 - ry1) * s, (x1 - rx1) * s : (x2 - rx1) * s]
        return paste_canvas(canvas, size_wh)


def paste_canvas(upsampled: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """The upsampled frame at the paste size: upstream resizes it with LANCZOS4, an exact copy at equal size."""
    if (upsampled.shape[1], upsampled.shape[0]) == tuple(size_wh):
        return upsampled
    return cv2.resize(upsampled, tuple(size_wh), interpolation=cv2.INTER_LANCZOS4)


class RestoreFormerRestorer:
    """RestoreFormer on aligned 512 BGR crops, a drop-in for `finish.enhance.Restorer`."""

    def __init__(self, path: Path, precision: str = "fp32", device: str = "cpu", cache_dir: Path | None = None):
        from xtalker.models.restoreformer import load_restoreformer

        self.device = torch.device(device)
        self.net = shared("restoreformer", network_key(path, device), lambda: load_restoreformer(path).to(self.device))
        self.precision = enhancer_precision("restoreformer", precision, device)
        self.int8 = int8_restoreformer(self.net, cache_dir) if self.precision == "int8" else None

    def __call__(self, crops: np.ndarray, keys: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        from xtalker.models.gfpgan import postprocess_to_bgr_u8, preprocess_bgr_u8
        from xtalker.models.restoreformer import SIZE, restore_bgr_u8

        if self.int8 is None:
            return restore_bgr_u8(self.net, crops, self.precision)
        if len(crops) == 0:
            return np.zeros((0, SIZE, SIZE, 3), np.uint8)
        return postprocess_to_bgr_u8(self.int8.restore(preprocess_bgr_u8(np.ascontiguousarray(crops)))).numpy()
