"""Face enhancers: what `lightweight` does to a frame, and the refusals of those not available."""

from __future__ import annotations

import numpy as np
import pytest

from xtalker.enhance import check_enhancer, make_enhancer, sharpen


def test_sharpen_keeps_flat_areas_and_steepens_edges():
    flat = np.full((32, 32, 3), 120, np.uint8)
    assert np.array_equal(sharpen(flat), flat)
    step = np.zeros((32, 32, 3), np.uint8)
    step[:, 16:] = 200
    out = sharpen(step).astype(int)
    assert out[0, 15, 0] == 0 and out[0, 16, 0] > 200  # overshoot on the bright side, clipped on the dark
    assert np.array_equal(out[:, :10], step[:, :10]) and np.array_equal(out[:, 24:], step[:, 24:])


def test_enhancer_names():
    assert make_enhancer(None) is None
    assert make_enhancer("Lightweight") is sharpen
    with pytest.raises(ValueError, match="GFPGAN v1.4 is not available in this build yet; use --enhancer lightweight"):
        check_enhancer("gfpgan")
    with pytest.raises(ValueError, match="must be one of lightweight"):
        check_enhancer("codeformer")
