"""What follows the renderer, per batch: aspect restore, face enhancer, paste-back, in upstream's order.

The chain is built once per video. With a heavy enhancer (GFPGAN) it splits in two: the workers of a
parallel run apply the stages up to the enhancer (so the expensive network runs in parallel) and store
their output in the shards; the merge applies the rest. A single process applies all of it.

Order: the source-aligned path (GFPGAN or RestoreFormer) enhances the face crop (resized to the paste box in
full modes) and pastes it into the original picture upscaled once per video; the `detect` path, like upstream,
enhances the finished frame. Either way the enhanced video is twice the rendered size, as upstream's, or with
`enhance_scale` 1 the rendered size (the restored face pasted back at it).

The background enhancer (RealESRGAN x2plus) replaces the Lanczos upscale under the faces. Per frame it costs:
crop modes, the whole frame (it is the animated crop); full modes, only the face box (the source path: the crop
before paste-back; the detect path: the box of the finished frame plus a tile pad), the still picture being
upscaled once per video.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from xtalker.finish.enhance import REALESRGAN_FILE, RESTORING, UPSCALE, check_weights, make_enhancer
from xtalker.finish.paste import Paster, PasteTarget
from xtalker.profiling import Profiler
from xtalker.render import resize_to_original, restored_size

StageFn = Callable[[np.ndarray, int], np.ndarray]
PARTS = ("all", "worker", "merge")


@dataclass(frozen=True)
class FinishSettings:
    """The run settings the chain depends on."""

    blend: str = "seamless"
    enhancer: str | None = None
    enhance_align: str = "source"
    checkpoint_dir: Path = Path("checkpoints")
    precision: str = "fp32"
    device: str = "cpu"  # resolved ("cpu", "cuda:N"): where the enhancer's networks run
    enhance_scale: int = UPSCALE  # a restoring enhancer's output: 2x (upstream) or the rendered size (1)
    background_enhancer: str | None = None  # "realesrgan": RealESRGAN x2plus under the restored faces
    cache_dir: Path | None = None  # int8 enhancer graphs (the renderer's --cache_dir); None: its default

    @property
    def heavy(self) -> bool:
        return self.enhancer is not None and self.enhancer.lower() in RESTORING


def scaled_target(target: PasteTarget, factor: int, settings: FinishSettings | None = None) -> PasteTarget:
    """The paste target `factor` times larger: the picture upscaled once (Lanczos, as upstream's enhancer, or the
    settings' background enhancer)."""
    h, w = target.background.shape[:2]
    size_wh = (w * factor, h * factor)
    box = tuple(v * factor for v in target.box)
    if settings is not None and settings.background_enhancer is not None:
        from xtalker.finish.background import BackgroundUpsampler

        path = check_weights(settings.enhancer, "source", settings.checkpoint_dir, settings.background_enhancer)
        upsampler = BackgroundUpsampler(path[REALESRGAN_FILE], settings.precision, settings.device,
                                        cache_dir=settings.cache_dir)
        bgr = np.ascontiguousarray(target.background[..., ::-1])
        return PasteTarget(np.ascontiguousarray(upsampler(bgr, size_wh)[..., ::-1]), box)
    if factor == 1:
        return target
    return PasteTarget(cv2.resize(target.background, size_wh, interpolation=cv2.INTER_LANCZOS4), box)


def _per_frame(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, int], np.ndarray]:
    return lambda frames, _first: np.stack([fn(f) for f in frames]) if len(frames) else frames


def _resize_to(size_wh: tuple[int, int]) -> Callable[[np.ndarray, int], np.ndarray]:
    return _per_frame(lambda f: cv2.resize(f, size_wh, interpolation=cv2.INTER_LINEAR))


class Finisher:
    """The post-render chain of one video; `part` picks all stages, the workers' share or the merge's share.

    Stages are described first and built only where they run, so a merge does not load GFPGAN and a worker
    does not upscale the picture it never pastes into.
    """

    def __init__(
        self,
        settings: FinishSettings,
        render_size: int,
        crop_size_wh: tuple[int, int],
        paste: PasteTarget | None,
        face_points: np.ndarray | None,
        seed: int,
        part: str = "all",
    ):
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        plan: list[tuple[str, Callable[[], StageFn]]] = [
            ("render", lambda: lambda frames, _first: resize_to_original(frames, crop_size_wh))
        ]
        frame_wh = restored_size(render_size, crop_size_wh)
        after_paste = settings.heavy and settings.enhance_align == "detect"
        upscale = settings.enhance_scale if settings.heavy and not after_paste else 1
        # The picture under a source-aligned restored face is upscaled once here (RealESRGAN when asked).
        upscale_picture = settings.heavy and not after_paste
        if settings.enhancer is not None and not after_paste:
            if paste is not None and settings.heavy:
                # Enhance at the size the face takes in the picture, as upstream's enhancer sees it.
                plan.append(("paste", lambda size=paste.size_wh: _resize_to(size)))
                frame_wh = paste.size_wh
            points = None
            if face_points is not None:
                scale = np.float32([frame_wh[0] / render_size, frame_wh[1] / render_size])
                points = np.asarray(face_points, np.float32) * scale
            plan.append(("enhance", lambda: make_enhancer(
                settings.enhancer, settings.enhance_align, settings.checkpoint_dir, settings.precision, seed,
                points, frame_wh, settings.device, settings.enhance_scale, settings.background_enhancer,
                cache_dir=settings.cache_dir)))
        heavy_until = len(plan) if settings.heavy else 0
        if paste is not None:
            plan.append(("paste", lambda: _per_frame(
                Paster(scaled_target(paste, upscale, settings if upscale_picture else None), settings.blend))))
        if after_paste:
            still = None if paste is None else (paste.background, paste.box)
            plan.append(("enhance", lambda: make_enhancer(
                settings.enhancer, settings.enhance_align, settings.checkpoint_dir, settings.precision, seed,
                device=settings.device, scale=settings.enhance_scale, background=settings.background_enhancer,
                still=still, cache_dir=settings.cache_dir)))
            heavy_until = len(plan)
        chosen = {"all": plan, "worker": plan[:heavy_until], "merge": plan[heavy_until:]}[part]
        self.stages = [(name, build()) for name, build in chosen]

    def __call__(self, frames: np.ndarray, first: int, prof: Profiler) -> np.ndarray:
        for name, stage in self.stages:
            with prof.stage(name):
                frames = stage(frames, first)
        return frames
