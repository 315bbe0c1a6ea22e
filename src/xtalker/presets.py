"""Named presets (configs/presets.yaml): defaults for a group of settings; explicit flags override them."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Settings a preset may set, with the type each must have ("workers" and "batch_size" may also be "auto").
PRESET_FIELDS: dict[str, type] = {"precision": str, "batch_size": int, "threads": int, "workers": int, "blend": str, "enhancer": str,
                                  "background_enhancer": str, "device": str, "facerender": str}
AUTO = "auto"
# Per-preset s/frame and PSNR from the last `scripts/benchmark.py presets` run (shipped with the package).
MEASURED_FILE = Path(__file__).resolve().parent / "data" / "presets_measured.json"
AUTO_FIELDS = ("workers", "batch_size")
# Cores per worker slot for `workers: auto`. On a 2-core VM one 2-thread process renders as fast as two
# 1-thread workers (76.8 vs 73.9 s, benchmark parallel), so small machines get one process; larger ones get
# a worker per 4 cores, where one process's threads stop scaling on these batch-1/2 convolutions.
AUTO_SLOT_CORES = 4


def auto_workers(cores: int) -> int:
    """Worker processes for `workers: auto` on a machine with `cores` usable cores."""
    return max(1, cores // AUTO_SLOT_CORES)


class PresetError(ValueError):
    """Unknown preset, or a presets file that does not parse."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    settings: dict[str, Any]


def presets_file() -> Path:
    """$XTALKER_PRESETS, else configs/presets.yaml of the checkout, else the copy installed with the package."""
    if env := os.environ.get("XTALKER_PRESETS"):
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "configs" / "presets.yaml"
    if checkout.is_file():
        return checkout
    return Path(sys.prefix) / "share" / "xtalker" / "configs" / "presets.yaml"


def load_presets(path: Path | None = None) -> dict[str, Preset]:
    path = path or presets_file()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PresetError(f"cannot read presets from {path}: {e}") from None
    if not isinstance(raw, dict):
        raise PresetError(f"{path}: expected a mapping of preset names")
    presets = {}
    for name, body in raw.items():
        if not isinstance(body, dict):
            raise PresetError(f"{path}: preset {name!r} is not a mapping")
        settings = {k: v for k, v in body.items() if k != "description"}
        for key, value in settings.items():
            kind = PRESET_FIELDS.get(key)
            if kind is None:
                raise PresetError(f"{path}: preset {name!r} sets unknown field {key!r} (known: {', '.join(PRESET_FIELDS)})")
            if key in AUTO_FIELDS and value == AUTO:
                continue
            if value is not None and not isinstance(value, kind):
                also = " or auto" if key in AUTO_FIELDS else ""
                raise PresetError(f"{path}: preset {name!r}: {key} must be {kind.__name__}{also}, got {value!r}")
        presets[str(name)] = Preset(str(name), str(body.get("description", "")), settings)
    return presets


def get_preset(name: str, path: Path | None = None) -> Preset:
    presets = load_presets(path)
    if name not in presets:
        raise PresetError(f"unknown preset {name!r}; available: {', '.join(presets)} (see --list_presets)")
    return presets[name]


def without_none(values: dict[str, Any], given: Any) -> dict[str, Any]:
    """`values` with "none" (any case) meaning no enhancer / no background enhancer. A face enhancer in `given` (the
    settings the user gave, over the preset's) that restores no face (none, lightweight) also drops the preset's
    background enhancer, which only works under a restoring one; a background enhancer the user gave is kept (and
    refused with a clear message)."""
    from xtalker.finish.enhance import RESTORING

    out = dict(values)
    for key in ("enhancer", "background_enhancer"):
        if str(out.get(key)).lower() == "none":
            out[key] = None
    restores = str(out.get("enhancer")).lower() in RESTORING
    if not restores and "enhancer" in given and "background_enhancer" not in given:
        out["background_enhancer"] = None
    return out


def measured() -> dict[str, Any]:
    """What `scripts/benchmark.py presets` last measured ({"machine": ..., "presets": {name: {...}}}), or {}."""
    try:
        return json.loads(MEASURED_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def describe(presets: dict[str, Preset]) -> str:
    numbers = measured()
    lines = []
    for p in presets.values():
        settings = ", ".join(f"{k}={v}" for k, v in p.settings.items())
        lines.append(f"{p.name:<12} {settings}\n{'':<12} {p.description}")
        if (m := numbers.get("presets", {}).get(p.name)) is not None:
            psnr = "the fp32 reference" if m["psnr_vs_fp32_db"] is None else f"{m['psnr_vs_fp32_db']} dB PSNR vs fp32"
            lines.append(f"{'':<12} measured: {m['s_per_frame']:.2f} s/frame, {psnr}")
    if numbers:
        lines.append(f"\nmeasured by scripts/benchmark.py presets (crop 256, synthetic weights) on {numbers['machine']}; "
                     "other machines differ")
    return "\n".join(lines)
