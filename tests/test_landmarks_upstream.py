"""The upstream landmark backend (RetinaFace R50 + AWing FAN): availability, `auto` choice, the two passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_wav

import xtalker.preprocess.landmarks.upstream as upstream
from xtalker.media import load_audio, probe
from xtalker.preprocess import LandmarkBackendError, get_backend
from xtalker.preprocess.landmarks.base import unavailable_reason

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"


@pytest.fixture(scope="module")
def backend(aux_checkpoints) -> upstream.UpstreamBackend:
    return get_backend("upstream", aux_checkpoints)


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)


def test_missing_files_are_named_and_auto_falls_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reason = unavailable_reason("upstream", tmp_path)
    assert "detection_Resnet50_Final.pth and alignment_WFLW_4HG.pth not found" in reason
    assert "download_models.sh" in reason
    with pytest.raises(LandmarkBackendError, match="landmark backend 'upstream' cannot run"):
        get_backend("upstream", tmp_path)
    assert get_backend("auto", tmp_path).name != "upstream"


def test_auto_prefers_upstream_when_its_files_are_present(aux_checkpoints, backend):
    assert backend.name == "upstream"
    assert get_backend("auto", aux_checkpoints).name == "upstream"


def test_faces_carry_fan_landmarks_of_their_box(backend, portrait):
    faces = backend.detect(portrait)
    # the synthetic detector scores a few priors of this portrait above upstream's 0.97 (random boxes)
    assert faces
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True) and all(s > upstream.CONF_THRESHOLD for s in scores)
    best = faces[0]
    assert best.landmarks.shape == (68, 2) and best.landmarks.dtype == np.float64
    expected = backend.fan.landmarks68([portrait], np.array([best.box]))[0]
    assert np.array_equal(best.landmarks, expected.astype(np.float64))


def test_first_pass_feeds_rgb_as_bgr_like_upstream(backend, portrait, monkeypatch):
    seen = []
    detect = backend.detector.detect
    monkeypatch.setattr(backend.detector, "detect", lambda images, *a: seen.append(images[0].copy()) or detect(images, *a))
    backend.detect(portrait, picture=True)
    backend.detect(portrait)
    assert np.array_equal(seen[0], portrait) and np.array_equal(seen[1], portrait[..., ::-1])


def test_batch_equals_single_frames(backend, portrait):
    crops = [np.ascontiguousarray(portrait[:256, :256]), np.ascontiguousarray(portrait[128:384, 128:384])]
    batched = backend.detect_batch(crops)
    assert [len(f) for f in batched] == [1, 1]
    for faces, crop in zip(batched, crops):
        single = backend.detect(crop)
        assert len(faces) == len(single)
        assert np.abs(np.array([f.box for f in faces]) - np.array([f.box for f in single])).max() < 1e-3
        for a, b in zip(faces, single):
            assert np.abs(a.landmarks - b.landmarks).max() < 1e-3


def test_auto_runs_upstream_end_to_end_and_says_so(tmp_path, synthetic_checkpoints, aux_checkpoints):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("SadTalker_V0.0.2_256.safetensors", "mapping_00229-model.pth.tar"):
        (ckpt / name).symlink_to(synthetic_checkpoints / name)
    for name in (upstream.DETECTOR_FILE, upstream.FAN_FILE):
        (ckpt / name).symlink_to(aux_checkpoints / name)
    audio = write_wav(tmp_path / "a.wav", load_audio(SPEECH)[4000 : 4000 + 2 * 640])
    out, report = tmp_path / "out.mp4", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "inference.py"), "--driven_audio", str(audio), "--source_image", str(PORTRAIT),
         "--checkpoint_dir", str(ckpt), "--output", str(out), "--report", str(report), "--seed", "1", "--verbose"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "landmarks: upstream backend" in proc.stderr
    assert json.loads(report.read_text())["landmarks"] == "upstream"
    assert probe(out).frame_count == 2


def test_fan_box_keeps_upstreams_slice_and_clips_only_where_upstream_crashes():
    det = np.array([10.7, 20.2, 100.9, 120.5, 0.99], np.float32)
    assert np.array_equal(upstream.fan_box(det, 256, 256), det[:4].astype(np.float64))
    # x1 = -5.5 -> int -5: numpy slices from the far end [-5:200] = empty: upstream's cv2.resize would fail
    clipped = upstream.fan_box(np.array([-5.5, 10, 200, 120, 0.99]), 256, 256)
    assert np.array_equal(clipped, [0, 10, 200, 120])
    # a non-empty quirky slice is upstream's: [-5:255] holds 4 columns, kept as is
    assert np.array_equal(upstream.fan_box(np.array([-5.5, 10, 255.5, 120, 0.9]), 256, 256), [-5.5, 10, 255.5, 120])
    assert upstream.fan_box(np.array([300, 10, 400, 120, 0.9]), 256, 256) is None


def test_no_face_gives_an_empty_list(backend):
    assert backend.detect(np.zeros((64, 64, 3), np.uint8)) == []
    assert backend.detect_batch([np.zeros((64, 64, 3), np.uint8)] * 2) == [[], []]


def test_landmarks_only_for_the_best_faces(backend, portrait, monkeypatch):
    monkeypatch.setattr(upstream, "CONF_THRESHOLD", 0.5)  # hundreds of random detections
    faces = backend.detect(portrait)
    assert len(faces) == upstream.MAX_FACES and faces[0].score >= faces[-1].score > 0.5
