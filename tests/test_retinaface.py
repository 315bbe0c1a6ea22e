"""RetinaFace R50 detector: official layout, loader variants and errors, priors, decoding, NMS and threshold
edge cases, batching, golden parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import golden_dir

from xtalker.models.auxfile import AuxWeightsMissing
from xtalker.models.retinaface import (
    FILE_NAME,
    RetinaFaceR50,
    load_retinaface,
    official_layout,
)
from xtalker.parity.cases_retinaface import RUNNERS
from xtalker.parity.core import Case, Context
from xtalker.preprocess import FaceDetector, restore_helper_faces
from xtalker.preprocess.face_detect import (
    box_ints,
    candidate_indices,
    decode,
    eye_distance,
    feature_sizes,
    nms,
    postprocess,
    priors,
    to_network_input,
)

AUX_MANIFEST = golden_dir().parent / "aux_manifest.json"
PARAMETERS = 27_293_600  # aux spec 1.1
F32_097 = np.float32(0.97)


@pytest.fixture(scope="module")
def weights(aux_checkpoints) -> Path:
    return aux_checkpoints / FILE_NAME


@pytest.fixture(scope="module")
def net(weights) -> RetinaFaceR50:
    return load_retinaface(weights)


@pytest.fixture(scope="module")
def detector(net) -> FaceDetector:
    return FaceDetector(net, batch_size=2)


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _heads(n: int, conf1: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero offsets and face probabilities `conf1` (default 0) for n priors."""
    conf1 = np.zeros(n, dtype=np.float32) if conf1 is None else conf1.astype(np.float32)
    return np.zeros((n, 4), np.float32), np.stack([1 - conf1, conf1], axis=1), np.zeros((n, 10), np.float32)


# --- weights -------------------------------------------------------------------------------------------------------


def test_layout_matches_manifest():
    if not AUX_MANIFEST.is_file():
        pytest.skip(f"{AUX_MANIFEST} not present")
    entry = json.loads(AUX_MANIFEST.read_text())["files"][FILE_NAME]
    # Manifest keys are model keys; only the file on disk may carry the `module.` prefix.
    assert entry["layout"] == "flat_state_dict"
    assert official_layout() == {k: tuple(v["shape"]) for k, v in entry["tensors"].items()}
    assert len(official_layout()) == 456


def test_loader_builds_network(net):
    assert not net.training
    assert sum(p.numel() for p in net.parameters()) == PARAMETERS


def test_loads_with_and_without_prefix_and_counters(weights, net, tmp_path):
    raw = torch.load(str(weights), map_location="cpu", weights_only=True)
    model = {k.removeprefix("module."): v for k, v in raw.items()}
    plain = tmp_path / "plain.pth"
    torch.save({k: v for k, v in model.items() if not k.endswith("num_batches_tracked")}, plain)
    prefixed = tmp_path / "prefixed.pth"
    torch.save({"module." + k: v for k, v in model.items()}, prefixed)
    expected = net.state_dict()
    for path in (plain, prefixed):
        state = load_retinaface(path).state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_bad_file_gives_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"module.body.conv1.weights": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth: not an official .*missing: .*unexpected: body\.conv1\.weights"):
        load_retinaface(bad)
    with pytest.raises(AuxWeightsMissing, match=FILE_NAME):
        load_retinaface(tmp_path / "absent.pth")


# --- priors and decoding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "n"), [(240, 320, 3160), (256, 256, 2688), (480, 640, 12600), (241, 321, 3390)])
def test_prior_counts(h, w, n):
    assert priors(h, w).shape == (n, 4)
    assert priors(h, w).dtype == np.float32


def test_prior_values_and_order():
    p = priors(100, 50)  # levels (13, 7), (7, 4), (4, 2)
    assert feature_sizes(100, 50) == [(13, 7), (7, 4), (4, 2)]
    np.testing.assert_array_equal(p[0], np.float32([4 / 50, 4 / 100, 16 / 50, 16 / 100]))
    np.testing.assert_array_equal(p[1], np.float32([4 / 50, 4 / 100, 32 / 50, 32 / 100]))
    # Row-major over (row, column, size): index 2 is column 1 of row 0.
    np.testing.assert_array_equal(p[2, :2], np.float32([12 / 50, 4 / 100]))
    first16 = 2 * 13 * 7
    np.testing.assert_array_equal(p[first16], np.float32([8 / 50, 8 / 100, 64 / 50, 64 / 100]))
    np.testing.assert_array_equal(p[-1], np.float32([(1.5 * 32) / 50, (3.5 * 32) / 100, 512 / 50, 512 / 100]))


def test_network_output_matches_priors_at_odd_size(net, detector):
    image = _images(1, 75, 99)
    (out,) = detector.head_outputs(image)
    n = len(priors(75, 99))
    assert n == 2 * (10 * 13 + 5 * 7 + 3 * 4)
    assert out.loc.shape == (n, 4) and out.conf.shape == (n, 2) and out.landms.shape == (n, 10)
    np.testing.assert_allclose(out.conf.sum(1), 1, atol=1e-6)
    # The detector's BN-folded channels-last network against the plain module.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in detector.net.modules())
    with torch.inference_mode():
        plain = net(to_network_input(image))
    for got, ref in zip(out, plain):
        np.testing.assert_allclose(got, ref[0].numpy(), atol=3e-5, rtol=0)


def test_decode_by_hand():
    anchors = np.float32([[0.5, 0.25, 0.1, 0.2]])
    loc = np.float32([[1.0, -2.0, 0.0, np.log(2) / 0.2]])
    landms = np.float32([[0, 0, 1, 1, -1, 0, 0, 10, 5, 5]])
    boxes, points = decode(loc, landms, anchors, 100, 200)
    # centre (0.5 + 0.01, 0.25 - 0.04) * (200, 100); size (0.1, 0.4) * (200, 100)
    np.testing.assert_allclose(boxes, [[92.0, 1.0, 112.0, 41.0]], atol=1e-4)
    expected = [[100, 25, 102, 27, 98, 25, 100, 45, 110, 35]]
    np.testing.assert_allclose(points, expected, atol=1e-4)
    assert boxes.dtype == np.float32 and points.dtype == np.float32


# --- thresholds, NMS and the restore helper ------------------------------------------------------------------------


def test_conf_threshold_is_strict_in_float32():
    scores = np.array([F32_097, np.nextafter(F32_097, np.float32(1)), 0.99, 0.5], dtype=np.float32)
    # float32(0.97) = 0.97000003 > 0.97 as a double, but upstream compares in float32: not kept.
    np.testing.assert_array_equal(candidate_indices(scores, 0.97), [2, 1])
    loc, conf, landms = _heads(len(priors(64, 64)), np.zeros(len(priors(64, 64))))
    conf[[3, 7], 1] = F32_097
    assert postprocess(loc, conf, landms, (64, 64)).shape == (0, 15)


def test_nms_suppresses_iou_exactly_at_float32_threshold():
    # IoU = 40 / (100 + 40 - 40) = float32(0.4) = 0.40000000596 > 0.4 as a double.
    dets = np.float32([[0, 0, 10, 10, 0.9], [0, 0, 10, 4, 0.8]])
    np.testing.assert_array_equal(nms(dets, 0.4), [0])
    np.testing.assert_array_equal(nms(dets, 0.41), [0, 1])
    just_below = np.float32([[0, 0, 10, 10, 0.9], [0, 0, 10, 3.99, 0.8]])
    np.testing.assert_array_equal(nms(just_below, 0.4), [0, 1])


def test_nms_greedy_order_and_ties():
    dets = np.float32([
        [0, 0, 10, 10, 0.5],  # suppressed by row 1
        [1, 0, 11, 10, 0.9],
        [3, 0, 13, 10, 0.7],  # IoU with row 1 = 80 / 120: suppressed
        [20, 20, 30, 30, 0.7],
        [20, 20, 20, 30, 0.95],  # zero area: IoU 0 or NaN, never suppresses
    ])
    np.testing.assert_array_equal(nms(dets, 0.4), [4, 1, 3])
    # A suppressed box no longer suppresses: row 2 overlaps row 1 (suppressed) but not row 0.
    chain = np.float32([[0, 0, 10, 10, 0.9], [4, 0, 14, 10, 0.8], [8, 0, 18, 10, 0.7]])
    np.testing.assert_array_equal(nms(chain, 0.4), [0, 2])
    # Ties are visited in row order: the first of two identical boxes survives.
    np.testing.assert_array_equal(nms(np.float32([[5, 5, 9, 9, 0.8], [0, 0, 4, 4, 0.8], [5, 5, 9, 9, 0.8]]), 0.4), [0, 1])
    assert nms(np.zeros((0, 15), np.float32), 0.4).shape == (0,)


def test_postprocess_order_and_layout():
    h, w = 64, 64
    n = len(priors(h, w))
    conf1 = np.zeros(n)
    conf1[[5, 100, 101]] = [0.98, 0.99, 0.975]  # 100 and 101: same centre, sizes 16 and 32 -> IoU 0.25
    loc, conf, landms = _heads(n, conf1)
    dets = postprocess(loc[None], conf[None], landms[None], (h, w))
    assert dets.shape == (3, 15) and dets.dtype == np.float32
    np.testing.assert_array_equal(dets[:, 4], np.float32([0.99, 0.98, 0.975]))
    boxes, points = decode(loc, landms, priors(h, w), h, w)
    np.testing.assert_array_equal(dets[:, :4], boxes[[100, 5, 101]])
    np.testing.assert_array_equal(dets[:, 5:], points[[100, 5, 101]])
    with pytest.raises(ValueError, match="priors"):
        postprocess(loc, conf, landms, (h, w + 8))


def test_restore_helper_eye_distance():
    dets = np.zeros((3, 15), np.float32)
    dets[:, :5] = [[0, 0, 10, 10, 0.99], [1, 1, 9, 9, 0.98], [2, 2, 8, 8, 0.975]]
    dets[0, 5:9] = [10, 10, 13, 14]  # eye distance exactly 5: kept (only < 5 is dropped)
    dets[1, 5:9] = [10, 10, 14.99, 10]
    dets[2, 5:9] = [0, 0, 0, 6]
    np.testing.assert_allclose(eye_distance(dets), [5.0, 4.99, 6.0], atol=1e-5)
    landmarks5, det_faces = restore_helper_faces(dets, 5.0)
    assert landmarks5.shape == (2, 5, 2) and det_faces.shape == (2, 5)
    np.testing.assert_array_equal(det_faces, dets[[0, 2], :5])
    np.testing.assert_array_equal(landmarks5[0, :2], [[10, 10], [13, 14]])
    assert len(restore_helper_faces(dets, None)[0]) == 3
    empty = restore_helper_faces(np.zeros((0, 15), np.float32))
    assert empty[0].shape == (0, 5, 2) and empty[1].shape == (0, 5)


def test_box_ints_truncate_toward_zero():
    assert box_ints(np.float32([-0.7, 12.9, 99.99, -3.2, 0.99])) == (0, 12, 99, -3)


# --- the detector --------------------------------------------------------------------------------------------------


def test_batch_equals_single_runs_and_keeps_order(detector):
    a, b = _images(2, 64, 96, seed=1)
    (c,) = _images(1, 80, 80, seed=2)
    images = [a, c, b]
    batched = detector.head_outputs(images)
    single = [detector.head_outputs([im], batch_size=1)[0] for im in images]
    # oneDNN sums in another order per batch size: fp32 reordering, relative to the value (1e-5 at 1.7 seen here)
    for got, ref in zip(batched, single):
        for x, y in zip(got, ref):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    # Views such as a channel flip are accepted as they are.
    flipped = detector.head_outputs([a[..., ::-1]])[0]
    np.testing.assert_array_equal(flipped.loc, detector.head_outputs([a[..., ::-1].copy()])[0].loc)
    # Random weights keep scores in about (0.09, 0.95): a low threshold gives detections to compare.
    dets = detector.detect(np.stack([a, b]), conf_threshold=0.5)
    one = [detector.detect([im], conf_threshold=0.5)[0] for im in (a, b)]
    for got, ref in zip(dets, one):
        assert len(got) > 0 and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-3)


def test_no_face_gives_empty_detections(detector):
    dets = detector.detect(list(_images(2, 64, 64)))
    assert [d.shape for d in dets] == [(0, 15), (0, 15)]
    assert all(d.dtype == np.float32 for d in dets)
    assert detector.detect([]) == []


def test_rejects_bad_images(detector):
    with pytest.raises(ValueError, match="HWC uint8"):
        detector.detect([np.zeros((64, 64, 3), np.float32)])


def test_bf16_close_to_fp32(net, detector):
    image = _images(1, 64, 64, seed=3)
    fp32 = detector.head_outputs(image)[0]
    bf16 = FaceDetector(net, precision="bf16").head_outputs(image)[0]
    assert all(x.dtype == np.float32 for x in bf16)
    np.testing.assert_allclose(bf16.conf, fp32.conf, atol=0.03)
    np.testing.assert_allclose(bf16.loc, fp32.loc, atol=0.15)
    with pytest.raises(ValueError, match="precision"):
        FaceDetector(net, precision="fp16")


# --- golden cases --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case_name", "kind"), [
    ("retinaface_r50_net_a", "retinaface_r50_net"),
    ("retinaface_postproc_a", "retinaface_postproc"),
])
def test_golden(golden, aux_checkpoints, case_name, kind):
    path = golden / f"{case_name}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    checks = RUNNERS[kind](Case.open(path), Context(aux_checkpoints))
    assert checks
    failed = [f"{c.name}: {c.error:.3g} > {c.tolerance:.3g}" for c in checks if not c.passed]
    assert not failed, failed
