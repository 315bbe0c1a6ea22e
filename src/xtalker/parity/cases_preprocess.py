"""Parity runners for source preprocessing: crop geometry, 5-point alignment + face recon, the recon net."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch

from xtalker.models.face_3drecon import COEFF_SLICES
from xtalker.parity.core import Case, Check, Context, exact, max_abs, max_rel
from xtalker.preprocess.align import align_face, coeff_rows, recon_input
from xtalker.preprocess.crop import CROP_OUTPUT_SIZE, apply_crop, crop_geometry, crop_info, resize_square

QUAD_ATOL = 1e-9
ALIGN_RTOL = 1e-6
LM_ALIGNED_ATOL = 1e-4  # px on the 224 grid: what a 1e-6 relative change of the fit moves
RECON_INPUT_ATOL = 1e-7  # at most 1 float32 ulp below 1.0
COEFF_ATOL = 1e-4

_RESIZED_KEY = re.compile(r"^out\.cropped_resized(\d+)_rgb_u8$")


def _pic_size(case: Case, key: str) -> int:
    for name in ("pic_size", "size", "resize_to"):
        if name in case.meta:
            return int(case.meta[name])
    match = _RESIZED_KEY.match(key)
    if match is None:
        raise ValueError(f"{case.name}: cannot tell the resize size from {key}")
    return int(match.group(1))


def run_crop_align_face(case: Case, ctx: Context) -> list[Check]:
    image = case.array("input.image_rgb_u8")
    h, w = image.shape[:2]
    extended = bool(case.meta.get("still_ext_crop", False))
    geometry = crop_geometry(case.array("input.lm68_xy"), (w, h), int(case.meta.get("output_size", CROP_OUTPUT_SIZE)))
    cropped = apply_crop(image, geometry, extended=extended)
    info = crop_info(geometry)
    checks = [
        exact("rsize_wh", np.array(geometry.rsize), case.array("out.rsize_wh")),
        exact("crop_xyxy", np.array(geometry.crop), case.array("out.crop_xyxy")),
        max_abs("quad_lx_ly_rx_ry", np.array(geometry.quad), case.array("out.quad_lx_ly_rx_ry"), QUAD_ATOL),
        exact("crop_info_size_wh", np.array(info.size), case.array("out.crop_info_size_wh")),
        exact("paste_box_oy1_oy2_ox1_ox2", np.array(info.paste_box()), case.array("out.paste_box_oy1_oy2_ox1_ox2")),
        exact("cropped_shape_hwc", np.array(cropped.shape), case.array("out.cropped_shape_hwc")),
    ]
    for key in case.keys():
        if _RESIZED_KEY.match(key):
            resized = resize_square(cropped, _pic_size(case, key))
            checks.append(exact(key.removeprefix("out."), resized, case.array(key)))
    return checks


def run_preprocess_align_recon(case: Case, ctx: Context) -> list[Check]:
    keys = set(case.keys())
    al = align_face(case.array("input.image_rgb_u8"), case.array("input.lm68_xy"))
    checks = [
        max_abs("lm68_yflipped", al.lm68_flipped, case.array("out.lm68_yflipped"), 0.0),
        max_rel("lm5p", al.lm5p, case.array("out.lm5p"), ALIGN_RTOL),
        max_rel("pos_t", al.pos_t, case.array("out.pos_t"), ALIGN_RTOL),
        max_rel("pos_s", np.array([al.pos_s]), case.array("out.pos_s"), ALIGN_RTOL),
        max_rel("trans_params_f64", al.trans_params, case.array("out.trans_params_f64"), ALIGN_RTOL),
        exact("aligned224_rgb_u8", al.image, case.array("out.aligned224_rgb_u8")),
        max_abs("lm68_aligned", al.lm68_aligned, case.array("out.lm68_aligned"), LM_ALIGNED_ATOL),
    ]
    if "out.trans_params_f32" in keys:
        f32 = al.trans_params.astype(np.float32)
        checks.append(max_rel("trans_params_f32", f32, case.array("out.trans_params_f32"), ALIGN_RTOL))
    x = recon_input([al.image])
    if "out.recon_input" in keys:
        checks.append(max_abs("recon_input", x, case.array("out.recon_input"), RECON_INPUT_ATOL))
    net = ctx.network("face_3drecon", ctx.packed_file(case))
    with torch.inference_mode():
        out = net(x)
    if "out.recon_output_257" in keys:
        checks.append(max_abs("recon_output_257", out, case.array("out.recon_output_257"), COEFF_ATOL))
    if "out.coeff_3dmm_73" in keys:
        row = coeff_rows(out, al.trans_params[None])
        expected = case.array("out.coeff_3dmm_73")
        checks.append(max_abs("coeff_3dmm_73[:70]", row[:, :70], expected[:, :70], COEFF_ATOL))
        checks.append(max_rel("coeff_3dmm_73[70:]", row[:, 70:], expected[:, 70:], ALIGN_RTOL))
    return checks


def run_net_recon(case: Case, ctx: Context) -> list[Check]:
    # Network input per the case's `input` note (README section 3): float32(u8) * float32(1/255), NCHW.
    u8 = case.tensor("input.image_u8_nhwc")
    x = (u8.to(torch.float32) * torch.tensor(1 / 255, dtype=torch.float32)).permute(0, 3, 1, 2).contiguous()
    net = ctx.network("face_3drecon", ctx.packed_file(case))
    with torch.inference_mode():
        out = net(x)
    keys = set(case.keys())
    checks = [max_abs("coeff_257", out, case.array("out.coeff_257"), COEFF_ATOL)]
    for name, sl in COEFF_SLICES.items():
        if f"out.{name}" in keys:
            checks.append(max_abs(name, out[:, sl], case.array(f"out.{name}"), COEFF_ATOL))
    return checks


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "crop_align_face": run_crop_align_face,
    "preprocess_align_recon": run_preprocess_align_recon,
    "net_recon": run_net_recon,
}
