"""Presets: YAML loading, explicit flags over presets, listing, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xtalker.cli import build_parser, config_from_args
from xtalker.presets import PresetError, get_preset, load_presets

REPO = Path(__file__).resolve().parents[1]
BASE = ["--driven_audio", "a.wav", "--source_image", "b.png"]


def config_for(*flags: str):
    return config_from_args(build_parser().parse_args([*BASE, *flags]))


def test_shipped_presets_parse_and_use_known_settings():
    presets = load_presets()
    assert list(presets) == ["quality", "balanced", "fast", "ultra_fast", "pirender"]
    assert presets["pirender"].settings == {"facerender": "pirender", "precision": "bf16", "batch_size": 2}
    assert config_for("--preset", "pirender", "--facerender", "facevid2vid").facerender == "facevid2vid"
    assert config_for("--preset", "quality").facerender == "facevid2vid"  # never chosen by which files exist
    assert config_for("--optimization_preset", "balanced").precision == "bf16"  # the presets fork's flag
    assert config_for("--preset", "ultra_fast", "--enhancer", "none").enhancer is None
    # The presets fork's enhancers: ultra_fast lightweight, fast GFPGAN without background upsampling, balanced
    # GFPGAN, quality RestoreFormer with the RealESRGAN background.
    chosen = {name: (config_for("--preset", name).enhancer, config_for("--preset", name).background_enhancer)
              for name in presets}
    assert chosen == {"quality": ("RestoreFormer", "realesrgan"), "balanced": ("gfpgan", None), "fast": ("gfpgan", None),
                      "ultra_fast": ("lightweight", None), "pirender": (None, None)}
    assert config_for("--preset", "quality", "--background_enhancer", "none").background_enhancer is None
    dropped = config_for("--preset", "quality", "--enhancer", "none")  # no face enhancer: no background either
    assert (dropped.enhancer, dropped.background_enhancer) == (None, None)
    light = config_for("--preset", "quality", "--enhancer", "lightweight")  # restores no face: no background either
    assert (light.enhancer, light.background_enhancer) == ("lightweight", None)
    kept = config_for("--preset", "quality", "--enhancer", "gfpgan")
    assert (kept.enhancer, kept.background_enhancer) == ("gfpgan", "realesrgan")
    assert presets["fast"].settings["precision"] == presets["ultra_fast"].settings["precision"] == "int8"
    assert presets["quality"].settings["precision"] == "fp32"
    assert presets["balanced"].settings["precision"] == "bf16"
    for preset in presets.values():
        config = config_for("--preset", preset.name)
        config.validate()
        assert config.precision == preset.settings["precision"]


def test_defaults_without_a_preset_are_upstreams():
    config = config_for()
    assert (config.precision, config.batch_size, config.threads) == ("fp32", 2, None)


def test_explicit_flags_win_over_the_preset():
    assert config_for("--preset", "balanced").precision == "bf16"
    config = config_for("--preset", "balanced", "--precision", "fp32", "--batch_size", "5", "--threads", "1")
    assert (config.precision, config.batch_size, config.threads) == ("fp32", 5, 1)


def test_auto_workers_follow_the_machine(monkeypatch):
    from xtalker import parallel

    monkeypatch.setattr(parallel, "available_cpus", lambda: [0, 1])
    assert config_for("--preset", "ultra_fast").workers == 1  # small machines: one process (measured as fast)
    monkeypatch.setattr(parallel, "available_cpus", lambda: list(range(16)))
    assert config_for("--preset", "ultra_fast").workers == 4
    assert config_for("--preset", "ultra_fast", "--workers", "2").workers == 2
    assert config_for("--preset", "fast").workers == 1


def test_unknown_preset_and_bad_files(tmp_path, monkeypatch):
    with pytest.raises(PresetError, match="unknown preset 'turbo'; available: quality, balanced, fast, ultra_fast, pirender"):
        get_preset("turbo")
    bad = tmp_path / "p.yaml"
    bad.write_text("quick:\n  precision: bf16\n  turbo: 9\n")
    with pytest.raises(PresetError, match="unknown field 'turbo'"):
        load_presets(bad)
    bad.write_text("quick:\n  batch_size: two\n")
    with pytest.raises(PresetError, match="batch_size must be int"):
        load_presets(bad)
    monkeypatch.setenv("XTALKER_PRESETS", str(bad))
    with pytest.raises(PresetError):
        load_presets()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "inference.py"), *args], capture_output=True, text=True, timeout=120)


def test_list_presets_and_cli_errors():
    proc = _cli("--list_presets")
    assert proc.returncode == 0
    assert proc.stdout.startswith("quality") and "precision=bf16" in proc.stdout
    proc = _cli(*BASE, "--preset", "turbo")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: unknown preset 'turbo'; available: quality, balanced, fast, ultra_fast, pirender (see --list_presets)"
    )
    proc = _cli("--preset", "quality")
    assert proc.returncode == 2 and "--driven_audio and --source_image are required" in proc.stderr


def test_list_presets_shows_the_measured_numbers_with_the_machine(tmp_path, monkeypatch):
    from xtalker import presets

    numbers = tmp_path / "measured.json"
    numbers.write_text('{"machine": "Test CPU, 2 cores, 2026-12-05", "presets": {"quality": {"s_per_frame": 12.5, '
                       '"psnr_vs_fp32_db": null}, "balanced": {"s_per_frame": 3.25, "psnr_vs_fp32_db": 44.1}}}')
    monkeypatch.setattr(presets, "MEASURED_FILE", numbers)
    lines = presets.describe(load_presets()).splitlines()
    assert lines[lines.index(next(x for x in lines if x.startswith("balanced"))) + 2].split() == [
        "measured:", "3.25", "s/frame,", "44.1", "dB", "PSNR", "vs", "fp32"]
    assert "measured: 12.50 s/frame, the fp32 reference" in "\n".join(lines)
    assert lines[-1].endswith("on Test CPU, 2 cores, 2026-12-05; other machines differ")
    monkeypatch.setattr(presets, "MEASURED_FILE", tmp_path / "absent.json")
    assert "measured" not in presets.describe(load_presets())


def test_ipex_backend_says_why_it_is_unavailable():
    import importlib.util

    if importlib.util.find_spec("intel_extension_for_pytorch") is not None:
        pytest.skip("IPEX is installed here")
    proc = _cli(*BASE, "--backend", "ipex")
    assert proc.returncode == 2
    assert "intel_extension_for_pytorch is not installed" in proc.stderr and "--precision bf16" in proc.stderr
