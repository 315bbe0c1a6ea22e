"""Paste-back blends on a real picture: where each puts the face, how its edge looks, how close to seamless."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from xtalker.finish import BLENDS, PasteTarget
from xtalker.finish.paste import Paster, blend_mask

PORTRAIT = Path(__file__).resolve().parents[1] / "examples" / "source_image" / "astronaut.png"
BOX = (60, 300, 140, 380)  # y1, y2, x1, x2: around the face of the bundled portrait


@pytest.fixture(scope="module")
def scene() -> tuple[PasteTarget, np.ndarray]:
    picture = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    y1, y2, x1, x2 = BOX
    # A "rendered" face: the same region, brighter and slightly blurred, at the renderer's 256 px.
    face = cv2.resize(picture[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_AREA)
    face = cv2.GaussianBlur(cv2.convertScaleAbs(face, alpha=1.0, beta=25), (0, 0), 1.0)
    return PasteTarget(np.ascontiguousarray(picture), BOX), face


def test_every_blend_keeps_the_picture_outside_the_box(scene):
    target, face = scene
    y1, y2, x1, x2 = BOX
    outside = np.ones(target.background.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    for method in BLENDS:
        out = Paster(target, method)(face)
        assert out.shape == target.background.shape and out.dtype == np.uint8
        if method != "seamless":  # the Poisson solve may touch the pixels right at the border
            assert np.array_equal(out[outside], target.background[outside]), method


def test_alpha_is_the_resized_face_and_soft_blends_fade_in(scene):
    target, face = scene
    y1, y2, x1, x2 = BOX
    patch = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(Paster(target, "alpha")(face)[y1:y2, x1:x2], patch)
    for method in ("feather", "gaussian"):
        out = Paster(target, method)(face)[y1:y2, x1:x2].astype(int)
        centre = (slice(100, 140), slice(100, 140))
        assert np.abs(out[centre] - patch[centre]).max() <= 1  # full weight inside
        # at the border the picture dominates
        edge = np.abs(out[:, 0] - target.background[y1:y2, x1].astype(int)).mean()
        assert edge < np.abs(patch[:, 0].astype(int) - target.background[y1:y2, x1]).mean() / 3, method


def test_soft_masks_are_monotone_ramps():
    for method in ("feather", "gaussian"):
        mask = blend_mask((200, 100), method)
        assert mask.shape == (100, 200) and mask.dtype == np.float32
        assert 0 <= mask.min() < 0.1 and mask.max() == pytest.approx(1.0, abs=1e-3)
        row = mask[50, :100]
        assert np.all(np.diff(row) >= -1e-6)  # rises from the border towards the centre
    assert blend_mask((10, 10), "seamless") is None and blend_mask((10, 10), "alpha") is None
    with pytest.raises(ValueError, match="unknown blend 'poisson'"):
        blend_mask((10, 10), "poisson")


def test_soft_blends_stay_close_to_seamless(scene):
    target, face = scene
    y1, y2, x1, x2 = BOX
    reference = Paster(target, "seamless")(face)[y1:y2, x1:x2].astype(float)
    for method in ("feather", "gaussian"):
        diff = np.abs(Paster(target, method)(face)[y1:y2, x1:x2] - reference).mean()
        assert diff < 30, (method, diff)  # seamless also shifts the face's colours towards the picture's
