"""KPDetector and generator: batching with shared source features, feature reuse, 512 shapes, exact helpers,
and the inference rewrites (folded BatchNorm, polyphase banks, fused SPADE decoder) against the official form.

The generator is size-agnostic (S a multiple of 128), so batch tests run at S = 128 with the 256 weights:
a 256 frame costs about 1 TFLOP, too slow for several renders here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xtalker.checkpoints import load_network, packed_file_name, read_packed
from xtalker.models.blocks import (
    DownBlock2d,
    DownBlock3d,
    PhaseConvBank,
    SameBlock2d,
    ShiftSumConv2d,
    UpBlock3d,
    coordinate_grid,
    fuse_for_inference,
)
from xtalker.models.generator import (
    Decoder3d,
    FusedSPADEDecoder,
    Generator,
    ResBlock3d,
    SourceFeatures,
    fold_spectral_norm,
    sample_volume,
)


@pytest.fixture(scope="module")
def generator(synthetic_checkpoints) -> Generator:
    return load_network("generator", synthetic_checkpoints / packed_file_name(256))


@pytest.fixture(scope="module")
def kp_detector_512(synthetic_checkpoints):
    return load_network("kp_extractor", synthetic_checkpoints / packed_file_name(512))


def keypoints(seed: int, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 15, 3, generator=g) * 1.6 - 0.8


def image(seed: int, b: int, size: int) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- exact helpers ------------------------------------------------------------------------------------


def test_spectral_norm_folding_equals_the_explicit_formula(synthetic_checkpoints, generator):
    state = read_packed(synthetic_checkpoints / packed_file_name(256), "generator")
    for name in ("decoder.G_middle_3.conv_1", "decoder.up_0.conv_s", "decoder.up_1.conv_0"):
        orig, u, v = (state[f"{name}.weight_{s}"].double() for s in ("orig", "u", "v"))
        sigma = u @ (orig.reshape(orig.shape[0], -1) @ v)
        folded = generator.get_submodule(name).weight
        torch.testing.assert_close(folded.double(), orig / sigma, rtol=1e-6, atol=0)
        assert abs(sigma.item() - 1) > 1e-3  # the division really changes the kernel
    folded_state = fold_spectral_norm(state)
    assert not any(k.endswith(("_orig", "_u", "_v")) for k in folded_state)
    assert "decoder.up_1.conv_s.bias" not in folded_state and "decoder.up_1.conv_s.weight" in folded_state


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_phase_bank_equals_conv_of_the_upsampled_map(factor):
    g = torch.Generator().manual_seed(factor)
    x = torch.randn(2, 8, 5, 7, generator=g)
    w = torch.randn(6, 8, 3, 3, generator=g)
    b = torch.randn(6, generator=g)
    expected = F.conv2d(F.interpolate(x, scale_factor=float(factor), mode="nearest"), w, b, padding=1)
    (out,) = PhaseConvBank([(w, b, (factor, factor))])(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_phase_bank_mixes_factors_and_dimensions():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 6, 5, generator=g)
    convs = [
        (torch.randn(c, 4, 3, 3, generator=g), torch.randn(c, generator=g), f)
        for c, f in ((3, (1, 1)), (5, (2, 2)), (2, (4, 4)), (3, (1, 2)))
    ]
    outs = PhaseConvBank(convs, relu=True)(x)
    for out, (w, b, f) in zip(outs, convs):
        up = F.interpolate(x, scale_factor=tuple(float(v) for v in f), mode="nearest")
        torch.testing.assert_close(out, F.relu(F.conv2d(up, w, b, padding=1)), rtol=1e-5, atol=1e-5)
    # 3-D with the depth kept, as in the hourglass up blocks.
    v = torch.randn(1, 4, 3, 4, 5, generator=g)
    w3, b3 = torch.randn(6, 4, 3, 3, 3, generator=g), torch.randn(6, generator=g)
    (out,) = PhaseConvBank([(w3, b3, (1, 2, 2))])(v)
    expected = F.conv3d(F.interpolate(v, scale_factor=(1.0, 2.0, 2.0), mode="nearest"), w3, b3, padding=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics far from identity, so a missed or wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 10
                t.copy_(torch.randn(t.shape, generator=g) * 3 / fan_in**0.5)
    return module.eval()


@pytest.mark.parametrize(
    "block, shape",
    [
        (DownBlock2d(4, 6), (2, 4, 8, 8)),
        (SameBlock2d(4, 6, leaky=True), (2, 4, 8, 8)),
        (DownBlock3d(4, 6), (2, 4, 3, 8, 8)),
        (UpBlock3d(4, 6), (2, 4, 3, 4, 4)),
        (ResBlock3d(4), (2, 4, 3, 5, 5)),
    ],
    ids=["down2d", "same2d", "down3d", "up3d", "res3d"],
)
@torch.inference_mode()
def test_fused_blocks_equal_the_official_blocks(block, shape):
    block = randomize_(block, 3)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    expected = block(x.clone())
    fused = fuse_for_inference(block)
    # Only ResBlock3d's norm1 (on the block input, which the residual also reads) cannot fold.
    norms = [m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms == ([fused.norm1] if isinstance(fused, ResBlock3d) else [])
    torch.testing.assert_close(fused(x.clone()), expected, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_fused_hourglass_decoder_equals_official():
    decoder = randomize_(Decoder3d(8), 5)
    g = torch.Generator().manual_seed(6)
    sizes = [(8, 32), (64, 16), (128, 8), (256, 4), (512, 2), (1024, 1)]  # (channels, side) of the encoder outputs
    skips = [torch.rand(1, c, 1, side, side, generator=g) for c, side in sizes]
    expected = decoder(list(skips))
    torch.testing.assert_close(fuse_for_inference(decoder)(list(skips)), expected, rtol=1e-4, atol=1e-4)


def test_shift_sum_conv_equals_the_conv():
    g = torch.Generator().manual_seed(6)
    conv = nn.Conv2d(40, 2, kernel_size=7, padding=3)
    x = torch.randn(2, 40, 9, 11, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ShiftSumConv2d(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_sampling_one_source_for_a_batch_equals_sampling_copies():
    g = torch.Generator().manual_seed(3)
    volume = torch.randn(1, 4, 3, 5, 6, generator=g)
    grid = torch.rand(3, 7, 5, 6, 3, generator=g) * 2.4 - 1.2
    shared = sample_volume(volume, grid)
    copies = F.grid_sample(volume.expand(3, -1, -1, -1, -1), grid, mode="bilinear", align_corners=False)
    assert shared.shape == (3, 4, 7, 5, 6)
    torch.testing.assert_close(shared, copies, rtol=0, atol=0)
    with pytest.raises(ValueError):
        sample_volume(torch.zeros(2, 4, 3, 5, 6), grid)


# ---- generator ----------------------------------------------------------------------------------------


@torch.inference_mode()
def test_shared_source_batch_equals_full_forward_per_sample(generator):
    source = image(0, 1, 128)
    kp_source, kp_driving = keypoints(1, 1), keypoints(1, 1) + 0.1 * keypoints(2, 2)
    features = generator.encode_source(source)
    kept = SourceFeatures(features.volume.clone(), features.compressed.clone())
    batch = generator.animate(features, kp_source.expand(2, -1, -1), kp_driving)
    # Features are reused for every frame: rendering must not modify them.
    assert torch.equal(features.volume, kept.volume) and torch.equal(features.compressed, kept.compressed)
    assert batch["prediction"].shape == (2, 3, 128, 128)
    assert batch["occlusion_map"].shape == (2, 1, 32, 32)
    assert batch["mask"].shape == (2, 16, 16, 32, 32)
    assert batch["deformation"].shape == (2, 16, 32, 32, 3)
    for i in range(2):
        single = generator(source, kp_source, kp_driving[i:i + 1])
        for key, value in single.items():
            torch.testing.assert_close(batch[key][i:i + 1], value, rtol=0, atol=1e-5, msg=key)
    torch.testing.assert_close(batch["mask"].sum(dim=1), torch.ones(2, 16, 32, 32), rtol=0, atol=1e-5)
    occlusion = batch["occlusion_map"]
    assert 0 < occlusion.min() and occlusion.max() < 1
    # Different driving keypoints give different frames.
    assert (batch["prediction"][0] - batch["prediction"][1]).abs().max() > 1e-3


@torch.inference_mode()
def test_mask_cut_drops_small_weights_without_renormalising(generator):
    motion_net = copy.deepcopy(generator.dense_motion_network)
    # A dominant background logit pushes all keypoint weights below the 1e-3 cut.
    motion_net.mask.bias[0] += 12.0
    compressed = torch.rand(1, 4, 16, 32, 32, generator=torch.Generator().manual_seed(6))
    out = motion_net(compressed, keypoints(7, 1), keypoints(8, 2))
    mask = out["mask"]
    assert 0 < mask[:, 1:].max() < 1e-3  # returned before the cut
    background = mask[:, 0].unsqueeze(-1)
    assert (1 - background).max() > 1e-4  # renormalising would visibly change the result
    grid = coordinate_grid(16, 32, 32)
    expected = (background * grid).expand(2, -1, -1, -1, -1)
    torch.testing.assert_close(out["deformation"], expected, rtol=0, atol=1e-7)


@torch.inference_mode()
def test_generator_rejects_mismatched_batches(generator):
    features = SourceFeatures(torch.zeros(2, 32, 16, 32, 32), torch.zeros(2, 4, 16, 32, 32))
    with pytest.raises(ValueError):
        generator.animate(features, keypoints(0, 1), keypoints(1, 3))
    with pytest.raises(ValueError):
        generator.animate(features, keypoints(0, 3), keypoints(1, 2)[:, :14])


@torch.inference_mode()
def test_encode_source_512_shapes(generator):
    features = generator.encode_source(image(4, 1, 512))
    assert features.volume.shape == (1, 32, 16, 128, 128)
    assert features.compressed.shape == (1, 4, 16, 128, 128)
    assert features.compressed.min() >= 0 and features.compressed.max() > 0


# ---- keypoint detector --------------------------------------------------------------------------------


@torch.inference_mode()
def test_kp_detector_512(kp_detector_512):
    x = image(5, 1, 512)
    down = kp_detector_512.antialias_down(x)
    assert down.shape == (1, 3, 128, 128)
    blurred = F.conv2d(F.pad(x, (6, 6, 6, 6)), kp_detector_512.down.weight, groups=3)
    torch.testing.assert_close(down, blurred[:, :, ::4, ::4], rtol=0, atol=1e-6)
    kp = kp_detector_512(x)
    assert kp.shape == (1, 15, 3)
    assert kp.abs().max() < 1 and kp.std() > 0.05


# ---- inference form against the official layout --------------------------------------------------------


@pytest.fixture(scope="module")
def official_generator(synthetic_checkpoints) -> Generator:
    """The generator in the official layout: BatchNorms, plain SPADE layers, no rewrites."""
    model = Generator()
    state = read_packed(synthetic_checkpoints / packed_file_name(256), "generator")
    model.load_state_dict(fold_spectral_norm(state), strict=True)
    return model.eval()


@torch.inference_mode()
def test_inference_form_equals_the_official_generator(generator, official_generator):
    assert isinstance(generator.decoder, FusedSPADEDecoder)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in generator.dense_motion_network.modules())
    source = image(9, 1, 128)
    kp_source, kp_driving = keypoints(10, 1), keypoints(10, 1) + 0.1 * keypoints(11, 1)
    expected = official_generator(source, kp_source, kp_driving)
    out = generator(source, kp_source, kp_driving)
    torch.testing.assert_close(out["mask"], expected["mask"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["occlusion_map"], expected["occlusion_map"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["deformation"], expected["deformation"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["prediction"], expected["prediction"], rtol=0, atol=1e-4)
    assert float((out["prediction"] - expected["prediction"]).abs().mean()) < 1e-5
