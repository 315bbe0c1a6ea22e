"""End to end on synthetic checkpoints with a real portrait and real speech: CLI, outputs, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_wav

from xtalker.config import InferenceConfig
from xtalker.media import VideoWriter, iter_video_frames, load_audio, probe
from xtalker.pipeline import generate
from xtalker.warm import Networks

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(SPEECH)


def clip(tmp_path: Path, speech: np.ndarray, frames: int, extra: int = 300) -> Path:
    """A speech excerpt lasting `frames` video frames plus `extra` samples (which upstream drops)."""
    start = 4000  # skip the leading silence of the clip
    return write_wav(tmp_path / f"speech_{frames}.wav", speech[start : start + frames * 640 + extra])


@pytest.fixture(scope="module")
def warm() -> Networks:
    """Networks shared by this module's runs (loaded once, as the Python API keeps them)."""
    return Networks()


def run(tmp_path: Path, ckpt: Path, audio: Path, networks: Networks | None = None, **kw) -> tuple:
    config = InferenceConfig(driven_audio=audio, source_image=kw.pop("source_image", PORTRAIT), checkpoint_dir=ckpt,
                             output=tmp_path / kw.pop("name", "out.mp4"), seed=kw.pop("seed", 7), **kw)
    result = generate(config, networks)
    return result, probe(result.output)


def frames_of(path: Path) -> np.ndarray:
    return np.stack(list(iter_video_frames(path)[1]))


@pytest.fixture(scope="module")
def plain(tmp_path_factory, speech, synthetic_checkpoints, warm) -> tuple:
    """The default 2-frame video that the enhancer and reference-video tests compare against (rendered once)."""
    folder = tmp_path_factory.mktemp("plain")
    return run(folder, synthetic_checkpoints, clip(folder, speech, frames=2), warm, name="plain.mp4")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "inference.py"), *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


def test_crop_256_video_has_the_upstream_shape(tmp_path, speech, synthetic_checkpoints, warm):
    audio = clip(tmp_path, speech, frames=4)
    result, info = run(tmp_path, synthetic_checkpoints, audio, warm, batch_size=3)
    assert result.output.is_file()
    assert (info.video_streams, info.audio_streams) == (1, 1)
    assert info.fps == 25
    assert info.frame_count == 4  # floor(len / 640): the 300 extra samples make no frame
    # 256 wide, height restored from the tight face crop's aspect (rounded up to even for yuv420p)
    w, h = result.size_wh
    assert info.width == 256 == w and info.height == h + (h % 2)
    assert abs(info.audio_duration - 4 / 25) < 1100 / 16000
    assert result.profile.frames == 4 and result.profile.seconds["render"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_same_seed_same_video_bit_for_bit(tmp_path, speech, synthetic_checkpoints, warm):
    audio = clip(tmp_path, speech, frames=2)
    a, _ = run(tmp_path, synthetic_checkpoints, audio, warm, name="a.mp4", seed=3)
    b, _ = run(tmp_path, synthetic_checkpoints, audio, None, name="b.mp4", seed=3)  # fresh networks too
    assert a.output.read_bytes() == b.output.read_bytes()
    c, _ = run(tmp_path, synthetic_checkpoints, audio, warm, name="c.mp4", seed=4)
    assert a.output.read_bytes() != c.output.read_bytes()


def test_lightweight_enhancer_sharpens_the_frames(tmp_path, speech, synthetic_checkpoints, warm, plain):
    audio = clip(tmp_path, speech, frames=2)
    plain, _ = plain
    sharp, _ = run(tmp_path, synthetic_checkpoints, audio, warm, name="sharp.mp4", enhancer="lightweight")
    detail = [cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in
              (frames_of(plain.output)[0], frames_of(sharp.output)[0])]
    assert detail[1] > 1.2 * detail[0] and "enhance" in sharp.profile.as_dict()["stages_s"]


def test_gfpgan_enhancer_doubles_the_video_and_restores_the_face(tmp_path, speech, enhancer_checkpoints, warm, plain):
    audio = clip(tmp_path, speech, frames=2)
    plain, _ = plain
    enhanced, info = run(tmp_path, enhancer_checkpoints, audio, warm, name="gfpgan.mp4", enhancer="gfpgan")
    w, h = plain.size_wh
    assert enhanced.size_wh == (2 * w, 2 * h) and info.frame_count == 2
    assert enhanced.profile.seconds["enhance"] > 0
    before, after = frames_of(plain.output)[0], frames_of(enhanced.output)[0]
    upscaled = cv2.resize(before, (after.shape[1], after.shape[0]), interpolation=cv2.INTER_LANCZOS4).astype(int)
    # corners keep the (upscaled) rendered frame, up to H.264 on noisy synthetic pictures; the face region is
    # GFPGAN's (meaningless with synthetic weights)
    corner = np.abs(after[:24, :24].astype(int) - upscaled[:24, :24]).mean()
    face = np.abs(after[180:330, 180:330].astype(int) - upscaled[180:330, 180:330]).mean()
    assert face > 3 * corner, (face, corner)
    same_size, info = run(tmp_path, enhancer_checkpoints, audio, warm, name="gfpgan1.mp4", enhancer="gfpgan",
                          enhance_scale=1)
    assert same_size.size_wh == plain.size_wh and info.width == w  # --enhance_scale 1: the rendered size back
    kept = frames_of(same_size.output)[0].astype(int)
    assert np.abs(kept[:12, :12] - before[:12, :12]).mean() < np.abs(kept[90:165, 90:165] - before[90:165, 90:165]).mean()


@pytest.mark.parametrize("scale", [2, 1])
def test_gfpgan_in_full_mode_pastes_the_enhanced_face_into_the_upscaled_picture(tmp_path, speech, enhancer_checkpoints,
                                                                                scale):
    """--enhance_scale 2 is upstream's doubled picture; 1 keeps the picture's own size (512 x 512 here)."""
    audio = clip(tmp_path, speech, frames=1)
    result, info = run(tmp_path, enhancer_checkpoints, audio, preprocess="full", still=True, blend="feather",
                       enhancer="gfpgan", precision="bf16", enhance_scale=scale)
    side = 512 * scale
    assert (info.width, info.height) == (side, side) == result.size_wh
    original = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    upscaled = cv2.resize(original, (side, side), interpolation=cv2.INTER_LANCZOS4).astype(int)
    frame = frames_of(result.output)[0].astype(int)
    assert np.abs(frame[:80, :80] - upscaled[:80, :80]).mean() < 4


def test_gfpgan_with_upstreams_per_frame_detection(tmp_path, speech, enhancer_checkpoints):
    audio = clip(tmp_path, speech, frames=1)
    result, info = run(tmp_path, enhancer_checkpoints, audio, enhancer="gfpgan", enhance_align="detect",
                       precision="bf16")
    w, h = result.size_wh
    assert (info.width, info.frame_count) == (512, 1) and h > 256
    assert result.profile.seconds["enhance"] > 0


def test_missing_enhancer_weights_fail_before_any_work(tmp_path, speech, synthetic_checkpoints):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("SadTalker_V0.0.2_256.safetensors", "mapping_00229-model.pth.tar"):
        (ckpt / name).symlink_to(synthetic_checkpoints / name)
    out = tmp_path / "out.mp4"
    proc = cli("--driven_audio", str(clip(tmp_path, speech, frames=1)), "--source_image", str(PORTRAIT),
               "--checkpoint_dir", str(ckpt), "--output", str(out), "--enhancer", "gfpgan", cwd=tmp_path)
    assert proc.returncode == 1 and not out.exists()
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --enhancer gfpgan needs GFPGANv1.4.pth, which is not in") and "download_models.sh" in line


# feather end to end is slow-marked: test_paste checks the blend, seamless the paste-back path
@pytest.mark.parametrize("blend", ["seamless", pytest.param("feather", marks=pytest.mark.slow)])
def test_full_mode_pastes_into_the_original_picture(tmp_path, speech, synthetic_checkpoints, blend):
    audio = clip(tmp_path, speech, frames=2)
    result, info = run(tmp_path, synthetic_checkpoints, audio, preprocess="full", still=True, blend=blend)
    assert (info.width, info.height) == (512, 512) and info.frame_count == 2
    frames = frames_of(result.output)
    original = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    # outside the face box the picture is the original (up to H.264), inside it is the rendered face
    corner = np.abs(frames[0, :40, :40].astype(int) - original[:40, :40].astype(int)).mean()
    centre = np.abs(frames[0, 60:160, 170:280].astype(int) - original[60:160, 170:280].astype(int)).mean()
    assert corner < 4 and centre > 10


@pytest.mark.parametrize("mode, size_wh", [("resize", (256, 256)), ("extfull", (512, 512))])
def test_other_preprocess_modes(tmp_path, speech, synthetic_checkpoints, mode, size_wh):
    audio = clip(tmp_path, speech, frames=1)
    result, info = run(tmp_path, synthetic_checkpoints, audio, preprocess=mode)
    # resize: the whole (square) picture at 256; extfull: pasted back into the 512x512 original
    assert (info.width, info.height) == size_wh and info.frame_count == 1


def test_bf16_renders_close_to_fp32(tmp_path, speech, synthetic_checkpoints, warm):
    audio = clip(tmp_path, speech, frames=2)
    fp32, _ = run(tmp_path, synthetic_checkpoints, audio, warm, name="fp32.mp4")
    bf16, info = run(tmp_path, synthetic_checkpoints, audio, name="bf16.mp4", precision="bf16")
    assert info.frame_count == 2
    a, b = frames_of(fp32.output).astype(np.float64), frames_of(bf16.output).astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))
    # Each H.264 encode of these noisy synthetic pictures alone costs ~34.5 dB, so this bar only catches a
    # broken path; the renderer's own fidelity (>= 40 dB) is measured by scripts/benchmark.py speed.
    assert psnr > 30, psnr


def test_512_renders_at_512(tmp_path, speech, synthetic_checkpoints):
    audio = clip(tmp_path, speech, frames=1)  # bf16: the 512 networks' fp32 parity is checked network by network
    result, info = run(tmp_path, synthetic_checkpoints, audio, size=512, preprocess="extcrop", precision="bf16")
    assert info.width == 512 and info.frame_count == 1


def test_reference_videos_drive_blinks_and_pose(tmp_path, speech, synthetic_checkpoints, warm, plain):
    portrait = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    ref = tmp_path / "ref.mp4"
    with VideoWriter(ref) as writer:
        for dx in range(5):
            writer.write(np.roll(portrait, 2 * dx, axis=1))
    audio = clip(tmp_path, speech, frames=2)
    plain, _ = plain
    driven, info = run(tmp_path, synthetic_checkpoints, audio, warm, name="ref.mp4", ref_eyeblink=ref, ref_pose=ref)
    assert info.frame_count == 2
    assert not np.array_equal(frames_of(plain.output), frames_of(driven.output))


def test_cli_end_to_end_with_report(tmp_path, speech, synthetic_checkpoints):
    import json

    audio = clip(tmp_path, speech, frames=2)
    out = tmp_path / "cli.mp4"
    report = tmp_path / "report.json"
    proc = cli("--driven_audio", str(audio), "--source_image", str(PORTRAIT), "--checkpoint_dir", str(synthetic_checkpoints),
               "--output", str(out), "--seed", "1", "--profile", "--report", str(report), "--input_yaw", "-10", "10")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert "render" in proc.stdout and "frames/s" in proc.stdout
    data = json.loads(report.read_text())
    assert data["frames"] == 2 and data["seed"] == 1 and data["settings"]["input_yaw"] == [-10.0, 10.0]
    assert set(data["profile"]["stages_s"]) >= {"load models", "preprocess", "audio", "audio2coeff", "render", "encode"}
    assert "SYNTHETIC" in proc.stderr


def test_default_output_goes_to_result_dir(tmp_path, speech, synthetic_checkpoints):
    audio = clip(tmp_path, speech, frames=1)
    proc = cli("--driven_audio", str(audio), "--source_image", str(PORTRAIT), "--checkpoint_dir", str(synthetic_checkpoints),
               "--result_dir", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stderr
    made = list((tmp_path / "results").glob("*.mp4"))
    assert len(made) == 1 and proc.stdout.strip().endswith(made[0].name)


# ---- bad input: one clear line, non-zero exit, nothing at the target ----

def _bad(tmp_path: Path, ckpt: Path, expect: str, *, audio: Path | None = None, image: Path = PORTRAIT, extra=()) -> None:
    out = tmp_path / "bad" / "out.mp4"
    args = ["--driven_audio", str(audio or SPEECH), "--source_image", str(image), "--checkpoint_dir", str(ckpt),
            "--output", str(out), *extra]
    proc = cli(*args)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert expect in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    if out.parent.exists():
        assert not list(out.parent.iterdir()), list(out.parent.iterdir())


def test_no_face(tmp_path, synthetic_checkpoints):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((300, 300, 3), 180, np.uint8))
    _bad(tmp_path, synthetic_checkpoints, "no face", image=blank)


def test_unreadable_image(tmp_path, synthetic_checkpoints):
    fake = tmp_path / "photo.png"
    fake.write_text("not a picture")
    _bad(tmp_path, synthetic_checkpoints, "photo.png", image=fake)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    _bad(tmp_path, synthetic_checkpoints, "notes.txt", image=notes)


def test_missing_image_and_audio(tmp_path, synthetic_checkpoints):
    _bad(tmp_path, synthetic_checkpoints, "source image not found", image=tmp_path / "nope.png")
    _bad(tmp_path, synthetic_checkpoints, "driven audio not found", audio=tmp_path / "nope.wav")


def test_unreadable_empty_and_short_audio(tmp_path, synthetic_checkpoints):
    junk = tmp_path / "speech.mp3"
    junk.write_bytes(b"\x00" * 1000)
    _bad(tmp_path, synthetic_checkpoints, "speech.mp3", audio=junk)
    _bad(tmp_path, synthetic_checkpoints, "empty.wav", audio=write_wav(tmp_path / "empty.wav", np.zeros(0)))
    _bad(tmp_path, synthetic_checkpoints, "shorter than one video frame", audio=write_wav(tmp_path / "blip.wav", np.zeros(600)))


def test_missing_checkpoints_say_where_and_how(tmp_path):
    empty = tmp_path / "ckpt"
    empty.mkdir()
    _bad(tmp_path, empty, "SadTalker_V0.0.2_256.safetensors")
    proc = cli("--driven_audio", str(SPEECH), "--source_image", str(PORTRAIT), "--checkpoint_dir", str(empty))
    assert "download_models.sh" in proc.stderr and str(empty) in proc.stderr


def test_checkpoint_of_the_wrong_kind(tmp_path, synthetic_checkpoints):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "SadTalker_V0.0.2_256.safetensors").symlink_to(synthetic_checkpoints / "SadTalker_V0.0.2_256.safetensors")
    # the 73-channel full-mode mapping net under the crop-mode name
    (ckpt / "mapping_00229-model.pth.tar").symlink_to(synthetic_checkpoints / "mapping_00109-model.pth.tar")
    _bad(tmp_path, ckpt, "mapping_00229-model.pth.tar", audio=clip(tmp_path, load_audio(SPEECH), 1))


def test_unwritable_output(tmp_path, synthetic_checkpoints):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = cli("--driven_audio", str(SPEECH), "--source_image", str(PORTRAIT), "--checkpoint_dir", str(synthetic_checkpoints),
               "--output", str(blocker / "out.mp4"))
    assert proc.returncode != 0 and proc.stderr.startswith("error: cannot create the folder for output")
    assert "Traceback" not in proc.stderr


def test_out_of_range_options_are_refused(tmp_path, synthetic_checkpoints):
    proc = cli("--driven_audio", str(SPEECH), "--source_image", str(PORTRAIT), "--enhancer", "CodeFormer")
    assert proc.returncode == 2 and "--enhancer must be one of gfpgan, RestoreFormer, lightweight or none" in proc.stderr
    proc = cli("--driven_audio", str(SPEECH), "--source_image", str(PORTRAIT), "--workers", "0")
    assert proc.returncode != 0 and "--workers must be at least 1" in proc.stderr
    proc = cli("--driven_audio", str(SPEECH), "--source_image", str(PORTRAIT), "--pose_style", "46")
    assert proc.returncode != 0 and "--pose_style must be in 0..45" in proc.stderr
