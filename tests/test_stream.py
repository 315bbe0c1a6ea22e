"""Streaming: coefficient rows bit for bit the offline ones (blinks of short clips excepted), frames out before the
audio ends, the offline frames, a fragmented MP4 that plays while it grows, the API's `stream`."""

from __future__ import annotations

import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from xtalker import XTalker
from xtalker.checkpoints import find_checkpoints, load_network
from xtalker.cli import main
from xtalker.config import ConfigError, InferenceConfig
from xtalker.media import iter_video_frames, load_audio, probe
from xtalker.pipeline import finisher, load_head, prepare_run, render_frames
from xtalker.profiling import Profiler
from xtalker.render.renderer import Renderer
from xtalker.speech import Audio2Coeff, audio_windows, blink_ratio, crop_to_frames, windows_to_tensor
from xtalker.speech.stream import CoeffStream, Reference
from xtalker.stream import FrameStream, file_chunks

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"


@pytest.fixture(scope="module")
def speech_nets(synthetic_checkpoints) -> Audio2Coeff:
    paths = find_checkpoints(synthetic_checkpoints, 256, "crop")
    return Audio2Coeff(load_network("audio2exp", paths.packed), load_network("audio2pose", paths.packed))


def _wav(frames: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=frames * 640 + 333) * 0.1).astype(np.float32)


def _offline(nets: Audio2Coeff, wav: np.ndarray, ref: Reference, seed: int, style: int) -> np.ndarray:
    wav = crop_to_frames(wav)
    T = len(wav) // 640
    rows = np.repeat(ref.source[None], T, axis=0)
    if ref.eyeblink is not None:
        rows[:, :64] = ref.eyeblink[np.arange(T) % len(ref.eyeblink)]
        blink = np.zeros((T, 1), np.float32)
    else:
        blink = blink_ratio(T, random.Random(seed))
    pred = nets.predict(windows_to_tensor(audio_windows(wav)), torch.from_numpy(rows[None]),
                        torch.from_numpy(blink[None]), style, torch.Generator().manual_seed(seed))
    return pred.coeffs[0].numpy()


def _streamed(nets: Audio2Coeff, wav: np.ndarray, ref: Reference, seed: int, style: int, chunk_rng) -> tuple[np.ndarray, CoeffStream]:
    stream = CoeffStream(nets, ref, seed, style)
    rows, pos = [], 0
    while pos < len(wav):
        n = int(chunk_rng.integers(1, 5000))
        rows.append(stream.push(wav[pos : pos + n]))
        pos += n
    rows.append(stream.finish())
    return np.concatenate(rows), stream


@pytest.mark.parametrize("frames", [1, 2, 13, 14, 33, 150, 171])
def test_rows_are_the_offline_rows(speech_nets, frames):
    """Any chunking of the audio gives the offline coefficients bit for bit (blinks: clips of 140+ frames, or none)."""
    ref = Reference(np.random.default_rng(1).normal(size=70).astype(np.float32))
    if 21 <= frames < 140:  # generated blinks of a short clip differ by design; a reference video's do not
        ref = Reference(ref.source, eyeblink=np.random.default_rng(2).normal(size=(9, 64)).astype(np.float32))
    wav = _wav(frames, frames)
    streamed, _ = _streamed(speech_nets, wav, ref, 5, 7, np.random.default_rng(frames))
    assert np.array_equal(streamed, _offline(speech_nets, wav, ref, 5, 7))


def test_short_clips_differ_only_in_blinks_and_ref_pose_applies(speech_nets):
    src = np.random.default_rng(3).normal(size=70).astype(np.float32)
    pose_video = np.random.default_rng(4).normal(size=(11, 6)).astype(np.float32)
    wav = _wav(60, 9)
    streamed, _ = _streamed(speech_nets, wav, Reference(src, pose=pose_video), 2, 0, np.random.default_rng(0))
    offline = _offline(speech_nets, wav, Reference(src), 2, 0)
    tiled = pose_video[np.arange(60) % 11]
    offline[:, 64:70] += tiled - tiled[0]
    assert np.array_equal(streamed[:, 64:], offline[:, 64:])  # the pose: identical
    differs = np.abs(streamed[:, :64] - offline[:, :64]).max(axis=1) > 0
    assert 0 < differs.sum() < 40  # expressions differ only around the blinks placed differently


def test_rows_come_out_with_a_bounded_lag_and_bounded_memory(speech_nets):
    stream = CoeffStream(speech_nets, Reference(np.zeros(70, np.float32)), 0)
    wav, lags = _wav(400, 1), []
    for chunk in file_chunks(wav, 0.2):
        stream.push(chunk)
        lags.append(stream.frames - stream.released)
        assert len(stream._wav) < 4000 and len(stream._mels.data) <= 64 and len(stream._pose.data) <= 64
    assert stream.released > 0 and max(lags[10:]) <= 70 and min(lags[10:]) >= 7
    before = stream.released
    assert len(stream.finish()) == 400 - before and stream.released == 400


def _cheap_render(self, source, driving, yaw_deg=None, pitch_deg=None, roll_deg=None):
    """A stand-in renderer: frames that depend on every driving window, at no cost (for long clips in CI)."""
    w = torch.as_tensor(np.asarray(driving), dtype=torch.float32)
    size = source.image_size
    level = torch.sigmoid(w.mean(dim=(1, 2)))[:, None, None, None]
    ramp = torch.linspace(0, 1, size)[None, None, None, :] * torch.sigmoid(w[:, :3, 13])[:, :, None, None]
    return (0.5 * level + 0.5 * ramp).expand(w.shape[0], 3, size, size).contiguous()


def _config(checkpoints: Path, **options) -> InferenceConfig:
    settings = dict(checkpoint_dir=checkpoints, seed=4, batch_size=2, device="cpu", landmarks="mediapipe")
    settings.update(options)
    return InferenceConfig(driven_audio=Path("-"), source_image=PORTRAIT, **settings)


def _offline_frames(config: InferenceConfig, wav: np.ndarray) -> np.ndarray:
    prof = Profiler()
    head = load_head(config, prof)
    run = prepare_run(config, head, crop_to_frames(wav), config.seed, prof)
    finish = finisher(run, config)
    batches = render_frames(head, run, 0, run.num_frames, config.batch_size, prof)
    return np.concatenate([finish(frames, i * config.batch_size, prof) for i, frames in enumerate(batches)])


def test_frames_are_the_offline_frames_with_the_real_renderer(synthetic_checkpoints):
    """Full preprocess (paste-back into the picture), bf16, a partial last batch."""
    wav = load_audio(SPEECH)[4000 : 4000 + 3 * 640 + 100]
    config = _config(synthetic_checkpoints, precision="bf16", preprocess="full")
    stream = FrameStream(config, file_chunks(wav, 0.05))
    streamed = np.concatenate(list(stream))
    assert streamed.shape == (3, 512, 512, 3) and stream.frames == 3 and stream.size_wh == (512, 512)
    assert np.array_equal(streamed, _offline_frames(config, wav))


def test_frames_come_out_before_the_audio_ends_and_match_offline(synthetic_checkpoints, monkeypatch):
    monkeypatch.setattr(Renderer, "render", _cheap_render)
    wav = np.tile(load_audio(SPEECH), 3)[: 120 * 640]  # 4.8 s
    read = []

    def chunks():
        for chunk in file_chunks(wav, 0.2):
            read.append(len(chunk))
            yield chunk

    config = _config(synthetic_checkpoints, batch_size=3, input_yaw=[5.0])
    stream = FrameStream(config, chunks())
    batches, audio_read = [], []
    for frames in stream:
        batches.append(frames)
        audio_read.append(sum(read) / 16000)
    assert audio_read[0] < 2.0 < 4.8 == audio_read[-1]  # the first frames came out after < 2 s of 4.8 s of audio
    assert stream.first_frame_audio_s < 2.0 and stream.first_frame_s > 0
    assert all(len(b) == 3 for b in batches) and stream.frames == 120
    assert np.array_equal(np.concatenate(batches), _offline_frames(config, wav))


def test_several_keyframes_are_refused(synthetic_checkpoints):
    with pytest.raises(ConfigError, match="--input_yaw with several keyframes .* stream does not know"):
        FrameStream(_config(synthetic_checkpoints, input_yaw=[0, 20]), iter([]))


def _decodable_frames(path: Path) -> int:
    try:
        return sum(1 for _ in iter_video_frames(path)[1])
    except Exception:  # a file that does not even have its header yet
        return 0


def test_cli_stream_writes_a_fragmented_mp4_playable_while_it_grows(synthetic_checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "live.mp4"
    seen = []

    def render(self, source, driving, *angles):
        seen.append(_decodable_frames(out))  # what a player finds in the file before this batch
        return _cheap_render(self, source, driving, *angles)

    monkeypatch.setattr(Renderer, "render", render)
    audio = tmp_path / "speech.wav"
    from conftest import write_wav

    write_wav(audio, np.tile(load_audio(SPEECH), 2)[: 80 * 640])
    code = main(["--stream", "--driven_audio", str(audio), "--source_image", str(PORTRAIT), "--checkpoint_dir",
                 str(synthetic_checkpoints), "--output", str(out), "--seed", "1", "--landmarks", "mediapipe", "--cpu"])
    assert code == 0
    assert max(seen) >= 25  # whole fragments of 25 frames were readable while rendering went on
    info = probe(out)
    assert (info.frame_count, info.audio_streams, info.width) == (80, 1, 256)
    assert abs(info.audio_duration - 3.2) <= 1024 / 16000  # one AAC frame of encoder delay
    data = out.read_bytes()
    assert data.count(b"moof") >= 3 and data[4:8] == b"ftyp"
    with av.open(str(out)) as container:  # 25 fps as written
        assert container.streams.video[0].time_base is not None


def test_cli_stream_reads_pcm_from_stdin_and_refuses_workers(synthetic_checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Renderer, "render", _cheap_render)
    pcm = (np.clip(load_audio(SPEECH)[: 30 * 640 + 1], -1, 1) * 32767).astype("<i2").tobytes()
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(pcm)))
    out = tmp_path / "pcm.mp4"
    common = ["--stream", "--driven_audio", "-", "--source_image", str(PORTRAIT), "--checkpoint_dir",
              str(synthetic_checkpoints), "--landmarks", "mediapipe", "--cpu"]
    assert main([*common, "--output", str(out)]) == 0
    assert probe(out).frame_count == 30
    assert main([*common, "--output", str(tmp_path / "w.mp4"), "--workers", "2"]) == 1
    assert "--stream renders in this process" in capsys.readouterr().err
    assert main([a for a in common if a != "--stream"]) == 2
    assert "--driven_audio - (PCM from stdin) needs --stream" in capsys.readouterr().err
    assert not (tmp_path / "w.mp4").exists()


def test_api_stream(synthetic_checkpoints, monkeypatch):
    monkeypatch.setattr(Renderer, "render", _cheap_render)
    xt = XTalker(synthetic_checkpoints, landmarks="mediapipe", device="cpu", warm=False)
    wav = load_audio(SPEECH)[: 40 * 640]
    stream = xt.stream(PORTRAIT, file_chunks(wav), seed=9, batch_size=4)
    frames = np.concatenate(list(stream))
    assert frames.shape == (40, 256, 256, 3) and stream.seed == 9 and stream.first_frame_s > 0
    with pytest.raises(ConfigError, match="source image not found"):
        xt.stream(PORTRAIT.with_name("missing.png"), file_chunks(wav))
