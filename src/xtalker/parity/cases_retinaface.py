"""Parity runners for the RetinaFace R50 detector: the network with decoding and detect_faces
("retinaface_r50_net"), and the post-processing on fed head outputs ("retinaface_postproc")."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from xtalker.models.retinaface import FILE_NAME
from xtalker.parity.cases_aux import aux_file
from xtalker.parity.core import Case, Check, Context, exact, max_abs
from xtalker.preprocess import FaceDetector, restore_helper_faces
from xtalker.preprocess.face_detect import (
    CONF_THRESHOLD,
    EYE_DIST_THRESHOLD,
    NMS_THRESHOLD,
    box_ints,
    candidate_indices,
    decode,
    eye_distance,
    postprocess,
    priors,
    to_network_input,
)

OutputChecks = dict[str, Callable[[str], list[Check]]]


@functools.lru_cache(maxsize=1)
def _detector(path: str) -> FaceDetector:
    return FaceDetector.from_file(path)


def _thresholds(case: Case) -> tuple[float, float]:
    meta = case.meta
    conf = meta.get("conf_threshold_used", meta.get("conf_threshold", CONF_THRESHOLD))
    return float(conf), float(meta.get("nms_threshold", NMS_THRESHOLD))


def _rows_checks(name: str, rows: np.ndarray, expected: np.ndarray, coord_tol: float, score_tol: float) -> list[Check]:
    """Detection-like rows (score in column 4): same count, then in order coordinates and scores."""
    count = exact(f"{name} count", np.int64(len(rows)), np.int64(len(expected)))
    if not count.passed:
        return [count]
    coords = [c for c in range(expected.shape[1]) if c != 4]
    return [
        count,
        max_abs(f"{name} coordinates", rows[:, coords], expected[:, coords], coord_tol),
        max_abs(f"{name} scores", rows[:, 4], expected[:, 4], score_tol),
    ]


def _run(checks: OutputChecks, case: Case) -> list[Check]:
    keys = set(case.keys())
    return [c for key, compare in checks.items() if key in keys for c in compare(key)]


def run_net(case: Case, ctx: Context) -> list[Check]:
    detector = _detector(str(aux_file(ctx, FILE_NAME)))
    image = case.array("input.image_bgr_u8")
    single = image.ndim == 3  # one HWC image, or a batch of them
    images = image[None] if single else image
    h, w = images.shape[1:3]
    conf_threshold, nms_threshold = _thresholds(case)
    heads = detector.head_outputs(images)
    loc, conf, landms = (np.stack([getattr(o, f) for o in heads]) for f in ("loc", "conf", "landms"))
    anchors = priors(h, w)
    boxes, points = decode(loc, landms, anchors, h, w)
    dets = detector.detect(images, conf_threshold, nms_threshold)

    def layer4(key: str) -> list[Check]:
        with torch.inference_mode():
            feat = detector.net.body(to_network_input(images))
        return [max_abs("body_layer4", feat, case.array(key), 1e-4)]

    def dets_checks(key: str) -> list[Check]:
        expected = case.array(key)
        if single:
            return _rows_checks("dets", dets[0], expected, 2e-3, 1e-5)
        return [c for b, d in enumerate(dets) for c in _rows_checks(f"dets[{b}]", d, expected[b], 2e-3, 1e-5)]

    checks: OutputChecks = {
        "out.loc": lambda k: [max_abs("loc", loc, case.array(k), 3e-5)],
        "out.conf": lambda k: [max_abs("conf", conf, case.array(k), 1e-5)],
        "out.landms": lambda k: [max_abs("landms", landms, case.array(k), 3e-5)],
        "out.priors": lambda k: [max_abs("priors", anchors, case.array(k), 1e-7)],
        "out.boxes_decoded_px": lambda k: [max_abs("boxes_decoded_px", boxes[0] if single else boxes, case.array(k), 2e-3)],
        "out.landmarks_decoded_px": lambda k: [
            max_abs("landmarks_decoded_px", points[0] if single else points, case.array(k), 2e-3)
        ],
        "out.body_layer4": layer4,
        "out.dets": dets_checks,
    }
    return _run(checks, case)


def run_postproc(case: Case, ctx: Context) -> list[Check]:
    h, w = (int(v) for v in case.array("input.image_hw"))
    loc, conf, landms = (case.array(f"input.{k}") for k in ("loc", "conf", "landms"))
    conf_threshold, nms_threshold = _thresholds(case)
    eye_threshold = float(case.meta.get("eye_dist_threshold", EYE_DIST_THRESHOLD))
    dets = postprocess(loc, conf, landms, (h, w), conf_threshold, nms_threshold)
    landmarks5, det_faces = restore_helper_faces(dets, eye_threshold)

    def crop_box(key: str) -> list[Check]:
        if len(dets) == 0:
            return [Check("sadtalker_crop_box_int", float("inf"), 0.0, "no detection to crop")]
        return [exact("sadtalker_crop_box_int", np.asarray(box_ints(dets[0]), dtype=np.int64), case.array(key))]

    def landmarks(key: str) -> list[Check]:
        expected = case.array(key)
        count = exact("restore_helper_landmarks5 count", np.int64(len(landmarks5)), np.int64(len(expected)))
        return [count, max_abs("restore_helper_landmarks5", landmarks5, expected, 1e-3)] if count.passed else [count]

    checks: OutputChecks = {
        "out.priors": lambda k: [max_abs("priors", priors(h, w), case.array(k), 1e-7)],
        "out.candidate_prior_idx": lambda k: [
            exact("candidate_prior_idx", candidate_indices(conf.reshape(-1, 2)[:, 1], conf_threshold), case.array(k))
        ],
        # Scores are fed inputs, so they must come through exactly.
        "out.dets": lambda k: _rows_checks("dets", dets, case.array(k), 1e-3, 0.0),
        "out.eye_dist": lambda k: [max_abs("eye_dist", eye_distance(dets), case.array(k), 1e-4)],
        "out.restore_helper_landmarks5": landmarks,
        "out.restore_helper_det_faces": lambda k: _rows_checks("restore_helper_det_faces", det_faces, case.array(k), 1e-3, 0.0),
        "out.sadtalker_crop_box_int": crop_box,
    }
    return _run(checks, case)


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "retinaface_r50_net": run_net,
    "retinaface_postproc": run_postproc,
}
