"""Typed configuration of one inference run (what the CLI flags mean, in one place)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

from xtalker.finish import ALIGNS, BLENDS, check_enhancer
from xtalker.finish.enhance import SCALES as ENHANCE_SCALES
from xtalker.finish.enhance import check_background
from xtalker.preprocess import PREPROCESS_MODES

SIZES = (256, 512)
PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # fp16: CUDA only; int8: CPU only (xtalker.device)
NUM_POSE_STYLES = 46
# Face renderers: SadTalker's facevid2vid generator, or PIRender (the lightweight one, ~10x fewer FLOPs a frame).
FACERENDERS = ("facevid2vid", "pirender")
PIRENDER_PRECISIONS = ("fp32", "bf16")  # bf16: the editing net only (xtalker.render.pirender)
AUTO_BATCH = "auto"  # --batch_size auto
FPS = 25


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message says which and what is allowed."""


@dataclass
class InferenceConfig:
    """Settings of one run; defaults are upstream SadTalker's."""

    driven_audio: Path
    source_image: Path
    result_dir: Path = Path("results")
    output: Path | None = None  # default: <result_dir>/<timestamp>.mp4
    checkpoint_dir: Path = Path("checkpoints")
    # Legacy per-network checkpoint files (auido2exp_00300-model.pth, ...; xtalker.checkpoints.find_checkpoints)
    # instead of the packed safetensors file; a folder without *.safetensors falls back to them anyway.
    old_version: bool = False
    size: int = 256
    facerender: str = "facevid2vid"  # FACERENDERS
    preprocess: str = "crop"
    still: bool = False
    pose_style: int = 0
    batch_size: int | str = 2  # or "auto": chosen per device at run time (xtalker.device.auto_batch_size)
    precision: str = "fp32"
    expression_scale: float = 1.0
    input_yaw: list[float] | None = None
    input_pitch: list[float] | None = None
    input_roll: list[float] | None = None
    ref_eyeblink: Path | None = None
    ref_pose: Path | None = None
    landmarks: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (xtalker.device); auto: the first CUDA GPU, else the CPU
    backend: str = "native"  # or "ipex": intel_extension_for_pytorch.optimize on the generator
    blend: str = "seamless"  # paste-back blend of the full modes (xtalker.finish.BLENDS)
    enhancer: str | None = None  # face enhancer (xtalker.finish.enhance.ENHANCERS), None: none
    enhance_align: str = "source"  # GFPGAN face alignment (xtalker.finish.ALIGNS): once from the source, or detect
    enhance_scale: int = 2  # a restoring enhancer's output: 2x the rendered size (upstream) or 1x
    background_enhancer: str | None = None  # "realesrgan": RealESRGAN x2plus under a restoring enhancer's faces
    # Render the next batch while this one is finished and encoded (xtalker.overlap). None: on a GPU only; on a
    # CPU the producer thread takes cores from the renderer (16 frames bf16: 28.2 s serial, 30.0 s overlapped).
    overlap: bool | None = None
    # int8 runs an ahead-of-time compiled graph; PIRender a torch.compile'd one; facevid2vid fp32/bf16 run eagerly
    compile: bool = True
    cache_dir: Path | None = None  # compiled int8 graphs; None: $XTALKER_CACHE_DIR or ~/.cache/xtalker/compiled
    seed: int | None = None  # None: a fresh seed per run (upstream is unseeded), reported for reruns
    threads: int | None = None  # None: torch's default (all cores)
    workers: int = 1  # >1: render in that many processes pinned to core slots (xtalker.parallel)
    profile: bool = False
    report: Path | None = None

    @property
    def extended_crop(self) -> bool:
        return self.preprocess.startswith("ext")

    @property
    def pastes_back(self) -> bool:
        """Full modes paste the animated face back into the original picture."""
        return "full" in self.preprocess

    def validate(self) -> None:
        if self.size not in SIZES:
            raise ConfigError(f"--size must be 256 or 512, got {self.size}")
        if self.preprocess not in PREPROCESS_MODES:
            raise ConfigError(f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {self.preprocess!r}")
        if not 0 <= self.pose_style < NUM_POSE_STYLES:
            raise ConfigError(f"--pose_style must be in 0..{NUM_POSE_STYLES - 1}, got {self.pose_style}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.facerender not in FACERENDERS:
            raise ConfigError(f"--facerender must be one of {', '.join(FACERENDERS)}, got {self.facerender!r}")
        if self.facerender == "pirender":
            self._check_pirender()
        from xtalker.device import check_precision_on, resolve_device

        device = resolve_device(self.device)
        check_precision_on(self.precision, device)
        if self.backend == "ipex" and device != "cpu":
            raise ConfigError(f"--backend ipex is a CPU backend; leave it out with --device {self.device}")
        if self.precision == "int8" and not self.compile:
            raise ConfigError("--precision int8 runs a compiled graph and cannot be used with --no-compile; "
                              "drop --no-compile, or use --precision bf16 (eager)")
        if self.precision == "int8" and self.backend == "ipex":
            raise ConfigError("--backend ipex applies to the fp32/bf16 generator; use --backend native with --precision int8")
        size = self.batch_size
        if size != AUTO_BATCH and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
            raise ConfigError(f"--batch_size must be a whole number of at least 1 or auto, got {self.batch_size!r}")
        if not self.expression_scale >= 0:
            raise ConfigError(f"--expression_scale must be a number >= 0, got {self.expression_scale}")
        try:
            check_enhancer(self.enhancer)
            check_background(self.background_enhancer, self.enhancer)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.enhance_align not in ALIGNS:
            raise ConfigError(f"--enhance_align must be one of {', '.join(ALIGNS)}, got {self.enhance_align!r}")
        if self.enhance_scale not in ENHANCE_SCALES:
            raise ConfigError(f"--enhance_scale must be 2 (upstream's doubled output) or 1 (the rendered size), "
                              f"got {self.enhance_scale!r}")
        if self.blend not in BLENDS:
            raise ConfigError(f"--blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        for name in ("input_yaw", "input_pitch", "input_roll"):
            values = getattr(self, name)
            if values is not None and not values:
                raise ConfigError(f"--{name} needs at least one angle in degrees")

    def _check_pirender(self) -> None:
        """What the PIRender path cannot do is refused, not ignored as upstream ignores it."""
        if self.precision not in PIRENDER_PRECISIONS:
            raise ConfigError(f"--facerender pirender runs in {' or '.join(PIRENDER_PRECISIONS)} (bf16: its editing net, "
                              f"46 dB against fp32), not {self.precision}; use --precision bf16")
        if self.backend != "native":
            raise ConfigError("--backend ipex applies to the facevid2vid generator; use --backend native with --facerender pirender")
        angles = [f"--{n}" for n in ("input_yaw", "input_pitch", "input_roll") if getattr(self, n) is not None]
        if angles:
            raise ConfigError(f"{', '.join(angles)} set head-angle keyframes, which PIRender cannot follow (its network reads "
                              "3DMM coefficients, not keypoint angles; SadTalker silently ignores them there): use "
                              "--facerender facevid2vid for keyframes, or leave them out")
