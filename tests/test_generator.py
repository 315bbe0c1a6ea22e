"""KPDetector and generator: batching with shared source features, feature reuse, 512 shapes, exact helpers.

The generator is size-agnostic (S a multiple of 128), so batch tests run at S = 128 with the 256 weights:
a 256 frame costs about 1.1 TFLOP, too slow for several renders here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from xtalker.checkpoints import load_network, packed_file_name, read_packed
from xtalker.models.generator import (
    Generator,
    SourceFeatures,
    fold_spectral_norm,
    sample_volume,
    upsampled_conv3x3,
)
from xtalker.models.blocks import coordinate_grid


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
def test_polyphase_conv_equals_conv_of_the_upsampled_map(factor):
    g = torch.Generator().manual_seed(factor)
    x = torch.randn(2, 8, 5, 7, generator=g)
    w = torch.randn(6, 8, 3, 3, generator=g)
    b = torch.randn(6, generator=g)
    expected = F.conv2d(F.interpolate(x, scale_factor=float(factor), mode="nearest"), w, b, padding=1)
    torch.testing.assert_close(upsampled_conv3x3(x, w, b, factor), expected, rtol=1e-5, atol=1e-5)


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
