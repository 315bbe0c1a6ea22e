"""Deterministic synthetic weights for the auxiliary networks (rule `sadtalker-synth-v1-aux`), GFPGAN v1.4 so far.

Seeding and drawing are those of `sadtalker-synth-v1` (see `xtalker.synthetic`): per tensor, in sorted key order,
a generator seeded from sha256(f"{F}:{path}") draws float64 values that are scaled into a range chosen by the
tensor's role and cast to float32. For GFPGAN, path = "params_ema/" + key and F = "GFPGANv1.4.pth". The golden
aux cases were computed with exactly these weights; `content_digest` proves a file follows the rule.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from xtalker.models.gfpgan import FILE_NAME as GFPGAN_FILE
from xtalker.models.gfpgan import official_layout
from xtalker.synthetic import content_digest, seed_for

log = logging.getLogger(__name__)

RULE = "sadtalker-synth-v1-aux"
GFPGAN_GROUP = "params_ema/"
GFPGAN_DIGEST = "9233018f9ef448c71d006a48009e089381a41604a08a50b219c932631dab0b63"

# Weight gains by key prefix (first match wins): small SFT conditions and RGB heads keep the decoder unsaturated.
GFPGAN_GAINS = (
    ("condition_scale.", 0.5),
    ("condition_shift.", 0.5),
    ("stylegan_decoder.to_rgb", 0.3),
)


def _draw(file_name: str, path: str, shape: tuple[int, ...], normal: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed_for(file_name, path))
    numel = math.prod(shape)
    draw = torch.randn if normal else torch.rand
    return draw(numel, generator=gen, dtype=torch.float64).reshape(shape)


def _uniform(file_name: str, path: str, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * _draw(file_name, path, shape)


def _gfpgan_gain(key: str) -> float:
    return next((gain for prefix, gain in GFPGAN_GAINS if key.startswith(prefix)), 1.0)


def _is_noise_strength(key: str) -> bool:
    parts = key.split(".")
    return key == "stylegan_decoder.style_conv1.weight" or (
        len(parts) == 4 and parts[:2] == ["stylegan_decoder", "style_convs"] and parts[3] == "weight"
    )


def _gfpgan_value(file_name: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    path = GFPGAN_GROUP + key
    leaf = key.rsplit(".", 1)[-1]
    if key == "stylegan_decoder.constant_input.weight" or key.startswith("stylegan_decoder.noises."):
        return _draw(file_name, path, shape, normal=True)
    if _is_noise_strength(key):
        return _uniform(file_name, path, shape, 0.0, 0.1)
    if key.endswith(".modulated_conv.modulation.bias"):
        return _uniform(file_name, path, shape, 0.9, 1.1)
    if leaf == "bias":
        return _uniform(file_name, path, shape, -0.1, 0.1)
    if leaf == "weight" and len(shape) >= 2:
        # 5-D StyleGAN kernels (1, out, in, k, k): the fan-in excludes the leading batch axis too.
        lead = shape[0] * shape[1] if key.endswith(".modulated_conv.weight") else shape[0]
        a = _gfpgan_gain(key) * math.sqrt(3.0 / (math.prod(shape) / lead))
        return _uniform(file_name, path, shape, -a, a)
    raise ValueError(f"{RULE} has no fill for {path} {shape}")


def synthesize_gfpgan(file_name: str = GFPGAN_FILE) -> OrderedDict[str, torch.Tensor]:
    """All 285 tensors of a synthetic GFPGANv1.4 state dict, in sorted key order."""
    layout = official_layout()
    return OrderedDict(
        (key, _gfpgan_value(file_name, key, layout[key]).to(torch.float32)) for key in sorted(layout)
    )


def write_gfpgan(path: str | Path, file_name: str = GFPGAN_FILE) -> str:
    """Write a synthetic `{"params_ema": state}` pickle atomically; return its content digest.

    `file_name` is the F of the seed rule (the official name), independent of where the file is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = synthesize_gfpgan(file_name)
    # A private temp folder keeps concurrent writers apart; saving under the final name there keeps the
    # bytes identical to a direct save (torch.save names the zip records after the file).
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        torch.save({"params_ema": state}, tmp)
        tmp.replace(path)
    digest = content_digest(state, GFPGAN_GROUP)
    log.info("%s: synthetic %s written (digest %s)", path, file_name, digest[:12])
    return digest


def ensure_gfpgan(folder: str | Path) -> Path:
    """`folder/GFPGANv1.4.pth`: the file if present, else a verified synthetic one written there (with a marker)."""
    folder = Path(folder)
    target = folder / GFPGAN_FILE
    marker = folder / f".{GFPGAN_FILE}.digest"
    if target.is_file():
        return target
    digest = write_gfpgan(target)
    if digest != GFPGAN_DIGEST:
        raise RuntimeError(f"synthetic {GFPGAN_FILE} does not match the {RULE} digest")
    marker.write_text(digest)
    return target
