"""Parity runners for the face renderer: mapping net, keypoint transformation, renderer inputs, end to end."""

from __future__ import annotations

from typing import Callable

import numpy as np

from xtalker.checkpoints import coeff_channels
from xtalker.models.mapping import HeadPose
from xtalker.parity.core import Case, Check, Context, image_tolerances, levels, max_abs, mean_abs, ulps
from xtalker.render import Renderer, driving_sequence, resize_to_original, source_image, source_semantics, to_uint8
from xtalker.render.inputs import BatchedTarget, batched_target
from xtalker.render.keypoints import logits_to_degrees, pose_degrees, rotation_matrix, transform_keypoints

ANGLES = ("yaw", "pitch", "roll")
HEADS = ("yaw", "pitch", "roll", "t", "exp")
LOGITS_ATOL = 1e-5
DEGREES_ATOL = 1e-4
KP_ATOL = 1e-5
PRED_MAX_ATOL = 2e-4  # at 256; scaled with the image size
PRED_MEAN_ATOL = 2e-5
FRAME_LEVELS = 1
FRAME_FRACTION = 0.005


def _angle_list(meta: dict, name: str) -> list[float] | None:
    value = meta.get(f"input_{name}")
    if value is None:
        return None
    return [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _target(case: Case) -> BatchedTarget:
    m = case.meta
    seq = driving_sequence(
        case.array("input.generated_coeff_3dmm"),
        case.array("input.first_coeff_3dmm"),
        preprocess=str(m.get("preprocess", "crop")),
        still=bool(m.get("still", False)),
        expression_scale=float(m.get("expression_scale", 1.0)),
        input_yaw=_angle_list(m, "yaw"),
        input_pitch=_angle_list(m, "pitch"),
        input_roll=_angle_list(m, "roll"),
    )
    frame_num = m.get("frame_num")
    if frame_num is not None and int(frame_num) != seq.num_frames:
        raise ValueError(f"metadata frame_num {frame_num} != {seq.num_frames} generated coefficient rows")
    return batched_target(seq, int(m["batch_size"]))


def _source_semantics(case: Case) -> np.ndarray:
    return source_semantics(case.array("input.first_coeff_3dmm"), str(case.meta.get("preprocess", "crop")))


def _target_checks(case: Case, target: BatchedTarget, src: np.ndarray) -> list[Check]:
    checks = [
        ulps("source_semantics_row0", src, case.array("out.source_semantics_row0")),
        ulps("target_semantics", target.semantics, case.array("out.target_semantics")),
    ]
    for name, seq in zip(ANGLES, (target.yaw, target.pitch, target.roll)):
        key = f"out.{name}_c_seq"
        if case.has(key):
            checks.append(ulps(f"{name}_c_seq", np.zeros(0) if seq is None else seq, case.array(key)))
    return checks


def run_mapping(case: Case, ctx: Context) -> list[Check]:
    semantics = case.tensor("input.semantics")
    coeff_nc = int(semantics.shape[1])
    net = ctx.network("mapping", ctx.mapping_file(case, coeff_nc))
    pose = net(semantics)
    checks = [max_abs(h, getattr(pose, h), case.tensor(f"out.{h}"), LOGITS_ATOL) for h in HEADS]
    checks += [
        max_abs(f"{a}_deg", logits_to_degrees(getattr(pose, a)), case.tensor(f"out.{a}_deg"), DEGREES_ATOL)
        for a in ANGLES
    ]
    return checks


def run_keypoint_transformation(case: Case, ctx: Context) -> list[Check]:
    pose = HeadPose(**{h: case.tensor(f"input.he_{h}") for h in HEADS})
    overrides = {
        f"{a}_deg": case.tensor(f"input.{a}_in_deg") if case.has(f"input.{a}_in_deg") else None for a in ANGLES
    }
    kp = transform_keypoints(case.tensor("input.kp_canonical"), pose, **overrides)
    deg = pose_degrees(pose, **overrides)
    checks = [
        max_abs(f"{a}_deg", logits_to_degrees(getattr(pose, a)), case.tensor(f"out.{a}_deg"), DEGREES_ATOL)
        for a in ANGLES
    ]
    checks.append(max_abs("rot_mat", rotation_matrix(deg.yaw, deg.pitch, deg.roll), case.tensor("out.rot_mat"), KP_ATOL))
    checks.append(max_abs("kp", kp, case.tensor("out.kp"), KP_ATOL))
    return checks


def run_facerender_batch(case: Case, ctx: Context) -> list[Check]:
    return _target_checks(case, _target(case), _source_semantics(case))


def run_make_animation(case: Case, ctx: Context) -> list[Check]:
    m = case.meta
    target = _target(case)
    src = _source_semantics(case)
    checks = _target_checks(case, target, src)
    packed = ctx.packed_file(case)
    renderer = Renderer(
        kp_detector=ctx.network("kp_extractor", packed),
        generator=ctx.network("generator", packed),
        mapping=ctx.network("mapping", ctx.mapping_file(case, coeff_channels(str(m.get("preprocess", "crop"))))),
    )
    b, n = target.semantics.shape[:2]
    # Render the padded tail too: the stored predictions keep it.
    source_png = case.array("input.source_png_rgb_u8")
    image_size = int(m.get("image_size", source_png.shape[0]))
    if source_png.shape[:2] != (image_size, image_size):
        raise ValueError(f"input.source_png_rgb_u8 is {source_png.shape} but the case says image_size {image_size}")
    frames = renderer.make_animation(source_image(source_png), src, target.semantics, b * n, target.yaw, target.pitch, target.roll)
    if case.has("out.predictions"):
        expected = case.tensor("out.predictions")
        predictions = frames.reshape(b, n, *frames.shape[1:])
        max_tol, mean_tol = image_tolerances(PRED_MAX_ATOL, PRED_MEAN_ATOL, image_size)
        checks.append(max_abs("predictions", predictions, expected, max_tol))
        checks.append(mean_abs("predictions_mean", predictions, expected, mean_tol))
    frames_u8 = to_uint8(frames[: target.num_frames])
    if case.has("out.frames_u8"):
        checks.append(levels("frames_u8", frames_u8, case.array("out.frames_u8"), FRAME_LEVELS, FRAME_FRACTION))
    size_wh = m.get("crop_info_original_size_wh")
    if case.has("out.frames_resized_u8") and size_wh:
        resized = resize_to_original(frames_u8, (int(size_wh[0]), int(size_wh[1])))
        checks.append(levels("frames_resized_u8", resized, case.array("out.frames_resized_u8"), FRAME_LEVELS, FRAME_FRACTION))
    return checks


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "mapping": run_mapping,
    "keypoint_transformation": run_keypoint_transformation,
    "facerender_batch": run_facerender_batch,
    "make_animation": run_make_animation,
}
