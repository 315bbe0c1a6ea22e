"""Synthetic weights by the reference rules: meaningless pictures, exactly the real compute.

In: a folder. Out: files in the official formats and layouts whose every tensor is drawn by rule, with content
digests equal to the reference manifests, so tests and benchmarks run without the real weights.

`sadtalker` writes the SadTalker files (rule sadtalker-synth-v1) into a shared cache; `auxiliary` the aux files
(GFPGAN, RetinaFace, AWing FAN, ParseNet; rule sadtalker-synth-v1-aux) into a cache of their own; `pirender` the
PIRender renderer's file (rule sadtalker-synth-v1-pirender) beside the SadTalker files; `legacy` the legacy
per-network set of `--old_version` (rule sadtalker-synth-v1-legacy, a re-keying of the packed 256 file);
`restorers` the optional restorers' files (RestoreFormer, RealESRGAN x2plus; rule sadtalker-synth-v1-restorers)
into the aux cache, beside GFPGANv1.4.pth.
"""

from xtalker.synthetic.auxiliary import default_aux_dir, ensure_aux
from xtalker.synthetic.legacy import ensure_legacy
from xtalker.synthetic.pirender import ensure_pirender
from xtalker.synthetic.restorers import ensure_restorers
from xtalker.synthetic.sadtalker import default_cache_dir, ensure_cached, is_synthetic_folder

__all__ = [
    "default_aux_dir",
    "default_cache_dir",
    "ensure_aux",
    "ensure_cached",
    "ensure_legacy",
    "ensure_pirender",
    "ensure_restorers",
    "is_synthetic_folder",
]
