"""Loading the official SadTalker checkpoint files exactly, with clear errors, and finding them on disk.

The packed `SadTalker_V0.0.2_{256,512}.safetensors` file holds five networks under top-level prefixes;
the `mapping_*.pth.tar` pickles hold the mapping net under `["mapping"]`. Every tensor key and shape is
checked against the official layout (`data/checkpoint_layout.json`, taken from the reference
manifest) before a network is built, so a wrong, truncated or foreign file fails with one line naming
the file and the first offending keys instead of a deep PyTorch traceback.

Older installs hold the legacy per-network files instead (`auido2exp_00300-model.pth`,
`auido2pose_00140-model.pth`, `facevid2vid_00189-model.pth.tar`, `epoch_20.pth`; layout in
`data/legacy_layout.json`, taken from the reference legacy manifest). Upstream reads them with `--old_version`
or when the checkpoint folder holds no `*.safetensors` file; so does `find_checkpoints`. They hold the same
tensors as the packed 256 file under other keys (plus the head-pose estimator, which is checked and dropped).
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


@functools.lru_cache(maxsize=1)
def legacy_layout() -> dict[str, Any]:
    with open(Path(__file__).parent / "data" / "legacy_layout.json", encoding="utf-8") as f:
        return json.load(f)


def legacy_file_names() -> list[str]:
    """The four legacy per-network files, in upstream's download order."""
    return list(legacy_layout()["files"])


def legacy_source(network: str) -> tuple[str, str]:
    """(legacy file name, top-level entry) that holds `network` in the legacy set."""
    for name, entry in legacy_layout()["files"].items():
        for top, group in entry["groups"].items():
            if group["network"] == network:
                return name, top
    raise KeyError(f"{network} has no legacy per-network file")


def legacy_expected(file_name: str) -> dict[str, dict[str, tuple[list[int], str]]]:
    """Top-level entry -> (key -> (shape, dtype)) of one legacy file: every tensor upstream loads strictly."""
    out = {}
    for top, group in legacy_layout()["files"][file_name]["groups"].items():
        if group["network"] is not None:
            out[top] = expected_tensors(group["network"])
        else:
            out[top] = {k: (v[0], v[1]) for k, v in group["tensors"].items()}
    return out


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


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts like a safetensors file (8-byte header length, then a JSON object)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _load_pickle(path: Path, mmap: bool = False) -> Any:
    """torch.load with weights_only=True (no pickled code runs); with `mmap`, memory-mapped when the file is a zip
    archive (a check of the renderer file's 863 tensors then reads only their headers)."""
    if _is_safetensors(path):
        raise CheckpointError(f"{path} is a safetensors file, not a torch pickle: it was renamed or put in the wrong place")
    try:
        mmap = mmap and zipfile.is_zipfile(path)
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a plain-weights pickle and was not loaded (weights_only=True refused it: {first})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e}); the file may be truncated: re-download it") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _identify(obj: Any) -> str | None:
    """Which official file a loaded pickle looks like (for error hints), or None."""
    if not isinstance(obj, dict):
        return None
    if "mapping" in obj:
        return "a mapping_*.pth.tar file"
    if "net_G_ema" in obj:
        return "the PIRender checkpoint"
    for name in legacy_file_names():
        expected = legacy_expected(name)
        if all(isinstance(obj.get(top), dict) and set(obj[top]) == set(keys) for top, keys in expected.items()):
            return name
    return None


def read_legacy(path: str | Path, network: str) -> dict[str, torch.Tensor]:
    """Tensors of one network from its legacy per-network file, checked like upstream's strict loader.

    The whole file is checked, as upstream's loader requires it: every state dict it loads (the renderer file's
    generator, kp_detector and he_estimator) with all keys and shapes, and the `epoch` entry where upstream reads
    it. Other top-level entries (optimizer, discriminator states) are ignored; he_estimator is checked and dropped
    (upstream never calls it). Read with weights_only=True.
    """
    path = Path(path)
    _check_exists(path)
    name, top = legacy_source(network)
    entry = legacy_layout()["files"][name]
    expected = legacy_expected(name)
    obj = _load_pickle(path, mmap=True)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict; it is not {name}")
    needed = list(expected) + (["epoch"] if entry["epoch_required"] else [])
    absent = [k for k in needed if k not in obj]
    if absent:
        found = _describe(map(str, obj.keys())) if obj else "nothing"
        guess = _identify(obj)
        hint = f"; it looks like {guess}" if guess and guess != name else ""
        raise CheckpointError(
            f"{path} has no {', '.join(repr(k) for k in absent)} entr{'y' if len(absent) == 1 else 'ies'} (found: {found}); "
            f"it is not the legacy {name}{hint}"
        )
    for group, keys in expected.items():
        state = obj[group]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: '{group}' is not a state dict of tensors")
        try:
            validate_state_dict(dict(state), keys, f"{path} [{group}]")
        except CheckpointError as e:
            guess = _identify(obj)
            raise CheckpointError(f"{e}" + (f"; the file looks like {guess}" if guess and guess != name else "")) from None
    state = dict(obj[top])
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
    obj = _load_pickle(path)
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
    """Read, check and build one network from its official file: the packed safetensors file, the network's
    legacy per-network pickle (any other suffix), or for `mapping` a mapping pickle."""
    if network == "mapping":
        state = read_mapping(path, coeff_nc)
    elif Path(path).suffix == ".safetensors":
        state = read_packed(path, network)
    else:
        state = read_legacy(path, network)
    log.debug("loaded %s from %s (%d tensors)", network, path, len(state))
    return build_network(network, state)


@dataclass(frozen=True)
class CheckpointPaths:
    """The official files a run needs, found like upstream: packed file by size, mapping by preprocess mode.

    With `legacy` the networks come from the legacy per-network files in the same folder (`file(network)`);
    `packed` is then the renderer file, `facevid2vid_00189-model.pth.tar`, for every size. With `pirender` (the
    PIRender checkpoint) that file renders instead of the generator, keypoint detector and mapping net, which are
    then neither needed nor read; `coeff_nc` is then PIRender's 73 in every preprocess mode.
    """

    packed: Path
    mapping: Path
    size: int
    coeff_nc: int
    legacy: bool = False
    pirender: Path | None = None

    def file(self, network: str) -> Path:
        """The file `network` is loaded from."""
        if network == "mapping":
            return self.mapping
        if not self.legacy:
            return self.packed
        return self.packed.parent / legacy_source(network)[0]

    @property
    def networks(self) -> list[str]:
        """The networks a run loads from the SadTalker files."""
        speech = ["face_3drecon", "audio2exp", "audio2pose"]
        return speech if self.pirender else speech + ["kp_extractor", "generator", "mapping"]

    @property
    def files(self) -> list[Path]:
        """Every file the networks come from, in load order (the renderer's last)."""
        found = list(dict.fromkeys(self.file(n) for n in self.networks))
        return found + ([self.pirender] if self.pirender else [])

    @property
    def label(self) -> str:
        """For log lines: the files, or the legacy set."""
        renderer = self.pirender.name if self.pirender else self.mapping.name
        if self.legacy:
            return f"legacy per-network files + {renderer}"
        return f"{self.packed.name} + {renderer}"


def coeff_channels(preprocess: str) -> int:
    """Full-image modes feed the alignment triple too (73 channels); the others 70."""
    return 73 if "full" in preprocess else 70


LEGACY_HINT = "run scripts/download_models.sh --legacy DIR (needs internet) or copy them from an older SadTalker install"
_noted: set[tuple[str, str]] = set()  # (what, folder): log lines said once per process


def _note_once(what: str, root: Path, message: str, *args: Any) -> None:
    key = (what, str(root.resolve()))
    if key not in _noted:
        _noted.add(key)
        log.warning(message, *args)


def has_safetensors(folder: Path) -> bool:
    """Upstream's test for the packed checkpoints: any `*.safetensors` file in the folder."""
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def find_checkpoints(
    checkpoint_dir: str | Path, size: int = 256, preprocess: str = "crop", old_version: bool = False,
    facerender: str = "facevid2vid",
) -> CheckpointPaths:
    """Locate the checkpoint files like upstream's init_path; raise one clear error listing what is missing.

    The packed `SadTalker_V0.0.2_{size}.safetensors` by default; the legacy per-network set with `old_version`,
    or (with one warning) when the folder holds no `*.safetensors` file but legacy files. The mapping file is
    chosen by preprocess either way. The legacy set has one renderer, so `--size 512` renders at 512 with the
    256 renderer's weights, as upstream does. `facerender` "pirender" needs the PIRender checkpoint instead of
    the renderer's files (one network at every size).
    """
    root = Path(checkpoint_dir)
    packed_name = packed_file_name(size)  # also rejects sizes other than 256 / 512
    nc = coeff_channels(preprocess)
    mapping = root / mapping_file_name(nc)
    pirender = None
    if facerender == "pirender":
        from xtalker.models.pirender import COEFF_NC, DOWNLOAD_HINT as PIRENDER_HINT, FILE_NAME

        pirender, nc = root / FILE_NAME, COEFF_NC
        if not pirender.is_file():
            raise CheckpointError(f"missing PIRender checkpoint {FILE_NAME} in {root.resolve()} (--facerender pirender "
                                  f"reads it); {PIRENDER_HINT} (or pass --checkpoint_dir, or use --facerender facevid2vid)")
    legacy = old_version
    if not legacy and not has_safetensors(root) and any((root / n).is_file() for n in legacy_file_names()):
        legacy = True
        _note_once("fallback", root, "no *.safetensors file in %s: using the legacy per-network checkpoints (%s), as "
                   "SadTalker does; put %s there to use the packed file", root, ", ".join(legacy_file_names()), packed_name)
    if legacy:
        renderer = root / legacy_source("generator")[0]
        paths = CheckpointPaths(packed=renderer, mapping=mapping, size=size, coeff_nc=nc, legacy=True, pirender=pirender)
        missing = [p.name for p in paths.files if not p.is_file()]
        if missing:
            why = ("--old_version reads the legacy per-network files" if old_version else
                   f"the folder has no *.safetensors file, so the legacy per-network set is read (as SadTalker does); "
                   f"put {packed_name} there, or complete the set")
            raise CheckpointError(
                f"missing legacy checkpoint file(s) {', '.join(missing)} in {root.resolve()}: {why}; {LEGACY_HINT} "
                f"(or pass --checkpoint_dir)"
            )
        if size != 256 and pirender is None:
            _note_once(f"legacy{size}", root, "legacy checkpoints at --size %d: the legacy set has no %d renderer, so "
                       "%s (the 256 renderer's weights) renders at %d, as SadTalker --old_version does",
                       size, size, renderer.name, size)
        return paths
    paths = CheckpointPaths(packed=root / packed_name, mapping=mapping, size=size, coeff_nc=nc, pirender=pirender)
    missing = [p.name for p in paths.files if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"missing checkpoint file(s) {', '.join(missing)} in {root.resolve()}; {DOWNLOAD_HINT} "
            f"(or pass --checkpoint_dir)"
        )
    return paths
