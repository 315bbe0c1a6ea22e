"""What follows the renderer: aspect restore, face enhancer, paste-back, per batch of frames.

In: uint8 face frames from the renderer and the run's paste target (the original picture and the crop box).
Out: finished video frames (the crop, or the whole picture in the full modes; twice the size with GFPGAN or
RestoreFormer unless `enhance_scale` is 1).

`chain` builds the post-render chain once per video and splits it for parallel workers; `paste` holds the
paste-back blends; `enhance` the face enhancers (lightweight, GFPGAN or RestoreFormer, source-aligned or per-frame
detect); `background` the RealESRGAN background upsampler and RestoreFormer's restorer; `restore` the face-restore
geometry the restorers run inside (5-point alignment, warps, parse mask, paste).
"""

from xtalker.finish.chain import Finisher, FinishSettings
from xtalker.finish.enhance import ALIGNS, check_background, check_enhancer, check_weights
from xtalker.finish.paste import BLENDS, PasteTarget, paste_target
from xtalker.finish.restore import five_points

__all__ = [
    "ALIGNS",
    "BLENDS",
    "FinishSettings",
    "Finisher",
    "PasteTarget",
    "check_background",
    "check_enhancer",
    "check_weights",
    "five_points",
    "paste_target",
]
