"""The Python API: load the networks once, make many videos.

    from xtalker import XTalker

    xt = XTalker(checkpoint_dir="checkpoints", preset="balanced")
    video = xt.generate("face.png", "speech.wav", "out.mp4", seed=7, still=True)
    print(video.output, video.frames, video.seconds, video.loaded)   # loaded: () once everything is warm

    for frames in xt.stream("face.png", microphone_chunks()):        # frames as the speech arrives
        show(frames)                                                  # (n, H, W, 3) uint8

Options are the CLI's per-video flags by their names (`size`, `preprocess`, `still`, `pose_style`,
`expression_scale`, `facerender`, `ref_eyeblink`, `ref_pose`, `input_yaw`, `input_pitch`, `input_roll`, `enhancer`,
`enhance_align`, `enhance_scale`, `background_enhancer`, `blend`, `seed`, `batch_size`, `precision`, `landmarks`,
`threads`, ...). Given to the constructor they are defaults; given to `generate` they apply to that video;
`enhancer="none"` turns off a preset's enhancer (and its background enhancer). A call whose settings need other
networks (another size, precision, checkpoint folder, enhancer) loads only those; the SadTalker networks of the
two most recent settings stay loaded. Errors are the CLI's: one-line exceptions of the types in `USER_ERRORS`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from xtalker.checkpoints import CheckpointError
from xtalker.config import FPS, ConfigError, InferenceConfig
from xtalker.media import MediaError
from xtalker.parallel import JobError, SlotError
from xtalker.pipeline import AudioTooShortError, Progress, check_run, generate, load_head
from xtalker.preprocess import LandmarkBackendError, NoFaceError, SourceError
from xtalker.presets import PresetError, get_preset, without_none
from xtalker.profiling import Profiler
from xtalker.render import QuantizationUnavailableError
from xtalker.stream import FrameStream, check_streamable
from xtalker.synthetic import is_synthetic_folder
from xtalker.warm import Networks

log = logging.getLogger(__name__)

# What a bad input or setup raises: each message is one line saying what is wrong and what to do.
USER_ERRORS = (CheckpointError, ConfigError, LandmarkBackendError, NoFaceError, MediaError, SourceError,
               AudioTooShortError, QuantizationUnavailableError, JobError, SlotError, PresetError)
# Settings of the CLI that are not per-video options here: the inputs are arguments, and the API renders in this
# process (`--workers`, reports and profiles are the CLI's; the profile is in every result).
NOT_OPTIONS = {"driven_audio", "source_image", "output", "workers", "profile", "report"}
OPTIONS = tuple(f.name for f in dataclasses.fields(InferenceConfig) if f.name not in NOT_OPTIONS)
PATH_OPTIONS = {"checkpoint_dir", "result_dir", "ref_eyeblink", "ref_pose", "cache_dir"}


@dataclass(frozen=True)
class Video:
    """One generated video and how it was made."""

    output: Path
    frames: int
    size_wh: tuple[int, int]
    seed: int  # pass it back as `seed=` to get the same video
    seconds: float  # wall time of the call
    loaded: tuple[str, ...]  # networks this call loaded: () when all were warm
    profile: dict[str, Any]  # per-stage seconds and rates (Profiler.as_dict)
    landmarks: str  # the landmark backend used
    synthetic: bool  # made with synthetic checkpoints: meaningless pictures

    @property
    def duration_s(self) -> float:
        return self.frames / FPS


def _preset_options(name: str | None) -> dict[str, Any]:
    if not name:
        return {}
    settings = dict(get_preset(name).settings)
    if settings.pop("workers", 1) not in (1, None):
        log.info("preset %s: its workers setting applies to the CLI; the API renders in this process", name)
    return {k: v for k, v in settings.items() if v is not None}


def _checked(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"options are: {', '.join(OPTIONS)}")
    return {k: Path(v) if k in PATH_OPTIONS and v is not None else v for k, v in options.items()}


class _LockedStream:
    """A FrameStream that holds the XTalker's lock while it runs (released when it ends or is closed)."""

    def __init__(self, stream: FrameStream, lock: threading.RLock):
        self._stream, self._lock = stream, lock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __iter__(self) -> Iterator[np.ndarray]:
        with self._lock:
            yield from self._stream


class XTalker:
    """SadTalker's networks, loaded once, behind `generate`.

    Safe to share between threads: calls are serialised by a lock (one video at a time; the renderer already
    uses every core it is given), so a web app or a worker pool can hold one XTalker per process.
    """

    def __init__(self, checkpoint_dir: str | Path = "checkpoints", *, preset: str | None = None, warm: bool = True,
                 max_settings: int = 2, **options: Any):
        """`options`: defaults for every video (see the module docstring); `preset`: a name from
        configs/presets.yaml under them; `warm`: load the networks now (else on the first call)."""
        self.preset = preset
        self.options = _checked({**options, "checkpoint_dir": checkpoint_dir})  # what the caller gave, over the preset
        self.defaults = {**_preset_options(preset), **self.options}
        self.networks = Networks(max_heads=max_settings)
        self._lock = threading.RLock()
        self.synthetic = is_synthetic_folder(Path(checkpoint_dir))
        if self.synthetic:
            log.warning("SYNTHETIC checkpoints in %s: videos show meaningless pictures (real cost, fake weights). "
                        "Put the official SadTalker files there for real results.", checkpoint_dir)
        if warm:
            self.warm_up()

    def config(self, source_image: str | Path, driven_audio: str | Path, output: str | Path | None = None,
               preset: str | None = None, **options: Any) -> InferenceConfig:
        """The run's settings: call options > call preset > constructor options > constructor preset > built-in."""
        given = _checked(options)
        values = without_none({**self.defaults, **_preset_options(preset), **given}, {**self.options, **given})
        return InferenceConfig(driven_audio=Path(driven_audio), source_image=Path(source_image),
                               output=None if output is None else Path(output), **values)

    def warm_up(self, **options: Any) -> list[str]:
        """Load the networks (and int8's compiled graph) for these settings now; returns what was loaded."""
        config = self.config("-", "-", **options)
        config.validate()
        with self._lock, self.networks.active():
            load_head(config, Profiler())
            return self.networks.take_loaded()

    def generate(self, source_image: str | Path, driven_audio: str | Path, output: str | Path | None = None, *,
                 preset: str | None = None, progress: Progress | None = None, **options: Any) -> Video:
        """Portrait + speech -> mp4 at `output` (default: <result_dir>/<timestamp>.mp4).

        `progress(done, total)` is called with the frames written so far; raising from it stops the run and
        leaves no file behind.
        """
        config = self.config(source_image, driven_audio, output, preset, **options)
        check_run(config)
        with self._lock:
            result = generate(config, self.networks, progress)
        profile = result.profile.as_dict()
        return Video(output=result.output, frames=result.frames, size_wh=result.size_wh, seed=result.seed,
                     seconds=float(profile["total_s"]), loaded=tuple(result.profile.loaded), profile=profile,
                     landmarks=result.landmarks, synthetic=is_synthetic_folder(config.checkpoint_dir))

    def stream(self, source_image: str | Path, audio_chunks: Iterable[np.ndarray], *, preset: str | None = None,
               **options: Any) -> Iterator[np.ndarray]:
        """Portrait + speech arriving over time -> finished frames as soon as they are rendered.

        `audio_chunks`: 16 kHz mono float32 arrays of any length, read lazily (a microphone, a socket, a file in
        pieces). Yields (n, H, W, 3) uint8 RGB batches in order; the first come out while later audio is still
        unread (about 1.5 s of audio ahead of a frame at most 2.8 s: see `xtalker.speech.stream`). The frames are
        the offline video's bit for bit, except for blink timing in clips under 5.6 s. The returned object also
        tells `frames`, `seed`, `size_wh`, `first_frame_s` (from the start to the first frame) and `profile`.
        The networks stay locked to this stream until it is exhausted or closed.
        """
        config = self.config(source_image, "-", None, preset, **options)
        check_run(config, audio_file=False, output=False)
        check_streamable(config)
        return _LockedStream(FrameStream(config, audio_chunks, self.networks), self._lock)

    def loaded(self) -> list[str]:
        """The kinds of network held now (most recently used last)."""
        return self.networks.kinds()

    def unload(self) -> None:
        """Drop every loaded network (the next call loads again)."""
        with self._lock:
            self.networks.clear()
