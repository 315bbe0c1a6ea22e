"""Shared fixtures: synthetic checkpoints (written once into a cache folder) and the reference golden folder."""

from __future__ import annotations

import os
import tempfile
import wave
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """The reference golden cases: $XTALKER_GOLDEN_DIR, else ../shared/reference/golden beside the checkout."""
    return Path(os.environ.get("XTALKER_GOLDEN_DIR") or REPO.parent / "shared" / "reference" / "golden")


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """Mono 16-bit PCM wav of float samples in [-1, 1]."""
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture(scope="session")
def synthetic_checkpoints() -> Path:
    """A folder with the four synthetic official files, verified by digest (written on first use, ~15 s)."""
    from xtalker.synthetic import default_cache_dir, ensure_cached

    return ensure_cached(default_cache_dir())


@pytest.fixture(scope="session")
def pirender_checkpoint() -> Path:
    """The synthetic PIRender file (epoch_00190_iteration_000400000_checkpoint.pt), verified by digest, beside the
    synthetic SadTalker files (written on first use, ~3 s)."""
    from xtalker.synthetic import default_cache_dir, ensure_pirender

    return ensure_pirender(default_cache_dir())


@pytest.fixture(scope="session")
def aux_checkpoints() -> Path:
    """A folder with the four synthetic aux files (GFPGAN, RetinaFace, AWing FAN, ParseNet), verified by digest."""
    from xtalker.synthetic import default_aux_dir
    from xtalker.synthetic.auxiliary import ensure_all_aux

    return ensure_all_aux(default_aux_dir())


@pytest.fixture(scope="session")
def restorer_checkpoints(aux_checkpoints) -> Path:
    """The synthetic aux folder with the optional restorers' files added (RestoreFormer.pth, RealESRGAN_x2plus.pth;
    rule sadtalker-synth-v1-restorers, verified by digest; written on first use, ~5 s, 358 MB)."""
    from xtalker.synthetic import ensure_restorers

    return ensure_restorers(aux_checkpoints)


@pytest.fixture(scope="session")
def enhancer_checkpoints(synthetic_checkpoints, restorer_checkpoints, tmp_path_factory) -> Path:
    """The synthetic SadTalker files plus the enhancers' (GFPGAN, RestoreFormer, RealESRGAN, detector, ParseNet) in one folder,
    without the landmark net, so `--landmarks auto` keeps the offline backend (synthetic upstream landmarks are random)."""
    folder = tmp_path_factory.mktemp("enhancer_checkpoints")
    for source in (synthetic_checkpoints, restorer_checkpoints):
        for path in source.iterdir():
            if path.is_file() and not path.name.startswith(".") and path.name != "alignment_WFLW_4HG.pth":
                (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="session")
def golden() -> Path:
    path = golden_dir()
    if not path.is_dir():
        pytest.skip(f"reference golden folder {path} not present (set XTALKER_GOLDEN_DIR)")
    return path


@pytest.fixture
def local_flyte(tmp_path, monkeypatch):
    """Flyte's local execution with an isolated cache and temp folder (yielded); torch's thread count restored
    afterwards (tasks set it)."""
    torch = pytest.importorskip("torch")
    local_cache = pytest.importorskip("flytekit.core.local_cache")
    threads = torch.get_num_threads()
    monkeypatch.setattr(local_cache, "CACHE_LOCATION", str(tmp_path / "cache"))
    monkeypatch.setattr(local_cache.LocalTaskCache, "_initialized", False)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    torch.set_num_threads(threads)
