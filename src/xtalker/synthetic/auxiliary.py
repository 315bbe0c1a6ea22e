"""Deterministic synthetic weights for the auxiliary networks (rule `sadtalker-synth-v1-aux`).

Seeding and drawing are those of `sadtalker-synth-v1` (see `xtalker.synthetic.sadtalker`): per tensor, in sorted key order,
a generator seeded from sha256(f"{F}:{path}") draws float64 values that are scaled into a range chosen by the
tensor's role and cast to the official dtype. F is the official file name; path is the digest group
("params_ema/" for GFPGAN, "state_dict/" for AWing FAN, "" for the flat RetinaFace and ParseNet files) plus the
model key. The golden aux cases were computed with exactly these weights; `content_digest` proves a file
follows the rule. Layouts (containers, keys, shapes) come from `data/aux_layout.json`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from xtalker.models.awing import FILE_NAME as AWING_FILE
from xtalker.models.gfpgan import FILE_NAME as GFPGAN_FILE
from xtalker.models.parsenet import FILE_NAME as PARSENET_FILE
from xtalker.models.retinaface import FILE_NAME as RETINAFACE_FILE
from xtalker.synthetic.sadtalker import content_digest, default_cache_dir, seed_for

log = logging.getLogger(__name__)

RULE = "sadtalker-synth-v1-aux"

# Weight gains by key prefix, per file (first match wins): they keep each random network in a useful range
# (unsaturated decoder, detector stem on mean-subtracted pixels, moderate heatmaps and parsing logits).
GAINS: dict[str, tuple[tuple[str, float], ...]] = {
    GFPGAN_FILE: (("condition_scale.", 0.5), ("condition_shift.", 0.5), ("stylegan_decoder.to_rgb", 0.3)),
    RETINAFACE_FILE: (("body.conv1.", 0.02),),
    AWING_FILE: (("l0.", 0.5), ("l1.", 0.5), ("l2.", 0.5), ("l3.", 0.5), ("al", 0.1), ("bl", 0.1)),
    PARSENET_FILE: (("body.", 0.5), ("decoder.", 0.7)),
}
DTYPES = {"F32": torch.float32, "I64": torch.int64}


def default_aux_dir() -> Path:
    """Where synthetic aux files are cached: beside, not among, the synthetic SadTalker files, because a
    detector and FAN in a checkpoint folder make `--landmarks auto` pick the upstream backend, whose synthetic
    weights put random boxes and points on a picture (or find nothing)."""
    return default_cache_dir() / "aux"


@functools.cache
def aux_layout() -> dict[str, dict]:
    """Per official aux file: `top_key` (None when flat), `stored_key_prefix`, `digest`, key -> [shape, dtype]."""
    with open(Path(__file__).parents[1] / "data" / "aux_layout.json", encoding="utf-8") as f:
        return json.load(f)


def digest_group(file_name: str) -> str:
    top = aux_layout()[file_name]["top_key"]
    return f"{top}/" if top else ""


def _draw(file_name: str, path: str, shape: tuple[int, ...], normal: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed_for(file_name, path))
    draw = torch.randn if normal else torch.rand
    return draw(math.prod(shape), generator=gen, dtype=torch.float64).reshape(shape)


def _uniform(file_name: str, path: str, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * _draw(file_name, path, shape)


def _is_noise_strength(key: str) -> bool:
    parts = key.split(".")
    return key == "stylegan_decoder.style_conv1.weight" or (
        len(parts) == 4 and parts[:2] == ["stylegan_decoder", "style_convs"] and parts[3] == "weight"
    )


def _gfpgan_special(file_name: str, path: str, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    if key == "stylegan_decoder.constant_input.weight" or key.startswith("stylegan_decoder.noises."):
        return _draw(file_name, path, shape, normal=True)
    if _is_noise_strength(key):
        return _uniform(file_name, path, shape, 0.0, 0.1)
    if key.endswith(".modulated_conv.modulation.bias"):
        return _uniform(file_name, path, shape, 0.9, 1.1)
    return None


def _value(file_name: str, key: str, shape: tuple[int, ...], keys: frozenset[str]) -> torch.Tensor:
    path = digest_group(file_name) + key
    stem, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    if file_name == GFPGAN_FILE and (special := _gfpgan_special(file_name, path, key, shape)) is not None:
        return special
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.float64)
    if leaf == "running_mean":
        return _uniform(file_name, path, shape, -0.1, 0.1)
    if leaf == "running_var":
        return _uniform(file_name, path, shape, 0.5, 1.5)
    if leaf == "weight" and len(shape) == 1 and f"{stem}.running_var" in keys:
        return _uniform(file_name, path, shape, 0.8, 1.2)
    if leaf == "bias":
        return _uniform(file_name, path, shape, -0.1, 0.1)
    if leaf == "weight" and len(shape) >= 2:
        # 5-D StyleGAN kernels (1, out, in, k, k): the fan-in excludes the leading batch axis too.
        lead = shape[0] * shape[1] if key.endswith(".modulated_conv.weight") else shape[0]
        gain = next((g for prefix, g in GAINS[file_name] if key.startswith(prefix)), 1.0)
        a = gain * math.sqrt(3.0 / (math.prod(shape) / lead))
        return _uniform(file_name, path, shape, -a, a)
    raise ValueError(f"{RULE} has no fill for {file_name}:{path} {shape}")


def synthesize(file_name: str) -> OrderedDict[str, torch.Tensor]:
    """Every model key's synthetic tensor of `file_name` (one of the four aux files), in sorted key order."""
    tensors = aux_layout()[file_name]["tensors"]
    keys = frozenset(tensors)
    return OrderedDict(
        (key, _value(file_name, key, tuple(shape), keys).to(DTYPES[dtype]))
        for key, (shape, dtype) in sorted(tensors.items())
    )


def write_aux(path: str | Path, file_name: str) -> str:
    """Write the synthetic `file_name` in its official container at `path` atomically; return its content digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = aux_layout()[file_name]
    state = synthesize(file_name)
    prefix = entry["stored_key_prefix"]
    stored = OrderedDict((prefix + k, v) for k, v in state.items())
    payload = {entry["top_key"]: stored} if entry["top_key"] else stored
    return save_synthetic(path, file_name, payload, state, digest_group(file_name))


def save_synthetic(path: Path, file_name: str, payload: dict, state: dict, group: str) -> str:
    """`payload` torch-saved at `path` (atomically); returns the content digest of `state` (the tensors it holds)
    under the key prefix `group`."""
    # A private temp folder keeps concurrent writers apart; saving under the final name there keeps the
    # bytes identical to a direct save (torch.save names the zip records after the file).
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        torch.save(payload, tmp)
        tmp.replace(path)
    digest = content_digest(state, group)
    log.info("%s: synthetic %s written (digest %s)", path, file_name, digest[:12])
    return digest


def ensure_verified(folder: str | Path, file_name: str, write, expected: str, rule: str) -> Path:
    """`folder/file_name`: the file if present, else one written by `write(path, file_name) -> digest`, checked
    against `expected` (rule `rule`) and marked with a `.NAME.digest` file."""
    folder = Path(folder)
    target = folder / file_name
    if target.is_file():
        return target
    digest = write(target, file_name)
    if digest != expected:
        target.unlink()
        raise RuntimeError(f"synthetic {file_name} does not match the {rule} digest")
    (folder / f".{file_name}.digest").write_text(digest)
    return target


def ensure_aux(folder: str | Path, file_name: str) -> Path:
    """`folder/file_name`: the file if present, else a verified synthetic one written there (with a marker)."""
    return ensure_verified(folder, file_name, write_aux, aux_layout()[file_name]["digest"], RULE)


def write_all_aux(folder: str | Path) -> dict[str, bool]:
    """Write all four aux files into `folder`; file name -> whether its content digest matches the rule's."""
    return {name: write_aux(Path(folder) / name, name) == entry["digest"] for name, entry in aux_layout().items()}


def ensure_all_aux(folder: str | Path) -> Path:
    """`folder` holding all four aux files (synthetic ones written where missing)."""
    for name in aux_layout():
        ensure_aux(folder, name)
    return Path(folder)
