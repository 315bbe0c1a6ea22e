"""Numeric precision of the renderer's generator, and the CPU memory setting the fast paths rely on.

`prepare_generator(generator, "bf16")` casts the per-frame convolution stacks of the generator to bfloat16
(oneDNN runs them about 2.3x faster than float32 on AVX-512 BF16 CPUs). The generator's forward code casts
activations at each part's boundary to that part's weight dtype, so what stays float32 is decided here only:

- `encode_source` (runs once per video; its features are sampled for every frame),
- all keypoint math: heatmaps, sparse motions, the mask softmax, the cut and the deformation,
- both grid_samples (sampling coordinates in bfloat16 would be off by up to a quarter pixel),
- `third` and `fourth`, the two convs between the warped volume and the decoder: 1% of the multiply-adds,
  but in bfloat16 they cost 2 dB (PSNR against float32 frames, 47 -> 45 dB),
- the occlusion map (a cheap 49-wide GEMM plus a float32 shifted sum; its sigmoid scales every feature),
- the final sigmoid.

The keypoint detector and the mapping net are not touched: they run once per video or on 27 x 70 numbers,
and keypoint drift is what ruins bfloat16 over the whole renderer (31 dB against float32).

"fp16" (CUDA only, see `xtalker.device`) is the same split in float16.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the per-frame parts' dtype

# Generator submodules that run in bfloat16 under "bf16": together about 98% of a frame's multiply-adds.
BF16_PARTS = ("dense_motion_network.hourglass", "dense_motion_network.mask", "decoder")

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def prepare_generator(generator: nn.Module, precision: str) -> nn.Module:
    """Set the generator's parts to `precision`, in place (one way: load a fresh generator for another).

    "int8" leaves the generator float32: `xtalker.render.quantize` builds the int8 graph from it, which needs
    calibration inputs that only the caller has.
    """
    if check_precision(precision) in HALF:
        for name in BF16_PARTS:
            generator.get_submodule(name).to(HALF[precision])
    log.debug("generator precision %s", precision)
    return generator


def generator_precision(generator: nn.Module) -> str:
    """"int8" for a quantized generator, else the dtype of the decoder's weights: "bf16", "fp16" or "fp32"."""
    if getattr(generator, "precision", None) == "int8":
        return "int8"
    dtype = generator.get_submodule("decoder").fc.weight.dtype
    return next((name for name, half in HALF.items() if half == dtype), "fp32")


def keep_freed_memory() -> bool:
    """Ask glibc malloc to recycle freed blocks instead of returning them to the kernel after each use.

    A 256 px frame allocates and frees gigabytes of temporaries; by default every block above the dynamic
    mmap threshold is a fresh mapping whose pages fault and are zeroed on first touch (measured per 256 px
    frame: 150k faults in bf16, 640k in fp32; 4-7% of the frame time on this VM). Freed memory then stays
    with the process (peak RSS is unchanged). Process-wide; returns False where it does not apply.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = all(
        libc.mallopt(option, value) == 1
        for option, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, 1 << 30),
            (_M_TOP_PAD, 256 << 20),
        )
    )
    log.debug("glibc malloc tuned for reuse: %s", ok)
    return ok
