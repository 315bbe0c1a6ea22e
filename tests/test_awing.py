"""AWing FAN landmark step: official layout, loader errors, batching, decoder quirks, 98->68, crop quirk, golden."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import golden_dir

from xtalker.models.auxfile import AuxWeightsMissing
from xtalker.models.awing import (
    FAN,
    FILE_NAME,
    load_awing,
    official_layout,
    read_awing_state,
)
from xtalker.parity.cases_awing import RUNNERS
from xtalker.parity.core import Case, Context
from xtalker.preprocess.landmarks.fan import FanLandmarks, crop_for_fan, decode_heatmaps, fan_input, wflw98_to_68

AUX_MANIFEST = golden_dir().parent / "aux_manifest.json"
PARAMETERS = 24_153_036  # aux spec 2.1
BATCH_NORMS = 184


@pytest.fixture(scope="module")
def fan_path(aux_checkpoints) -> Path:
    return aux_checkpoints / FILE_NAME


@pytest.fixture(scope="module")
def fan(fan_path) -> FanLandmarks:
    return FanLandmarks.from_file(fan_path)


def test_layout_matches_manifest():
    if not AUX_MANIFEST.is_file():
        pytest.skip(f"{AUX_MANIFEST} not present")
    manifest = json.loads(AUX_MANIFEST.read_text())["files"][FILE_NAME]["tensors"]["state_dict"]
    assert official_layout() == {k: tuple(v["shape"]) for k, v in manifest.items()}


def test_network_size():
    with torch.device("meta"):
        net = FAN()
    assert len(official_layout()) == 1137
    assert sum(p.numel() for p in net.parameters()) == PARAMETERS
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == BATCH_NORMS


def _meta_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {k: torch.empty(s) for k, s in official_layout().items()}


def test_from_official_is_strict_but_counters_are_optional():
    state = {k: v for k, v in _meta_state().items() if not k.endswith("num_batches_tracked")}
    net = FAN.from_official(state)
    assert int(net.m3.b3_4.bn1.num_batches_tracked) == 0
    del state["m2.b2_plus_1.conv3.weight"]
    with pytest.raises(RuntimeError, match=r"m2\.b2_plus_1\.conv3\.weight"):
        FAN.from_official(state)


def test_loader_errors(tmp_path):
    with pytest.raises(AuxWeightsMissing, match=FILE_NAME):
        load_awing(tmp_path / "absent.pth")
    flat = tmp_path / "flat.pth"
    torch.save({"conv1.conv.weight": torch.zeros(64, 6, 7, 7)}, flat)
    with pytest.raises(ValueError, match=r"flat\.pth: no 'state_dict' state dict"):
        load_awing(flat)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"conv1.conv.weights": torch.zeros(64, 6, 7, 7)}}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth \[state_dict\].*missing: .*unexpected: conv1\.conv\.weights"):
        load_awing(bad)


def test_loads_without_counters_and_ignores_other_top_level_keys(fan_path, fan, tmp_path):
    state = read_awing_state(fan_path)
    assert not any(k.endswith("num_batches_tracked") for k in state)
    bare = tmp_path / FILE_NAME
    torch.save({"state_dict": state, "epoch": 7, "optimizer": {"lr": 0.1}}, bare)
    net = load_awing(bare)
    assert not net.training
    reference = fan.net.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in net.state_dict().items())


def _golden_pair() -> tuple[np.ndarray, np.ndarray]:
    path = golden_dir() / "awing_fan_a.safetensors"
    if path.is_file():
        case = Case.open(path)
        return case.array("input.image_rgb_u8"), case.array("input.det_box_xyxy")
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (300, 300, 3), dtype=np.uint8), np.array([62.7, 48.3, 231.9, 250.6], np.float32)


def test_batch_of_two_equals_single_runs_in_fp32_under_autocast(fan):
    image, box = _golden_pair()
    # A mirrored image and another box: different crop sizes and different boundary gates per image.
    other, other_box = np.ascontiguousarray(image[::-1, ::-1]), np.array([20.5, 10.2, 250.2, 280.9])
    both = fan.steps([image, other], [box, other_box])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        singles = [fan.steps([image], [box]), fan.steps([other], [other_box])]
    assert both.heatmaps.dtype == torch.float32 and both.heatmaps.shape == (2, 99, 64, 64)
    assert both.boundaries.shape == (2, 3, 64, 64)
    for i, single in enumerate(singles):
        assert single.heatmaps.dtype == torch.float32
        # fp32 sums in another order per batch size grow with the value (1.02e-4 at 4.8 seen on this machine)
        torch.testing.assert_close(both.heatmaps[i : i + 1], single.heatmaps, atol=1e-4, rtol=5e-5)
        torch.testing.assert_close(both.boundaries[i : i + 1], single.boundaries, atol=1e-4, rtol=5e-5)
        np.testing.assert_array_equal(both.argmax[i], single.argmax[0])
        np.testing.assert_array_equal(both.lm68_image[i], single.lm68_image[0])
    assert both.crops_rgb_u8[1].shape == (270, 230, 3)
    np.testing.assert_array_equal(both.offsets_xy, [[62, 48], [20, 10]])


SIDE = 64
N = SIDE * SIDE


class PlantedFan(torch.nn.Module):
    """Stands in for the network: landmark n of every image peaks (alone) at row 2 + n % 60, column n // 2."""

    calls: list[int]

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward_with_boundaries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(len(x))
        maps = torch.zeros(len(x), 99, SIDE, SIDE)
        for n in range(98):
            maps[:, n, 2 + n % 60, n // 2] = 1.0
        return maps, torch.zeros(len(x), 3, SIDE, SIDE)


def test_landmarks68_scales_to_the_crop_and_shifts_by_the_int_box_corner():
    planted = PlantedFan()
    fan = FanLandmarks(planted, max_batch=2)  # type: ignore[arg-type]
    image = np.zeros((300, 300, 3), np.uint8)
    detection = [10.7, 20.2, 138.9, 276.5, 0.99] + [0.0] * 10  # a detector row: only the box is used
    lm = fan.landmarks68([image] * 3, [detection, [0.0, 0.0, 64.0, 64.0], [-0.5, 299.0, 300.0, 300.0]])
    assert planted.calls == [2, 1]
    assert lm.shape == (3, 68, 2) and lm.dtype == np.float32
    n = np.arange(98)
    pts98 = np.stack([n // 2 + 0.5, 2 + n % 60 + 0.5], axis=-1)  # heatmap units
    # Crops 128 x 256 (scale 2, 4) at (10, 20); 64 x 64 (scale 1) at (0, 0); 300 x 1 (scale 4.6875, 1/64) at (0, 299).
    for i, (scale, offset) in enumerate([((2.0, 4.0), (10, 20)), ((1.0, 1.0), (0, 0)), ((300 / 64, 1 / 64), (0, 299))]):
        expected = wflw98_to_68(pts98 * scale) + np.float32(offset)
        np.testing.assert_array_equal(lm[i], expected)
    np.testing.assert_array_equal(lm[0, 18], [(17.5 + 20.5) / 2 * 2 + 10, (36.5 + 43.5) / 2 * 4 + 20])


def _peaks(rows_cols: list[tuple[int, int]], images: int = 1) -> np.ndarray:
    """(images, 98, 64, 64) maps, landmark n peaking (value 10) at rows_cols[n % len], zero elsewhere."""
    maps = np.zeros((images, 98, SIDE, SIDE), np.float32)
    for n in range(98):
        r, c = rows_cols[n % len(rows_cols)]
        maps[:, n, r, c] = 10.0
    return maps


def _flat(maps: np.ndarray, image: int, landmark: int) -> np.ndarray:
    return maps[image, landmark].reshape(-1)  # a view: writes go into `maps`


def test_decode_interior_neighbours_ties_and_equal_values():
    maps = _peaks([(20, 30)])
    f = _flat(maps, 0, 0)
    f[20 * SIDE + 31], f[20 * SIDE + 29] = 2.0, 1.0  # x: right > left -> +0.25
    f[21 * SIDE + 30], f[19 * SIDE + 30] = 1.0, 3.0  # y: below < above -> -0.25
    f = _flat(maps, 0, 1)
    f[20 * SIDE + 31] = f[20 * SIDE + 29] = 4.0  # equal neighbours: sign 0
    f = _flat(maps, 0, 2)
    f[40 * SIDE + 50] = 10.0  # a tie with the (20, 30) peak: the first occurrence wins
    f[20 * SIDE + 29] = 1.0
    f = _flat(maps, 0, 3)
    f[20 * SIDE + 30] = 0.0
    f[25 * SIDE + 63] = 10.0  # at a row end the right neighbour is the next row's first pixel
    f[26 * SIDE + 0], f[25 * SIDE + 62] = 5.0, 1.0
    argmax, pts = decode_heatmaps(torch.from_numpy(maps))
    assert argmax.dtype == np.int64 and pts.dtype == np.float64
    assert argmax[0, :4].tolist() == [20 * SIDE + 30, 20 * SIDE + 30, 20 * SIDE + 30, 25 * SIDE + 63]
    np.testing.assert_array_equal(pts[0, 0], [30.75, 20.25])
    np.testing.assert_array_equal(pts[0, 1], [30.5, 20.5])
    np.testing.assert_array_equal(pts[0, 2], [30.25, 20.5])
    np.testing.assert_array_equal(pts[0, 3], [63.75, 25.5])
    np.testing.assert_array_equal(pts[0, 4:], np.tile([30.5, 20.5], (94, 1)))


def test_decode_border_rules_are_global_per_image():
    # Image 0 has landmark 5 in row 0, image 1 landmark 9 in the last row, image 2 neither. Every map has the
    # true vertical neighbours up 2 > down 1 (+0.25 in y), but element 0 = 3 and element 4095 = 0.5, so either
    # border rule turns the sign of every landmark of its image.
    maps = _peaks([(30, 30)], images=3)
    for image in range(3):
        for n in range(98):
            f = _flat(maps, image, n)
            f[31 * SIDE + 30], f[29 * SIDE + 30] = 2.0, 1.0
            f[0], f[N - 1] = 3.0, 0.5
    for image, n, (r, c) in ((0, 5, (0, 17)), (1, 9, (SIDE - 1, 40))):
        f = _flat(maps, image, n)
        f[30 * SIDE + 30] = 0.0
        f[r * SIDE + c] = 10.0
    argmax, pts = decode_heatmaps(maps)
    assert argmax[0, 5] == 17 and argmax[1, 9] == (SIDE - 1) * SIDE + 40
    rest = np.tile([30.5, 30.25], (97, 1))
    np.testing.assert_array_equal(np.delete(pts[0], 5, axis=0), rest)  # y_down = F[0] = 3 > y_up = 2
    np.testing.assert_array_equal(pts[0, 5], [17.5, 0.25])  # y_up = F[81] = 0 < y_down = F[0] = 3
    np.testing.assert_array_equal(np.delete(pts[1], 9, axis=0), rest)  # y_up = F[4095] = 0.5 < y_down = 1
    np.testing.assert_array_equal(pts[1, 9], [40.5, 63.75])  # y_up = F[4095] = 0.5 > y_down = F[62, 40] = 0
    np.testing.assert_array_equal(pts[2], np.tile([30.5, 30.75], (98, 1)))


@pytest.mark.parametrize(("peak", "expected"), [(0, [0.75, 0.25]), (SIDE, [0.25, 1.75])])
def test_decode_first_row_rule_includes_index_64_and_index_0_wraps(peak, expected):
    maps = _peaks([(30, 30)])
    f = _flat(maps, 0, 3)
    f[30 * SIDE + 30] = 0.0
    f[peak] = 10.0
    # Index 0: x_down wraps to element 4095 (-2 < x_up = -1: +0.25; clamping or zero-filling would give -0.25).
    # Index 64: x_down = F[63] = 0 > -1. In y, y_up = 5 against y_down = F[0] (10 for index 0, 0 for index 64).
    f[peak + 1], f[N - 1] = -1.0, -2.0
    f[peak + SIDE] = 5.0
    g = _flat(maps, 0, 4)
    g[0], g[29 * SIDE + 30], g[31 * SIDE + 30] = 1.0, 4.0, 2.0  # y_down = F[0] = 1 < y_up = 2 (plain: 4 > 2)
    argmax, pts = decode_heatmaps(maps)
    assert argmax[0, 3] == peak
    np.testing.assert_array_equal(pts[0, 3], expected)
    np.testing.assert_array_equal(pts[0, 4], [30.5, 30.75])


def test_decode_survives_a_peak_at_the_last_pixel():
    # upstream raises IndexError here; the right neighbour reads the peak itself, y follows the last-row rule
    maps = _peaks([(30, 30)], images=2)
    _flat(maps, 1, 17)[N - 2] = 5.0
    _flat(maps, 1, 17)[N - 1] = 99.0
    argmax, pts = decode_heatmaps(maps)
    assert argmax[1, 17] == N - 1
    assert pts[1, 17, 0] == SIDE - 1 + 0.5 + 0.25  # sign(F[4095] - F[4094]) = +1
    assert pts[1, 17, 1] == SIDE - 1 + 0.5 + 0.25 * np.sign(99.0 - _flat(maps, 1, 17)[0])


def test_decode_accepts_the_99_map_output_and_checks_shape():
    maps = np.concatenate([_peaks([(12, 34)]), np.full((1, 1, SIDE, SIDE), 100.0, np.float32)], axis=1)
    argmax, pts = decode_heatmaps(maps)
    assert argmax.shape == (1, 98) and set(argmax[0].tolist()) == {12 * SIDE + 34}
    np.testing.assert_array_equal(pts[0], np.tile([34.5, 12.5], (98, 1)))
    with pytest.raises(ValueError, match="heatmaps"):
        decode_heatmaps(maps[:, :50])


def test_wflw98_to_68_mapping():
    pts98 = np.stack([np.arange(98.0), 1000.0 + np.arange(98.0) / 3], axis=-1)
    lm = wflw98_to_68(pts98[None])
    assert lm.shape == (1, 68, 2) and lm.dtype == np.float32
    means = {18: (34, 41), 19: (35, 40), 20: (36, 39), 21: (37, 38), 22: (42, 50), 23: (43, 49), 24: (44, 48), 25: (45, 47)}
    singles = dict(zip(range(17), range(0, 33, 2)))
    singles |= {17: 33, 26: 46} | dict(zip(range(27, 36), range(51, 60)))
    singles |= dict(zip(range(36, 48), (60, 61, 63, 64, 65, 67, 68, 69, 71, 72, 73, 75)))
    singles |= dict(zip(range(48, 68), range(76, 96)))
    assert sorted(means.keys() | singles.keys()) == list(range(68))
    for i, j in singles.items():
        np.testing.assert_array_equal(lm[0, i], pts98[j].astype(np.float32))
    for i, (a, b) in means.items():
        np.testing.assert_array_equal(lm[0, i], ((pts98[a] + pts98[b]) / 2).astype(np.float32))
    assert lm[0, 18, 0] == 37.5


def test_crop_truncates_and_wraps_negative_coordinates():
    image = np.arange(40 * 50 * 3, dtype=np.int64).reshape(40, 50, 3).astype(np.uint8)
    crop, resized, offset = crop_for_fan(image, np.array([-2.5, 1.9, 60.0, 30.99, 0.99]))
    # int(-2.5) = -2: numpy slices columns 48..49 (the box's last two), not 0..; the offset stays -2.
    np.testing.assert_array_equal(crop, image[1:30, 48:50])
    assert offset == (-2, 1)
    np.testing.assert_array_equal(resized, cv2.resize(crop, (256, 256))[..., ::-1])
    crop, _, offset = crop_for_fan(image, [-0.9, 0.0, 10.0, 12.0])  # truncation toward zero, not floor
    np.testing.assert_array_equal(crop, image[0:12, 0:10])
    assert offset == (0, 0)
    with pytest.raises(ValueError, match=r"empty crop .*\[-1:20, 5:30\]"):
        crop_for_fan(image, [5.0, -1.2, 30.0, 20.0])


def test_fan_input_is_a_float32_division():
    u8 = np.arange(256 * 256 * 3).reshape(256, 256, 3).astype(np.uint8)
    x = fan_input([u8, u8[::-1]])
    assert x.shape == (2, 3, 256, 256) and x.dtype == torch.float32 and x.is_contiguous()
    expected = u8.astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(x[0].permute(1, 2, 0).numpy(), expected)
    np.testing.assert_array_equal(x[1, 2].numpy(), expected[::-1, :, 2])


@pytest.mark.parametrize("name", ["awing_fan_a", "awing_decode_quirks_a"])
def test_golden_case(golden, aux_checkpoints, name):
    path = golden / f"{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    case = Case.open(path)
    checks = RUNNERS[name.removesuffix("_a")](case, Context(aux_checkpoints))
    expected = 9 if name == "awing_fan_a" else 15
    assert len(checks) == expected
    failed = [(c.name, c.error, c.tolerance) for c in checks if not c.passed]
    assert not failed
