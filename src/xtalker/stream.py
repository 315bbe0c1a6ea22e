"""Portrait + speech arriving over time -> finished video frames as soon as they are rendered.

In: a run's settings (`InferenceConfig`; its audio file is not read) and an iterable of 16 kHz mono float32 audio
chunks of any length, consumed lazily. Out: (n, H, W, 3) uint8 frame batches in order, through the whole
post-render chain (aspect restore, paste-back, enhancer), equal to the offline run's frames bit for bit except
for the blink timing of clips under 5.6 s (see `xtalker.speech.stream`). Frames come out once the coefficient
rows they depend on are final and their renderer batch (aligned to multiples of the batch size from frame 0,
as offline) is complete; `--input_yaw`/`pitch`/`roll` with several keyframes need the clip's length and are
refused. `write_stream` puts the frames and the audio into a fragmented MP4 that plays while it grows.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from xtalker.config import FPS, ConfigError, InferenceConfig
from xtalker.media import VideoWriter, load_audio
from xtalker.pipeline import (
    AudioTooShortError,
    Progress,
    RunResult,
    default_output,
    finisher,
    load_head,
    prepare_face,
    render_frames,
    row_layout,
    run_batch_size,
    run_seed,
    source_run,
)
from xtalker.profiling import Profiler
from xtalker.render import DrivingSequence
from xtalker.render.inputs import SEMANTIC_RADIUS, driving_coefficients
from xtalker.speech.audio import SAMPLE_RATE
from xtalker.speech.stream import CoeffStream, Reference
from xtalker.warm import Networks

log = logging.getLogger(__name__)

EXP_DIM = 64
CHUNK_SECONDS = 0.2  # audio read per step when a file is streamed


def check_streamable(config: InferenceConfig) -> None:
    """Settings a stream cannot honour, refused with one line."""
    for name in ("input_yaw", "input_pitch", "input_roll"):
        keys = getattr(config, name)
        if keys is not None and len(keys) > 1:
            raise ConfigError(f"--{name} with several keyframes spreads them over the whole clip, whose length a "
                              f"stream does not know; give one angle, or run without streaming")


def file_chunks(wav: np.ndarray, seconds: float = CHUNK_SECONDS) -> Iterator[np.ndarray]:
    """A decoded waveform as the chunks a live source would deliver."""
    step = max(1, int(seconds * SAMPLE_RATE))
    for start in range(0, len(wav), step):
        yield wav[start : start + step]


def pcm_chunks(source: BinaryIO, seconds: float = CHUNK_SECONDS) -> Iterator[np.ndarray]:
    """16 kHz mono signed 16-bit little-endian PCM from a pipe, as float32 chunks while it flows."""
    size = 2 * max(1, int(seconds * SAMPLE_RATE))
    carry = b""
    while block := source.read(size):
        data, carry = carry + block, b""
        if len(data) % 2:  # half a sample: keep it for the next read
            data, carry = data[:-1], data[-1:]
        yield np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(32768)


def stream_audio(path: Path) -> Iterator[np.ndarray]:
    """Chunks of the driving audio: raw PCM from stdin for `-`, else the decoded file in 0.2 s pieces."""
    if str(path) == "-":
        return pcm_chunks(sys.stdin.buffer)
    return file_chunks(load_audio(path))


class FrameStream:
    """Iterate for the frame batches; afterwards `frames`, `seed`, `size_wh`, `first_frame_s`, `profile` tell how
    it went. One pass only."""

    def __init__(self, config: InferenceConfig, audio_chunks: Iterable[np.ndarray], networks: Networks | None = None,
                 on_audio=None):
        config.validate()
        check_streamable(config)
        self.config = config
        self.seed = run_seed(config)
        self.frames = 0
        self.size_wh: tuple[int, int] | None = None
        self.first_frame_s: float | None = None  # from the start of iteration to the first frame out
        self.first_frame_audio_s: float | None = None  # audio received when the first frame came out
        self.profile = Profiler()
        self.batch_size = 0  # frames per renderer call, once known (`--batch_size auto` resolves on the device)
        self.landmarks = ""  # the landmark backend used
        self.int8 = None  # where an int8 graph came from
        self._chunks = audio_chunks
        self._networks = networks if networks is not None else Networks()
        self._on_audio = on_audio  # called with each chunk as it is read (the writer muxes it)
        self._started = False

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._started:
            raise RuntimeError("a FrameStream can be iterated once")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[np.ndarray]:
        config, prof = self.config, self.profile
        start = time.perf_counter()
        with self._networks.active():
            head = load_head(config, prof)
            self.landmarks, self.int8 = head.landmarks.name, head.int8
            face, ref_coeffs = prepare_face(config, head, prof)
            reference = Reference(
                source=np.asarray(face.coeff_3dmm, np.float32).reshape(-1, face.coeff_3dmm.shape[-1])[0, :70].copy(),
                eyeblink=None if config.ref_eyeblink is None else ref_coeffs[config.ref_eyeblink][:, :EXP_DIM],
                pose=None if config.ref_pose is None else ref_coeffs[config.ref_pose][:, EXP_DIM:70],
            )
            speech = CoeffStream(head.audio2coeff, reference, self.seed, config.pose_style, head.device)
            channels = head.paths.coeff_nc
            run = source_run(config, head, face, DrivingSequence(np.zeros((0, channels), np.float32)),
                             np.zeros(0, np.float32), self.seed, prof)
            self.batch_size = run_batch_size(config, head, prof)
            with prof.stage("load models"):
                finish = finisher(run, config)
            rows = _HeldRows(config, face.coeff_3dmm, channels)
            for chunk in self._chunks:
                if self._on_audio is not None:
                    self._on_audio(chunk)
                with prof.stage("audio2coeff"):
                    rows.add(speech.push(chunk))
                for frames in self._ready(head, run, rows, finish, final=False):
                    self._note_first(start, speech)
                    yield frames
            with prof.stage("audio2coeff"):
                rows.add(speech.finish())
            if speech.frames == 0:
                raise AudioTooShortError(f"the audio stream lasted {speech.samples / SAMPLE_RATE:.3f} s: shorter than "
                                         f"one video frame ({1 / FPS:.2f} s)")
            for frames in self._ready(head, run, rows, finish, final=True):
                self._note_first(start, speech)
                yield frames
        prof.loaded = self._networks.take_loaded()
        log.info("streamed %d frames; first after %.2f s", self.frames, self.first_frame_s or 0.0)

    def _note_first(self, start: float, speech: CoeffStream) -> None:
        if self.first_frame_s is None:
            self.first_frame_s = time.perf_counter() - start
            self.first_frame_audio_s = speech.samples / SAMPLE_RATE

    def _ready(self, head, run, rows: "_HeldRows", finish, final: bool) -> Iterator[np.ndarray]:
        """Render and finish every batch whose driving windows are final."""
        batch = self.batch_size
        while self.frames < rows.stop:
            first = self.frames
            last = min(first + batch, rows.stop)
            # The mapping net reads 13 rows past the batch's last frame (clamped at the clip's end).
            if not final and (last < first + batch or last - 1 + SEMANTIC_RADIUS >= rows.stop):
                return
            clip = dataclasses.replace(run, sequence=rows.sequence(final))
            for frames in render_frames(head, clip, first, last, batch, self.profile):
                frames = finish(frames, first, self.profile)
                self.size_wh = (frames.shape[2], frames.shape[1])
                self.frames = last
                rows.drop_before(self.frames - SEMANTIC_RADIUS)
                yield frames


class _HeldRows:
    """The renderer's driving rows released so far, minus those no later frame reads."""

    def __init__(self, config: InferenceConfig, coeff_3dmm: np.ndarray, channels: int):
        self.config = config
        self.coeff_3dmm = coeff_3dmm
        self.rows = np.zeros((0, channels), np.float32)
        self.offset = 0

    @property
    def stop(self) -> int:
        return self.offset + len(self.rows)

    def add(self, generated: np.ndarray) -> None:
        if len(generated):
            c = self.config
            rows = driving_coefficients(generated, self.coeff_3dmm, row_layout(c), c.still, c.expression_scale)
            self.rows = np.concatenate([self.rows, rows])

    def drop_before(self, frame: int) -> None:
        cut = min(max(frame - self.offset, 0), len(self.rows))
        self.rows, self.offset = self.rows[cut:], self.offset + cut

    def sequence(self, final: bool) -> DrivingSequence:
        n = len(self.rows)
        yaw, pitch, roll = (None if keys is None else np.full(n, float(keys[0]))
                            for keys in (self.config.input_yaw, self.config.input_pitch, self.config.input_roll))
        return DrivingSequence(self.rows, yaw, pitch, roll, offset=self.offset, length=self.stop if final else None)


def segments(batches: Iterable[np.ndarray], wav: np.ndarray, folder: Path, frames_per_segment: int = FPS,
             prefix: str = "segment") -> Iterator[Path]:
    """Frame batches -> self-contained mp4 files of `frames_per_segment` frames with their stretch of `wav` (the
    last one shorter): what a web page's streaming video (Gradio, HLS) plays one after another."""
    samples = SAMPLE_RATE // FPS
    pending: list[np.ndarray] = []
    first = count = 0

    def flush(frames: np.ndarray) -> Path:
        path = folder / f"{prefix}-{count:05d}.mp4"
        with VideoWriter(path, fps=FPS, audio=wav[first * samples : (first + len(frames)) * samples]) as writer:
            writer.write_many(frames)
        return path

    for batch in batches:
        pending.append(batch)
        frames = np.concatenate(pending)
        while len(frames) >= frames_per_segment:
            yield flush(frames[:frames_per_segment])
            first, count, frames = first + frames_per_segment, count + 1, frames[frames_per_segment:]
        pending = [frames] if len(frames) else []
    if pending:
        yield flush(np.concatenate(pending))


def stream_to_file(config: InferenceConfig, audio_chunks: Iterable[np.ndarray], networks: Networks | None = None,
                   progress: Progress | None = None) -> RunResult:
    """Frames and audio into a fragmented MP4 at `config.output` that plays while it grows. A failure removes the
    partial file."""
    output = config.output or default_output(config)
    writer = VideoWriter(output, fps=FPS, audio=np.zeros(0, np.float32), fragmented=True)
    stream = FrameStream(config, audio_chunks, networks, on_audio=writer.add_audio)
    with writer:
        for frames in stream:
            with stream.profile.stage("encode"):
                writer.write_many(frames)
            if progress is not None:
                progress(stream.frames, 0)
        with stream.profile.stage("encode"):
            writer.close()
    return RunResult(output=output, frames=stream.frames, size_wh=stream.size_wh or (0, 0), seed=stream.seed,
                     landmarks=stream.landmarks, profile=stream.profile, int8=stream.int8, batch_size=stream.batch_size)
