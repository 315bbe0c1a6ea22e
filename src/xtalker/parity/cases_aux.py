"""Parity runners for the auxiliary networks: GFPGAN v1.4 ("gfpgan_v14").

The aux weight files are not among the four SadTalker files the Context knows, so a runner takes
its file (e.g. `GFPGANv1.4.pth`) from the checkpoint folder when it is there and otherwise writes the verified synthetic
file (rule sadtalker-synth-v1-aux): into the checkpoint folder when that is a synthetic cache, else into
the default synthetic cache folder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from xtalker.models.gfpgan import (
    FILE_NAME as GFPGAN_FILE,
)
from xtalker.models.gfpgan import (
    NOISE_SIZES,
    GFPGANv1Clean,
    load_gfpgan,
    postprocess_to_bgr_u8,
    preprocess_bgr_u8,
)
from xtalker.parity.core import Case, Check, Context, levels, max_abs, mean_abs
from xtalker.synthetic import default_cache_dir
from xtalker.synthetic_aux import ensure_aux


def aux_file(ctx: Context, file_name: str) -> Path:
    """The aux weight file `file_name` the cases run with (see the module docstring)."""
    present = ctx.checkpoint_dir / file_name
    if present.is_file():
        return present
    return ensure_aux(ctx.checkpoint_dir if ctx.synthesize_missing else default_cache_dir(), file_name)


@functools.lru_cache(maxsize=1)
def _gfpgan(path: str) -> GFPGANv1Clean:
    return load_gfpgan(path)


def run_gfpgan(case: Case, ctx: Context) -> list[Check]:
    net = _gfpgan(str(aux_file(ctx, GFPGAN_FILE)))
    crops = case.tensor("input.cropped_face_bgr_u8")
    single = crops.dim() == 3  # one HWC crop, or a batch of them
    x = preprocess_bgr_u8(crops.unsqueeze(0) if single else crops)
    keys = set(case.keys())
    encoded = net.encode(x)
    if "input.noise0" in keys:
        image = net.decode(encoded, [case.tensor(f"input.noise{i}") for i in range(len(NOISE_SIZES))])
    else:
        # Upstream draws the noise from the global generator right after the case's manual_seed.
        torch.manual_seed(int(case.meta["torch_noise_seed"]))
        image = net.decode(encoded)
    restored = postprocess_to_bgr_u8(image)
    scale0, shift0 = encoded.conditions[0]
    outputs: dict[str, Callable[[str], list[Check]]] = {
        "out.image": lambda k: [
            max_abs("image", image, case.tensor(k), 1e-5),
            mean_abs("image (mean)", image, case.tensor(k), 1e-6),
        ],
        "out.style_code": lambda k: [max_abs("style_code", encoded.style_code, case.tensor(k), 1e-5)],
        "out.condition_scale0": lambda k: [max_abs("condition_scale0", scale0, case.tensor(k), 1e-5)],
        "out.condition_shift0": lambda k: [max_abs("condition_shift0", shift0, case.tensor(k), 1e-5)],
        "out.restored_face_bgr_u8": lambda k: [
            levels("restored_face_bgr_u8", restored[0] if single else restored, case.tensor(k), 1, 1e-4)
        ],
    }
    return [c for key, compare in outputs.items() if key in keys for c in compare(key)]


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "gfpgan_v14": run_gfpgan,
}
