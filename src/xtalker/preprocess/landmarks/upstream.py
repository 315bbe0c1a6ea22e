"""Upstream SadTalker's landmarks: RetinaFace R50 finds the face, AWing FAN puts 98 WFLW points on it, mapped to 68.

Needs `detection_Resnet50_Final.pth` and `alignment_WFLW_4HG.pth` in the checkpoint folder (or upstream's
`gfpgan/weights`); with them, crops, 5-point alignment and 3DMM coefficients follow upstream exactly.
Upstream runs the detector twice with different channel orders: on the whole source picture it passes its
RGB array where BGR is expected (`picture=True` reproduces that, since the crop box depends on it), on the
square crop and on reference-video frames it converts correctly. Both networks stay in fp32: bf16 moves
detector scores across the 0.97 threshold and FAN argmaxes (aux spec 6.5), and together they cost well
under a second per picture. Both run on the run's device (`create(..., device=)`); the crop, decoding and
NMS stay on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xtalker.models.auxfile import locate, search_folders
from xtalker.models.awing import FILE_NAME as FAN_FILE
from xtalker.models.retinaface import FILE_NAME as DETECTOR_FILE
from xtalker.preprocess.face_detect import CONF_THRESHOLD, NMS_THRESHOLD, FaceDetector
from xtalker.preprocess.landmarks.base import Face, check_image
from xtalker.preprocess.landmarks.fan import FanLandmarks

MAX_FACES = 4  # FAN runs on the best detections only (upstream uses just the first); a crowd costs no more


def unavailable_reason(checkpoint_dir: Path | None = None) -> str | None:
    missing = [n for n in (DETECTOR_FILE, FAN_FILE) if locate(n, checkpoint_dir) is None]
    if not missing:
        return None
    where = ", ".join(str(f) for f in search_folders(checkpoint_dir)) or "no checkpoint folder given"
    return (f"{' and '.join(missing)} not found ({where}); scripts/download_models.sh fetches them")


def _slice_length(start: int, stop: int, size: int) -> int:
    return len(range(*slice(start, stop).indices(size)))


def fan_box(det: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """The box FAN crops for a detection: upstream's own (its `int()` slice, quirks included) whenever that
    slice holds pixels; where it is empty (a box starting at <= -1 past the far edge), upstream crashes, and
    here the box is clipped to the image instead. None when nothing of the box is inside the image."""
    x1, y1, x2, y2 = (int(v) for v in det[:4])
    if _slice_length(x1, x2, width) and _slice_length(y1, y2, height):
        return np.asarray(det[:4], dtype=np.float64)
    clipped = np.clip(np.asarray(det[:4], dtype=np.float64), 0, [width, height, width, height])
    cx1, cy1, cx2, cy2 = (int(v) for v in clipped)
    return clipped if cx2 > cx1 and cy2 > cy1 else None


class UpstreamBackend:
    """RetinaFace + AWing FAN, batched over same-size frames."""

    name = "upstream"

    def __init__(self, detector_path: Path, fan_path: Path, device: str = "cpu"):
        self.detector = FaceDetector.from_file(detector_path, device=device)
        self.fan = FanLandmarks.from_file(fan_path, device=device)

    def _faces(self, images_rgb: Sequence[np.ndarray], detections: Sequence[np.ndarray]) -> list[list[Face]]:
        pairs = [(i, det, box) for i, dets in enumerate(detections) for det in dets[:MAX_FACES]
                 if (box := fan_box(det, *images_rgb[i].shape[:2])) is not None]
        faces: list[list[Face]] = [[] for _ in images_rgb]
        if not pairs:
            return faces
        points = self.fan.landmarks68([images_rgb[i] for i, _, _ in pairs], np.array([b for _, _, b in pairs]))
        for (i, det, _), lm in zip(pairs, points):
            box = tuple(float(v) for v in det[:4])
            faces[i].append(Face(box=box, score=float(det[4]), landmarks=lm.astype(np.float64)))
        return faces

    def detect(self, image: np.ndarray, picture: bool = False) -> list[Face]:
        """Faces best first. `picture`: the first pass on the whole source picture (RGB fed as BGR, as upstream)."""
        image = check_image(image)
        fed = image if picture else image[..., ::-1]
        return self._faces([image], self.detector.detect([fed], CONF_THRESHOLD, NMS_THRESHOLD))[0]

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        frames = [check_image(f) for f in frames]
        return self._faces(frames, self.detector.detect([f[..., ::-1] for f in frames], CONF_THRESHOLD, NMS_THRESHOLD))


def create(checkpoint_dir: Path | None = None, device: str = "cpu") -> UpstreamBackend:
    detector, fan = locate(DETECTOR_FILE, checkpoint_dir), locate(FAN_FILE, checkpoint_dir)
    if detector is None or fan is None:
        raise FileNotFoundError(unavailable_reason(checkpoint_dir))
    return UpstreamBackend(detector, fan, device)
