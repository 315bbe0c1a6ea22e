"""Source-image crop (spec A3): FFHQ-style face box from 68 landmarks, the crop itself and crop_info.

Upstream computes the geometry on a working size `rsize` (the image shrunk by an integer factor when the
face quad is 2048 px or more), cuts a bordered box around the face quad, then (unless the mode is
extended) the tight quad inside it, and resizes the result to a square `pic_size` image. The numbers
reproduce upstream exactly, quirks included (the bottom edge is clipped with the width, and the paste
box is in working-size coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CROP_OUTPUT_SIZE = 512  # upstream always calls align_face with 512, independent of the render size
PREPROCESS_MODES = ("crop", "extcrop", "resize", "full", "extfull")


@dataclass(frozen=True)
class CropGeometry:
    """Where to cut the face, all in working-size (`rsize`) pixels.

    `crop` is the bordered box (x1, y1, x2, y2); `quad` = (lx, ly, rx, ry) is the tight face box
    relative to `crop`, as floats.
    """

    rsize: tuple[int, int]
    crop: tuple[int, int, int, int]
    quad: tuple[float, float, float, float]
    shrink: int

    @property
    def quad_int(self) -> tuple[int, int, int, int]:
        """The quad as upstream slices with it (truncated)."""
        lx, ly, rx, ry = self.quad
        return int(lx), int(ly), int(rx), int(ry)


@dataclass(frozen=True)
class CropInfo:
    """What later stages need to restore the aspect ratio and paste back (upstream `crop_info`).

    `size` = (w, h) of the tight box (the full image in `resize` mode); `crop`/`quad` are None in
    `resize` mode.
    """

    size: tuple[int, int]
    crop: tuple[int, int, int, int] | None = None
    quad: tuple[float, float, float, float] | None = None

    def paste_box(self, extended: bool = False) -> tuple[int, int, int, int]:
        """(oy1, oy2, ox1, ox2): the tight box, or the whole bordered crop when `extended`.

        In working-size coordinates, so only right for the original image when no shrink happened.
        """
        if self.crop is None or self.quad is None:
            w, h = self.size
            return 0, h, 0, w
        if extended:
            clx, cly, crx, cry = self.crop
            return cly, cry, clx, crx
        return _tight_box(self.crop, self.quad)


@dataclass(frozen=True)
class SourceCrop:
    """The cropped source: `image` is the square pic_size RGB image fed to the renderer."""

    image: np.ndarray
    cropped: np.ndarray
    info: CropInfo
    geometry: CropGeometry | None


def _tight_box(crop: tuple[int, int, int, int], quad: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """(oy1, oy2, ox1, ox2) of the tight quad in working-size pixels (the quad truncated like upstream)."""
    clx, cly = crop[0], crop[1]
    lx, ly, rx, ry = (int(v) for v in quad)
    return cly + ly, cly + ry, clx + lx, clx + rx


def _face_frame(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-axes x, y and centre c of the oriented face square (FFHQ construction)."""
    eye_left = np.mean(lm[36:42], axis=0)
    eye_right = np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return x, y, c


def crop_geometry(lm68: np.ndarray, image_wh: tuple[int, int], output_size: int = CROP_OUTPUT_SIZE) -> CropGeometry:
    """Crop box and tight quad for one image of size `image_wh` = (W, H) with landmarks (68, 2) in pixels."""
    lm = np.asarray(lm68)
    if not np.issubdtype(lm.dtype, np.floating):
        lm = lm.astype(np.float64)
    x, y, c = _face_frame(lm)
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = np.hypot(*x) * 2

    width, height = int(image_wh[0]), int(image_wh[1])
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(width) / shrink)), int(np.rint(float(height) / shrink)))
        quad /= shrink
        qsize /= shrink
    else:
        rsize = (width, height)
        shrink = 1

    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (
        max(int(np.floor(min(quad[:, 0]))) - border, 0),
        max(int(np.floor(min(quad[:, 1]))) - border, 0),
        min(int(np.ceil(max(quad[:, 0]))) + border, rsize[0]),
        min(int(np.ceil(max(quad[:, 1]))) + border, rsize[1]),
    )
    # Upstream shifts only when the crop is smaller than the image; otherwise the crop starts at (0, 0)
    # and the shift is a no-op, so shifting always is the same.
    quad -= crop[0:2]

    q = (quad + 0.5).flatten()
    lx = max(min(q[0], q[2]), 0)
    ly = max(min(q[1], q[7]), 0)
    rx = min(max(q[4], q[6]), rsize[0])
    ry = min(max(q[3], q[5]), rsize[0])  # upstream quirk: the bottom edge is clipped with the width
    return CropGeometry(rsize=rsize, crop=crop, quad=(float(lx), float(ly), float(rx), float(ry)), shrink=shrink)


def apply_crop(image: np.ndarray, geometry: CropGeometry, extended: bool = False) -> np.ndarray:
    """Cut one HWC image like upstream: resize to rsize (bilinear), bordered crop, then the tight quad."""
    h, w = image.shape[:2]
    if (w, h) != geometry.rsize:
        image = cv2.resize(image, geometry.rsize, interpolation=cv2.INTER_LINEAR)
    clx, cly, crx, cry = geometry.crop
    out = image[cly:cry, clx:crx]
    if not extended:
        lx, ly, rx, ry = geometry.quad_int
        out = out[ly:ry, lx:rx]
    return np.ascontiguousarray(out)


def crop_info(geometry: CropGeometry) -> CropInfo:
    """crop_info as upstream builds it: the size is that of the tight box, also for extended crops."""
    oy1, oy2, ox1, ox2 = _tight_box(geometry.crop, geometry.quad)
    return CropInfo(size=(ox2 - ox1, oy2 - oy1), crop=geometry.crop, quad=geometry.quad)


def resize_square(image: np.ndarray, pic_size: int) -> np.ndarray:
    """Square resize of the crop to the renderer size; aspect is not kept (restored after rendering)."""
    return cv2.resize(np.ascontiguousarray(image), (pic_size, pic_size), interpolation=cv2.INTER_LINEAR)


def crop_source(
    image: np.ndarray,
    lm68: np.ndarray | None,
    mode: str = "crop",
    pic_size: int = 256,
    output_size: int = CROP_OUTPUT_SIZE,
) -> SourceCrop:
    """Crop (modes containing `crop` or `full`; `ext*` keeps the bordered box) or just resize the source.

    `lm68` may be None in `resize` mode, which needs no landmarks.
    """
    mode = mode.lower()
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {', '.join(PREPROCESS_MODES)}")
    h, w = image.shape[:2]
    if mode == "resize":
        return SourceCrop(resize_square(image, pic_size), cropped=image, info=CropInfo(size=(w, h)), geometry=None)
    if lm68 is None:
        raise ValueError(f"preprocess mode {mode!r} needs 68 face landmarks")
    geometry = crop_geometry(lm68, (w, h), output_size)
    cropped = apply_crop(image, geometry, extended=mode.startswith("ext"))
    return SourceCrop(resize_square(cropped, pic_size), cropped=cropped, info=crop_info(geometry), geometry=geometry)
