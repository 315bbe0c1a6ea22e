"""Precision switch: which parts of the renderer run in bfloat16, and how close bf16 frames stay to float32.

Runs at S = 128 with the 256 weights (the networks are size-agnostic) and the bundled portrait.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from xtalker.checkpoints import load_network, mapping_file_name, packed_file_name
from xtalker.render import Renderer, driving_sequence, source_image, source_semantics
from xtalker.render.precision import BF16_PARTS, check_precision, generator_precision, prepare_generator

PORTRAIT = Path(__file__).resolve().parents[1] / "examples" / "source_image" / "astronaut.png"
MIN_PSNR_DB = 42.0  # measured 47 dB at 128 px (45-47 dB at 256 on the golden inputs)


@pytest.fixture(scope="module")
def bf16_renderer(synthetic_checkpoints) -> Renderer:
    return Renderer.from_checkpoints(
        synthetic_checkpoints / packed_file_name(256), synthetic_checkpoints / mapping_file_name(70), precision="bf16"
    )


def portrait(size: int) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    side = min(rgb.shape[:2])
    return source_image(cv2.resize(rgb[:side, :side], (size, size), interpolation=cv2.INTER_AREA))


def float_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in module.state_dict().values() if t.is_floating_point()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse)).tolist()


def test_unknown_precision_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="fp32, bf16, fp16, int8"):
        Renderer.from_checkpoints(tmp_path / "missing.safetensors", tmp_path / "missing.pth.tar", precision="fp64")
    assert check_precision("bf16") == "bf16"


def test_bf16_touches_only_the_generator_per_frame_stacks(bf16_renderer):
    assert bf16_renderer.precision == "bf16"
    gen = bf16_renderer.generator
    for name in BF16_PARTS:
        assert float_dtypes(gen.get_submodule(name)) == {torch.bfloat16}
    kept = [
        bf16_renderer.kp_detector, bf16_renderer.mapping, gen.first, gen.down_blocks, gen.second, gen.resblocks_3d,
        gen.third, gen.fourth, gen.dense_motion_network.compress, gen.dense_motion_network.occlusion,
    ]
    for module in kept:
        assert float_dtypes(module) == {torch.float32}


@torch.inference_mode()
def test_bf16_frames_stay_close_to_fp32(bf16_renderer, synthetic_checkpoints):
    fp32_gen = load_network("generator", synthetic_checkpoints / packed_file_name(256))
    assert prepare_generator(fp32_gen, "fp32") is fp32_gen and generator_precision(fp32_gen) == "fp32"
    fp32 = Renderer(bf16_renderer.kp_detector, fp32_gen, bf16_renderer.mapping)
    rng = np.random.default_rng(0)
    src = rng.standard_normal((1, 73)).astype(np.float32) * 0.3
    windows = driving_sequence(rng.standard_normal((2, 70)).astype(np.float32) * 0.3, src).windows(0, 2)
    image = portrait(128)
    source = bf16_renderer.prepare(image, source_semantics(src, "crop"))
    reference = fp32.prepare(image, source_semantics(src, "crop"))
    # Source work stays float32: identical keypoints and features.
    assert source.kp_source.dtype == torch.float32 and source.features.volume.dtype == torch.float32
    torch.testing.assert_close(source.features.volume, reference.features.volume, rtol=0, atol=0)
    torch.testing.assert_close(source.kp_source, reference.kp_source, rtol=0, atol=0)
    fast, exact = bf16_renderer.render(source, windows), fp32.render(reference, windows)
    assert fast.dtype == torch.float32 and fast.shape == (2, 3, 128, 128)
    assert min(psnr(fast, exact)) > MIN_PSNR_DB
    assert float((fast - exact).abs().max()) > 0  # really a different computation


def test_keep_freed_memory_applies_on_glibc():
    # Process-wide malloc setting: checked in a child process.
    code = "from xtalker.render.precision import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("True" if sys.platform.startswith("linux") else "False")
