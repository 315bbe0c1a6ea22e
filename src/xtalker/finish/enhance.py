"""Face enhancement of rendered frames, batch by batch in the streaming pipeline.

- `lightweight`: an unsharp mask (no weights, ~1 ms a frame) on the face crop before paste-back.
- `gfpgan`: GFPGAN v1.4 (`GFPGANv1.4.pth`); the output is twice the input size, as upstream's enhancer.
- `restoreformer`: RestoreFormer (`RestoreFormer.pth`) in GFPGAN's place, with the same geometry (`--enhancer
  RestoreFormer` as upstream spells it). Its codebook lookup is discrete, so its encoder and quantizer stay fp32 in
  every precision; only the decoder runs in bf16.
The restoring enhancers (`gfpgan`, `restoreformer`) take two ways to find the face (`--enhance_align`):
  - `source` (default): the renderer's crop holds the source face where the source landmarks put it, so
    the 5-point alignment to the 512 template is computed once per video from those landmarks and every
    frame is warped with it; the restored face goes back with a fixed soft face mask. No detection, no
    face parsing per frame: one GFPGAN pass is the whole per-frame cost.
  - `detect`: upstream's per-frame procedure on the finished frame: RetinaFace (`detection_Resnet50_Final.pth`)
    finds every face, LMedS alignment, GFPGAN, ParseNet (`parsing_parsenet.pth`) mask, paste on a Lanczos
    upscale. Costs about 2.2x `source` (detector + ParseNet on top of GFPGAN).
With `--background_enhancer realesrgan` the canvas the faces are pasted on is RealESRGAN x2plus's output instead
of the Lanczos upscale (`background`: a callable (frame, size) -> canvas, `finish.background`).
GFPGAN's StyleGAN noise is drawn per face from a generator seeded by (run seed, frame index, face index),
so a frame's result does not depend on batching or on which worker renders it.

The networks run on the run's device (`device`: "cpu" or "cuda:N", resolved by the caller), one cached copy per
file and device; frames go in and come back as numpy arrays on the CPU. The geometry (alignment, warps, masks,
paste) stays on the CPU in OpenCV. Precision: fp32 runs keep the networks in fp32; any other run precision runs
GFPGAN and ParseNet in bf16, on CUDA too (an fp16 run's enhancer is bf16: the plans have no fp16 form). An int8 run
on the CPU runs GFPGAN as an int8 graph compiled once and cached in `cache_dir` (49 dB against fp32, 1.7x bf16's
speed); RestoreFormer and RealESRGAN stay bf16 there, where int8 costs more than it gains (`finish.int8` gives the
measurements).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from xtalker.checkpoints import CheckpointError
from xtalker.finish.restore import (
    FACE_SIZE,
    FFHQ_TEMPLATE_512,
    align_affine,
    inverse_affine,
    paste_face,
    to_u8,
    upscale_background,
    warp_face,
    warp_mask,
)
from xtalker.finish.restore import parse_mask as parse_classes_mask
from xtalker.models import auxfile
from xtalker.models.gfpgan import FILE_NAME as GFPGAN_FILE
from xtalker.models.parsenet import FILE_NAME as PARSENET_FILE
from xtalker.models.restoreformer import FILE_NAME as RESTOREFORMER_FILE
from xtalker.models.retinaface import FILE_NAME as RETINAFACE_FILE
from xtalker.models.rrdbnet import FILE_NAME as REALESRGAN_FILE
from xtalker.warm import network_key, shared

ENHANCERS = ("lightweight", "gfpgan", "restoreformer")
RESTORING = ("gfpgan", "restoreformer")  # networks on aligned 512 face crops: heavy, twice the size by default
ALIGNS = ("source", "detect")
BACKGROUND_ENHANCERS = ("realesrgan",)
SHARPEN_SIGMA = 1.2  # px at the output size: the renderer's blur scale at 256 px
SHARPEN_AMOUNT = 0.6  # 1 + amount times the frame minus amount times its blur
UPSCALE = 2  # upstream's GFPGANer(upscale=2): the enhanced video is twice the rendered size
SCALES = (2, 1)  # --enhance_scale: upstream's doubled output, or the input's size (the face pasted back at it)


class EnhancerWeightsMissing(CheckpointError):
    """A file the chosen enhancer needs is in none of the folders searched."""


def check_enhancer(name: str | None) -> str | None:
    """The normalised enhancer name, or None; ValueError naming what is available otherwise."""
    if name is None:
        return None
    key = name.lower()
    if key in ENHANCERS:
        return key
    raise ValueError(f"--enhancer must be one of gfpgan, RestoreFormer, lightweight or none, got {name!r}")


def check_background(name: str | None, enhancer: str | None) -> str | None:
    """The normalised background enhancer, or None; ValueError when unknown or without a restoring enhancer
    (upstream hands the background upsampler to GFPGANer, so it does nothing without one)."""
    if name is None:
        return None
    key = name.lower()
    if key not in BACKGROUND_ENHANCERS:
        raise ValueError(f"--background_enhancer must be realesrgan, got {name!r}")
    if check_enhancer(enhancer) not in RESTORING:
        raise ValueError("--background_enhancer realesrgan upscales the picture under a restored face: add "
                         "--enhancer gfpgan or --enhancer RestoreFormer, or leave --background_enhancer out")
    return key


def required_files(name: str | None, align: str = "source", background: str | None = None) -> tuple[str, ...]:
    """The weight files enhancer `name` needs with alignment `align` and background enhancer `background`."""
    key = check_enhancer(name)
    if key not in RESTORING:
        return ()
    files = (GFPGAN_FILE if key == "gfpgan" else RESTOREFORMER_FILE,)
    if align == "detect":
        files += (RETINAFACE_FILE, PARSENET_FILE)
    return files + ((REALESRGAN_FILE,) if check_background(background, key) else ())


def find_weights(file_name: str, checkpoint_dir: Path, purpose: str) -> Path:
    """The first `file_name` in the search folders; EnhancerWeightsMissing (one line: what, where, how) if none."""
    found = auxfile.locate(file_name, checkpoint_dir)
    if found is not None:
        return found
    looked = ", ".join(str(f) for f in auxfile.search_folders(checkpoint_dir))
    raise EnhancerWeightsMissing(
        f"{purpose} needs {file_name}, which is not in {looked}; run scripts/download_models.sh {checkpoint_dir} "
        f"(it fetches the enhancer weights too) or copy the file into {checkpoint_dir}"
    )


def check_weights(name: str | None, align: str, checkpoint_dir: Path, background: str | None = None) -> dict[str, Path]:
    """Every file the enhancers need, found (raises EnhancerWeightsMissing before any work otherwise)."""
    purpose = f"--enhancer {name}" + (" --enhance_align detect" if align == "detect" else "")
    found = {}
    for f in required_files(name, align, background):
        found[f] = find_weights(f, checkpoint_dir, "--background_enhancer realesrgan" if f == REALESRGAN_FILE else purpose)
    return found


class FaceRestorer(Protocol):
    """(n, 512, 512, 3) aligned BGR uint8 crops, one (frame, face) key each -> restored crops, same layout."""

    def __call__(self, crops: np.ndarray, keys: Sequence[tuple[int, int]]) -> np.ndarray: ...


class Enhancer(Protocol):
    """Batch of RGB uint8 frames (n, h, w, 3) whose first is frame `first` of the video -> enhanced frames.
    Where it sits in the post-render chain (before or after paste-back, in the workers or the merge) and its
    upscale are decided by `xtalker.finish.chain` from the settings, before any enhancer is built."""

    def __call__(self, frames: np.ndarray, first: int) -> np.ndarray: ...


def sharpen(frame: np.ndarray, sigma: float = SHARPEN_SIGMA, amount: float = SHARPEN_AMOUNT) -> np.ndarray:
    """Unsharp mask of one uint8 HWC frame (saturating)."""
    blurred = cv2.GaussianBlur(frame, (0, 0), sigma)
    return cv2.addWeighted(frame, 1.0 + amount, blurred, -amount, 0.0)


class Sharpener:
    def __call__(self, frames: np.ndarray, first: int) -> np.ndarray:
        return np.stack([sharpen(f) for f in frames]) if len(frames) else frames


def noise_seed(seed: int, frame: int, face: int) -> int:
    """A generator seed for one face of one frame, independent of batching and sharding."""
    return int(np.random.SeedSequence([seed, frame, face]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class Restorer:
    """GFPGAN v1.4 on aligned 512 BGR crops through its fast plan (exact rewrites of the same sums; fp32 within the
    golden tolerance, bf16 about 60 dB PSNR against fp32 on the image, aux spec 6.5 reports 57.7 for autocast)."""

    def __init__(self, path: Path, precision: str = "fp32", seed: int = 0, device: str = "cpu",
                 cache_dir: Path | None = None):
        from xtalker.finish.int8 import enhancer_precision, int8_gfpgan
        from xtalker.models.gfpgan import load_gfpgan

        self.device = torch.device(device)
        self.net = shared("gfpgan", network_key(path, device), lambda: load_gfpgan(path).to(self.device))
        self.precision, self.seed = enhancer_precision("gfpgan", precision, device), seed
        self.int8 = int8_gfpgan(self.net, cache_dir) if self.precision == "int8" else None

    def __call__(self, crops: np.ndarray, keys: Sequence[tuple[int, int]]) -> np.ndarray:
        """(n, 512, 512, 3) BGR uint8 crops, one (frame, face) key each -> restored crops, same layout."""
        from xtalker.models.gfpgan import (
            draw_noise,
            fast_plan,
            postprocess_to_bgr_u8,
            preprocess_bgr_u8,
        )

        if len(crops) == 0:
            return np.asarray(crops)
        # Noise is drawn on the CPU on every device: the same seed, the same faces.
        per_face = [draw_noise(1, torch.Generator().manual_seed(noise_seed(self.seed, *k))) for k in keys]
        noise = [torch.cat(maps).to(self.device) for maps in zip(*per_face)]
        plan = self.int8 if self.int8 is not None else fast_plan(self.net, self.precision)
        crops_u8 = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)  # uint8 across, floats made there
        image = plan.restore(preprocess_bgr_u8(crops_u8), noise)
        return postprocess_to_bgr_u8(image).cpu().numpy()


def template_mask(size: int = FACE_SIZE) -> np.ndarray:
    """Soft paste weights of the face region of the aligned template, processed like a parse mask (fixed,
    so the source-aligned path needs no face parsing)."""
    eyes_y = FFHQ_TEMPLATE_512[:2, 1].mean()
    mouth_y = FFHQ_TEMPLATE_512[3:, 1].mean()
    centre = (size / 2, (eyes_y + mouth_y) / 2 * size / FACE_SIZE)
    axes = (0.32 * size, 0.40 * size)  # cheeks to chin, brows to the hairline of the FFHQ crop
    classes = np.zeros((size, size), np.uint8)
    cv2.ellipse(classes, (round(centre[0]), round(centre[1])), (round(axes[0]), round(axes[1])), 0, 0, 360, 1, -1)
    return parse_classes_mask(classes)


def _bgr(frames: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(frames[..., ::-1])


Background = Callable[[np.ndarray, tuple[int, int]], np.ndarray]  # (frame_bgr, (w, h)) -> canvas at that size


class SourceAlignedEnhancer:
    """A restorer with one alignment per video from the source landmarks (in the coordinates of the frames
    this enhancer receives) and a fixed soft mask; faces are pasted on `background(frame)` (Lanczos default)."""

    def __init__(self, restorer: FaceRestorer, lm5: np.ndarray, frame_wh: tuple[int, int], scale: int = UPSCALE,
                 background: Background | None = None):
        self.restorer = restorer
        self.background = background or upscale_background
        self.affine = align_affine(lm5)
        self.inverse = inverse_affine(self.affine, scale)
        self.frame_wh = frame_wh
        self.out_wh = (frame_wh[0] * scale, frame_wh[1] * scale)
        self.soft_mask = warp_mask(template_mask(), self.inverse, self.out_wh)

    def __call__(self, frames: np.ndarray, first: int) -> np.ndarray:
        if (frames.shape[2], frames.shape[1]) != self.frame_wh:
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]}, the alignment is for "
                             f"{self.frame_wh[0]}x{self.frame_wh[1]}")
        bgr = _bgr(frames)
        restored = self.restorer(np.stack([warp_face(f, self.affine) for f in bgr]),
                                 [(first + i, 0) for i in range(len(bgr))])
        out = [
            to_u8(paste_face(self.background(f, self.out_wh).astype(np.float64), r, self.inverse, self.soft_mask))
            for f, r in zip(bgr, restored)
        ]
        return np.stack(out)[..., ::-1]


@dataclass(frozen=True)
class DetectedFaces:
    """The faces the restore helper keeps in one frame: 5 points each, in score order."""

    landmarks5: np.ndarray  # (K, 5, 2) float32
    det_faces: np.ndarray  # (K, 5) box + score


def enhance_detected(
    frame_bgr: np.ndarray,
    faces: DetectedFaces,
    restore: Callable[[np.ndarray], np.ndarray],
    parse: Callable[[np.ndarray], np.ndarray],
    scale: int = UPSCALE,
    background: Background | None = None,
) -> np.ndarray:
    """Upstream's per-frame enhance: align each face, restore, parse, paste in order on the Lanczos upscale, or on
    `background(frame_bgr, size_wh)` (GFPGANer's background upsampler, `finish.background`) when given."""
    h, w = frame_bgr.shape[:2]
    size_wh = (w * scale, h * scale)
    canvas = (background or upscale_background)(frame_bgr, size_wh)
    if len(faces.landmarks5) == 0:
        return canvas
    affines = [align_affine(lm5) for lm5 in faces.landmarks5]
    restored = restore(np.stack([warp_face(frame_bgr, a) for a in affines]))
    classes = parse(restored)
    out = canvas.astype(np.float64)
    for affine, face, cls in zip(affines, restored, classes):
        inverse = inverse_affine(affine, scale)
        out = paste_face(out, face, inverse, warp_mask(parse_classes_mask(cls), inverse, size_wh))
    return to_u8(out)


class DetectingEnhancer:
    """Upstream's procedure per finished frame: RetinaFace, LMedS alignment, restorer, ParseNet mask, paste on
    `background` (Lanczos default)."""

    def __init__(self, restorer: FaceRestorer, detector_path: Path, parsenet_path: Path, precision: str = "fp32",
                 device: str = "cpu", scale: int = UPSCALE, background: Background | None = None):
        from xtalker.models.parsenet import load_parsenet
        from xtalker.preprocess import FaceDetector

        self.restorer = restorer
        # Detection stays fp32: bf16 moves face scores across the 0.97 threshold (aux spec 6.5).
        self.detector = shared("retinaface", network_key(detector_path, device),
                               lambda: FaceDetector.from_file(detector_path, device=device))
        self.parsenet = shared("parsenet", network_key(parsenet_path, device),
                               lambda: load_parsenet(parsenet_path).to(torch.device(device)))
        # ParseNet has fp32 and bf16 plans only: any other run precision (int8, fp16) parses in bf16.
        self.precision = "fp32" if precision == "fp32" else "bf16"
        self.scale, self.background = scale, background

    def faces(self, frames_bgr: Sequence[np.ndarray]) -> list[DetectedFaces]:
        from xtalker.preprocess import restore_helper_faces

        found = []
        # detect_faces' and the restore helper's defaults are upstream's: score 0.97, NMS 0.4, eye distance 5 px.
        for dets in self.detector.detect(list(frames_bgr)):
            landmarks5, det_faces = restore_helper_faces(dets)
            found.append(DetectedFaces(landmarks5, det_faces))
        return found

    def parse(self, faces_bgr: np.ndarray) -> np.ndarray:
        from xtalker.models.parsenet import parse_classes

        return parse_classes(self.parsenet, faces_bgr, self.precision)

    def __call__(self, frames: np.ndarray, first: int) -> np.ndarray:
        bgr = list(_bgr(frames))
        out = []
        for i, (frame, faces) in enumerate(zip(bgr, self.faces(bgr))):
            keys = [(first + i, k) for k in range(len(faces.landmarks5))]
            out.append(enhance_detected(frame, faces, lambda crops, keys=keys: self.restorer(crops, keys), self.parse,
                                        self.scale, self.background))
        return np.stack(out)[..., ::-1]


def make_enhancer(
    name: str | None,
    align: str = "source",
    checkpoint_dir: Path = Path("checkpoints"),
    precision: str = "fp32",
    seed: int = 0,
    lm5: np.ndarray | None = None,
    frame_wh: tuple[int, int] | None = None,
    device: str = "cpu",
    scale: int = UPSCALE,
    background: str | None = None,
    still: tuple[np.ndarray, tuple[int, int, int, int]] | None = None,
    cache_dir: Path | None = None,
) -> Enhancer | None:
    """The enhancer `name` (see ENHANCERS), or None. `lm5`/`frame_wh`: the source face's 5 points in the frames
    the enhancer will receive (the `source` alignment). `precision` fp32 keeps the networks in fp32; int8 runs
    the networks where int8 pays as int8 graphs cached in `cache_dir` (default: the renderer's,
    `render.quantize.default_cache_dir()`) and the others in bf16 (`finish.int8.enhancer_precision`); anything
    else runs GFPGAN, ParseNet, RestoreFormer's decoder and RealESRGAN in bf16. `device`: where the networks run
    (resolved: "cpu" or "cuda:N"); the lightweight enhancer is OpenCV on the CPU. `scale`: the restoring enhancers'
    output size, 2 (upstream) or 1 times their input (SCALES). `background`: "realesrgan" pastes the faces on
    RealESRGAN x2plus's output. `still`: (RGB picture, box (y1, y2, x1, x2)) when the frames are that picture
    with only the box changing (the full modes after paste-back): the picture is upscaled once and only the box
    per frame."""
    key = check_enhancer(name)
    if key is None:
        return None
    background = check_background(background, key)
    if key == "lightweight":
        return Sharpener()
    if align not in ALIGNS:
        raise ValueError(f"--enhance_align must be one of {', '.join(ALIGNS)}, got {align!r}")
    paths = check_weights(key, align, checkpoint_dir, background)
    if key == "gfpgan":
        restorer: FaceRestorer = Restorer(paths[GFPGAN_FILE], precision, seed, device, cache_dir)
    else:
        from xtalker.finish.background import RestoreFormerRestorer

        restorer = RestoreFormerRestorer(paths[RESTOREFORMER_FILE], precision, device, cache_dir)
    canvas = None
    if background is not None:
        from xtalker.finish.background import BackgroundUpsampler, StillBackground

        canvas = BackgroundUpsampler(paths[REALESRGAN_FILE], precision, device, cache_dir=cache_dir)
        if still is not None:
            canvas = StillBackground(canvas, _bgr(still[0]), still[1])
    if align == "detect":
        return DetectingEnhancer(restorer, paths[RETINAFACE_FILE], paths[PARSENET_FILE], precision, device, scale,
                                 canvas)
    if lm5 is None or frame_wh is None:
        raise ValueError("the source-aligned enhancer needs the source face's 5 points and the frame size")
    return SourceAlignedEnhancer(restorer, lm5, frame_wh, scale, canvas)
