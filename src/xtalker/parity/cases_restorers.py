"""Parity runners for the optional restorers: RestoreFormer, the RealESRGAN x2plus RRDBNet, RealESRGANer's tiled
enhance, and GFPGANer.enhance with RestoreFormer and the RealESRGAN background upsampler.

The restorer files are not among the files the Context knows, so a runner takes each file (`weights_files` in the
metadata) from the checkpoint folder when it is there and otherwise writes the verified synthetic file (rule
sadtalker-synth-v1-restorers) into the synthetic aux cache (`xtalker.synthetic.default_aux_dir`), beside the aux
files (rule sadtalker-synth-v1-aux) the enhance case also needs. Sizes, tiles and flags come from the metadata.
Tolerances are those of the reference (README_restorers 7.4).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from xtalker.finish.background import BackgroundUpsampler, paste_canvas
from xtalker.models.gfpgan import postprocess_to_bgr_u8, preprocess_bgr_u8
from xtalker.models.restoreformer import FILE_NAME as RESTOREFORMER_FILE
from xtalker.models.restoreformer import RestoreFormer, fast_plan, load_restoreformer, restore_bgr_u8
from xtalker.models.rrdbnet import FILE_NAME as REALESRGAN_FILE
from xtalker.models.rrdbnet import RealESRGANer, RRDBNet, load_rrdbnet
from xtalker.parity.cases_aux import _Recorded, aux_file, case_faces
from xtalker.parity.core import Case, Check, Context, exact, levels, max_abs, mean_abs
from xtalker.synthetic import default_aux_dir
from xtalker.synthetic.restorers import FILES as RESTORER_FILES
from xtalker.synthetic.restorers import ensure_restorer

# README_restorers 7.4.
RESTOREFORMER_TOL = {"image": 3e-5, "image_mean": 4e-6, "z": 5e-5, "z_q": 3e-6, "gap": 3e-4, "features": 2e-4}
RESTORED_LEVELS = (1, 5e-4)
RRDB_TOL = {"output": 5e-6, "output_mean": 1e-6, "body": 1e-3, "body_mean": 6e-5}
TILE_FLOAT_TOL = 5e-6
TILE_LEVELS = (1, 1e-3)
ENHANCE_TOL = {"landmarks": 1e-3, "affine": 1e-6, "parse_fraction": 2e-3, "background": (1, 1e-3), "final": (1, 1e-2)}


def restorer_file(ctx: Context, file_name: str) -> Path:
    """The weight file `file_name` the cases run with (see the module docstring)."""
    present = ctx.checkpoint_dir / file_name
    if present.is_file():
        return present
    if file_name in RESTORER_FILES:
        return ensure_restorer(default_aux_dir(), file_name)
    return aux_file(ctx, file_name)


def _check_weights(case: Case, known: tuple[str, ...]) -> None:
    unknown = [f for f in case.meta.get("weights_files", []) if f not in known]
    if unknown:
        raise ValueError(f"case needs weights {unknown}; this runner knows {', '.join(known)}")


def _check_fp32(meta: dict) -> None:
    if meta.get("half"):
        raise ValueError("case was computed with half=True (fp16 on CUDA); only float32 cases are compared")


@functools.lru_cache(maxsize=1)
def _restoreformer(path: str) -> RestoreFormer:
    return load_restoreformer(path)


@functools.lru_cache(maxsize=1)
def _rrdbnet(path: str) -> RRDBNet:
    return load_rrdbnet(path)


def run_restoreformer(case: Case, ctx: Context) -> list[Check]:
    _check_weights(case, (RESTOREFORMER_FILE,))
    net = _restoreformer(str(restorer_file(ctx, RESTOREFORMER_FILE)))
    crops = case.tensor("input.cropped_face_bgr_u8")
    single = crops.dim() == 3  # one HWC crop, or a batch of them
    x = preprocess_bgr_u8(crops.unsqueeze(0) if single else crops)
    ref = net.intermediates(x)
    # The enhancer runs the fast plan: it must meet the same bar.
    fast = fast_plan(net, "fp32").restore(x)
    restored = postprocess_to_bgr_u8(fast)
    restored = restored[0] if single else restored
    tol = RESTOREFORMER_TOL

    def per_position(name: str, ours: torch.Tensor, k: str, atol: float | None) -> Check:
        expected = case.tensor(k)
        ours = ours.reshape(expected.shape)
        return exact(name, ours, expected) if atol is None else max_abs(name, ours, expected, atol)

    outputs: dict[str, Callable[[str], list[Check]]] = {
        "out.image": lambda k: [
            max_abs("image", ref.image, case.tensor(k), tol["image"]),
            mean_abs("image (mean)", ref.image, case.tensor(k), tol["image_mean"]),
            max_abs("image (fast plan)", fast, case.tensor(k), tol["image"]),
            mean_abs("image (fast plan, mean)", fast, case.tensor(k), tol["image_mean"]),
        ],
        "out.restored_face_bgr_u8": lambda k: [
            levels("restored_face_bgr_u8 (fast plan)", restored, case.tensor(k), *RESTORED_LEVELS)
        ],
        "out.z_quant_conv": lambda k: [max_abs("z_quant_conv", ref.z, case.tensor(k), tol["z"])],
        "out.vq_indices_i64": lambda k: [per_position("vq_indices", ref.quantized.indices, k, None)],
        "out.vq_top2_gap_f32": lambda k: [per_position("vq_top2_gap", ref.quantized.gap, k, tol["gap"])],
        "out.z_q": lambda k: [max_abs("z_q", ref.quantized.z_q, case.tensor(k), tol["z_q"])],
        "out.enc_block_5_atten": lambda k: [
            max_abs("enc_block_5_atten", ref.features.f16a, case.tensor(k), tol["features"])
        ],
        "out.enc_mid_atten": lambda k: [max_abs("enc_mid_atten", ref.features.f16b, case.tensor(k), tol["features"])],
    }
    keys = set(case.keys())
    return [c for key, compare in outputs.items() if key in keys for c in compare(key)]


def _rgb_input(u8: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3) RGB uint8 -> (B, 3, H, W) float32(u8) / 255 (a float32 division)."""
    x = u8.unsqueeze(0) if u8.dim() == 3 else u8
    return (x.to(torch.float32) / torch.tensor(255.0, dtype=torch.float32)).permute(0, 3, 1, 2).contiguous()


def run_rrdbnet_x2plus(case: Case, ctx: Context) -> list[Check]:
    _check_weights(case, (REALESRGAN_FILE,))
    _check_fp32(case.meta)
    if int(case.meta.get("scale", 2)) != 2:
        raise ValueError(f"case has scale {case.meta['scale']}; only the x2plus network (scale 2) is implemented")
    net = _rrdbnet(str(restorer_file(ctx, REALESRGAN_FILE)))
    x = _rgb_input(case.tensor("input.image_rgb_u8"))
    feat, body = net.trunk(x)
    output = net.head(feat, body)
    checks = []
    if case.has("out.output"):
        expected = case.tensor("out.output").reshape(output.shape)
        checks += [max_abs("output", output, expected, RRDB_TOL["output"]),
                   mean_abs("output (mean)", output, expected, RRDB_TOL["output_mean"])]
    if case.has("out.body_out"):
        expected = case.tensor("out.body_out").reshape(body.shape)
        checks += [max_abs("body_out", body, expected, RRDB_TOL["body"]),
                   mean_abs("body_out (mean)", body, expected, RRDB_TOL["body_mean"])]
    return checks


def _upsampler_settings(meta: dict) -> tuple[int, int, int, float]:
    """(tile, tile_pad, pre_pad, outscale) of a case: the top-level flags, or the `bg_upsampler` entry."""
    flags = meta.get("bg_upsampler") if isinstance(meta.get("bg_upsampler"), dict) else meta
    _check_fp32(flags)
    if int(flags.get("scale", 2)) != 2:
        raise ValueError(f"case has scale {flags['scale']}; only the x2plus network (scale 2) is implemented")
    return (int(flags.get("tile", 0)), int(flags.get("tile_pad", 10)), int(flags.get("pre_pad", 10)),
            float(flags.get("outscale", 2)))


def run_realesrganer_tile(case: Case, ctx: Context) -> list[Check]:
    _check_weights(case, (REALESRGAN_FILE,))
    tile, tile_pad, pre_pad, outscale = _upsampler_settings(case.meta)
    net = _rrdbnet(str(restorer_file(ctx, REALESRGAN_FILE)))
    result = RealESRGANer(net, tile, tile_pad, pre_pad).enhance(case.array("input.image_bgr_u8"), outscale)
    checks = []
    if case.has("out.tile_boxes_i64"):
        boxes = np.array([t.row() for t in result.tiles], dtype=np.int64)
        checks.append(exact("tile_boxes", boxes, case.array("out.tile_boxes_i64")))
    if case.has("out.output_bgr_f32"):
        checks.append(max_abs("output_bgr_f32", result.float_bgr, case.array("out.output_bgr_f32"), TILE_FLOAT_TOL))
    checks.append(levels("output_bgr_u8", result.image, case.array("out.output_bgr_u8"), *TILE_LEVELS))
    return checks


def run_gfpganer_bg(case: Case, ctx: Context) -> list[Check]:
    from xtalker.finish.enhance import PARSENET_FILE, RETINAFACE_FILE, enhance_detected
    from xtalker.finish.restore import FACE_SIZE, align_affine, inverse_affine, warp_face
    from xtalker.models.parsenet import load_parsenet, parse_classes

    meta = case.meta
    arch = str(meta.get("arch", "RestoreFormer"))
    if arch != "RestoreFormer":
        raise ValueError(f"case uses arch {arch!r}; the gfpganer_bg runner restores with RestoreFormer")
    _check_weights(case, (RESTOREFORMER_FILE, REALESRGAN_FILE, RETINAFACE_FILE, PARSENET_FILE))
    upscale = int(meta.get("upscale", 2))
    frame = np.ascontiguousarray(case.array("input.frame_rgb_u8")[..., ::-1])
    h, w = frame.shape[:2]
    faces, checks = case_faces(case, frame, restorer_file(ctx, RETINAFACE_FILE))
    net = _restoreformer(str(restorer_file(ctx, RESTOREFORMER_FILE)))
    parsenet = load_parsenet(restorer_file(ctx, PARSENET_FILE))
    tile, tile_pad, pre_pad, outscale = _upsampler_settings(meta)
    if outscale != upscale:
        raise ValueError(f"case has bg outscale {outscale} != upscale {upscale}; GFPGANer passes outscale=upscale")
    background = BackgroundUpsampler(net=_rrdbnet(str(restorer_file(ctx, REALESRGAN_FILE))), tile=tile,
                                     tile_pad=tile_pad, pre_pad=pre_pad)
    restorer = _Recorded(lambda crops: restore_bgr_u8(net, crops))
    parser = _Recorded(lambda faces_bgr: parse_classes(parsenet, faces_bgr))
    bg = _Recorded(background.upsample)
    final = enhance_detected(frame, faces, restorer, parser, upscale, background=lambda f, wh: paste_canvas(bg(f), wh))
    tol = ENHANCE_TOL
    stored_faces = case.array("out.landmarks5") if case.has("out.landmarks5") else None
    if stored_faces is not None:
        checks.append(max_abs("landmarks5", faces.landmarks5, stored_faces, tol["landmarks"]))
    if case.has("out.det_faces"):
        checks.append(max_abs("det_faces", faces.det_faces, case.array("out.det_faces"), tol["landmarks"]))
    expected_faces = int(meta.get("num_faces", 0 if stored_faces is None else len(stored_faces)))
    checks.append(exact("face count", np.array(len(faces.landmarks5)), np.array(expected_faces)))
    restored = restorer.outputs[0] if restorer.outputs else np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8)
    classes = parser.outputs[0] if parser.outputs else np.zeros((0, FACE_SIZE, FACE_SIZE), np.uint8)
    for i, lm5 in enumerate(faces.landmarks5):
        affine = align_affine(lm5)
        values = {f"out.affine_face{i}": (affine, tol["affine"]),
                  f"out.inverse_affine_face{i}": (inverse_affine(affine, upscale), tol["affine"])}
        checks += [max_abs(k, v, case.array(k), t) for k, (v, t) in values.items() if case.has(k)]
        images = {f"out.cropped_face{i}_bgr_u8": lambda k, a=affine: exact(k, warp_face(frame, a), case.array(k)),
                  f"out.restored_face{i}_bgr_u8": lambda k, i=i: levels(k, restored[i], case.array(k),
                                                                        *RESTORED_LEVELS),
                  f"out.parse_classes_face{i}_u8": lambda k, i=i: levels(k, classes[i], case.array(k), 255,
                                                                         tol["parse_fraction"])}
        checks += [compare(k) for k, compare in images.items() if case.has(k)]
    if case.has("out.bg_upsampled_bgr_u8"):
        checks.append(levels("bg_upsampled_bgr_u8", bg.outputs[0], case.array("out.bg_upsampled_bgr_u8"),
                             *tol["background"]))
    checks.append(levels("final_bgr_u8", final, case.array("out.final_bgr_u8"), *tol["final"]))
    return checks


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "restoreformer": run_restoreformer,
    "rrdbnet_x2plus": run_rrdbnet_x2plus,
    "realesrganer_tile": run_realesrganer_tile,
    "gfpganer_bg": run_gfpganer_bg,
}
