"""Face enhancement of rendered frames, in the streaming pipeline (after aspect restore, before paste-back).

`lightweight` needs no weights: an unsharp mask that restores some of the detail the 256 px renderer loses,
at about a millisecond per frame. `gfpgan` (upstream's GFPGAN v1.4) is refused with a clear message
until the network lands.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

ENHANCERS = ("lightweight",)
PLANNED = {"gfpgan": "GFPGAN v1.4", "restoreformer": "RestoreFormer"}
SHARPEN_SIGMA = 1.2  # px at the output size: the renderer's blur scale at 256 px
SHARPEN_AMOUNT = 0.6  # 1 + amount times the frame minus amount times its blur


def check_enhancer(name: str | None) -> str | None:
    """The normalised enhancer name, or None; ValueError naming what is available otherwise."""
    if name is None:
        return None
    key = name.lower()
    if key in ENHANCERS:
        return key
    if key in PLANNED:
        raise ValueError(f"--enhancer {name}: {PLANNED[key]} is not available in this build yet; "
                         "use --enhancer lightweight (no weights needed) or run without an enhancer")
    raise ValueError(f"--enhancer must be one of {', '.join(ENHANCERS)}, got {name!r}")


def sharpen(frame: np.ndarray, sigma: float = SHARPEN_SIGMA, amount: float = SHARPEN_AMOUNT) -> np.ndarray:
    """Unsharp mask of one uint8 HWC frame (saturating)."""
    blurred = cv2.GaussianBlur(frame, (0, 0), sigma)
    return cv2.addWeighted(frame, 1.0 + amount, blurred, -amount, 0.0)


def make_enhancer(name: str | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """Per-frame enhancer for `name` (see ENHANCERS), or None for no enhancement."""
    if check_enhancer(name) is None:
        return None
    return sharpen
