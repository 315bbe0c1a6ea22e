"""Loading the official SadTalker checkpoint files exactly, with clear errors, and finding them on disk.

The packed `SadTalker_V0.0.2_{256,512}.safetensors` file holds five networks under top-level prefixes;
the `mapping_*.pth.tar` pickles hold the mapping net under `["mapping"]`. Every tensor key and shape is
checked against the official layout (`data/checkpoint_layout.json`, taken from the reference
manifest) before a network is built, so a wrong, truncated or foreign file fails with one line naming
the file and the first offending keys instead of a deep PyTorch traceback.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"F32": torch.float32, "I64": torch.int64}

# Network name -> (module, class). Names are the checkpoint prefixes (mapping lives in its own file).
NETWORKS: dict[str, tuple[str, str]] = {
    "kp_extractor": ("xtalker.models.kp_extractor", "KPDetector"),
    "generator": ("xtalker.models.generator", "Generator"),
    "audio2exp": ("xtalker.models.audio2exp", "ExpNet"),
    "audio2pose": ("xtalker.models.audio2pose", "Audio2Pose"),
    "face_3drecon": ("xtalker.models.face_3drecon", "ReconNet"),
    "mapping": ("xtalker.models.mapping", "MappingNet"),
}

# Stored in the official file but never used at inference: recognised, shape-checked and skipped.
UNUSED_SUBPREFIXES = {"audio2pose": ("netG.encoder.", "netD_motion.")}

DOWNLOAD_HINT = "run scripts/download_models.sh (needs internet) or copy the official SadTalker files there"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not have the official layout."""


@functools.lru_cache(maxsize=1)
def layout() -> dict[str, Any]:
    with open(Path(__file__).parent / "data" / "checkpoint_layout.json", encoding="utf-8") as f:
        return json.load(f)


def packed_file_name(size: int) -> str:
    try:
        return layout()["packed"]["files"][str(size)]
    except KeyError:
        raise CheckpointError(f"unsupported size {size}: SadTalker checkpoints exist for 256 and 512") from None


def mapping_file_name(coeff_nc: int) -> str:
    return layout()["mapping"][str(coeff_nc)]["file"]


def official_file_names() -> list[str]:
    lay = layout()
    return list(lay["packed"]["files"].values()) + [e["file"] for e in lay["mapping"].values()]


def expected_tensors(network: str, coeff_nc: int = 70) -> dict[str, tuple[list[int], str]]:
    """Official key -> (shape, dtype) of one network, keys without the file prefix."""
    if network == "mapping":
        return {k: (v[0], v[1]) for k, v in layout()["mapping"][str(coeff_nc)]["tensors"].items()}
    prefix = network + "."
    return {
        k[len(prefix):]: (v[0], v[1]) for k, v in layout()["packed"]["tensors"].items() if k.startswith(prefix)
    }


def _describe(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def validate_state_dict(state: dict[str, torch.Tensor], expected: dict[str, tuple[list[int], str]], where: str) -> None:
    """Raise CheckpointError naming `where` and the first offending keys unless keys, shapes and dtypes match."""
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    wrong = []
    for key in sorted(expected.keys() & state.keys()):
        shape, dtype = expected[key]
        t = state[key]
        if list(t.shape) != list(shape) or t.dtype != DTYPES[dtype]:
            wrong.append(f"{key} is {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {DTYPES[dtype]}")
    if wrong:
        problems.append("wrong shape/dtype: " + "; ".join(wrong[:3]) + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""))
    if problems:
        raise CheckpointError(f"{where} does not have the official layout: " + "; ".join(problems))


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; {DOWNLOAD_HINT}")


def read_packed(path: str | Path, network: str) -> dict[str, torch.Tensor]:
    """Tensors of one network from a packed SadTalker safetensors file, prefix stripped, layout-checked.

    Only this network's tensors are read (the file is memory-mapped), and unused tensors are dropped after
    their shapes were checked.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_exists(path)
    prefix = network + "."
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            all_keys = list(f.keys())
            if not any(k.startswith(prefix) for k in all_keys):
                raise CheckpointError(
                    f"{path} holds no '{prefix}*' tensors; it is not a SadTalker_V0.0.2 packed checkpoint "
                    f"(first keys: {_describe(all_keys)})"
                )
            state = {k[len(prefix):]: f.get_tensor(k) for k in all_keys if k.startswith(prefix)}
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); the file may be truncated: re-download it") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    validate_state_dict(state, expected_tensors(network), f"{path} [{prefix}*]")
    for sub in UNUSED_SUBPREFIXES.get(network, ()):
        state = {k: v for k, v in state.items() if not k.startswith(sub)}
    return state


def read_mapping(path: str | Path, coeff_nc: int | None = None) -> dict[str, torch.Tensor]:
    """The `mapping` state dict of a mapping_*.pth.tar pickle, read with weights_only=True (no code runs).

    Other top-level entries (epoch, optimiser or discriminator state) are ignored. `coeff_nc` (70 or 73)
    is checked when given; otherwise it is taken from the file.
    """
    path = Path(path)
    _check_exists(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a plain-weights pickle and was not loaded (weights_only=True refused it: {first})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e}); the file may be truncated: re-download it") from None
    if not isinstance(obj, dict) or "mapping" not in obj:
        keys = _describe(map(str, obj.keys())) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} has no 'mapping' entry (found: {keys}); it is not a SadTalker mapping checkpoint")
    state = obj["mapping"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'mapping' is not a state dict of tensors")
    first = state.get("first.0.weight")
    found_nc = int(first.shape[1]) if isinstance(first, torch.Tensor) and first.dim() == 3 else None
    nc = coeff_nc or (found_nc if found_nc in (70, 73) else 70)
    validate_state_dict(dict(state), expected_tensors("mapping", nc), f"{path} [mapping]")
    return dict(state)


def build_network(network: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """Instantiate a network class from an official (prefix-stripped, validated) state dict, in eval mode."""
    module_name, class_name = NETWORKS[network]
    cls = getattr(importlib.import_module(module_name), class_name)
    model = cls.from_official(state)
    return model.eval().requires_grad_(False)


def load_network(network: str, path: str | Path, coeff_nc: int | None = None) -> nn.Module:
    """Read, check and build one network from its official file."""
    if network == "mapping":
        state = read_mapping(path, coeff_nc)
    else:
        state = read_packed(path, network)
    log.debug("loaded %s from %s (%d tensors)", network, path, len(state))
    return build_network(network, state)


@dataclass(frozen=True)
class CheckpointPaths:
    """The official files a run needs, found like upstream: packed file by size, mapping by preprocess mode."""

    packed: Path
    mapping: Path
    size: int
    coeff_nc: int


def coeff_channels(preprocess: str) -> int:
    """Full-image modes feed the alignment triple too (73 channels); the others 70."""
    return 73 if "full" in preprocess else 70


def find_checkpoints(checkpoint_dir: str | Path, size: int = 256, preprocess: str = "crop") -> CheckpointPaths:
    """Locate the packed file and the right mapping file; raise one clear error listing what is missing."""
    root = Path(checkpoint_dir)
    nc = coeff_channels(preprocess)
    packed = root / packed_file_name(size)
    mapping = root / mapping_file_name(nc)
    missing = [p.name for p in (packed, mapping) if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"missing checkpoint file(s) {', '.join(missing)} in {root.resolve()}; {DOWNLOAD_HINT} "
            f"(or pass --checkpoint_dir)"
        )
    return CheckpointPaths(packed=packed, mapping=mapping, size=size, coeff_nc=nc)
