"""The synthetic legacy per-network set (rule `sadtalker-synth-v1-legacy`): the `--old_version` files.

Files (layouts in `xtalker/data/legacy_layout.json`):
  auido2exp_00300-model.pth        {'model': ExpNet state dict, 'epoch': 300}
  auido2pose_00140-model.pth       {'model': Audio2Pose state dict, 'epoch': 140}
  facevid2vid_00189-model.pth.tar  {'generator': ..., 'kp_detector': ..., 'he_estimator': ..., 'epoch': 189}
  epoch_20.pth                     {'net_recon': face reconstruction state dict}

Rule: every tensor that the packed 256 file also holds is a bit-identical copy of the synthetic
`SadTalker_V0.0.2_256.safetensors` tensor (key = packed key without its network prefix), so the set gives the
same networks, and the same videos, as the packed file. The 402 head-pose estimator tensors (no packed
counterpart; upstream loads them and never calls the network) are drawn by `sadtalker-synth-v1` itself with
F = `facevid2vid_00189-model.pth.tar` and path `he_estimator/` + key. Keys are stored in sorted order.
Digest: sha256 over `{top}/{key}|{dtype}|{shape}|` + raw bytes, entries and keys in sorted order.
The mapping files are the same in both paths: `ensure_legacy` links the synthetic ones beside the set.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from xtalker.checkpoints import legacy_expected, legacy_file_names, legacy_layout, mapping_file_name, packed_file_name
from xtalker.synthetic.sadtalker import _marker, default_cache_dir, ensure_cached, synthesize

log = logging.getLogger(__name__)

RULE = "sadtalker-synth-v1-legacy"
PACKED = packed_file_name(256)


def expected_digest(name: str) -> str:
    return legacy_layout()["files"][name]["digest"]


def build(name: str, packed_path: str | Path) -> OrderedDict[str, Any]:
    """The object to torch.save for one legacy file, re-keyed from the synthetic packed 256 file."""
    from safetensors import safe_open

    entry = legacy_layout()["files"][name]
    expected = legacy_expected(name)
    obj: OrderedDict[str, Any] = OrderedDict()
    with safe_open(str(packed_path), "pt", device="cpu") as packed:
        for top, group in entry["groups"].items():
            spec = expected[top]
            if group["network"] is None:
                state = synthesize(name, top + "/", spec)
            else:
                prefix = group["network"] + "."
                state = {key: packed.get_tensor(prefix + key).clone() for key in spec}
            for key, (shape, _dtype) in spec.items():
                if list(state[key].shape) != list(shape):
                    raise ValueError(f"{RULE}: {name} [{top}] {key} is {tuple(state[key].shape)}, expected {tuple(shape)}")
            obj[top] = OrderedDict((k, state[k].contiguous()) for k in sorted(spec))
    obj.update(entry["synthetic_extra_top_level"])
    return obj


def content_digest(obj: dict[str, Any]) -> str:
    """sha256 over `{top}/{key}|{dtype}|{shape}|` + raw bytes of every state dict entry, sorted."""
    h = hashlib.sha256()
    groups = {top + "/": state for top, state in obj.items() if isinstance(state, dict)}
    for group in sorted(groups):
        state = groups[group]
        for key in sorted(state):
            t = state[key].contiguous()
            h.update(f"{group}{key}|{t.dtype}|{tuple(t.shape)}|".encode("utf-8"))
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_back(path: Path) -> dict[str, Any]:
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def write_legacy(
    out_dir: str | Path, packed_path: str | Path | None = None, verify: bool = False, only: set[str] | None = None,
) -> dict[str, bool | None]:
    """Write the four legacy files (or those in `only`) into `out_dir`, re-keyed from `packed_path` (default:
    the synthetic packed 256 file in `out_dir`, written first when missing). With `verify`, each file is read back
    and its digest compared with the manifest's, and every re-keyed tensor with the packed one.

    Returns file name -> verified (None when not verified).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if packed_path is None:
        packed_path = out / PACKED
        if not packed_path.is_file():
            from xtalker.synthetic.sadtalker import write_all

            write_all(out, verify=True, only={PACKED})
    results: dict[str, bool | None] = {}
    for name in legacy_file_names():
        if only is not None and name not in only:
            continue
        obj = build(name, packed_path)
        # Written under its own name in a private temp folder (torch.save names the archive after the file, so the
        # bytes are those of a direct write), then renamed: concurrent writers never see a partial file.
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out))
        try:
            torch.save(obj, tmp_dir / name)
            (tmp_dir / name).replace(out / name)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        del obj
        ok = None
        if verify:
            back = read_back(out / name)
            ok = content_digest(back) == expected_digest(name) and _rekeyed_equal(name, back, packed_path)
            if ok:
                _marker(out, name).write_text(expected_digest(name))
        log.info("%s: written%s", name, "" if ok is None else (", digest OK" if ok else ", DIGEST MISMATCH"))
        results[name] = ok
    return results


def _rekeyed_equal(name: str, obj: dict[str, Any], packed_path: str | Path) -> bool:
    """Every tensor with a packed counterpart equals it bit for bit."""
    from safetensors import safe_open

    with safe_open(str(packed_path), "pt", device="cpu") as packed:
        for top, group in legacy_layout()["files"][name]["groups"].items():
            if group["network"] is None:
                continue
            prefix = group["network"] + "."
            for key, t in obj[top].items():
                if not torch.equal(t, packed.get_tensor(prefix + key)):
                    return False
    return True


def default_legacy_dir() -> Path:
    """Where the synthetic legacy set is cached: a `legacy` folder inside the synthetic cache."""
    return default_cache_dir() / "legacy"


def ensure_legacy(folder: str | Path | None = None, packed_dir: str | Path | None = None) -> Path:
    """A folder holding the verified synthetic legacy set and the two mapping files, and no *.safetensors file (so
    it also exercises upstream's fallback). The packed 256 and mapping files come from `packed_dir` (default: the
    synthetic cache, filled when needed); a marker per file records its digest."""
    folder = Path(folder) if folder is not None else default_legacy_dir()
    packed = ensure_cached(packed_dir or default_cache_dir(), {PACKED, mapping_file_name(70), mapping_file_name(73)})
    folder.mkdir(parents=True, exist_ok=True)
    missing = {
        name for name in legacy_file_names()
        if not (folder / name).is_file() or not _marker(folder, name).is_file()
        or _marker(folder, name).read_text().strip() != expected_digest(name)
    }
    if missing:
        log.info("writing synthetic legacy checkpoints to %s: %s", folder, ", ".join(sorted(missing)))
        for name, ok in write_legacy(folder, packed / PACKED, verify=True, only=missing).items():
            if not ok:
                raise RuntimeError(f"synthetic {name} does not match the {RULE} digest")
    for nc in (70, 73):
        name = mapping_file_name(nc)
        target = folder / name
        if not target.is_file():
            target.unlink(missing_ok=True)
            try:
                target.symlink_to((packed / name).resolve())
            except OSError:
                shutil.copyfile(packed / name, target)
    return folder
