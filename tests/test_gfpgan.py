"""GFPGAN v1.4: official file layout, synthetic weights by rule, clear loader errors, batching, golden parity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import golden_dir

from xtalker.models.gfpgan import (
    NOISE_SIZES,
    GFPGANv1Clean,
    _conv_upsampled,
    _up_kernel,
    _winograd_conv,
    _winograd_kernel,
    check_state,
    draw_noise,
    fast_plan,
    load_gfpgan,
    official_layout,
    postprocess_to_bgr_u8,
    preprocess_bgr_u8,
)
from xtalker.parity.cases_aux import RUNNERS
from xtalker.parity.core import Case, Context
from xtalker.synthetic.auxiliary import aux_layout
from xtalker.synthetic.sadtalker import content_digest

USED_PARAMETERS = 84_339_239  # aux spec 3.1: 86,444,252 minus style MLP and toRGB heads
AUX_MANIFEST = golden_dir().parent / "aux_manifest.json"


@pytest.fixture(scope="module")
def gfpgan_path(aux_checkpoints) -> Path:
    return aux_checkpoints / "GFPGANv1.4.pth"


@pytest.fixture(scope="module")
def net(gfpgan_path) -> GFPGANv1Clean:
    return load_gfpgan(gfpgan_path)


def test_layout_matches_manifest():
    if not AUX_MANIFEST.is_file():
        pytest.skip(f"{AUX_MANIFEST} not present")
    manifest = json.loads(AUX_MANIFEST.read_text())["files"]["GFPGANv1.4.pth"]["tensors"]["params_ema"]
    assert official_layout() == {k: tuple(v["shape"]) for k, v in manifest.items()}
    assert len(official_layout()) == 285


def test_synthetic_file_follows_rule(gfpgan_path):
    top = torch.load(str(gfpgan_path), map_location="cpu", weights_only=True)
    assert list(top) == ["params_ema"]
    assert content_digest(top["params_ema"], "params_ema/") == aux_layout()["GFPGANv1.4.pth"]["digest"]


def test_loader_builds_used_network(net):
    assert not net.training
    assert sum(p.numel() for p in net.parameters()) == USED_PARAMETERS
    assert not any(k.startswith(("toRGB.", "stylegan_decoder.style_mlp.", "stylegan_decoder.noises.")) for k in net.state_dict())


def test_wrong_keys_give_clear_error(tmp_path):
    bad = tmp_path / "not_gfpgan.pth"
    torch.save({"params": {"conv_body_first.weights": torch.zeros(32, 3, 1, 1)}}, bad)
    with pytest.raises(ValueError, match=r"not_gfpgan\.pth \[params\].*missing: .*unexpected: conv_body_first\.weights"):
        load_gfpgan(bad)
    flat = tmp_path / "flat.pth"
    torch.save({"conv_body_first.weight": torch.zeros(32, 3, 1, 1)}, flat)
    with pytest.raises(ValueError, match=r"flat\.pth: no 'params_ema' or 'params' state dict"):
        load_gfpgan(flat)


def test_wrong_shape_is_named():
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in official_layout().items()}
        state["final_linear.weight"] = torch.empty(8192, 2048)
    with pytest.raises(ValueError, match=r"somefile: .*wrong shape: final_linear\.weight \(8192, 2048\) != \(8192, 4096\)"):
        check_state(state, "somefile")


def test_pre_and_post_processing():
    crop = torch.zeros(1, 512, 512, 3, dtype=torch.uint8)
    crop[..., 0] = 255  # blue in BGR
    x = preprocess_bgr_u8(crop)
    assert x.shape == (1, 3, 512, 512) and x.dtype == torch.float32
    assert torch.equal(x[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    image = torch.tensor([-2.0, 0.0, 1.0]).view(1, 3, 1, 1)  # R clamped to 0; G = 127.5 rounds half to even
    assert postprocess_to_bgr_u8(image).tolist() == [[[[255, 128, 0]]]]


@pytest.fixture(scope="module")
def smooth_batch() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Two face-like inputs (smooth random images in [-1, 1]) and their noise maps."""
    g = torch.Generator().manual_seed(11)
    coarse = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    x = F.interpolate(coarse, size=(512, 512), mode="bicubic", align_corners=False).clamp(-1, 1)
    return x, draw_noise(2, torch.Generator().manual_seed(12))


@pytest.fixture(scope="module")
def reference_pair(net, smooth_batch) -> torch.Tensor:
    """The reference forward on both inputs, its noise drawn from the generator that made `smooth_batch`'s."""
    with torch.inference_mode():
        return net(smooth_batch[0], generator=torch.Generator().manual_seed(12))


@pytest.fixture(scope="module")
def reference_first(reference_pair) -> torch.Tensor:
    return reference_pair[:1]


@pytest.fixture(scope="module")
def bf16_first(net, smooth_batch) -> torch.Tensor:
    x, noise = smooth_batch
    return fast_plan(net, "bf16").restore(x[:1], [n[:1] for n in noise])


def test_batch_with_generator_equals_single_run(net, smooth_batch, reference_pair):
    x, noise = smooth_batch
    assert [tuple(n.shape) for n in noise] == [(2, 1, r, r) for r in NOISE_SIZES]
    with torch.inference_mode():
        single = net(x[1:], [n[1:] for n in noise])
    assert reference_pair.shape == (2, 3, 512, 512)
    # Noise drawn inside the forward from the generator = the same maps passed explicitly.
    torch.testing.assert_close(reference_pair[1:], single, atol=1e-5, rtol=0)
    assert (reference_pair[0] - reference_pair[1]).abs().mean() > 1e-2  # the samples are not mixed up


@pytest.mark.slow  # test_parity runs every golden case
def test_golden_gfpgan_v14(golden, synthetic_checkpoints):
    path = golden / "gfpgan_v14_a.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with torch.inference_mode():
        checks = RUNNERS["gfpgan_v14"](Case.open(path), Context(synthetic_checkpoints))
    assert {c.name for c in checks} >= {"image", "style_code", "condition_scale0", "restored_face_bgr_u8"}
    failing = [f"{c.name}: {c.error:.3g} > {c.tolerance:.3g}" for c in checks if not c.passed]
    assert not failing, "; ".join(failing)


def _psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    return 10 * math.log10(peak**2 / (a.double() - b.double()).pow(2).mean().item())


def test_transposed_upsampled_conv_equals_upsample_then_conv():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, 9, generator=g, dtype=torch.float64)  # non-square: rows and columns not mixed up
    w = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    direct = F.conv2d(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), w, b, padding=1)
    torch.testing.assert_close(_conv_upsampled(x, w, _up_kernel(w), b), direct, atol=1e-12, rtol=0)


def test_winograd_conv_equals_conv():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 4, 10, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 6, 3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_winograd_conv(x, _winograd_kernel(w)), F.conv2d(x, w, padding=1), atol=1e-12, rtol=0)


def test_fast_fp32_matches_reference_forward(net, smooth_batch, reference_first):
    x, noise = smooth_batch
    fast = fast_plan(net, "fp32").restore(x[:1], [n[:1] for n in noise])
    assert fast.shape == (1, 3, 512, 512) and fast.dtype == torch.float32
    error = (fast - reference_first).abs()
    assert error.max() <= 1e-5 and error.mean() <= 1e-6  # the golden gfpgan_v14 image tolerances
    assert reference_first.std() > 0.1  # a real image, not a constant


def test_fast_bf16_close_to_fp32(bf16_first, reference_first):
    fast = bf16_first
    assert fast.dtype == torch.float32
    image_psnr = _psnr((fast.clamp(-1, 1) + 1) / 2, (reference_first.clamp(-1, 1) + 1) / 2, 1.0)
    face_psnr = _psnr(postprocess_to_bgr_u8(fast).float(), postprocess_to_bgr_u8(reference_first).float(), 255.0)
    assert image_psnr > 55 and face_psnr > 50  # ~60 / ~55 dB measured; bf16 autocast of upstream: ~58 / ~54


def test_fast_batch_equals_single_faces(net, smooth_batch, bf16_first):
    x, noise = smooth_batch
    plan = fast_plan(net, "bf16")
    assert fast_plan(net, "bf16") is plan  # built once per network and precision
    both = plan.restore(x, generator=torch.Generator().manual_seed(12))  # the same noise, drawn inside
    second = plan.restore(x[1:], [n[1:] for n in noise])
    assert torch.equal(both[:1], bf16_first) and torch.equal(both[1:], second)
    assert (both[0] - both[1]).abs().mean() > 1e-2


def test_fast_plan_rejects_bad_calls(net):
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        fast_plan(net, "fp16")
    with pytest.raises(ValueError, match=r"expects \(B, 3, 512, 512\) images, got \(1, 3, 256, 256\)"):
        fast_plan(net, "fp32").restore(torch.zeros(1, 3, 256, 256), draw_noise(1))
    with pytest.raises(ValueError, match="needs 15 noise maps, got 14"):
        fast_plan(net, "fp32").restore(torch.zeros(1, 3, 512, 512), draw_noise(1)[:14])
