"""Face detection and 68-point landmarks behind a small backend interface.

Every backend returns `Face`s whose landmarks follow the iBUG-300W 68-point order that the crop and
alignment stages expect: jaw 0-16, brows 17-26, nose bridge 27-30 (30 = tip), nose bottom 31-35, eyes
36-41 (the subject's right eye, on the image's left) and 42-47, outer lips 48-59 (48/54 corners),
inner lips 60-67.

Backends live in their own modules and are registered here by name; `get_backend("auto")` picks the
most faithful one whose requirements are met. Modules are imported only when asked for, so a missing
optional package fails with an install hint instead of an ImportError at start-up.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

NUM_LANDMARKS = 68


class NoFaceError(ValueError):
    """No face was found where one is needed; the message says in which picture or frame."""


class LandmarkBackendError(RuntimeError):
    """A landmark backend is unknown or cannot run here; the message says what to install or supply."""


@dataclass(frozen=True)
class Face:
    """One detected face.

    Coordinates are image pixels, x right and y down, with (0, 0) the top-left corner of the image (the
    centre of pixel (row i, column j) is (j + 0.5, i + 0.5)). `box` = (x1, y1, x2, y2) bounds the face,
    `score` is the detector's confidence in [0, 1], `landmarks` the (68, 2) float64 iBUG-300W points.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


@runtime_checkable
class LandmarkBackend(Protocol):
    """Finds faces in RGB uint8 images (H, W, 3)."""

    name: str

    def detect(self, image: np.ndarray, picture: bool = False) -> list[Face]:
        """All faces found, best (highest score) first; empty when there is none. `picture`: this is the first
        pass over a whole source picture (upstream's backend treats that pass differently)."""
        ...

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        """`detect` on every frame (reference videos), in order."""
        ...


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend.

    `module` must define `unavailable_reason(checkpoint_dir) -> str | None` (None when it can run) and
    `create(checkpoint_dir, device) -> LandmarkBackend` (`device` resolved: "cpu", "cuda:N"; a backend that cannot
    use it runs where it can). "auto" tries the highest `priority` first.
    """

    name: str
    module: str
    priority: int
    description: str


_REGISTRY: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> None:
    if spec.name == "auto":
        raise ValueError('"auto" is reserved for picking a backend')
    _REGISTRY[spec.name] = spec


def backend_names() -> list[str]:
    """Registered names, most preferred first (what "auto" tries, in order)."""
    return [s.name for s in sorted(_REGISTRY.values(), key=lambda s: -s.priority)]


def _module(spec: BackendSpec) -> ModuleType:
    return importlib.import_module(spec.module)


def unavailable_reason(name: str, checkpoint_dir: Path | None = None) -> str | None:
    """Why backend `name` cannot run here (what to install or supply), or None when it can."""
    spec = _spec(name)
    return _module(spec).unavailable_reason(checkpoint_dir)


def _spec(name: str) -> BackendSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        choices = ", ".join(["auto", *backend_names()])
        raise LandmarkBackendError(f"unknown landmark backend {name!r}; choose one of {choices}") from None


def get_backend(name: str = "auto", checkpoint_dir: Path | str | None = None, device: str = "cpu") -> LandmarkBackend:
    """A ready backend: `name` itself, or for "auto" the most preferred one that can run here.

    Models are loaded once here, so keep the instance for every image and frame of a run. `device` (resolved:
    "cpu", "cuda:N"): where its torch networks run (upstream's; MediaPipe's TFLite models stay on the CPU).
    """
    folder = None if checkpoint_dir is None else Path(checkpoint_dir)
    if name != "auto":
        spec = _spec(name)
        reason = _module(spec).unavailable_reason(folder)
        if reason is not None:
            raise LandmarkBackendError(f"landmark backend {name!r} cannot run: {reason}")
        return _module(spec).create(folder, device=device)
    reasons = []
    for candidate in backend_names():
        spec = _REGISTRY[candidate]
        reason = _module(spec).unavailable_reason(folder)
        if reason is None:
            log.debug("landmark backend: %s (%s)", spec.name, spec.description)
            return _module(spec).create(folder, device=device)
        log.debug("landmark backend %s skipped: %s", spec.name, reason)
        reasons.append(f"{spec.name}: {reason}")
    raise LandmarkBackendError("no landmark backend can run here (" + "; ".join(reasons) + ")")


def best_face(faces: Sequence[Face], what: str = "the image") -> Face:
    """The face upstream SadTalker would use: the highest-scoring detection."""
    if not faces:
        raise NoFaceError(f"no face found in {what}; use a picture with one clearly visible, roughly frontal face")
    return max(faces, key=lambda f: f.score)


def largest_face(faces: Sequence[Face], what: str = "the image") -> Face:
    """The face with the largest box (the subject of a portrait when several people are visible)."""
    if not faces:
        raise NoFaceError(f"no face found in {what}; use a picture with one clearly visible, roughly frontal face")
    return max(faces, key=lambda f: f.area)


def check_image(image: np.ndarray) -> np.ndarray:
    """The image as a contiguous (H, W, 3) uint8 array, or a ValueError saying what is wrong with it."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image {image.shape}")
    return np.ascontiguousarray(image)


register_backend(
    BackendSpec(
        name="mediapipe",
        module="xtalker.preprocess.landmarks.mediapipe",
        priority=0,
        description="MediaPipe face detector + 468-point mesh mapped to 68 points (models from pip packages)",
    )
)
register_backend(
    BackendSpec(
        name="upstream",
        module="xtalker.preprocess.landmarks.upstream",
        priority=10,
        description="upstream SadTalker's RetinaFace R50 + AWing FAN (detection_Resnet50_Final.pth, alignment_WFLW_4HG.pth)",
    )
)
