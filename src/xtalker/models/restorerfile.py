"""Reading the optional restorers' official files (`RestoreFormer.pth`, `RealESRGAN_x2plus.pth`): torch pickles.

Both are `{'params_ema': state_dict}` (`'params'` is the fallback upstream's loaders take when `params_ema` is
absent), read with `weights_only=True` and checked key by key and shape by shape against the layout taken from
the reference manifest (`data/restorers_layout.json`). Every problem is one `RestorerWeightsError` line naming
the file and the first offending keys; a file that is another known network's (GFPGAN, the other restorer, an
x4 RRDBNet) says which one it looks like.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from xtalker.checkpoints import CheckpointError
from xtalker.models import auxfile


class RestorerWeightsError(CheckpointError, ValueError):
    """A restorer weight file is unreadable or does not have the official layout (a CheckpointError and, like the
    other aux files' errors, a ValueError)."""


class RestorerWeightsMissing(RestorerWeightsError, FileNotFoundError):
    """A restorer weight file is not where it was looked for."""


@functools.cache
def restorers_layout() -> dict[str, dict]:
    """Per official restorer file: `top_key`, `top_keys` (tried in order), `stored_key_prefix`, `rule`, `digest`,
    `tensors` (key -> [shape, dtype])."""
    with open(Path(__file__).parents[1] / "data" / "restorers_layout.json", encoding="utf-8") as f:
        return json.load(f)


def official_layout(file_name: str) -> dict[str, tuple[int, ...]]:
    """Every key -> shape of the official state dict of `file_name`."""
    return {k: tuple(shape) for k, (shape, _) in restorers_layout()[file_name]["tensors"].items()}


def _known_layouts() -> dict[str, frozenset[str]]:
    """Key sets of every official file this package knows (restorers and aux files), for "looks like" hints."""
    from xtalker.synthetic.auxiliary import aux_layout

    known = {name: frozenset(e["tensors"]) for name, e in restorers_layout().items()}
    known.update({name: frozenset(e["tensors"]) for name, e in aux_layout().items()})
    return known


def _kind_hint(state: dict, file_name: str) -> str:
    """"; it looks like X" when the keys are mostly those of another known file (or of an RRDBNet of another scale)."""
    keys = {k.removeprefix("module.") for k in state}
    if not keys:
        return ""
    if file_name.startswith("RealESRGAN_x2plus") and keys == set(official_layout(file_name)):
        first = state.get("conv_first.weight")
        if isinstance(first, torch.Tensor) and first.dim() == 4 and first.shape[1] in (3, 48):
            scale = 4 if first.shape[1] == 3 else 1
            return (f"; conv_first.weight has {first.shape[1]} input channels: an RRDBNet for scale {scale}"
                    f"{' (RealESRGAN_x4plus.pth)' if scale == 4 else ''}, not the x2plus network (12)")
    best, overlap = None, 0.0
    for name, known in _known_layouts().items():
        share = len(keys & known) / len(keys | known)
        if name != file_name and share > overlap:
            best, overlap = name, share
    return f"; it looks like {best}" if best is not None and overlap > 0.5 else ""


def _first_line(error: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    _, found, after = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (after if found else text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def read_state(path: str | Path, file_name: str) -> dict[str, torch.Tensor]:
    """The checked state dict of an official (or synthetic) restorer file: `params_ema`, else `params`."""
    path = Path(path)
    if not path.is_file():
        raise RestorerWeightsMissing(f"{path}: {file_name} not found")
    try:
        top = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and storage errors have many types; report them uniformly
        raise RestorerWeightsError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {_first_line(e)}); the file may be "
            f"truncated or damaged: download {file_name} again"
        ) from None
    entry = restorers_layout()[file_name]
    if not isinstance(top, dict):
        raise RestorerWeightsError(
            f"{path}: expected a dict holding a {file_name} state dict, got {type(top).__name__}")
    key = next((k for k in entry["top_keys"] if isinstance(top.get(k), dict)), None)
    if key is None:
        wanted = " or ".join(repr(k) for k in entry["top_keys"])
        # A flat state dict (another network's file) gets its hint from its own keys.
        hint = _kind_hint(top, file_name) if all(isinstance(v, torch.Tensor) for v in top.values()) else ""
        found = ", ".join(sorted(map(str, top))[:5]) + (f" (+{len(top) - 5} more)" if len(top) > 5 else "")
        raise RestorerWeightsError(f"{path}: no {wanted} state dict (top-level keys: {found}){hint}")
    state = top[key]
    try:
        auxfile.check_state(state, official_layout(file_name), file_name, f"{path} [{key}]")
    except ValueError as e:
        raise RestorerWeightsError(f"{e}{_kind_hint(state, file_name)}") from None
    return dict(state)
