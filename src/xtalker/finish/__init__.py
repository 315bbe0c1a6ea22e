"""What follows the renderer: aspect restore, face enhancer, paste-back, per batch of frames.

In: uint8 face frames from the renderer and the run's paste target (the original picture and the crop box).
Out: finished video frames (the crop, or the whole picture in the full modes; twice the size with GFPGAN).

`chain` builds the post-render chain once per video and splits it for parallel workers; `paste` holds the
paste-back blends; `enhance` the face enhancers (lightweight, GFPGAN source-aligned or per-frame detect);
`restore` the face-restore geometry GFPGAN runs inside (5-point alignment, warps, parse mask, paste).
"""

from xtalker.finish.chain import Finisher, FinishSettings
from xtalker.finish.enhance import ALIGNS, check_enhancer, check_weights
from xtalker.finish.paste import BLENDS, PasteTarget, paste_target
from xtalker.finish.restore import five_points

__all__ = [
    "ALIGNS",
    "BLENDS",
    "FinishSettings",
    "Finisher",
    "PasteTarget",
    "check_enhancer",
    "check_weights",
    "five_points",
    "paste_target",
]
