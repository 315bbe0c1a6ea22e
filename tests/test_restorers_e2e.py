"""RestoreFormer and the RealESRGAN background end to end: the enhanced video's size and content, what the
background enhancer computes per frame in each mode (network calls counted), and the CLI's one-line errors.

The renderer is PIRender in eager bf16 (the cheapest), the restorers bf16: these tests are about the finish
stage, whose frames do not depend on which renderer drew them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_wav

from xtalker.config import InferenceConfig
from xtalker.finish.background import BackgroundUpsampler
from xtalker.media import iter_video_frames, load_audio, probe
from xtalker.pipeline import generate
from xtalker.warm import Networks

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"  # 512 x 512
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"


@pytest.fixture(scope="module")
def ckpt(enhancer_checkpoints, pirender_checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("restorer_run")
    for path in {p.name: p for p in (*enhancer_checkpoints.iterdir(), pirender_checkpoint)}.values():
        (folder / path.name).symlink_to(path.resolve())
    return folder


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> dict[int, Path]:
    speech = load_audio(SPEECH)
    folder = tmp_path_factory.mktemp("restorer_audio")
    return {n: write_wav(folder / f"{n}.wav", speech[4000 : 4000 + n * 640 + 100]) for n in (1, 2)}


@pytest.fixture(scope="module")
def warm() -> Networks:
    return Networks()


@pytest.fixture
def upsample_calls(monkeypatch) -> list[tuple[int, int]]:
    """(h, w) of every frame RealESRGAN upsamples."""
    calls = []
    real = BackgroundUpsampler.upsample

    def counted(self, frame_bgr):
        calls.append(frame_bgr.shape[:2])
        return real(self, frame_bgr)

    monkeypatch.setattr(BackgroundUpsampler, "upsample", counted)
    return calls


def run(tmp_path: Path, ckpt: Path, audio: Path, warm: Networks, **kw):
    config = InferenceConfig(driven_audio=audio, source_image=PORTRAIT, checkpoint_dir=ckpt, facerender="pirender",
                             precision="bf16", compile=False, seed=3, output=tmp_path / kw.pop("name", "out.mp4"), **kw)
    result = generate(config, warm)
    return result, np.stack(list(iter_video_frames(result.output)[1]))


def test_restoreformer_doubles_the_crop_and_restores_the_face(tmp_path, ckpt, audio, warm):
    plain, before = run(tmp_path, ckpt, audio[2], warm, name="plain.mp4")
    result, after = run(tmp_path, ckpt, audio[2], warm, name="rf.mp4", enhancer="RestoreFormer")
    w, h = plain.size_wh
    assert result.size_wh == (2 * w, 2 * h) and len(after) == 2 and probe(result.output).width == 2 * w
    upscaled = cv2.resize(before[0], (2 * w, 2 * h), interpolation=cv2.INTER_LANCZOS4).astype(int)
    corner = np.abs(after[0, :24, :24].astype(int) - upscaled[:24, :24]).mean()
    face = np.abs(after[0, 180:330, 180:330].astype(int) - upscaled[180:330, 180:330]).mean()
    assert face > 3 * corner, (face, corner)
    assert "restoreformer" in warm.kinds() and "gfpgan" not in warm.kinds()


def test_restoreformer_with_per_frame_detection(tmp_path, ckpt, audio, warm):
    result, frames = run(tmp_path, ckpt, audio[1], warm, enhancer="RestoreFormer", enhance_align="detect")
    assert frames.shape[0] == 1 and result.size_wh[0] == 512 and result.profile.seconds["enhance"] > 0


def test_background_in_crop_modes_is_upscaled_every_frame(tmp_path, ckpt, audio, warm, upsample_calls):
    result, frames = run(tmp_path, ckpt, audio[2], warm, enhancer="gfpgan", background_enhancer="realesrgan")
    w, h = result.size_wh
    assert upsample_calls == [(h // 2, w // 2)] * 2  # the whole (animated) crop, once per frame


@pytest.mark.parametrize("align", ["source", "detect"])
def test_background_in_full_modes_upscales_the_picture_once(tmp_path, ckpt, audio, warm, upsample_calls, align,
                                                            monkeypatch):
    """The still picture goes through RealESRGAN once per video; per frame only the face box does. Away from the
    face the video is RealESRGAN's picture, not the Lanczos upscale."""
    from xtalker.finish.enhance import DetectedFaces, DetectingEnhancer

    # The synthetic detector finds faces anywhere (corners too); the background is what is tested here.
    nothing = DetectedFaces(np.zeros((0, 5, 2), np.float32), np.zeros((0, 5), np.float32))
    monkeypatch.setattr(DetectingEnhancer, "faces", lambda self, frames: [nothing] * len(frames))
    result, frames = run(tmp_path, ckpt, audio[2], warm, preprocess="full", still=True, blend="feather",
                         enhancer="RestoreFormer", enhance_align=align, background_enhancer="realesrgan")
    assert result.size_wh == (1024, 1024) and len(frames) == 2
    assert upsample_calls[0] == (512, 512)
    boxes = upsample_calls[1:]
    assert len(boxes) == 2 and all(bh * bw < 512 * 512 / 2 for bh, bw in boxes), upsample_calls
    picture = cv2.imread(str(PORTRAIT))
    sr = BackgroundUpsampler(ckpt / "RealESRGAN_x2plus.pth", "bf16").upsampler.enhance(picture).image[..., ::-1]
    lanczos = cv2.resize(picture, (1024, 1024), interpolation=cv2.INTER_LANCZOS4)[..., ::-1]
    corner = frames[1, :96, :96].astype(int)
    assert np.abs(corner - sr[:96, :96]).mean() < 4 < np.abs(corner - lanczos[:96, :96]).mean()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "inference.py"), "--source_image", str(PORTRAIT), *args],
                          capture_output=True, text=True, timeout=300)


def test_background_enhancer_needs_a_restoring_enhancer(tmp_path, ckpt, audio):
    out = tmp_path / "never.mp4"
    for extra, says in ((["--enhancer", "lightweight"], "add --enhancer gfpgan or --enhancer RestoreFormer"),
                        ([], "add --enhancer gfpgan or --enhancer RestoreFormer"),
                        (["--enhancer", "gfpgan", "--background_enhancer", "esrgan"], "must be realesrgan")):
        flags = extra if "--background_enhancer" in extra else [*extra, "--background_enhancer", "realesrgan"]
        done = cli("--driven_audio", str(audio[1]), "--checkpoint_dir", str(ckpt), "--output", str(out), *flags)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert not out.exists()


def test_missing_restorer_files_fail_before_any_work(tmp_path, ckpt, audio):
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in ckpt.iterdir():
        if path.name not in ("RestoreFormer.pth", "RealESRGAN_x2plus.pth"):
            (partial / path.name).symlink_to(path.resolve())
    out = tmp_path / "never.mp4"
    base = ["--driven_audio", str(audio[1]), "--checkpoint_dir", str(partial), "--output", str(out)]
    done = cli(*base, "--enhancer", "RestoreFormer")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "--enhancer RestoreFormer needs RestoreFormer.pth" in done.stderr and "download_models.sh" in done.stderr
    done = cli(*base, "--enhancer", "gfpgan", "--background_enhancer", "realesrgan")
    assert "--background_enhancer realesrgan needs RealESRGAN_x2plus.pth" in done.stderr, done.stderr
    done = cli(*base, "--preset", "quality")
    assert done.returncode == 1 and "preset quality uses --enhancer RestoreFormer" in done.stderr
    assert "--enhancer none" in done.stderr and "RestoreFormer.pth" in done.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
