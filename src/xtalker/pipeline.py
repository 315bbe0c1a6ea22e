"""Portrait + speech -> talking-head mp4: the stages of SadTalker wired together, streaming.

`TalkingHead` owns the networks for one checkpoint folder, size and preprocess family and can serve many
runs. `generate` runs one: source preprocessing, audio, coefficients, then batch by batch render ->
uint8 -> aspect restore / paste-back -> encoder, so memory does not grow with the length of the audio.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from xtalker.checkpoints import CheckpointPaths, find_checkpoints, load_network
from xtalker.config import AUTO_BATCH, FPS, ConfigError, InferenceConfig
from xtalker.device import auto_batch_size, resolve_device
from xtalker.finish import Finisher, FinishSettings, PasteTarget, check_weights, five_points, paste_target
from xtalker.media import VideoWriter, load_audio
from xtalker.overlap import ahead
from xtalker.preprocess import LandmarkBackend, PreparedFace, get_backend, prepare_source, video_coefficients
from xtalker.profiling import Profiler
from xtalker.render import (
    ArtifactInfo,
    CalibrationBatch,
    DrivingSequence,
    Int8Settings,
    PreparedSource,
    Renderer,
    cached_artifact,
    check_available,
    driving_sequence,
    quantize_generator,
    record_calibration,
    source_image,
    source_semantics,
    tensor_digest,
    to_uint8,
)
from xtalker.render.pirender import PIRenderRenderer
from xtalker.speech import (
    Audio2Coeff,
    apply_ref_pose,
    audio_windows,
    blink_ratio,
    crop_to_frames,
    num_video_frames,
    windows_to_tensor,
)
from xtalker.warm import HEADS, Networks, shared

log = logging.getLogger(__name__)

EXP_DIM = 64
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
CALIBRATION_PORTRAIT = Path(__file__).parent / "data" / "calibration" / "portrait.png"
CALIBRATION_SPEECH = Path(__file__).parent / "data" / "calibration" / "speech.wav"
CALIBRATION_FRAMES = 8
Progress = Callable[[int, int], None]  # (frames written, frames in the video)


class AudioTooShortError(ValueError):
    """The driving audio does not last one video frame."""


@dataclass(frozen=True)
class RunResult:
    output: Path
    frames: int
    size_wh: tuple[int, int]
    seed: int
    landmarks: str
    profile: Profiler
    int8: ArtifactInfo | None = None  # where the quantized generator came from (int8 runs)
    batch_size: int | None = None  # frames per renderer call (what `--batch_size auto` chose)


@dataclass(frozen=True)
class Setting:
    """What the networks of a TalkingHead depend on; runs with the same setting can share them."""

    paths: CheckpointPaths
    precision: str = "fp32"
    backend: str = "native"
    cache_dir: Path | None = None  # compiled int8 graphs; None: xtalker.render.quantize.default_cache_dir()
    device: str = "cpu"  # resolved: "cpu" or "cuda:N"
    compile: bool = False  # PIRender's forward through torch.compile (`PIRenderRenderer.compile`)

    @classmethod
    def of(cls, config: InferenceConfig) -> "Setting":
        paths = find_checkpoints(config.checkpoint_dir, config.size, config.preprocess, config.old_version, config.facerender)
        return cls(paths, config.precision, config.backend, config.cache_dir, resolve_device(config.device),
                   compile=config.compile and paths.pirender is not None)


@dataclass(frozen=True)
class ExampleInputs:
    """Renderer inputs made from a portrait and a speech clip by this checkpoint's own networks."""

    image: np.ndarray  # (1, 3, S, S) in [0, 1]
    semantics: np.ndarray  # (1, C, 27)
    sequence: DrivingSequence


def example_inputs(head: "TalkingHead", portrait: Path, wav: np.ndarray, seed: int = 0) -> ExampleInputs:
    """What `generate` feeds the renderer for `portrait` and the 16 kHz `wav` (crop mode, or full mode for a
    73-channel mapping net; PIRender's rows either way), without rendering: for calibration and benchmarks."""
    preprocess = "full" if head.paths.coeff_nc == 73 and not head.paths.pirender else "crop"
    config = InferenceConfig(driven_audio=portrait, source_image=portrait, size=head.paths.size, preprocess=preprocess,
                             facerender=head.facerender)
    face = prepare_source(portrait, head.landmarks, head.recon, preprocess, head.paths.size)
    wav = crop_to_frames(wav)
    coeffs = speech_coefficients(head, config, face, wav, num_video_frames(len(wav)), {}, seed, Profiler())
    return ExampleInputs(
        image=source_image(face.crop.image),
        semantics=source_semantics(face.coeff_3dmm, row_layout(config)),
        sequence=clip_sequence(config, coeffs, face),
    )


def calibration_batches(head: "TalkingHead", frames: int = CALIBRATION_FRAMES, batch_size: int = 2) -> list[CalibrationBatch]:
    """The int8 calibration recipe: the bundled portrait and speech clip through this checkpoint's networks,
    `frames` driving windows spread over the clip. Fixed, so the quantized graph never depends on the user's
    inputs and can be cached by checkpoint, size and settings alone."""
    inputs = example_inputs(head, CALIBRATION_PORTRAIT, load_audio(CALIBRATION_SPEECH))
    picks = np.linspace(0, inputs.sequence.num_frames - 1, frames).round().astype(int)
    windows = np.concatenate([inputs.sequence.windows(int(i), int(i) + 1) for i in picks])
    return record_calibration(
        head.renderer, torch.from_numpy(inputs.image), torch.from_numpy(inputs.semantics),
        torch.from_numpy(windows), batch_size,
    )


class TalkingHead:
    """The networks of one setting (checkpoint folder, 256/512, crop-like or full preprocess, precision)."""

    def __init__(self, setting: Setting, landmarks: LandmarkBackend):
        self.setting = setting
        self.landmarks = landmarks
        paths = setting.paths
        # Packed: one file; legacy (--old_version): each network from its own file, the renderer's two from one.
        self.recon = load_network("face_3drecon", paths.file("face_3drecon"))
        self.audio2coeff = Audio2Coeff(load_network("audio2exp", paths.file("audio2exp")),
                                       load_network("audio2pose", paths.file("audio2pose")))
        if paths.pirender:
            self.renderer = PIRenderRenderer.from_checkpoint(paths.pirender, precision=setting.precision)
            if setting.compile:
                self.renderer.compile(setting.cache_dir)
        else:
            self.renderer = Renderer.from_checkpoints(paths.file("generator"), paths.mapping, paths.coeff_nc,
                                                      precision=setting.precision)
        if setting.device != "cpu":
            self._to(torch.device(setting.device))
            if setting.precision == "fp32":
                # fp32 means float32 on a GPU too (torch lets cuDNN convolutions use TF32 by default, ~1e-3
                # relative error): fp16 and bf16 are the fast settings there.
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
        if setting.backend == "ipex":
            self._use_ipex()
        self.int8: ArtifactInfo | None = None

    def quantize(self) -> ArtifactInfo | None:
        """For int8: swap in the quantized, compiled generator (from the cache, else built once: minutes).

        The cache key covers the generator's weights and code, the size, the settings and the calibration
        recipe with the networks that make its inputs (keypoint detector, mapping net, landmark backend).
        """
        if self.setting.precision != "int8" or self.int8 is not None:
            return self.int8
        renderer = self.renderer
        quantized = quantize_generator(
            renderer.generator, lambda: calibration_batches(self), self.paths.size, self.setting.cache_dir,
            self.int8_settings(),
        )
        renderer.generator = quantized
        self.int8 = quantized.info
        return self.int8

    @property
    def device(self) -> torch.device:
        return torch.device(self.setting.device)

    @property
    def facerender(self) -> str:
        return "pirender" if self.paths.pirender else "facevid2vid"

    def _to(self, device: torch.device) -> None:
        """Every SadTalker network of this head onto `device` (the landmark backend is built on the setting's
        device by `get_backend`)."""
        for net in (self.recon, self.audio2coeff.exp_net, self.audio2coeff.pose_net, self.renderer):
            net.to(device)

    def int8_settings(self) -> Int8Settings:
        """The int8 build's settings, named by the calibration recipe and the networks that make its inputs."""
        renderer = self.renderer
        tag = "bundled-example-v1:" + ":".join(
            [tensor_digest(renderer.kp_detector)[:16], tensor_digest(renderer.mapping)[:16], self.landmarks.name]
        )
        return Int8Settings(calibration_tag=tag)

    def int8_cached(self) -> bool:
        """Whether `quantize` would load a compiled graph (seconds) rather than build one (minutes)."""
        if self.int8 is not None:  # quantized already: its graph is in the cache
            return True
        return cached_artifact(self.renderer.generator, self.paths.size, self.setting.cache_dir,
                               self.int8_settings()) is not None

    @property
    def paths(self) -> CheckpointPaths:
        return self.setting.paths

    def _use_ipex(self) -> None:
        """Let Intel Extension for PyTorch re-layout the generator (the CLI allows this only when it is installed)."""
        import intel_extension_for_pytorch as ipex

        dtype = torch.bfloat16 if self.setting.precision == "bf16" else torch.float32
        self.renderer.generator = ipex.optimize(self.renderer.generator, dtype=dtype, inplace=True)

    @classmethod
    def from_config(cls, config: InferenceConfig) -> "TalkingHead":
        setting = Setting.of(config)
        return cls(setting, get_backend(config.landmarks, config.checkpoint_dir, device=setting.device))

    def serves(self, config: InferenceConfig) -> bool:
        return self.setting == Setting.of(config)


def default_output(config: InferenceConfig) -> Path:
    """Upstream's naming, <result_dir>/<timestamp>.mp4, with _1, _2 ... when a video of that second exists (the API
    and batch make several a second)."""
    stem = datetime.now().strftime("%Y_%m_%d_%H.%M.%S")
    path, n = config.result_dir / f"{stem}.mp4", 1
    while path.exists():
        path, n = config.result_dir / f"{stem}_{n}.mp4", n + 1
    return path


def _tile(rows: np.ndarray, length: int) -> np.ndarray:
    """Repeat a reference sequence until it covers `length` frames, then cut (upstream's tiling)."""
    reps = -(-length // len(rows))
    return np.tile(rows, (reps, 1))[:length]


def speech_coefficients(
    head: TalkingHead, config: InferenceConfig, face: PreparedFace, wav: np.ndarray, num_frames: int,
    ref_coeffs: dict[Path, np.ndarray], seed: int, prof: Profiler,
) -> np.ndarray:
    """(T, 70) driving coefficients: expression and head pose from speech (spec stages B-E)."""
    with prof.stage("audio"):
        mels = windows_to_tensor(audio_windows(wav))
    with prof.stage("audio2coeff"):
        ref = np.repeat(face.coeff_3dmm[:, :70], num_frames, axis=0)
        if config.ref_eyeblink is not None:
            # Blinks come from the reference video's expressions instead of the generated blink curve.
            ref[:, :EXP_DIM] = _tile(ref_coeffs[config.ref_eyeblink][:, :EXP_DIM], num_frames)
            blink = np.zeros((num_frames, 1), dtype=np.float32)
        else:
            blink = blink_ratio(num_frames, random.Random(seed))
        noise = torch.Generator().manual_seed(seed)  # drawn on the CPU on every device: the same seed, the same motion
        device = head.device
        pred = head.audio2coeff.predict(
            mels.to(device), torch.from_numpy(ref[None]).to(device), torch.from_numpy(blink[None]).to(device),
            config.pose_style, noise,
        )
        coeffs = pred.coeffs[0]
        if config.ref_pose is not None:
            ref_pose = torch.from_numpy(_tile(ref_coeffs[config.ref_pose][:, EXP_DIM:70], num_frames)).to(device)
            coeffs = apply_ref_pose(coeffs, ref_pose)
    return coeffs.cpu().numpy()


@dataclass
class PreparedRun:
    """Everything rendering and writing need, computed once per run (workers get it from a job folder)."""

    num_frames: int
    seed: int
    wav: np.ndarray  # 16 kHz mono, cut to whole video frames
    sequence: DrivingSequence
    source: PreparedSource | None  # the renderer's source work (None where nothing renders: a job's merge)
    image_size: int  # side of the rendered frames
    crop_size_wh: tuple[int, int]  # the face crop's size in the picture: rendered frames are restored to it
    paste: PasteTarget | None  # full modes: where the face goes back into the original picture
    face_points: np.ndarray  # (5, 2) eye centres, nose, mouth corners of the source face in the rendered frame


def load_head(config: InferenceConfig, prof: Profiler) -> TalkingHead:
    """The networks for `config` (from the active `xtalker.warm.Networks` when it holds them), int8 graph included."""
    with prof.stage("load models"):
        key = (Setting.of(config), config.landmarks, str(config.checkpoint_dir))
        head = shared(HEADS, key, lambda: TalkingHead.from_config(config))
    if config.precision == "int8":
        with prof.stage("int8 graph"):
            info = head.quantize()
        log.info("int8 generator %s in %.1f s", "loaded from the cache" if info.from_cache else "built and cached", info.seconds)
    return head


def load_speech(config: InferenceConfig, prof: Profiler) -> np.ndarray:
    """The driving audio at 16 kHz, cut to whole video frames; checked before any network is loaded."""
    with prof.stage("audio"):
        wav = load_audio(config.driven_audio)
        if num_video_frames(len(wav)) < 1:
            raise AudioTooShortError(
                f"{config.driven_audio} lasts {len(wav) / 16000:.3f} s: shorter than one video frame "
                f"({1 / FPS:.2f} s); use a longer speech clip"
            )
        return crop_to_frames(wav)


def prepare_face(config: InferenceConfig, head: TalkingHead, prof: Profiler) -> tuple[PreparedFace, dict[Path, np.ndarray]]:
    """The source face (crop, landmarks, coefficients) and the reference videos' coefficients."""
    log.info("landmarks: %s backend; checkpoints %s", head.landmarks.name, head.paths.label)
    with prof.stage("preprocess"):
        face = prepare_source(config.source_image, head.landmarks, head.recon, config.preprocess, config.size)
        ref_coeffs = {
            path: video_coefficients(path, head.landmarks, head.recon, config.preprocess, config.size)
            for path in {config.ref_eyeblink, config.ref_pose} - {None}
        }
    return face, ref_coeffs


def row_layout(config: InferenceConfig) -> str:
    """The preprocess mode whose coefficient rows the renderer reads: PIRender always takes the full modes' 73
    channels (the source's crop triple appended), facevid2vid 70 or 73 by the run's mode."""
    return "full" if config.facerender == "pirender" else config.preprocess


def clip_sequence(config: InferenceConfig, coeffs: np.ndarray, face: PreparedFace) -> DrivingSequence:
    """The renderer's driving rows from generated (T, 70) coefficients (a streamed clip: any run of rows)."""
    return driving_sequence(
        coeffs, face.coeff_3dmm, row_layout(config), config.still, config.expression_scale,
        config.input_yaw, config.input_pitch, config.input_roll,
    )


def source_run(
    config: InferenceConfig, head: TalkingHead, face: PreparedFace, sequence: DrivingSequence, wav: np.ndarray,
    seed: int, prof: Profiler,
) -> PreparedRun:
    """The renderer's source work and the paste-back geometry around a clip."""
    with prof.stage("render"):
        source = head.renderer.prepare(source_image(face.crop.image), source_semantics(face.coeff_3dmm, row_layout(config)))
    paste = paste_target(face.original, face.info, face.geometry, config.extended_crop) if config.pastes_back else None
    return PreparedRun(sequence.num_frames, seed, wav, sequence, source, source.image_size, face.info.size, paste,
                       five_points(face.landmarks_crop))


def prepare_run(config: InferenceConfig, head: TalkingHead, wav: np.ndarray, seed: int, prof: Profiler) -> PreparedRun:
    """Source picture, coefficients and the renderer's source work: all that precedes per-frame work."""
    face, ref_coeffs = prepare_face(config, head, prof)
    coeffs = speech_coefficients(head, config, face, wav, num_video_frames(len(wav)), ref_coeffs, seed, prof)
    return source_run(config, head, face, clip_sequence(config, coeffs, face), wav, seed, prof)


def run_batch_size(config: InferenceConfig, head: TalkingHead, prof: Profiler | None = None) -> int:
    """Frames per renderer call for this run: `config.batch_size`, or for "auto" what suits the head's device
    (`xtalker.device.auto_batch_size`; on CUDA from the memory free now, so call it once, after the source work).
    Recorded in `prof`."""
    batch_size = config.batch_size
    if batch_size == AUTO_BATCH:
        device, size, precision = head.setting.device, head.paths.size, head.setting.precision
        batch_size = auto_batch_size(device, size, precision)
        log.info("--batch_size auto: %d frames per renderer call (%s, %d px, %s)", batch_size, device, size, precision)
    if prof is not None:
        prof.batch_size = batch_size
    return batch_size


def render_frames(
    head: TalkingHead, run: PreparedRun, start: int, stop: int, batch_size: int, prof: Profiler
) -> Iterator[np.ndarray]:
    """Frames [start, stop) as (n, S, S, 3) uint8 batches of `batch_size` counted from `start`.

    A frame's pixels depend on which frames share its batch (kernel blocking), so shards that start at
    multiples of the batch size render exactly what one process renders.
    """
    for first in range(start, stop, batch_size):
        last = min(first + batch_size, stop)
        with prof.stage("render"):
            yaw, pitch, roll = run.sequence.angles(first, last)
            windows = run.sequence.windows(first, last)
            frames = to_uint8(head.renderer.render(run.source, windows, yaw, pitch, roll))
        prof.frames += last - first
        yield frames


def finisher(run: PreparedRun, config: InferenceConfig, part: str = "all") -> Finisher:
    """The post-render chain of `run` (see xtalker.finish): all of it, the workers' share or the merge's."""
    settings = FinishSettings(config.blend, config.enhancer, config.enhance_align, config.checkpoint_dir, config.precision,
                              resolve_device(config.device), config.enhance_scale, config.background_enhancer,
                              config.cache_dir)
    return Finisher(settings, run.image_size, run.crop_size_wh, run.paste, run.face_points, run.seed, part)


def write_video(
    run: PreparedRun, batches: Iterable[np.ndarray], output: Path, prof: Profiler, finish: Finisher,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Uint8 batches, in order -> the rest of the post-render chain -> one H.264 + AAC encode; returns (w, h)."""
    size_wh = (0, 0)
    first = 0
    with VideoWriter(output, fps=FPS, audio=run.wav) as writer, tqdm(
        total=run.num_frames, unit="frame", desc="rendering", disable=None, leave=False
    ) as bar:
        for frames in batches:
            frames = finish(frames, first, prof)
            with prof.stage("encode"):
                for frame in frames:
                    writer.write(frame)
            size_wh = (frames.shape[2], frames.shape[1])
            first += len(frames)
            bar.update(len(frames))
            if progress is not None:
                progress(first, run.num_frames)
        with prof.stage("encode"):
            writer.close()
    return size_wh


def _writable_problem(path: Path, what: str) -> str | None:
    """Why `path` cannot be written (its folder is created if missing), or None."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        return f"{what} {path} is a folder; give a file path"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder for {what} {path}: {e.strerror or e}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write {what} {path}: folder {folder} is not writable"
    return None


def check_run(config: InferenceConfig, *, audio_file: bool = True, output: bool = True) -> None:
    """Everything that can be checked before any work, one clear error each: the settings, int8's prerequisites,
    the enhancer's weights, the input files, the checkpoint files, where the video goes (chosen here when not given). A stream has no
    audio file (`audio_file=False`), and the API's stream writes no video (`output=False`)."""
    config.validate()
    if config.precision == "int8":
        check_available()
    check_weights(config.enhancer, config.enhance_align, config.checkpoint_dir, config.background_enhancer)
    for path, what in ((config.driven_audio if audio_file else None, "driven audio"), (config.source_image, "source image"),
                       (config.ref_eyeblink, "--ref_eyeblink video"), (config.ref_pose, "--ref_pose video")):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{what} not found: {path}")
    find_checkpoints(config.checkpoint_dir, config.size, config.preprocess, config.old_version, config.facerender)
    if not output:
        return
    config.output = config.output or default_output(config)
    for path, what in ((config.output, "output"), (config.report, "report")):
        if path is not None and (problem := _writable_problem(Path(path), what)):
            raise ConfigError(problem)


def run_seed(config: InferenceConfig) -> int:
    return config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)


def generate(config: InferenceConfig, networks: Networks | None = None, progress: Progress | None = None) -> RunResult:
    """Run one portrait + audio -> mp4. Raises clear errors for bad inputs before any output exists.

    `networks`: loaded networks to reuse (and keep what this run loads); `progress(done, total)` is called with
    the frames written so far, and may raise to stop the run (nothing is left behind).
    """
    config.validate()
    prof = Profiler()
    seed = run_seed(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    output = config.output or default_output(config)
    check_weights(config.enhancer, config.enhance_align, config.checkpoint_dir, config.background_enhancer)
    networks = networks if networks is not None else Networks()
    with networks.active():
        wav = load_speech(config, prof)
        head = load_head(config, prof)
        run = prepare_run(config, head, wav, seed, prof)
        with prof.stage("load models"):
            finish = finisher(run, config)
        batch_size = run_batch_size(config, head, prof)  # "auto": from the memory left with every network loaded
        frames = render_frames(head, run, 0, run.num_frames, batch_size, prof)
        if config.overlap if config.overlap is not None else head.device.type == "cuda":
            frames = ahead(frames, depth=2)
        size_wh = write_video(run, frames, output, prof, finish, progress)
    prof.loaded = networks.take_loaded()
    return RunResult(
        output=output, frames=run.num_frames, size_wh=size_wh, seed=seed, landmarks=head.landmarks.name, profile=prof,
        int8=head.int8, batch_size=batch_size,
    )
