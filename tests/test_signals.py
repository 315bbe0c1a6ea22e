"""SIGTERM is handled like Ctrl-C: temp files removed, finished shards kept, one line, exit 143, no traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_wav

from xtalker import cli
from xtalker.media import load_audio
from xtalker.parallel import Job

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"
FRAMES = 12  # long enough to be stopped mid-write


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    samples = load_audio(SPEECH)[: FRAMES * 640 + 200]
    return write_wav(tmp_path_factory.mktemp("audio") / "clip.wav", np.asarray(samples, np.float32))


def flags(ckpt: Path, audio: Path, out: Path) -> list[str]:
    return ["--driven_audio", str(audio), "--source_image", str(PORTRAIT), "--checkpoint_dir", str(ckpt),
            "--output", str(out), "--seed", "3", "--batch_size", "1", "--threads", "1"]


def terminate_when(proc: subprocess.Popen, appears: callable, timeout: float = 240) -> tuple[int, str]:
    """Send SIGTERM once `appears()` is true (the process is mid-write); its exit code and stderr."""
    deadline = time.monotonic() + timeout
    while not appears():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the temp file never appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigterm_while_encoding_leaves_no_partial_video(synthetic_checkpoints, clip, tmp_path):
    out = tmp_path / "video.mp4"
    proc = subprocess.Popen([sys.executable, str(REPO / "inference.py"), *flags(synthetic_checkpoints, clip, out)],
                            stderr=subprocess.PIPE, text=True)
    code, err = terminate_when(proc, lambda: any(tmp_path.glob(".*.partial.mp4")))
    assert code == 143
    assert err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM); no output was written")
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow  # the CLI's SIGTERM tests here and test_parallel's killed-worker resume cover the same paths
def test_sigterm_stops_a_worker_and_keeps_the_job_resumable(synthetic_checkpoints, clip, tmp_path):
    job = tmp_path / "job"
    base = flags(synthetic_checkpoints, clip, tmp_path / "video.mp4")
    assert cli.main([*base, "--job", str(job), "--stage", "prepare"]) == 0
    shards = Job(job).shard_path(0).parent
    worker = [sys.executable, "-m", "xtalker.cli", *base, "--job", str(job), "--stage", "render", "--shards", "3"]
    assert subprocess.run([*worker, "--shard", "2"], capture_output=True, check=False).returncode == 0
    proc = subprocess.Popen([*worker, "--shard", "0"], stderr=subprocess.PIPE, text=True)
    code, err = terminate_when(proc, lambda: any(shards.glob(".shard_0000.*.tmp.npy")))
    assert code == 143 and "Traceback" not in err
    assert sorted(p.name for p in shards.iterdir()) == ["shard_0002.npy"]  # the finished shard stays, no temp file
