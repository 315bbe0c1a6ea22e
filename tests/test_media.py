"""Media I/O: audio from many containers, video frames in, the one-pass atomic mp4 writer, probe."""

from __future__ import annotations

import math
import os
import wave
from fractions import Fraction
from itertools import islice
from pathlib import Path

import av
import numpy as np
import pytest
import soxr

from xtalker.media import (
    MediaError,
    VideoWriter,
    _StreamResampler,
    first_frame,
    iter_video_frames,
    load_audio,
    pad_to_even,
    probe,
)

REPO = Path(__file__).resolve().parents[1]
HELLO = REPO / "examples" / "driven_audio" / "hello.wav"
DURATION = 1.5  # seconds of the stereo test tone


def _pcm16(path: Path) -> tuple[np.ndarray, int]:
    """(channels, n) int16 samples and rate of a PCM16 wav, read without FFmpeg."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data.reshape(-1, w.getnchannels()).T, w.getframerate()


def _librosa_like(pcm: np.ndarray, rate: int) -> np.ndarray:
    """librosa.load(sr=16000) on PCM16: /32768 in float32, channel mean, soxr HQ, length ceil(n * 16000 / rate)."""
    mono = (pcm.astype(np.float32) / np.float32(32768)).mean(axis=0, dtype=np.float32)
    y = soxr.resample(mono, rate, 16000, quality="HQ")
    n = math.ceil(pcm.shape[1] * (16000 / rate))
    return np.pad(y, (0, max(0, n - len(y))))[:n]


def _stereo_tone(rate: int, right_hz: float = 700) -> np.ndarray:
    """(2, n) int16: 300 Hz on the left, `right_hz` on the right."""
    t = np.arange(int(DURATION * rate)) / rate
    left, right = 0.4 * np.sin(2 * np.pi * 300 * t), 0.3 * np.sin(2 * np.pi * right_hz * t)
    return np.rint(np.stack([left, right]) * 32767).astype(np.int16)


def _expected_mono_16k(n: int, right_hz: float = 700, shift: int = 0) -> np.ndarray:
    """The channel mean of `_stereo_tone` at 16 kHz, `shift` samples later."""
    t = (np.arange(n) + shift) / 16000
    return 0.2 * np.sin(2 * np.pi * 300 * t) + 0.15 * np.sin(2 * np.pi * right_hz * t)


def _write_audio(path: Path, codec: str, pcm: np.ndarray, rate: int, *, video: bool = False) -> Path:
    """Encode stereo int16 `pcm` with PyAV (plus a short H.264 track when `video`)."""
    with av.open(str(path), mode="w") as out:
        if video:
            vstream = out.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
            vstream.width, vstream.height, vstream.pix_fmt = 64, 48, "yuv420p"
        astream = out.add_stream(codec, rate=rate, layout="stereo")
        if codec == "vorbis":
            astream.codec_context.options = {"strict": "experimental"}
        step = rate // 10
        for start in range(0, pcm.shape[1], step):
            chunk = np.ascontiguousarray(pcm[:, start : start + step].T).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            out.mux(astream.encode(frame))
        out.mux(astream.encode(None))
        if video:
            for i in range(int(DURATION * 25)):
                image = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="rgb24")
                image.pts = i
                out.mux(vstream.encode(image))
            out.mux(vstream.encode(None))
    return path


def _wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(pcm.T).astype("<i2").tobytes())
    return path


def _smooth_frame(i: int, height: int = 317, width: int = 256) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = [128 + 100 * np.sin(x / 40 + i / 5), 128 + 100 * np.cos(y / 30 - i / 7), 128 + 80 * np.sin((x + y) / 50)]
    return np.clip(np.stack(rgb, axis=-1), 0, 255).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("VmRSS not in /proc/self/status")


# ------------------------------------------------------------------------------------------- load_audio


def test_bundled_wav_matches_direct_soxr() -> None:
    pcm, rate = _pcm16(HELLO)
    assert rate == 22050 and pcm.shape[0] == 1
    wav = load_audio(HELLO)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - round(pcm.shape[1] * 16000 / 22050)) <= 1
    assert len(wav) == math.ceil(pcm.shape[1] * 16000 / 22050)  # librosa's fix_length
    np.testing.assert_array_equal(wav, _librosa_like(pcm, rate))


@pytest.mark.parametrize("rate", [44100, 48000, 16000])
def test_stereo_wav_is_channel_mean_then_soxr(tmp_path: Path, rate: int) -> None:
    pcm = _stereo_tone(rate)
    wav = load_audio(_wav(tmp_path / "tone.wav", pcm, rate))
    np.testing.assert_array_equal(wav, _librosa_like(pcm, rate))


@pytest.mark.parametrize("width", [1, 3])
def test_8_and_24_bit_wav(tmp_path: Path, width: int) -> None:
    """u8 and s24 PCM map to float like soundfile does: (x - 128) / 128 and x / 2**23."""
    rng = np.random.default_rng(width)
    bits = 8 * width
    ints = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(2, 11025))
    path = tmp_path / "pcm.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(width)
        w.setframerate(11025)
        stored = (ints + 128).astype("u1") if width == 1 else ints.astype("<i4").view("u1").reshape(2, -1, 4)[..., :3]
        w.writeframes(np.ascontiguousarray(np.moveaxis(stored, 0, 1)).tobytes())
    floats = (ints / 2.0 ** (bits - 1)).astype(np.float32)
    expected = soxr.resample(floats.mean(axis=0, dtype=np.float32), 11025, 16000, quality="HQ")
    expected = np.pad(expected, (0, math.ceil(11025 * 16000 / 11025) - len(expected)))
    np.testing.assert_array_equal(load_audio(path), expected)


@pytest.mark.parametrize("expected_in", [0, 1000, 10**6])
def test_streamed_resampling_equals_one_call(expected_in: int) -> None:
    """Decoded-frame-sized pieces and any length estimate give exactly one soxr.resample call's output."""
    rng = np.random.default_rng(expected_in)
    x = (0.1 * rng.standard_normal(200_000)).astype(np.float32)
    resampler = _StreamResampler(44100, 16000, expected_in)
    pos = 0
    while pos < len(x):
        step = int(rng.integers(1, 3000))
        resampler.push(x[None, pos : pos + step])
        pos += step
    y = soxr.resample(x, 44100, 16000, quality="HQ")
    n = math.ceil(len(x) * 16000 / 44100)
    np.testing.assert_array_equal(resampler.finish(), np.pad(y, (0, n - len(y)))[:n])


def test_flac_is_lossless(tmp_path: Path) -> None:
    pcm = _stereo_tone(48000)
    wav = load_audio(_write_audio(tmp_path / "tone.flac", "flac", pcm, 48000))
    np.testing.assert_array_equal(wav, _librosa_like(pcm, 48000))


@pytest.mark.parametrize(
    ("name", "codec", "rate", "video"),
    [
        ("tone.mp3", "libmp3lame", 44100, False),
        ("tone.ogg", "libopus", 48000, False),
        ("tone.oga", "vorbis", 44100, False),
        ("tone.m4a", "aac", 44100, False),
        ("clip.mp4", "aac", 48000, True),
        ("clip.mkv", "libopus", 48000, True),
    ],
)
def test_lossy_containers_give_the_same_signal(tmp_path: Path, name: str, codec: str, rate: int, video: bool) -> None:
    # FFmpeg's own (experimental) vorbis encoder garbles stereo with different tones per channel.
    right_hz = 300 if codec == "vorbis" else 700
    wav = load_audio(_write_audio(tmp_path / name, codec, _stereo_tone(rate, right_hz), rate, video=video))
    assert wav.dtype == np.float32
    # Encoder padding may add up to a codec frame at the end; the start must be aligned (gapless decode).
    assert 0 <= len(wav) - DURATION * 16000 <= 2048
    inner = slice(1600, int(DURATION * 16000) - 1600)

    def rel_rms(shift: int) -> float:
        expected = _expected_mono_16k(len(wav), right_hz, shift)[inner]
        return float(np.sqrt(np.mean((wav[inner] - expected) ** 2) / np.mean(expected**2)))

    assert min(range(-20, 21), key=rel_rms) == 0, f"{name}: decoded audio is shifted"
    assert rel_rms(0) < 0.1, f"{name}: relative RMS error {rel_rms(0):.4f}"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "speech.wav"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(MediaError, match="speech.wav"):
        load_audio(path)


def test_empty_wav(tmp_path: Path) -> None:
    path = _wav(tmp_path / "empty.wav", np.zeros((1, 0), np.int16), 16000)
    with pytest.raises(MediaError, match="no audio samples"):
        load_audio(path)


def test_video_without_audio(tmp_path: Path) -> None:
    path = tmp_path / "silent.mp4"
    with VideoWriter(path) as writer:
        writer.write(_smooth_frame(0, 64, 64))
    with pytest.raises(MediaError, match="no audio track"):
        load_audio(path)


def test_errors_are_one_line_value_errors(tmp_path: Path) -> None:
    path = tmp_path / "junk.mp3"
    path.write_bytes(b"\x00\xff" * 5000)
    with pytest.raises(ValueError) as info:
        load_audio(path)
    assert isinstance(info.value, MediaError) and "\n" not in str(info.value) and "junk.mp3" in str(info.value)


# ------------------------------------------------------------------------------------------- video input


def test_iter_video_frames_and_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "ref.mp4"
    with VideoWriter(path, fps=30, crf=0) as writer:
        for i in range(7):
            writer.write(_smooth_frame(i, 64, 96))
    fps, frames = iter_video_frames(path)
    decoded = list(frames)
    assert fps == 30.0 and len(decoded) == 7
    assert decoded[0].shape == (64, 96, 3) and decoded[0].dtype == np.uint8
    np.testing.assert_array_equal(first_frame(path), decoded[0])
    assert _psnr(decoded[3], _smooth_frame(3, 64, 96)) > 40


def test_video_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="not found"):
        iter_video_frames(tmp_path / "missing.mp4")
    with pytest.raises(MediaError, match="no video track"):
        first_frame(HELLO)
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    with pytest.raises(MediaError, match="junk.mp4"):
        first_frame(junk)


# ------------------------------------------------------------------------------------------- VideoWriter


def test_pad_to_even_replicates_edges() -> None:
    frame = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    padded = pad_to_even(frame)
    assert padded.shape == (4, 6, 3)
    np.testing.assert_array_equal(padded[:3, :5], frame)
    np.testing.assert_array_equal(padded[3, :5], frame[2])
    np.testing.assert_array_equal(padded[:3, 5], frame[:, 4])
    assert pad_to_even(padded) is padded


def test_writer_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    t = np.arange(int(1.9 * 16000)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    target = out_dir / "video.mp4"
    with VideoWriter(target, audio=audio) as writer:
        for i in range(30):
            writer.write(_smooth_frame(i))
        assert not target.exists()  # only the hidden temporary file exists while encoding
    assert sorted(p.name for p in out_dir.iterdir()) == ["video.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing in the working directory
    info = probe(target)
    assert (info.video_streams, info.audio_streams) == (1, 1)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    assert info.fps == 25.0 and info.frame_count == 30
    assert (info.width, info.height) == (256, 318)
    assert info.audio_sample_rate == 16000 and info.audio_channels == 1
    assert abs(info.audio_duration - 1.2) <= 1024 / 16000
    assert info.video_duration == pytest.approx(1.2)
    frame = first_frame(target)
    assert frame.shape == (318, 256, 3)
    assert _psnr(frame, pad_to_even(_smooth_frame(0))) > 35
    decoded = load_audio(target)[: int(1.2 * 16000)]
    assert np.corrcoef(decoded[1000:-1000], audio[1000 : int(1.2 * 16000) - 1000])[0, 1] > 0.99


def test_short_audio_is_padded_and_no_audio_gives_video_only(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "a.mp4", audio=np.zeros(3000, np.float32)) as writer:
        writer.write_many(np.zeros((25, 32, 32, 3), np.uint8))
    info = probe(tmp_path / "a.mp4")
    assert info.frame_count == 25 and abs(info.audio_duration - 1.0) <= 1024 / 16000
    with VideoWriter(tmp_path / "b.mp4", size=(32, 32)) as writer:
        writer.write_many(np.zeros((3, 32, 32, 3), np.uint8))
    info = probe(tmp_path / "b.mp4")
    assert (info.video_streams, info.audio_streams, info.frame_count) == (1, 0, 3)
    assert info.audio_duration is None


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_leaves_nothing_behind(tmp_path: Path, error: type[BaseException]) -> None:
    target = tmp_path / "video.mp4"
    with pytest.raises(error):
        with VideoWriter(target, audio=np.zeros(16000, np.float32)) as writer:
            for i in range(5):
                writer.write(_smooth_frame(i, 64, 64))
            raise error("stop")
    assert list(tmp_path.iterdir()) == []


def test_existing_target_untouched_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "video.mp4"
    target.write_bytes(b"previous result")
    with pytest.raises(ValueError):
        with VideoWriter(target) as writer:
            writer.write(_smooth_frame(0, 64, 64))
            writer.write(_smooth_frame(0, 32, 32))  # size change
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]


def test_dropped_writer_removes_temp_file(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "video.mp4")
    writer.write(_smooth_frame(0, 64, 64))
    assert len(list(tmp_path.iterdir())) == 1
    del writer
    assert list(tmp_path.iterdir()) == []


def test_no_frames_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="no frames"):
        with VideoWriter(tmp_path / "video.mp4"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "video.mp4")
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(MediaError, match="is a folder"):
        VideoWriter(tmp_path / "folder.mp4")
    (tmp_path / "file").write_text("")
    with pytest.raises(MediaError, match="does not exist"):
        VideoWriter(tmp_path / "file" / "video.mp4")


def test_read_only_destination(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Root ignores folder permissions; sysfs refuses new files even to root.
        if not Path("/sys/kernel").is_dir():
            pytest.skip("running as root without sysfs")
        with pytest.raises(MediaError, match="cannot write to output folder /sys"):
            VideoWriter("/sys/video.mp4")
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(MediaError, match="cannot write"):
            VideoWriter(folder / "video.mp4")
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


def test_memory_stays_flat_and_streams_interleave(tmp_path: Path) -> None:
    size, frames = 160, 2000
    patterns = [_smooth_frame(i, size, size) for i in range(50)]
    audio = np.sin(np.arange(frames * 640) / 20).astype(np.float32) * 0.1
    target = tmp_path / "long.mp4"
    with VideoWriter(target, audio=audio) as writer:
        for i in range(frames):
            writer.write(patterns[i % 50])
            if i == 199:
                warm = _rss_kib()
        grown_mib = (_rss_kib() - warm) / 1024
    # Buffering the frames would hold 1800 x 75 KiB = 130 MiB more.
    assert grown_mib < 40, f"RSS grew {grown_mib:.1f} MiB while encoding"
    with av.open(str(target)) as container:
        kinds = [p.stream.type for p in islice(container.demux(), 200) if p.size]
    assert kinds.count("audio") > 20 and kinds.count("video") > 20
    info = probe(target)
    assert info.frame_count == frames and abs(info.audio_duration - frames / 25) <= 1024 / 16000
