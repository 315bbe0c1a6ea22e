"""The alignment's bicubic resize: Pillow 13's arithmetic without Pillow, so the UI's older Pillow changes nothing."""

from __future__ import annotations

import hashlib

import numpy as np
import PIL
import pytest
from PIL import Image

from xtalker.preprocess.resample import resize_bicubic

PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13

# A fixed picture's resizes, recorded with Pillow 13.0: rows first, columns first (height shrinks by more than
# twice what the width loses), a width grown while the height shrinks, and an upscale.
PICTURE = (np.arange(97 * 131 * 3, dtype=np.int64).reshape(97, 131, 3) * 2654435761 % 251).astype(np.uint8)
RECORDED = {(60, 40): "6ccbf5b081c39ea4", (120, 20): "f400c3542eba48a8", (150, 40): "09040f08ca54f699",
            (300, 300): "162c14b674af6803"}


@pytest.mark.parametrize("size", list(RECORDED))
def test_matches_the_recorded_pillow_13_output(size):
    assert hashlib.sha256(resize_bicubic(PICTURE, size).tobytes()).hexdigest()[:16] == RECORDED[size]


@pytest.mark.skipif(not PILLOW_13, reason="compares against Pillow 13's own resize")
def test_equals_pillow_13_on_random_sizes():
    rng = np.random.default_rng(3)
    for i in range(120):
        h, w = (int(v) for v in rng.integers(1, 160, 2))
        size = (int(rng.integers(1, 220)), int(rng.integers(1, 220)))
        if i % 3 == 0:  # near the rows-first / columns-first boundary
            size = (max(1, w - int(rng.integers(0, 10))), max(1, h - int(rng.integers(0, 40))))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(image).resize(size, resample=Image.BICUBIC))
        assert np.array_equal(resize_bicubic(image, size), expected), (image.shape, size)


def test_grey_images_and_bad_input():
    grey = PICTURE[..., 0]
    assert np.array_equal(resize_bicubic(grey, (60, 40)), resize_bicubic(PICTURE, (60, 40))[..., 0])
    with pytest.raises(TypeError, match="uint8"):
        resize_bicubic(PICTURE.astype(np.float32), (10, 10))
    with pytest.raises(ValueError, match="positive size"):
        resize_bicubic(PICTURE, (0, 10))
