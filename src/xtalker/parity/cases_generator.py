"""Parity runners for the renderer's big networks: KPDetector ("kp_detector") and the generator ("generator")."""

from __future__ import annotations

from typing import Callable

import torch

from xtalker.parity.core import Case, Check, Context, image_tolerances, max_abs, mean_abs


def image_from_u8(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW as upstream's loader: float32(u8) * float32(1/255)."""
    scaled = images.to(torch.float32) * torch.tensor(1 / 255, dtype=torch.float32)
    return scaled.permute(0, 3, 1, 2).contiguous()


def _input_image(case: Case, key: str) -> torch.Tensor:
    image = image_from_u8(case.tensor(key))
    size = int(case.meta.get("image_size", image.shape[-1]))
    if tuple(image.shape[-2:]) != (size, size):
        raise ValueError(f"{key} is {tuple(image.shape)} but the case says image_size {size}")
    return image


def _present(case: Case, checks: list[tuple[str, Callable[[str], list[Check]]]]) -> list[Check]:
    """Run the comparisons whose golden output exists in this case (hidden cases may omit intermediates)."""
    keys = set(case.keys())
    return [c for key, compare in checks if key in keys for c in compare(key)]


def run_kp_detector(case: Case, ctx: Context) -> list[Check]:
    net = ctx.network("kp_extractor", ctx.packed_file(case))
    image = _input_image(case, "input.image_u8_nhwc")
    down = net.antialias_down(image)
    kp = net(image)
    return _present(
        case,
        [
            ("out.antialias_down", lambda k: [max_abs("antialias_down", down, case.tensor(k), 1e-6)]),
            ("out.kp_canonical", lambda k: [max_abs("kp_canonical", kp, case.tensor(k), 1e-5)]),
        ],
    )


def run_generator(case: Case, ctx: Context) -> list[Check]:
    net = ctx.network("generator", ctx.packed_file(case))
    source = _input_image(case, "input.source_image_u8_nhwc")
    out = net(source, case.tensor("input.kp_source"), case.tensor("input.kp_driving"))

    def compare(name: str, max_tol: float, mean_tol: float | None = None) -> Callable[[str], list[Check]]:
        def run(key: str) -> list[Check]:
            expected = case.tensor(key)
            checks = [max_abs(name, out[name], expected, max_tol)]
            if mean_tol is not None:
                checks.append(mean_abs(name + " (mean)", out[name], expected, mean_tol))
            return checks

        return run

    return _present(
        case,
        [
            ("out.prediction", compare("prediction", *image_tolerances(1e-4, 1e-5, int(source.shape[-1])))),
            ("out.occlusion_map", compare("occlusion_map", 2e-5)),
            ("out.deformation", compare("deformation", 1e-4)),
            # Stored before the < 1e-3 cut, so entries near the cut compare like any other.
            ("out.mask", compare("mask", 1e-5)),
        ],
    )


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "kp_detector": run_kp_detector,
    "generator": run_generator,
}
