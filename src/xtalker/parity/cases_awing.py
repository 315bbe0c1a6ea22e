"""Parity runners for the AWing FAN landmark step: "awing_fan" (network + decode on a detected box) and
"awing_decode_quirks" (the heatmap decoder alone on planted heatmaps), with README 6.4's tolerances.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from xtalker.models.awing import FILE_NAME
from xtalker.parity.cases_aux import aux_file
from xtalker.parity.core import Case, Check, Context, exact, max_abs
from xtalker.preprocess.landmarks.fan import FanLandmarks, decode_heatmaps, wflw98_to_68

HEATMAP_TOL = 1e-4
POINTS_TOL = 1e-9
LM68_TOL = 1e-4


@functools.lru_cache(maxsize=1)
def _landmarks(path: str) -> FanLandmarks:
    return FanLandmarks.from_file(path)


def _like(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """`actual` in the stored layout (cases keep or drop the batch axis per output); other sizes stay as they are."""
    return actual.reshape(expected.shape) if actual.size == expected.size else actual


def run_awing_fan(case: Case, ctx: Context) -> list[Check]:
    fan = _landmarks(str(aux_file(ctx, FILE_NAME)))
    boxes = case.array("input.det_box_xyxy")
    boxes = boxes.reshape(-1, boxes.shape[-1])
    images = case.array("input.image_rgb_u8")
    steps = fan.steps(list(images) if images.ndim == 4 else [images] * len(boxes), boxes)
    # Differently sized crops cannot be one stored tensor: such a batch fails the crop check by shape.
    same_size = len({c.shape for c in steps.crops_rgb_u8}) == 1
    crops = np.stack(steps.crops_rgb_u8) if same_size else np.empty(0, np.uint8)
    actual: dict[str, tuple[np.ndarray, float | None]] = {
        "out.crop_rgb_u8": (crops, None),
        "out.resized256_bgr_u8": (np.stack(steps.resized_bgr_u8), None),
        "out.heatmaps_stack3": (steps.heatmaps.numpy(), HEATMAP_TOL),
        "out.boundary_stacks012": (steps.boundaries.numpy(), HEATMAP_TOL),
        "out.argmax_index": (steps.argmax, None),
        "out.pts98_heatmap": (steps.pts98_heatmap, POINTS_TOL),
        "out.pts98_crop": (steps.pts98_crop, POINTS_TOL),
        "out.lm68_crop": (steps.lm68_crop, LM68_TOL),
        "out.lm68_image": (steps.lm68_image, LM68_TOL),
    }
    checks = []
    for key, (value, tol) in actual.items():
        if case.has(key):
            expected = case.array(key)
            got = _like(value, expected)
            checks.append(exact(key, got, expected) if tol is None else max_abs(key, got, expected, tol))
    return checks


def _variant_heatmaps(case: Case, variant: str) -> np.ndarray:
    """The base heatmaps (float16 stored, used as float32) with the variant's (landmark, row, col, value) edits."""
    maps = case.array("input.heatmaps_base_f16").astype(np.float32)
    key = f"input.edits_{variant}"
    if case.has(key):
        for landmark, row, col, value in case.array(key).reshape(-1, 4).tolist():
            maps[..., int(landmark), int(row), int(col)] = np.float32(value)
    return maps if maps.ndim == 4 else maps[None]


def run_awing_decode_quirks(case: Case, ctx: Context) -> list[Check]:
    checks: list[Check] = []
    for variant in case.meta["variants"]:
        argmax, pts = decode_heatmaps(_variant_heatmaps(case, variant))
        # README 6.4: exact. The points are quarter-pixel steps, exactly representable.
        actual = {f"out.argmax_{variant}": argmax, f"out.pts98_{variant}": pts, f"out.lm68_{variant}": wflw98_to_68(pts)}
        for key, value in actual.items():
            if case.has(key):
                expected = case.array(key)
                got = _like(value, expected)
                checks.append(exact(key, got, expected) if key.startswith("out.argmax") else max_abs(key, got, expected, 0.0))
    return checks


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "awing_fan": run_awing_fan,
    "awing_decode_quirks": run_awing_decode_quirks,
}
