"""Deterministic synthetic weights for PIRender's FaceGenerator (rule `sadtalker-synth-v1-pirender`).

File: `epoch_00190_iteration_000400000_checkpoint.pt`, a torch pickle `{'net_G_ema': state_dict,
'current_epoch': 190, 'current_iteration': 400000}` with the 304 official float32 tensors (keys and shapes
from `xtalker.models.pirender.official_layout`). Seeding and drawing are those of `sadtalker-synth-v1`
(`xtalker.synthetic.sadtalker`): per tensor, in sorted key order, a generator seeded from
sha256(f"{F}:net_G_ema/{key}") draws float64 values scaled into a range chosen by the tensor's role, cast to
float32. The golden PIRender cases were computed with exactly these weights; the content digest proves it.

Ranges (reference README_extensions P.2):
- conv / conv-transpose / linear weights (ndim >= 2, not LayerNorm2d): U(-a, a), a = gain * sqrt(3 / fan_in),
  fan_in = numel / shape[0]; gain 0.5 for the ADAIN scale/shift heads, 2.0 for the flow conv, 0.7 for the
  last conv before tanh, 1.0 otherwise; the mapping net's first conv has its crop-triple input channels
  (70:73, values around 100-160 px) scaled by 0.01 after the draw;
- LayerNorm2d weights (C, 1, 1): U(0.8, 1.2);
- biases: U(-0.1, 0.1), except the final conv's U(0.6, 0.8) (about 3/4 of the output lands in (0, 1)).
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from xtalker.models.pirender import FILE_NAME, TOP_KEY, official_layout
from xtalker.synthetic.sadtalker import content_digest, seed_for

log = logging.getLogger(__name__)

RULE = "sadtalker-synth-v1-pirender"
DIGEST = "cbbe1be8071ba097182af950044c54fc2b8e3788ce34ebbedd94ef01ca1ba7b7"
GROUP = TOP_KEY + "/"
EXTRA_TOP_LEVEL = (("current_epoch", 190), ("current_iteration", 400000))

# First matching pattern (re.search on the model key) gives the weight gain; 1.0 otherwise.
GAINS = (
    (r"\.mlp_(gamma|beta)\.", 0.5),
    (r"^warpping_net\.flow_out\.2\.", 2.0),
    (r"^editing_net\.decoder\.final\.", 0.7),
)
BIAS_RANGE = (-0.1, 0.1)
BIAS_RANGES = {"editing_net.decoder.final.model.0.bias": (0.6, 0.8)}
NORM_WEIGHT_RANGE = (0.8, 1.2)
CROP_INPUT_KEY = "mapping_net.first.0.weight"
CROP_INPUT_CHANNELS = slice(70, 73)
CROP_INPUT_SCALE = 0.01


def _uniform(key: str, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed_for(FILE_NAME, GROUP + key))
    u = torch.rand(math.prod(shape), generator=gen, dtype=torch.float64)
    return (lo + (hi - lo) * u).reshape(shape)


def _gain(key: str) -> float:
    return next((gain for pattern, gain in GAINS if re.search(pattern, key)), 1.0)


def _value(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return _uniform(key, shape, *BIAS_RANGES.get(key, BIAS_RANGE))
    if leaf == "weight" and len(shape) >= 2 and math.prod(shape) == shape[0]:  # LayerNorm2d (C, 1, 1)
        return _uniform(key, shape, *NORM_WEIGHT_RANGE)
    if leaf == "weight" and len(shape) >= 2:
        a = _gain(key) * math.sqrt(3.0 / (math.prod(shape) / shape[0]))
        value = _uniform(key, shape, -a, a)
        if key == CROP_INPUT_KEY:
            value[:, CROP_INPUT_CHANNELS] *= CROP_INPUT_SCALE
        return value
    raise ValueError(f"{RULE} has no fill for {key} {shape}")


def synthesize() -> OrderedDict[str, torch.Tensor]:
    """Every `net_G_ema` tensor by the rule, float32, in sorted key order."""
    return OrderedDict((key, _value(key, shape).to(torch.float32)) for key, shape in sorted(official_layout().items()))


def write_pirender(path: str | Path) -> str:
    """Write the synthetic file at `path` atomically in the official container; return its content digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = synthesize()
    payload = OrderedDict([(TOP_KEY, state), *EXTRA_TOP_LEVEL])
    # A private temp folder keeps concurrent writers apart; saving under the final name there keeps the bytes
    # identical to a direct save (torch.save names the zip records after the file).
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        torch.save(payload, tmp)
        tmp.replace(path)
    digest = content_digest(state, GROUP)
    log.info("%s: synthetic %s written (digest %s)", path, FILE_NAME, digest[:12])
    return digest


def read_back_digest(path: str | Path) -> str:
    """Content digest of a PIRender file's `net_G_ema` as a loader reads it."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)[TOP_KEY]
    return content_digest(state, GROUP)


def _marker(folder: Path) -> Path:
    return folder / f".{FILE_NAME}.digest"


def ensure_pirender(folder: str | Path) -> Path:
    """`folder/epoch_00190_iteration_000400000_checkpoint.pt`: the file if present, else a verified synthetic one
    written there (with a digest marker beside it, as for the other synthetic files)."""
    folder = Path(folder)
    target = folder / FILE_NAME
    if target.is_file():
        return target
    digest = write_pirender(target)
    if digest != DIGEST:
        target.unlink()
        raise RuntimeError(f"synthetic {FILE_NAME} does not match the {RULE} digest")
    _marker(folder).write_text(digest)
    return target


def write_all_pirender(folder: str | Path, verify: bool = False) -> dict[str, bool | None]:
    """Write the file into `folder`; file name -> digest OK (read back when `verify`, else the written content's)."""
    path = Path(folder) / FILE_NAME
    digest = write_pirender(path)
    ok = (read_back_digest(path) if verify else digest) == DIGEST
    if ok:
        _marker(Path(folder)).write_text(DIGEST)
    return {FILE_NAME: ok}
