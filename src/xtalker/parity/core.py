"""Golden-case loading, comparisons and the per-case result model of the parity checker."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open


@dataclass
class Case:
    """One golden case: its metadata (the `json` entry) and its tensors, read lazily."""

    path: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def kind_id(self) -> str:
        return str(self.meta.get("case", ""))

    def keys(self) -> list[str]:
        with safe_open(str(self.path), "pt") as f:
            return list(f.keys())

    def has(self, key: str) -> bool:
        return key in self.keys()

    def tensor(self, key: str) -> torch.Tensor:
        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(key)

    def array(self, key: str) -> np.ndarray:
        return self.tensor(key).numpy()

    @classmethod
    def open(cls, path: Path) -> "Case":
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("json")
        if raw is None:
            raise ValueError(f"{path}: no 'json' metadata entry; not a golden case file")
        return cls(path=path, meta=json.loads(raw))


@dataclass
class Check:
    """One compared output. `error` and `tolerance` are in the same unit; passed means error <= tolerance."""

    name: str
    error: float
    tolerance: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tolerance

    @property
    def ratio(self) -> float:
        if not np.isfinite(self.error):
            return float("inf")
        if self.tolerance == 0:
            return 0.0 if self.error == 0 else float("inf")
        return self.error / self.tolerance


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _same_shape(name: str, actual: np.ndarray, expected: np.ndarray) -> Check | None:
    if actual.shape != expected.shape:
        return Check(name, float("inf"), 0.0, f"shape {actual.shape} != expected {expected.shape}")
    return None


def max_abs(name: str, actual: Any, expected: Any, atol: float) -> Check:
    """Largest absolute difference, computed in float64."""
    a, e = _np(actual), _np(expected)
    bad = _same_shape(name, a, e)
    if bad:
        return bad
    if a.size == 0:
        return Check(name, 0.0, atol)
    err = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64))))
    return Check(name, err if np.isfinite(err) else float("inf"), atol, "max abs")


def mean_abs(name: str, actual: Any, expected: Any, atol: float) -> Check:
    a, e = _np(actual), _np(expected)
    bad = _same_shape(name, a, e)
    if bad:
        return bad
    err = float(np.mean(np.abs(a.astype(np.float64) - e.astype(np.float64)))) if a.size else 0.0
    return Check(name, err if np.isfinite(err) else float("inf"), atol, "mean abs")


def max_rel(name: str, actual: Any, expected: Any, rtol: float) -> Check:
    """Largest |a - e| / |e| (|e| floored at 1e-12), for values with a natural scale (pose fits, scales)."""
    a, e = _np(actual).astype(np.float64), _np(expected).astype(np.float64)
    bad = _same_shape(name, a, e)
    if bad:
        return bad
    err = float(np.max(np.abs(a - e) / np.maximum(np.abs(e), 1e-12))) if a.size else 0.0
    return Check(name, err if np.isfinite(err) else float("inf"), rtol, "max rel")


def ulps(name: str, actual: Any, expected: Any, max_ulps: float = 1.0) -> Check:
    """Largest difference in float32 units in the last place of the expected value (for exact-by-design outputs)."""
    a, e = _np(actual).astype(np.float32), _np(expected).astype(np.float32)
    bad = _same_shape(name, a, e)
    if bad:
        return bad
    if a.size == 0:
        return Check(name, 0.0, max_ulps, "float32 ulps")
    err = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)) / np.spacing(np.abs(e)).astype(np.float64)))
    return Check(name, err if np.isfinite(err) else float("inf"), max_ulps, "float32 ulps")


def exact(name: str, actual: Any, expected: Any) -> Check:
    """Equality of every element (integers, uint8 images); error = number of differing elements."""
    a, e = _np(actual), _np(expected)
    bad = _same_shape(name, a, e)
    if bad:
        return bad
    diff = int(np.count_nonzero(a != e))
    return Check(name, float(diff), 0.0, "differing elements")


def levels(name: str, actual: Any, expected: Any, max_level: int, max_fraction: float) -> Check:
    """uint8 images: fail if any value is more than `max_level` off, or more than `max_fraction` of values differ.

    The reported error is the fraction of differing values (tolerance `max_fraction`); a value off by more
    than `max_level` makes the error infinite.
    """
    a, e = _np(actual).astype(np.int32), _np(expected).astype(np.int32)
    bad = _same_shape(name, a, e)
    if bad:
        return bad
    d = np.abs(a - e)
    worst = int(d.max()) if d.size else 0
    frac = float(np.count_nonzero(d)) / max(d.size, 1)
    err = frac if worst <= max_level else float("inf")
    return Check(name, err, max_fraction, f"fraction off (worst {worst} levels, allowed {max_level})")


# Upstream's own 1-vs-2-thread difference grows with the image size (reference README 5): 2.0e-4 max abs for a
# 512 end-to-end render, ten times the 256 figure the image tolerances were set from. Factors on (max, mean).
IMAGE_TOLERANCE_SCALE = {256: (1.0, 1.0), 512: (10.0, 2.5)}


def image_tolerances(max_tol: float, mean_tol: float, image_size: int) -> tuple[float, float]:
    """The (max abs, mean abs) tolerances of a rendered image at `image_size`, given the values set at 256."""
    if image_size not in IMAGE_TOLERANCE_SCALE:
        raise ValueError(f"no image tolerances for image_size {image_size} (known: {sorted(IMAGE_TOLERANCE_SCALE)})")
    max_scale, mean_scale = IMAGE_TOLERANCE_SCALE[image_size]
    return max_tol * max_scale, mean_tol * mean_scale


@dataclass
class CaseResult:
    name: str
    kind: str
    status: str  # PASS, FAIL, SKIP
    checks: list[Check] = field(default_factory=list)
    message: str = ""

    @property
    def worst(self) -> Check | None:
        return max(self.checks, key=lambda c: c.ratio) if self.checks else None


CaseRunner = Callable[[Case, "Any"], list[Check]]


class Context:
    """What case runners share: the checkpoint folder and a cache of networks built from it."""

    def __init__(self, checkpoint_dir: Path, synthesize_missing: bool = False):
        self.checkpoint_dir = Path(checkpoint_dir)
        # With a cache folder of synthetic weights, each file is written the first time a case needs it.
        self.synthesize_missing = synthesize_missing
        self._networks: dict[tuple[str, str], torch.nn.Module] = {}

    def checkpoint(self, file_name: str) -> Path:
        if self.synthesize_missing:
            from xtalker.synthetic import ensure_cached

            ensure_cached(self.checkpoint_dir, {file_name})
        return self.checkpoint_dir / file_name

    def network(self, name: str, file_name: str) -> torch.nn.Module:
        """Network `name` (a checkpoint prefix, or "mapping") built from `file_name` in the checkpoint folder."""
        from xtalker.checkpoints import load_network

        key = (name, file_name)
        if key not in self._networks:
            self._networks[key] = load_network(name, self.checkpoint(file_name))
        return self._networks[key]

    @staticmethod
    def _named_file(case: Case, suffix: str) -> str | None:
        """An official checkpoint file ending in `suffix` named in the metadata: `weights` first, then any text."""
        from xtalker.checkpoints import official_file_names

        known = {n for n in official_file_names() if n.endswith(suffix)}
        fields = [case.meta.get("weights", "")] + [v for k, v in case.meta.items() if k != "weights"]
        for text in fields:
            if isinstance(text, str):
                for token in re.split(r"[\s,;()'\"]+", text):
                    if token in known:
                        return token
        return None

    @classmethod
    def packed_file(cls, case: Case) -> str:
        """The packed SadTalker file a case was computed with: named in the metadata, else chosen by `image_size`."""
        from xtalker.checkpoints import packed_file_name

        return cls._named_file(case, ".safetensors") or packed_file_name(int(case.meta.get("image_size", 256)))

    @classmethod
    def mapping_file(cls, case: Case, coeff_nc: int) -> str:
        """The mapping pickle a case was computed with: named in the metadata, else chosen by channel count."""
        from xtalker.checkpoints import mapping_file_name

        return cls._named_file(case, ".pth.tar") or mapping_file_name(coeff_nc)
