"""Parity runner for ParseNet, the paste-back face parser ("parsenet").

The logits, per-class means and classes are checked on the inference path the enhancer runs
(`mask_logits` / `parse_classes`: folded BatchNorm, transposed up-convs) and on the op-for-op forward,
which alone computes the unused image head (`out.out_img_mean_per_channel`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import numpy as np
import torch

from xtalker.models.parsenet import (
    FILE_NAME,
    ParseNet,
    load_parsenet,
    mask_logits,
    preprocess_bgr_u8,
)
from xtalker.parity.cases_aux import aux_file
from xtalker.parity.core import Case, Check, Context, exact, max_abs

LOGITS_ATOL = 1e-4
MEAN_ATOL = 1e-5
# Pixels whose stored top-1 minus top-2 logit is below this may legitimately change class.
NEAR_TIE_MARGIN = 1e-3
_CROP_KEY = re.compile(r"out\.logits_crop_rows(\d+)_(\d+)_cols(\d+)_(\d+)$")


@functools.lru_cache(maxsize=1)
def _parsenet(path: str) -> ParseNet:
    return load_parsenet(path)


def _means(values: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial means, per sample when the stored means have a batch axis, else over the batch too."""
    return values.mean((0, 2, 3)) if expected.dim() == 1 else values.mean((2, 3))


def _logit_checks(case: Case, label: str, logits: torch.Tensor) -> list[Check]:
    checks = []
    for key in case.keys():  # noqa: SIM118 - Case is not a mapping
        window = _CROP_KEY.match(key)
        if window:
            r0, r1, c0, c1 = map(int, window.groups())
            checks.append(max_abs(f"{key[4:]}{label}", logits[:, :, r0:r1, c0:c1], case.tensor(key), LOGITS_ATOL))
    if case.has("out.logits_mean_per_class"):
        expected = case.tensor("out.logits_mean_per_class")
        checks.append(max_abs(f"logits_mean_per_class{label}", _means(logits, expected), expected, MEAN_ATOL))
    return checks


def _class_check(case: Case, name: str, classes: np.ndarray, single: bool) -> Check:
    expected = case.array("out.parse_classes_u8")
    actual = classes[0] if single else classes
    if not case.has("out.top2_margin_f16") or actual.shape != expected.shape:
        return exact(name, actual, expected)
    decided = case.array("out.top2_margin_f16").astype(np.float32) >= NEAR_TIE_MARGIN
    check = exact(name, actual[decided], expected[decided])
    near_tie = int(np.count_nonzero(actual[~decided] != expected[~decided]))
    check.detail += f"; ignoring {near_tie} changes where the stored margin < {NEAR_TIE_MARGIN:g}"
    return check


def run_parsenet(case: Case, ctx: Context) -> list[Check]:
    net = _parsenet(str(aux_file(ctx, FILE_NAME)))
    # The colour order is in the tensor name (README 6.3); the network path takes BGR like upstream.
    faces = case.array("input.face_bgr_u8") if case.has("input.face_bgr_u8") else case.array("input.face_rgb_u8")[..., ::-1]
    single = faces.ndim == 3  # one HWC face, or a batch of them
    batch = faces[None] if single else faces
    logits = mask_logits(net, batch)
    checks = _logit_checks(case, "", logits)
    with torch.inference_mode():
        reference_logits, image = net(preprocess_bgr_u8(batch))
    checks += _logit_checks(case, " (forward)", reference_logits)
    if case.has("out.out_img_mean_per_channel"):
        expected = case.tensor("out.out_img_mean_per_channel")
        checks.append(max_abs("out_img_mean_per_channel (forward)", _means(image, expected), expected, MEAN_ATOL))
    if case.has("out.parse_classes_u8"):
        # `parse_classes` is this argmax (without the float32 copy of the logits).
        classes = logits.argmax(1).to(torch.uint8).numpy()
        checks.append(_class_check(case, "parse_classes_u8", classes, single))
        forward_classes = reference_logits.argmax(1).to(torch.uint8).numpy()
        checks.append(_class_check(case, "parse_classes_u8 (forward)", forward_classes, single))
    return checks


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "parsenet": run_parsenet,
}
