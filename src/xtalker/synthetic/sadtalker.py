"""Deterministic synthetic weights in the official SadTalker file formats (rule `sadtalker-synth-v1`).

The values are meaningless as a model but have the real shapes, so every stage costs exactly what it costs
with the official weights, and activations stay healthy (nothing saturates). The golden reference outputs
were computed with exactly these weights, so a content digest proves a writer follows the rule.

Rule, per file F and tensor (sorted key order; path = key, or "mapping/" + key inside the mapping pickles):
seed = first 8 bytes (little endian) of sha256(f"{F}:{path}") masked to 63 bits; values are drawn in float64
with torch.rand (torch.randn for spectral-norm vectors) from a generator with that seed, scaled into a range
chosen by the tensor's role, then cast to the official dtype.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import torch

from xtalker.checkpoints import DTYPES, layout

log = logging.getLogger(__name__)

RULE = "sadtalker-synth-v1"
SPECTRAL_ITERATIONS = 30


def default_cache_dir() -> Path:
    """Where synthetic checkpoints are cached: $XTALKER_SYNTHETIC_DIR, else ~/.cache/xtalker/synthetic."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("XTALKER_SYNTHETIC_DIR") or Path(base) / "xtalker" / "synthetic")


def seed_for(file_name: str, path: str) -> int:
    digest = hashlib.sha256(f"{file_name}:{path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(file_name: str, path: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(file_name, path))


def _uniform(file_name: str, path: str, shape: list[int], lo: float, hi: float) -> torch.Tensor:
    numel = math.prod(shape)
    u = torch.rand(numel, generator=_generator(file_name, path), dtype=torch.float64)
    return (lo + (hi - lo) * u).reshape(shape)


def _gain(path: str) -> float:
    # Networks followed by softmax-style read-outs need larger activations to stay non-degenerate.
    if path.startswith(("kp_extractor.", "generator.dense_motion_network.")):
        return math.sqrt(2.0)
    if path.startswith(("mapping/fc_exp.", "mapping/fc_t.")):
        return 0.1
    return 1.0


def gaussian_kernel(size: int = 13, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 2-D Gaussian that upstream stores as the keypoint detector's anti-aliasing filter."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def _spectral_vectors(file_name: str, v_path: str, weight_orig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u, v of a converged power iteration on W = weight_orig.reshape(out, -1), started from the v path's seed."""
    w = weight_orig.to(torch.float64).reshape(weight_orig.shape[0], -1)
    v = _normalize(torch.randn(w.shape[1], generator=_generator(file_name, v_path), dtype=torch.float64))
    u = _normalize(w @ v)
    for _ in range(SPECTRAL_ITERATIONS):
        v = _normalize(w.T @ u)
        u = _normalize(w @ v)
    return u, v


def synthesize(file_name: str, group: str, spec: dict[str, tuple[list[int], str]]) -> dict[str, torch.Tensor]:
    """All tensors of one file by the rule. `spec` maps key -> (shape, dtype); `group` is "" or "mapping/"."""
    out: dict[str, torch.Tensor] = OrderedDict()
    keys = sorted(spec)
    for key in keys:
        shape, dtype = spec[key]
        path = group + key
        leaf = key.rsplit(".", 1)[-1]
        parent = key[: -len(leaf)]
        if leaf == "num_batches_tracked":
            value = torch.zeros(shape, dtype=torch.float64)
        elif path == "kp_extractor.down.weight":
            value = gaussian_kernel(shape[-1]).expand(shape).clone()
        elif leaf in ("weight_u", "weight_v"):
            continue  # filled together below, once weight_orig is known
        elif leaf in ("weight", "weight_orig") and len(shape) >= 2:
            a = _gain(path) * math.sqrt(3.0 / (math.prod(shape) / shape[0]))
            value = _uniform(file_name, path, shape, -a, a)
        elif leaf == "weight" and parent + "running_var" in spec:
            value = _uniform(file_name, path, shape, 0.8, 1.2)
        elif leaf in ("bias", "running_mean"):
            value = _uniform(file_name, path, shape, -0.1, 0.1)
        elif leaf == "running_var":
            value = _uniform(file_name, path, shape, 0.5, 1.5)
        elif leaf == "classbias":
            value = _uniform(file_name, path, shape, -1.0, 1.0)
        else:
            raise ValueError(f"{RULE} has no fill for {path} {shape}")
        out[key] = value.to(DTYPES[dtype])
    for key in keys:
        if key.endswith(".weight_v"):
            stem = key[: -len("weight_v")]
            u, v = _spectral_vectors(file_name, group + key, out[stem + "weight_orig"])
            out[stem + "weight_u"] = u.to(DTYPES[spec[stem + "weight_u"][1]])
            out[key] = v.to(DTYPES[spec[key][1]])
    return OrderedDict((k, out[k]) for k in keys)


def content_digest(tensors: dict[str, torch.Tensor], group: str = "") -> str:
    """sha256 over `{group}{key}|{dtype}|{shape}|` + raw little-endian bytes, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{group}{key}|{t.dtype}|{tuple(t.shape)}|".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def official_files() -> Iterator[tuple[str, str, dict[str, tuple[list[int], str]]]]:
    """(file name, digest group, key -> (shape, dtype)) for the four official files."""
    lay = layout()
    packed = {k: (v[0], v[1]) for k, v in lay["packed"]["tensors"].items()}
    for name in lay["packed"]["files"].values():
        yield name, "", packed
    for entry in lay["mapping"].values():
        yield entry["file"], "mapping/", {k: (v[0], v[1]) for k, v in entry["tensors"].items()}


def expected_digest(file_name: str) -> str:
    return layout()["digests"][file_name]


def write_file(out_dir: Path, file_name: str, group: str, spec: dict[str, tuple[list[int], str]]) -> str:
    """Write one synthetic file atomically (temp name, then rename); return its content digest."""
    from safetensors.torch import save_file

    tensors = synthesize(file_name, group, spec)
    # A unique temp name per writer: concurrent processes filling the same cache never see a partial file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".partial", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if group:
            epoch = next(int(e["epoch"]) for e in layout()["mapping"].values() if e["file"] == file_name)
            torch.save({"mapping": tensors, "epoch": epoch}, tmp)
        else:
            save_file(dict(tensors), str(tmp))
        tmp.replace(out_dir / file_name)
    finally:
        tmp.unlink(missing_ok=True)
    return content_digest(tensors, group)


def read_back_digest(path: Path, group: str) -> str:
    """Digest of a written file as a loader sees it (what --verify checks)."""
    if group:
        state = torch.load(str(path), map_location="cpu", weights_only=True)["mapping"]
    else:
        from safetensors.torch import load_file

        state = load_file(str(path))
    return content_digest(state, group)


def write_all(out_dir: str | Path, verify: bool = False, only: set[str] | None = None) -> dict[str, bool | None]:
    """Write the four files (or those in `only`); with verify, re-read each and compare with the manifest digest.

    Returns file name -> digest OK (None when not verified).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, bool | None] = {}
    for name, group, spec in official_files():
        if only is not None and name not in only:
            continue
        write_file(out, name, group, spec)
        ok = read_back_digest(out / name, group) == expected_digest(name) if verify else None
        if ok:
            _marker(out, name).write_text(expected_digest(name))
        log.info("%s: written%s", name, "" if ok is None else (", digest OK" if ok else ", DIGEST MISMATCH"))
        results[name] = ok
    return results


def _marker(folder: Path, name: str) -> Path:
    """Records that `name` in `folder` is a verified synthetic file (its digest)."""
    return folder / f".{name}.digest"


def is_synthetic_folder(folder: str | Path) -> bool:
    """Whether the packed (or legacy per-network) checkpoints in `folder` are verified synthetic ones (meaningless
    pictures)."""
    from xtalker.checkpoints import legacy_file_names

    folder = Path(folder)
    return any(
        _marker(folder, name).is_file() and (folder / name).is_file()
        for name in [*layout()["packed"]["files"].values(), *legacy_file_names()]
    )


def ensure_cached(cache_dir: str | Path, needed: set[str] | None = None) -> Path:
    """A folder holding verified synthetic files; writes the missing ones. A marker per file records its digest."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    missing = set()
    for name, _group, _spec in official_files():
        if needed is not None and name not in needed:
            continue
        marker = _marker(cache, name)
        if not (cache / name).is_file() or not marker.is_file() or marker.read_text().strip() != expected_digest(name):
            missing.add(name)
    if missing:
        log.info("writing synthetic checkpoints to %s: %s", cache, ", ".join(sorted(missing)))
        for name, ok in write_all(cache, verify=True, only=missing).items():
            if not ok:
                raise RuntimeError(f"synthetic {name} does not match the {RULE} digest")
    return cache
