"""Parity runners for the PIRender renderer (`--facerender pirender`): the FaceGenerator alone, and SadTalker's
PIRender path end to end (73-channel windows, frame loop, uint8 frames with the padded ones kept).

The weights file (`weights_file` in the metadata, `epoch_00190_iteration_000400000_checkpoint.pt`) is taken from the
checkpoint folder when it is there, else the verified synthetic one (rule sadtalker-synth-v1-pirender) is written
beside the synthetic SadTalker files. Tolerances come from each case's metadata (the defaults below where it gives
none), image outputs scaled with the image size like every renderer output (`core.image_tolerances`); the uint8
bars, stated there in words, are those of reference README_extensions P.4.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from xtalker.models.pirender import FILE_NAME, Rendered
from xtalker.parity.cases_renderer import _angle_list, _target_checks
from xtalker.parity.core import IMAGE_TOLERANCE_SCALE, Case, Check, Context, image_tolerances, levels, max_abs, mean_abs
from xtalker.render import pirender, resize_to_original, source_image
from xtalker.render.inputs import batched_target
from xtalker.synthetic import default_cache_dir, ensure_pirender

# At 256, used where a case's metadata gives no number.
DEFAULT_TOLERANCE = {
    "descriptor": 3e-5,
    "flow_field": 2e-4,
    "deformation": 1e-5,
    "warp_image_max_abs": 5e-4,
    "warp_image_mean_abs": 5e-6,
    "fake_image_max_abs": 2e-4,
    "fake_image_mean_abs": 1e-5,
    "predictions_max_abs": 2e-4,
    "predictions_mean_abs": 1e-5,
}
FRAME_LEVELS = 1
FRAME_FRACTION = 0.001


def _tolerance(case: Case, name: str, default: str | None = None) -> float:
    value = (case.meta.get("tolerance") or {}).get(name)
    return float(value) if isinstance(value, (int, float)) else DEFAULT_TOLERANCE[default or name]


def _image_checks(case: Case, name: str, actual: torch.Tensor, expected: torch.Tensor, image_size: int) -> list[Check]:
    max_tol, mean_tol = _tolerance(case, f"{name}_max_abs"), _tolerance(case, f"{name}_mean_abs")
    if image_size in IMAGE_TOLERANCE_SCALE:
        max_tol, mean_tol = image_tolerances(max_tol, mean_tol, image_size)
    return [max_abs(name, actual, expected, max_tol), mean_abs(f"{name}_mean", actual, expected, mean_tol)]


def weights_file(case: Case, ctx: Context) -> Path:
    """The PIRender weights the case runs with (see the module docstring)."""
    name = case.meta.get("weights_file", FILE_NAME)
    if name != FILE_NAME:
        raise ValueError(f"case needs weights {name!r}; only {FILE_NAME} is known for PIRender")
    present = ctx.checkpoint_dir / FILE_NAME
    return present if present.is_file() else ensure_pirender(default_cache_dir())


@functools.lru_cache(maxsize=1)
def _renderer(path: str) -> pirender.PIRenderRenderer:
    return pirender.PIRenderRenderer.from_checkpoint(path)


def _image_size(case: Case, height_width: tuple[int, ...]) -> int:
    size = int(case.meta.get("image_size", height_width[-1]))
    if tuple(height_width) != (size, size):
        raise ValueError(f"source image is {tuple(height_width)} but the case says image_size {size}")
    return size


def _forward(renderer: pirender.PIRenderRenderer, sources_u8: np.ndarray, windows: torch.Tensor) -> Rendered:
    """Upstream's FaceGenerator call on (1 or B, S, S, 3) source images: one prepared source when they are all the
    same image (as SadTalker always calls it), else each window with its own image."""
    sources = sources_u8.reshape(-1, *sources_u8.shape[-3:])
    if all(np.array_equal(s, sources[0]) for s in sources[1:]):
        return renderer.net.render_all(renderer.prepare(source_image(sources[0])), windows)
    if len(sources) != windows.shape[0]:
        raise ValueError(f"{len(sources)} different source images for {windows.shape[0]} windows")
    parts = [renderer.net.render_all(renderer.prepare(source_image(s)), windows[i : i + 1]) for i, s in enumerate(sources)]
    return Rendered(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Rendered)))


def run_pirender_net(case: Case, ctx: Context) -> list[Check]:
    renderer = _renderer(str(weights_file(case, ctx)))
    sources = case.array("input.source_image_u8_nhwc")
    image_size = _image_size(case, sources.shape[-3:-1])
    out = _forward(renderer, sources, case.tensor("input.target_semantics"))
    checks = [
        max_abs("descriptor", out.descriptor, case.tensor("out.descriptor"), _tolerance(case, "descriptor")),
        max_abs("flow_field", out.flow_field, case.tensor("out.flow_field"), _tolerance(case, "flow_field")),
    ]
    for key in (k for k in case.keys() if k.startswith("out.deformation")):  # deformation_64 at 256, _128 at 512
        name = key.removeprefix("out.")
        checks.append(max_abs(name, out.deformation, case.tensor(key), _tolerance(case, name, "deformation")))
    for name in ("warp_image", "fake_image"):
        checks += _image_checks(case, name, getattr(out, name), case.tensor(f"out.{name}"), image_size)
    return checks


def run_pirender_render(case: Case, ctx: Context) -> list[Check]:
    m = case.meta
    first = case.array("input.first_coeff_3dmm")
    seq = pirender.driving_sequence(
        case.array("input.generated_coeff_3dmm"),
        first,
        still=bool(m.get("still", False)),
        expression_scale=float(m.get("expression_scale", 1.0)),
        input_yaw=_angle_list(m, "yaw"),
        input_pitch=_angle_list(m, "pitch"),
        input_roll=_angle_list(m, "roll"),
    )
    if m.get("frame_num") is not None and int(m["frame_num"]) != seq.num_frames:
        raise ValueError(f"metadata frame_num {m['frame_num']} != {seq.num_frames} generated coefficient rows")
    batch_size = int(m["batch_size"])
    target = batched_target(seq, batch_size)
    # Source window and keyframe paths: computed upstream (and checked here), never read by the renderer.
    checks = _target_checks(case, target, pirender.source_semantics(first))
    count = pirender.rendered_frame_count(seq.num_frames, batch_size)
    if m.get("frames_rendered") is not None and int(m["frames_rendered"]) != count:
        raise ValueError(f"metadata frames_rendered {m['frames_rendered']} != {count} (padded frames are kept)")
    image = source_image(case.array("input.source_png_rgb_u8"))
    image_size = _image_size(case, image.shape[-2:])
    renderer = _renderer(str(weights_file(case, ctx)))
    predictions = renderer.render_clip(image, target.semantics)
    if case.has("out.predictions"):
        checks += _image_checks(case, "predictions", predictions, case.tensor("out.predictions"), image_size)
    frames = pirender.to_frames(predictions.reshape(-1, *predictions.shape[2:]))
    if case.has("out.frames_u8"):
        checks.append(levels("frames_u8", frames, case.array("out.frames_u8"), FRAME_LEVELS, FRAME_FRACTION))
    size_wh = m.get("crop_info_original_size_wh")
    if case.has("out.frames_resized_u8") and size_wh:
        resized = resize_to_original(frames, (int(size_wh[0]), int(size_wh[1])))
        checks.append(levels("frames_resized_u8", resized, case.array("out.frames_resized_u8"), FRAME_LEVELS, FRAME_FRACTION))
    return checks


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "pirender_net": run_pirender_net,
    "pirender_render": run_pirender_render,
}
