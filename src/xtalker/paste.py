"""Paste-back for the full modes: each rendered face goes back into the original picture (spec section 10).

Upstream writes the face video to a lossy file, reads it back and clones every frame into the original with
`cv2.seamlessClone` (NORMAL_CLONE, an all-255 mask). Here the same blend runs in memory on each frame as it
leaves the renderer, so nothing is encoded twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from xtalker.crop import CropGeometry, CropInfo


@dataclass(frozen=True)
class PasteTarget:
    """The original RGB picture and the box (y1, y2, x1, x2) the face occupies in it."""

    background: np.ndarray
    box: tuple[int, int, int, int]

    @property
    def size_wh(self) -> tuple[int, int]:
        y1, y2, x1, x2 = self.box
        return x2 - x1, y2 - y1


def paste_target(original: np.ndarray, info: CropInfo, geometry: CropGeometry | None, extended: bool) -> PasteTarget:
    """Box of the face in the original image: the tight quad, or the whole bordered crop for `extfull`.

    The crop is computed in working-size pixels; for huge images (face quad >= 2048 px) that size is smaller
    than the original. Upstream then pastes at the working-size coordinates (the wrong place); here the box is
    scaled back to the original.
    """
    y1, y2, x1, x2 = info.paste_box(extended)
    h, w = original.shape[:2]
    if geometry is not None and tuple(geometry.rsize) != (w, h):
        sx, sy = w / geometry.rsize[0], h / geometry.rsize[1]
        y1, y2, x1, x2 = round(y1 * sy), round(y2 * sy), round(x1 * sx), round(x2 * sx)
    y1, y2 = max(0, min(y1, h)), max(0, min(y2, h))
    x1, x2 = max(0, min(x1, w)), max(0, min(x2, w))
    if y2 - y1 < 2 or x2 - x1 < 2:
        raise ValueError(f"paste box {(y1, y2, x1, x2)} is empty for a {w}x{h} picture")
    return PasteTarget(background=np.ascontiguousarray(original), box=(y1, y2, x1, x2))


def seamless_paste(face: np.ndarray, target: PasteTarget) -> np.ndarray:
    """One rendered RGB face frame (any size) cloned into the original picture, as upstream."""
    y1, y2, x1, x2 = target.box
    w, h = target.size_wh
    patch = cv2.resize(np.ascontiguousarray(face), (w, h), interpolation=cv2.INTER_LINEAR)
    mask = np.full((h, w), 255, dtype=np.uint8)
    center = ((x1 + x2) // 2, (y1 + y2) // 2)
    return cv2.seamlessClone(patch, target.background, mask, center, cv2.NORMAL_CLONE)
