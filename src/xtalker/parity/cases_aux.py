"""Parity runners for the auxiliary networks: GFPGAN v1.4, the face-restore alignment and paste, GFPGANer.enhance.

The aux weight files are not among the four SadTalker files the Context knows, so a runner takes
its file (e.g. `GFPGANv1.4.pth`) from the checkpoint folder when it is there and otherwise writes the verified synthetic
file (rule sadtalker-synth-v1-aux) into the synthetic aux cache (`xtalker.synthetic.default_aux_dir`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from xtalker.finish.enhance import GFPGAN_FILE, PARSENET_FILE, RETINAFACE_FILE
from xtalker.finish.restore import (
    FFHQ_TEMPLATE_512,
    align_affine,
    inverse_affine,
    parse_mask,
    paste_face,
    to_u8,
    upscale_background,
    warp_face,
    warp_mask,
)
from xtalker.models.gfpgan import (
    NOISE_SIZES,
    GFPGANv1Clean,
    draw_noise,
    fast_plan,
    load_gfpgan,
    postprocess_to_bgr_u8,
    preprocess_bgr_u8,
)
from xtalker.parity.core import Case, Check, Context, exact, levels, max_abs, mean_abs
from xtalker.synthetic import default_aux_dir, ensure_aux


def aux_file(ctx: Context, file_name: str) -> Path:
    """The aux weight file `file_name` the cases run with (see the module docstring)."""
    present = ctx.checkpoint_dir / file_name
    if present.is_file():
        return present
    return ensure_aux(default_aux_dir(), file_name)


@functools.lru_cache(maxsize=1)
def _gfpgan(path: str) -> GFPGANv1Clean:
    return load_gfpgan(path)


def run_gfpgan(case: Case, ctx: Context) -> list[Check]:
    net = _gfpgan(str(aux_file(ctx, GFPGAN_FILE)))
    crops = case.tensor("input.cropped_face_bgr_u8")
    single = crops.dim() == 3  # one HWC crop, or a batch of them
    x = preprocess_bgr_u8(crops.unsqueeze(0) if single else crops)
    keys = set(case.keys())
    encoded = net.encode(x)
    if "input.noise0" in keys:
        noise = [case.tensor(f"input.noise{i}") for i in range(len(NOISE_SIZES))]
    else:
        # Upstream draws the noise from the global generator right after the case's manual_seed.
        torch.manual_seed(int(case.meta["torch_noise_seed"]))
        noise = draw_noise(x.shape[0])
    image = net.decode(encoded, noise)
    # The enhancer runs the fast plan: it must meet the same bar.
    fast = fast_plan(net, "fp32").restore(x, noise)
    restored = postprocess_to_bgr_u8(image)
    scale0, shift0 = encoded.conditions[0]
    outputs: dict[str, Callable[[str], list[Check]]] = {
        "out.image": lambda k: [
            max_abs("image", image, case.tensor(k), 1e-5),
            mean_abs("image (mean)", image, case.tensor(k), 1e-6),
            max_abs("image (fast plan)", fast, case.tensor(k), 1e-5),
            mean_abs("image (fast plan, mean)", fast, case.tensor(k), 1e-6),
        ],
        "out.style_code": lambda k: [max_abs("style_code", encoded.style_code, case.tensor(k), 1e-5)],
        "out.condition_scale0": lambda k: [max_abs("condition_scale0", scale0, case.tensor(k), 1e-5)],
        "out.condition_shift0": lambda k: [max_abs("condition_shift0", shift0, case.tensor(k), 1e-5)],
        "out.restored_face_bgr_u8": lambda k: [
            levels("restored_face_bgr_u8", restored[0] if single else restored, case.tensor(k), 1, 1e-4)
        ],
    }
    return [c for key, compare in outputs.items() if key in keys for c in compare(key)]


def run_restore_align_lmeds(case: Case, ctx: Context) -> list[Check]:
    template = case.array("const.face_template_512")
    sets = case.array("input.lm5_sets")
    affines = np.stack([align_affine(lm5, template) for lm5 in sets])
    inverses = np.stack([cv2.invertAffineTransform(a) * 2 for a in affines])
    checks = [max_abs("affine_lmeds", affines, case.array("out.affine_lmeds"), 1e-6)]
    if case.has("out.inverse_affine_x2"):
        checks.append(max_abs("inverse_affine_x2", inverses, case.array("out.inverse_affine_x2"), 1e-6))
    return checks


def _soft_mask_key(case: Case, face: int) -> str | None:
    return next((k for k in case.keys() if k.startswith(f"out.inv_soft_mask_face{face}_")), None)  # noqa: SIM118 - Case is not a mapping


def run_face_align_paste(case: Case, ctx: Context) -> list[Check]:
    image = case.array("input.image_bgr_u8")
    template = case.array("const.face_template_512") if case.has("const.face_template_512") else FFHQ_TEMPLATE_512
    upscale = float(case.meta.get("upscale", 2))
    h, w = image.shape[:2]
    size_wh = (round(w * upscale), round(h * upscale))
    background = upscale_background(image, size_wh)
    canvas = background.astype(np.float64)
    checks = []
    if case.has("out.background_lanczos_u8"):
        checks.append(exact("background_lanczos_u8", background, case.array("out.background_lanczos_u8")))
    for i in range(int(case.meta.get("num_faces", 1))):
        affine = align_affine(case.array(f"input.lm5_face{i}"), template)
        inverse = inverse_affine(affine, upscale)
        mask = parse_mask(case.array(f"input.parse_classes_face{i}_u8"))
        soft = warp_mask(mask, inverse, size_wh)
        canvas = paste_face(canvas, case.array(f"input.restored_face{i}_bgr_u8"), inverse, soft)
        values = {f"out.affine_face{i}": (affine, 1e-9), f"out.inverse_affine_face{i}": (inverse, 1e-9),
                  f"out.mask512_face{i}_f32": (mask, 1e-6)}
        checks += [max_abs(k, v, case.array(k).astype(np.float64), tol) for k, (v, tol) in values.items() if case.has(k)]
        crop_key = f"out.cropped_face{i}_bgr_u8"
        if case.has(crop_key):
            checks.append(exact(crop_key, warp_face(image, affine), case.array(crop_key)))
        soft_key = _soft_mask_key(case, i)
        if soft_key is not None:
            stored = case.array(soft_key)
            # A float16 copy carries its own rounding (half an ulp of float16 near 1 is 2.4e-4).
            tol = 1e-6 if stored.dtype == np.float32 else 5e-4
            checks.append(max_abs(soft_key, soft, stored.astype(np.float64), tol))
    checks.append(exact("final_bgr_u8", to_u8(canvas), case.array("out.final_bgr_u8")))
    return checks


class _Recorded:
    """Wraps a per-batch function and keeps what it returned (the intermediates upstream exposes)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]):
        self.fn, self.outputs = fn, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.fn(x)
        self.outputs.append(y)
        return y


def case_faces(case: Case, frame_bgr: np.ndarray, detector_path: Path):
    """The restore helper's faces in a GFPGANer case's frame, and the detector check where the case has one: the
    detector's raw outputs are fed when the case holds them (random weights never reach the 0.97 threshold)."""
    from xtalker.finish.enhance import DetectedFaces
    from xtalker.preprocess import FaceDetector, restore_helper_faces
    from xtalker.preprocess.face_detect import postprocess

    hw = frame_bgr.shape[:2]
    checks = []
    if case.has("input.det_loc"):
        dets = postprocess(case.array("input.det_loc"), case.array("input.det_conf"), case.array("input.det_landms"), hw)
    else:
        head = FaceDetector.from_file(detector_path).head_outputs([frame_bgr])[0]
        if case.has("out.det_conf"):
            checks.append(max_abs("det_conf", head.conf, case.array("out.det_conf").reshape(head.conf.shape), 1e-5))
        dets = postprocess(*head, hw)
    return DetectedFaces(*restore_helper_faces(dets)), checks


def run_gfpganer_enhance(case: Case, ctx: Context) -> list[Check]:
    from xtalker.finish.enhance import enhance_detected
    from xtalker.finish.restore import FACE_SIZE
    from xtalker.models.parsenet import load_parsenet, parse_classes

    frame = np.ascontiguousarray(case.array("input.frame_rgb_u8")[..., ::-1])
    h, w = frame.shape[:2]
    faces, checks = case_faces(case, frame, aux_file(ctx, RETINAFACE_FILE))
    net = _gfpgan(str(aux_file(ctx, GFPGAN_FILE)))
    parsenet = load_parsenet(aux_file(ctx, PARSENET_FILE))

    def restore(crops: np.ndarray) -> np.ndarray:
        # Upstream restores face after face, each drawing its noise from the global generator.
        with torch.inference_mode():
            return np.concatenate([
                postprocess_to_bgr_u8(net(preprocess_bgr_u8(crop[None]), draw_noise(1))).numpy() for crop in crops
            ])

    if "torch_noise_seed" in case.meta:
        torch.manual_seed(int(case.meta["torch_noise_seed"]))
    restorer = _Recorded(restore)
    parser = _Recorded(lambda faces_bgr: parse_classes(parsenet, faces_bgr))
    final = enhance_detected(frame, faces, restorer, parser)
    stored_faces = case.array("out.landmarks5") if case.has("out.landmarks5") else None
    if stored_faces is not None:
        checks.append(max_abs("landmarks5", faces.landmarks5, stored_faces, 1e-3))
    if case.has("out.det_faces"):
        checks.append(max_abs("det_faces", faces.det_faces, case.array("out.det_faces"), 1e-3))
    # A case without stored faces is one where no face passes (the no-face cases).
    expected_faces = int(case.meta.get("num_faces", 0 if stored_faces is None else len(stored_faces)))
    checks.append(exact("face count", np.array(len(faces.landmarks5)), np.array(expected_faces)))
    restored = restorer.outputs[0] if restorer.outputs else np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8)
    classes = parser.outputs[0] if parser.outputs else np.zeros((0, FACE_SIZE, FACE_SIZE), np.uint8)
    for i, lm5 in enumerate(faces.landmarks5):
        affine = align_affine(lm5)
        values = {f"out.affine_face{i}": (affine, 1e-6), f"out.inverse_affine_face{i}": (inverse_affine(affine), 1e-6)}
        checks += [max_abs(k, v, case.array(k), tol) for k, (v, tol) in values.items() if case.has(k)]
        images = {f"out.cropped_face{i}_bgr_u8": lambda k, a=affine: exact(k, warp_face(frame, a), case.array(k)),
                  f"out.restored_face{i}_bgr_u8": lambda k, i=i: levels(k, restored[i], case.array(k), 1, 1e-4),
                  f"out.parse_classes_face{i}_u8": lambda k, i=i: levels(k, classes[i], case.array(k), 255, 5e-3)}
        checks += [compare(k) for k, compare in images.items() if case.has(k)]
    expected_final = (case.array("out.final_bgr_u8") if case.has("out.final_bgr_u8")
                      else cv2.resize(frame, (2 * w, 2 * h), interpolation=cv2.INTER_LANCZOS4))
    checks.append(levels("final_bgr_u8", final, expected_final, 1, 5e-3))
    return checks


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "gfpgan_v14": run_gfpgan,
    "restore_align_lmeds": run_restore_align_lmeds,
    "face_align_paste": run_face_align_paste,
    "gfpganer_enhance": run_gfpganer_enhance,
}
