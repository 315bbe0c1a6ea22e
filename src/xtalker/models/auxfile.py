"""Reading the auxiliary networks' official files (GFPGAN, RetinaFace, AWing FAN, ParseNet): torch pickles.

All four are plain tensor dicts, read with `weights_only=True`, then checked against the layout the network
module declares (key -> shape, all float32 except BatchNorm counters). Differences between old and new
official files that upstream tolerates are tolerated here too: a leading `module.` on every key
(RetinaFace) and absent `num_batches_tracked` counters (never used at inference).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

OPTIONAL_SUFFIX = ".num_batches_tracked"
# Where upstream SadTalker keeps these files (relative to its working folder), searched after the checkpoint folder.
UPSTREAM_WEIGHTS_DIR = Path("gfpgan") / "weights"


class AuxWeightsMissing(FileNotFoundError):
    """An auxiliary weight file is not where it was looked for."""


def search_folders(checkpoint_dir: Path | None) -> list[Path]:
    """The folders an aux file is looked for in, in order."""
    return [] if checkpoint_dir is None else [Path(checkpoint_dir), UPSTREAM_WEIGHTS_DIR]


def locate(file_name: str, checkpoint_dir: Path | None) -> Path | None:
    """The first `file_name` in the search folders, or None."""
    return next((f / file_name for f in search_folders(checkpoint_dir) if (f / file_name).is_file()), None)


def _describe(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_state(
    state: dict[str, torch.Tensor], layout: dict[str, tuple[int, ...]], file_name: str, source: str
) -> None:
    """Raise a ValueError naming `source` and the first offending keys unless `state` matches `layout`."""
    missing = sorted(k for k in set(layout) - set(state) if not k.endswith(OPTIONAL_SUFFIX))
    unexpected = sorted(set(state) - set(layout))
    common = sorted(set(layout) & set(state))
    not_tensor = [k for k in common if not isinstance(state[k], torch.Tensor)]
    tensors = [k for k in common if k not in not_tensor]
    wrong = [f"{k} {tuple(state[k].shape)} != {layout[k]}" for k in tensors if tuple(state[k].shape) != layout[k]]
    wrong_dtype = [
        k for k in tensors if not k.endswith(OPTIONAL_SUFFIX) and state[k].dtype != torch.float32
    ]
    problems = [
        f"{label}: {_describe(items)}"
        for label, items in (
            ("missing", missing), ("unexpected", unexpected), ("not a tensor", not_tensor),
            ("wrong shape", wrong), ("not float32", wrong_dtype),
        )
        if items
    ]
    if problems:
        raise ValueError(f"{source}: not an official {file_name} state dict; " + "; ".join(problems))


def read_state(
    path: str | Path,
    file_name: str,
    layout: dict[str, tuple[int, ...]],
    top_keys: Sequence[str] = (),
    strip_prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """The checked state dict of an official aux file, without the optional BatchNorm counters.

    `top_keys`: the nested container's keys to try in order (e.g. `params_ema`, then `params`); empty for a
    flat state dict. `strip_prefix`: removed from every key that starts with it (facexlib's `module.`).
    """
    path = Path(path)
    if not path.is_file():
        raise AuxWeightsMissing(f"{path}: {file_name} not found")
    try:
        top = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors have many types; report them uniformly
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(top, dict):
        raise ValueError(  # noqa: TRY004 - a bad file, reported like every other bad file
            f"{path}: expected a dict, got {type(top).__name__}")
    where = str(path)
    state = top
    if top_keys:
        key = next((k for k in top_keys if isinstance(top.get(k), dict)), None)
        if key is None:
            wanted = " or ".join(repr(k) for k in top_keys)
            raise ValueError(f"{path}: no {wanted} state dict (top-level keys: {_describe(sorted(map(str, top)), 5)})")
        state, where = top[key], f"{path} [{key}]"
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    check_state(state, layout, file_name, where)
    return {k: v for k, v in state.items() if not k.endswith(OPTIONAL_SUFFIX)}
