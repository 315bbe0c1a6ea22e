"""The Python API: networks loaded once, the CLI's video for the same seed, only the needed reloads, the CLI's
errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_wav

from xtalker import USER_ERRORS, XTalker
from xtalker.config import ConfigError
from xtalker.media import iter_video_frames, load_audio
from xtalker.preprocess import NoFaceError

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"


def frames(path: Path) -> np.ndarray:
    return np.stack(list(iter_video_frames(path)[1]))


def speech_clip(folder: Path, frames_: int) -> Path:
    return write_wav(folder / f"speech_{frames_}.wav", load_audio(SPEECH)[4000 : 4000 + frames_ * 640 + 100])


@pytest.fixture(scope="module")
def xt(synthetic_checkpoints) -> XTalker:
    return XTalker(synthetic_checkpoints, batch_size=1, precision="bf16")  # bf16: 3x faster here, same checks


def test_networks_load_once_and_the_video_is_the_clis(xt, synthetic_checkpoints, tmp_path):
    assert xt.loaded() == ["sadtalker"] and xt.synthetic  # loaded by the constructor
    audio = speech_clip(tmp_path, 3)
    first = xt.generate(PORTRAIT, audio, tmp_path / "a.mp4", seed=11)
    second = xt.generate(str(PORTRAIT), str(audio), str(tmp_path / "b.mp4"), seed=11)
    assert first.loaded == () and second.loaded == ()
    assert second.profile["loaded"] == [] and second.profile["stages_s"]["load models"] < 0.5
    assert (second.frames, second.seed, second.size_wh) == (3, 11, (256, 256)) and second.synthetic
    subprocess.run([sys.executable, str(REPO / "inference.py"), "--source_image", str(PORTRAIT), "--driven_audio",
                    str(audio), "--checkpoint_dir", str(synthetic_checkpoints), "--seed", "11", "--batch_size", "1",
                    "--precision", "bf16", "--output", str(tmp_path / "cli.mp4")], check=True, capture_output=True)
    cli = frames(tmp_path / "cli.mp4")
    assert np.array_equal(frames(first.output), cli) and np.array_equal(frames(second.output), cli)


def test_other_settings_load_only_what_they_need(enhancer_checkpoints, tmp_path):
    xt = XTalker(enhancer_checkpoints, batch_size=1, max_settings=2, precision="bf16")
    audio = speech_clip(tmp_path, 1)

    def loads(**options) -> tuple[str, ...]:
        return xt.generate(PORTRAIT, audio, tmp_path / "v.mp4", seed=1, **options).loaded

    assert loads(enhancer="lightweight") == ()
    assert loads(enhancer="gfpgan") == ("gfpgan",)
    assert loads(enhancer="gfpgan") == ()
    assert loads(precision="fp32") == ("sadtalker",)  # a second setting, kept beside the first
    assert loads() == () and loads(precision="fp32") == ()
    assert loads(preprocess="full") == ("sadtalker",)  # a third (another mapping net): the least recently used goes
    assert loads(precision="fp32") == () and loads() == ("sadtalker",)


def test_enhancer_none_turns_off_a_presets_enhancers(tmp_path):
    xt = XTalker(tmp_path, preset="quality", warm=False)
    chosen = xt.config(PORTRAIT, "a.wav")
    assert (chosen.enhancer, chosen.background_enhancer) == ("RestoreFormer", "realesrgan")
    off = xt.config(PORTRAIT, "a.wav", enhancer="none")
    assert (off.enhancer, off.background_enhancer) == (None, None)
    gfpgan = xt.config(PORTRAIT, "a.wav", enhancer="gfpgan", background_enhancer="None")
    assert (gfpgan.enhancer, gfpgan.background_enhancer) == ("gfpgan", None)
    plain = XTalker(tmp_path, warm=False, enhancer="none").config(PORTRAIT, "a.wav", preset="balanced")
    assert plain.enhancer == "gfpgan"  # a call's preset is over the constructor's options
    kept = XTalker(tmp_path, preset="quality", warm=False, enhancer="none")
    assert (kept.config(PORTRAIT, "a.wav").enhancer, kept.config(PORTRAIT, "a.wav").background_enhancer) == (None, None)


def test_errors_are_the_clis_one_line_exceptions(xt, tmp_path):
    audio = speech_clip(tmp_path, 1)
    with pytest.raises(ConfigError, match="unknown option pose; options are: .*pose_style"):
        xt.generate(PORTRAIT, audio, pose=3)
    with pytest.raises(ConfigError, match="--pose_style must be in 0..45, got 46"):
        xt.generate(PORTRAIT, audio, pose_style=46)
    with pytest.raises(ConfigError, match="source image not found: .*nowhere.png"):
        xt.generate(tmp_path / "nowhere.png", audio)
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 128, np.uint8))
    with pytest.raises(NoFaceError, match="no face found") as caught:
        xt.generate(blank, audio, tmp_path / "none.mp4")
    assert isinstance(caught.value, USER_ERRORS) and "\n" not in str(caught.value)
    assert not (tmp_path / "none.mp4").exists()


def test_a_progress_callback_sees_frames_and_can_stop_the_run(xt, tmp_path):
    audio = speech_clip(tmp_path, 4)
    seen = []
    xt.generate(PORTRAIT, audio, tmp_path / "p.mp4", seed=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        xt.generate(PORTRAIT, audio, tmp_path / "stopped.mp4", progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.mp4", "speech_4.wav"]


def test_default_outputs_never_overwrite(xt, tmp_path):
    audio = speech_clip(tmp_path, 1)
    videos = [xt.generate(PORTRAIT, audio, result_dir=tmp_path / "results").output for _ in range(2)]
    assert videos[0] != videos[1] and all(v.is_file() and v.parent == tmp_path / "results" for v in videos)
