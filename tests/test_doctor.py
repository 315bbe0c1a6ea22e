"""`xtalker doctor`: the facts of this machine, the synthetic checkpoints named, a missing folder's fixing line,
JSON for scripts, and the quick test's recommendation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "inference.py"), "doctor", *args], capture_output=True,
                          text=True, timeout=600, check=False)


def test_reports_this_machine_and_names_synthetic_checkpoints(synthetic_checkpoints):
    result = doctor("--checkpoint_dir", str(synthetic_checkpoints))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("XTalker ") and "torch " in out and "oneDNN " in out
    assert "AVX-512 BF16" in out and "usable of" in out
    assert f"ok      checkpoints 256: {synthetic_checkpoints}: synthetic (meaningless pictures)" in out
    assert "landmark backend: auto uses " in out and "H.264 + AAC encoders" in out
    assert out.rstrip().endswith("all needed parts are present")
    assert result.stderr == ""  # quiet: no third-party warnings


def test_json_and_a_missing_checkpoint_folder(tmp_path):
    result = doctor("--checkpoint_dir", str(tmp_path / "nothing"), "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["healthy"] is False and data["facts"]["checkpoints"]["kind"] is None
    missing = [c for c in data["checks"] if c["needed"] and not c["ok"]]
    assert [c["name"] for c in missing] == ["checkpoints 256"]
    assert "scripts/download_models.sh" in missing[0]["fix"]
    assert isinstance(data["facts"]["cpu"]["features"]["avx512_bf16"], bool)
    text = doctor("--checkpoint_dir", str(tmp_path / "nothing"))
    assert text.returncode == 1 and "MISSING checkpoints 256: none in" in text.stdout
    assert "-> run scripts/download_models.sh" in text.stdout


def test_quick_test_measures_and_recommends(synthetic_checkpoints, tmp_path):
    result = doctor("--checkpoint_dir", str(synthetic_checkpoints), "--quick", "--frames", "1", "--json",
                    "--cache_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    quick = json.loads(result.stdout)["quick"]
    assert set(quick["precisions"]) == {"fp32", "bf16"} and "no compiled graph yet" in quick["notes"]["int8"]
    assert quick["precisions"]["fp32"]["psnr_db"] is None and quick["precisions"]["bf16"]["psnr_db"] > 40
    assert quick["recommended_preset"] in ("quality", "balanced")
