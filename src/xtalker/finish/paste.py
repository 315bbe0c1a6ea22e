"""Paste-back for the full modes: each rendered face goes back into the original picture (spec section 10).

Upstream writes the face video to a lossy file, reads it back and clones every frame into the original with
`cv2.seamlessClone` (NORMAL_CLONE, an all-255 mask). Here the blend runs in memory on each frame as it leaves
the renderer, so nothing is encoded twice. `seamless` is upstream's blend (a Poisson solve per frame); the
others weight face and picture with a mask computed once per video (the box does not move):

- `alpha`: the face replaces the box outright (a hard edge; the cheapest);
- `feather`: the weight ramps linearly from 0 at the box border to 1 at `FEATHER` of the box's shorter side;
- `gaussian`: a box mask inset by the same margin, Gaussian-blurred: a smooth S-shaped edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from xtalker.preprocess import CropGeometry, CropInfo


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


BLENDS = ("seamless", "alpha", "feather", "gaussian")
FEATHER = 0.1  # edge width of the soft masks, as a fraction of the box's shorter side


def blend_mask(size_wh: tuple[int, int], method: str) -> np.ndarray | None:
    """(h, w) float32 weights of the face for a soft blend; None for `seamless` and `alpha`."""
    if method not in BLENDS:
        raise ValueError(f"unknown blend {method!r}; choose one of {', '.join(BLENDS)}")
    if method in ("seamless", "alpha"):
        return None
    w, h = size_wh
    margin = max(1.0, FEATHER * min(w, h))
    if method == "feather":
        ys = np.minimum(np.arange(h), np.arange(h)[::-1]).astype(np.float32) + 0.5
        xs = np.minimum(np.arange(w), np.arange(w)[::-1]).astype(np.float32) + 0.5
        return np.clip(np.minimum(ys[:, None], xs[None, :]) / margin, 0.0, 1.0)
    inset = int(round(margin / 2))
    mask = np.zeros((h, w), np.float32)
    mask[inset : h - inset, inset : w - inset] = 1.0
    return cv2.GaussianBlur(mask, (0, 0), sigmaX=margin / 4, borderType=cv2.BORDER_CONSTANT)


class Paster:
    """Pastes rendered frames into one target with one blend; the mask and its complement are made once."""

    def __init__(self, target: PasteTarget, method: str = "seamless"):
        self.target, self.method = target, method
        mask = blend_mask(target.size_wh, method)
        self._weights = None if mask is None else (mask, np.ascontiguousarray(1.0 - mask))

    def __call__(self, face: np.ndarray) -> np.ndarray:
        if self.method == "seamless":
            return seamless_paste(face, self.target)
        y1, y2, x1, x2 = self.target.box
        w, h = self.target.size_wh
        patch = cv2.resize(np.ascontiguousarray(face), (w, h), interpolation=cv2.INTER_LINEAR)
        out = self.target.background.copy()
        if self._weights is None:
            out[y1:y2, x1:x2] = patch
        else:
            region = np.ascontiguousarray(out[y1:y2, x1:x2])
            out[y1:y2, x1:x2] = cv2.blendLinear(patch, region, *self._weights)
        return out


def seamless_paste(face: np.ndarray, target: PasteTarget) -> np.ndarray:
    """One rendered RGB face frame (any size) cloned into the original picture, as upstream."""
    y1, y2, x1, x2 = target.box
    w, h = target.size_wh
    patch = cv2.resize(np.ascontiguousarray(face), (w, h), interpolation=cv2.INTER_LINEAR)
    mask = np.full((h, w), 255, dtype=np.uint8)
    center = ((x1 + x2) // 2, (y1 + y2) // 2)
    return cv2.seamlessClone(patch, target.background, mask, center, cv2.NORMAL_CLONE)
