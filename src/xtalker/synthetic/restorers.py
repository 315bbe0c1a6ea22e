"""Deterministic synthetic weights for the optional restorers (rule `sadtalker-synth-v1-restorers`).

Files: `RestoreFormer.pth` and `RealESRGAN_x2plus.pth`, each `torch.save({'params_ema': state_dict})` with the
official float32 tensors (keys and shapes from `data/restorers_layout.json`, taken from the reference manifest).
Seeding and drawing are those of `sadtalker-synth-v1` (`xtalker.synthetic.sadtalker`): per tensor, in sorted key
order, a generator seeded from sha256(f"{F}:params_ema/{key}") draws float64 values scaled into a range chosen by
the tensor's role, cast to float32. The golden restorer cases were computed with exactly these weights; the content
digest proves a file follows the rule.

Ranges (reference README_restorers 7.2):
- weights with ndim >= 2 (conv kernels, the VQ codebook): U(-a, a), a = gain * sqrt(3 / fan_in),
  fan_in = numel / shape[0]; gain 0.3 for RestoreFormer `decoder.conv_out.`, 0.02 for RealESRGAN `conv_body.`,
  0.7 for RealESRGAN `conv_last.`, 1.0 otherwise (first matching prefix wins);
- 1-D weights (RestoreFormer GroupNorm gammas): U(0.8, 1.2);
- biases: U(-0.1, 0.1), except RealESRGAN `conv_last.bias`: U(0.4, 0.6).

They are cached with the aux files (`default_aux_dir()`), beside `GFPGANv1.4.pth`: the enhancer looks for all its
files in one folder.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path

import torch

from xtalker.models.restorerfile import restorers_layout
from xtalker.models.restoreformer import FILE_NAME as RESTOREFORMER_FILE
from xtalker.models.rrdbnet import FILE_NAME as REALESRGAN_FILE
from xtalker.synthetic.auxiliary import default_aux_dir, save_synthetic
from xtalker.synthetic.sadtalker import content_digest, seed_for

log = logging.getLogger(__name__)

RULE = "sadtalker-synth-v1-restorers"
FILES = (RESTOREFORMER_FILE, REALESRGAN_FILE)
GAINS: dict[str, tuple[tuple[str, float], ...]] = {
    RESTOREFORMER_FILE: (("decoder.conv_out.", 0.3),),
    REALESRGAN_FILE: (("conv_body.", 0.02), ("conv_last.", 0.7)),
}
BIAS_RANGE = (-0.1, 0.1)
BIAS_RANGES = {REALESRGAN_FILE: {"conv_last.bias": (0.4, 0.6)}}
NORM_WEIGHT_RANGE = (0.8, 1.2)
DTYPES = {"F32": torch.float32, "I64": torch.int64}


def digest_group(file_name: str) -> str:
    return restorers_layout()[file_name]["top_key"] + "/"


def _uniform(file_name: str, key: str, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed_for(file_name, digest_group(file_name) + key))
    u = torch.rand(math.prod(shape), generator=gen, dtype=torch.float64)
    return (lo + (hi - lo) * u).reshape(shape)


def _value(file_name: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return _uniform(file_name, key, shape, *BIAS_RANGES.get(file_name, {}).get(key, BIAS_RANGE))
    if leaf == "weight" and len(shape) == 1:
        return _uniform(file_name, key, shape, *NORM_WEIGHT_RANGE)
    if leaf == "weight" and len(shape) >= 2:
        gain = next((g for prefix, g in GAINS[file_name] if key.startswith(prefix)), 1.0)
        a = gain * math.sqrt(3.0 / (math.prod(shape) // shape[0]))
        return _uniform(file_name, key, shape, -a, a)
    raise ValueError(f"{RULE} has no fill for {file_name}:{key} {shape}")


def synthesize(file_name: str) -> OrderedDict[str, torch.Tensor]:
    """Every tensor of `file_name` (one of FILES) by the rule, in sorted key order."""
    tensors = restorers_layout()[file_name]["tensors"]
    return OrderedDict(
        (key, _value(file_name, key, tuple(shape)).to(DTYPES[dtype]).contiguous())
        for key, (shape, dtype) in sorted(tensors.items())
    )


def write_restorer(path: str | Path, file_name: str, top_key: str | None = None) -> str:
    """Write the synthetic `file_name` at `path` atomically in the official container (the state dict under
    `top_key`, default `params_ema`; `params` writes the loader-fallback layout); return its content digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = synthesize(file_name)
    payload = OrderedDict([(top_key or restorers_layout()[file_name]["top_key"], state)])  # as the reference writer
    return save_synthetic(path, file_name, payload, state, digest_group(file_name))


def read_back_digest(path: str | Path, file_name: str) -> str:
    """Content digest of a restorer file as a loader reads it (`params_ema`, else `params`, digested as
    `params_ema/`, like the reference writer's --verify)."""
    top = torch.load(str(path), map_location="cpu", weights_only=True)
    state = top["params_ema"] if "params_ema" in top else top["params"]
    return content_digest(state, digest_group(file_name))


def ensure_restorer(folder: str | Path, file_name: str) -> Path:
    """`folder/file_name`: the file if present, else a verified synthetic one written there (with a marker)."""
    from xtalker.synthetic.auxiliary import ensure_verified

    return ensure_verified(folder, file_name, write_restorer, restorers_layout()[file_name]["digest"], RULE)


def ensure_restorers(folder: str | Path | None = None) -> Path:
    """`folder` (default: the synthetic aux cache, beside GFPGANv1.4.pth) holding both restorer files (synthetic
    ones written where missing; 358 MB, about 10 s)."""
    folder = Path(folder) if folder is not None else default_aux_dir()
    for name in FILES:
        ensure_restorer(folder, name)
    return folder


def write_all_restorers(folder: str | Path, verify: bool = False) -> dict[str, bool]:
    """Write both files into `folder`; file name -> digest OK (read back from disk when `verify`)."""
    results = {}
    for name in FILES:
        path = Path(folder) / name
        digest = write_restorer(path, name)
        results[name] = (read_back_digest(path, name) if verify else digest) == restorers_layout()[name]["digest"]
    return results
