"""Source preprocessing (spec stage A): picture -> face crop for the renderer + 3DMM coefficient row.

Also the same work for reference videos (`--ref_eyeblink`, `--ref_pose`): the crop is placed from the first
frame's landmarks and applied to every frame, then each cropped frame gets its own coefficients.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import cv2
import numpy as np

from xtalker.models.face_3drecon import ReconNet
from xtalker.preprocess.align import source_coefficients
from xtalker.preprocess.crop import CropGeometry, CropInfo, SourceCrop, apply_crop, crop_source, resize_square
from xtalker.preprocess.landmarks.base import LandmarkBackend, NoFaceError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_CHUNK = 32  # reference-video frames per face-recon batch: bounded memory for long videos


class SourceError(ValueError):
    """The source picture or a reference video cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class PreparedFace:
    """Everything later stages need from the source picture."""

    original: np.ndarray  # RGB uint8, the picture as read (full modes paste into it)
    crop: SourceCrop  # `crop.image` is the square renderer input
    coeff_3dmm: np.ndarray  # (1, 73) exp | angle | trans | alignment triple
    landmarks_crop: np.ndarray  # (68, 2) landmarks of the square crop (the renderer's source image)

    @property
    def info(self) -> CropInfo:
        return self.crop.info

    @property
    def geometry(self) -> CropGeometry | None:
        return self.crop.geometry


def read_picture(path: Path) -> np.ndarray:
    """RGB uint8 picture from an image file, or the first frame of a video file (as upstream)."""
    if not path.is_file():
        raise SourceError(f"source image not found: {path}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SourceError(f"cannot read {path} as an image; use a PNG or JPEG portrait")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    from xtalker.media import MediaError, first_frame

    try:
        return first_frame(path)
    except MediaError as e:
        raise SourceError(f"cannot read {path} as an image or video ({e}); use a PNG or JPEG portrait") from None


def _landmarks(backend: LandmarkBackend, image: np.ndarray, what: str, picture: bool = False) -> np.ndarray:
    faces = backend.detect(image, picture=picture)
    if not faces:
        raise NoFaceError(f"no face found in {what}; use a picture with one clearly visible, roughly frontal face")
    return faces[0].landmarks


def prepare_source(
    path: Path, backend: LandmarkBackend, recon: ReconNet, preprocess: str, size: int
) -> PreparedFace:
    """Detect, crop (or resize), detect again on the square crop, align and reconstruct (spec A2-A6)."""
    original = read_picture(path)
    lm_full = None if preprocess == "resize" else _landmarks(backend, original, f"the source image {path}", picture=True)
    crop = crop_source(original, lm_full, mode=preprocess, pic_size=size)
    lm_crop = _landmarks(backend, crop.image, f"the cropped face of {path}")
    coeffs = source_coefficients(recon, [crop.image], [lm_crop])
    log.debug("source %s: %dx%d, crop info %s", path, original.shape[1], original.shape[0], crop.info)
    return PreparedFace(original=original, crop=crop, coeff_3dmm=coeffs.coeff_3dmm, landmarks_crop=lm_crop)


def _chunks(frames: Iterable[np.ndarray], n: int) -> Iterator[list[np.ndarray]]:
    it = iter(frames)
    while chunk := list(islice(it, n)):
        yield chunk


def video_coefficients(
    path: Path, backend: LandmarkBackend, recon: ReconNet, preprocess: str, size: int
) -> np.ndarray:
    """(N, 73) coefficients of every frame of a reference video, cropped like the source picture."""
    from xtalker.media import MediaError, iter_video_frames

    if not path.is_file():
        raise SourceError(f"reference video not found: {path}")
    try:
        _fps, frames = iter_video_frames(path)
        first = next(frames, None)
    except MediaError as e:
        raise SourceError(f"cannot read reference video {path}: {e}") from None
    if first is None:
        raise SourceError(f"reference video {path} has no frames")
    lm_first = None if preprocess == "resize" else _landmarks(backend, first, f"the first frame of {path}", picture=True)
    geometry = crop_source(first, lm_first, mode=preprocess, pic_size=size).geometry
    extended = preprocess.startswith("ext")

    def cropped(frame: np.ndarray) -> np.ndarray:
        face = frame if geometry is None else apply_crop(frame, geometry, extended=extended)
        return resize_square(face, size)

    rows = []
    index = 0
    for chunk in _chunks((cropped(f) for f in chain([first], frames)), VIDEO_CHUNK):
        landmarks = []
        for faces in backend.detect_batch(chunk):
            if not faces:
                raise NoFaceError(f"no face found in frame {index} of the reference video {path}")
            landmarks.append(faces[0].landmarks)
            index += 1
        rows.append(source_coefficients(recon, chunk, landmarks).coeff_3dmm)
    log.debug("reference video %s: %d frames", path, index)
    return np.concatenate(rows, axis=0)
