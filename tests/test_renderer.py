"""Face renderer: mapping net, keypoint transformation, renderer inputs, batch layout, frames, rendering."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xtalker.checkpoints import load_network, mapping_file_name, packed_file_name
from xtalker.models.mapping import HeadPose
from xtalker.render import (
    Renderer,
    driving_sequence,
    resize_to_original,
    restored_size,
    source_image,
    source_semantics,
    to_uint8,
)
from xtalker.render.inputs import batched_target, driving_coefficients, keyframe_degrees, padded_length
from xtalker.render.keypoints import logits_to_degrees, rotation_matrix, transform_keypoints


def coeffs(rng: np.random.Generator, t: int, c: int = 70) -> np.ndarray:
    return rng.standard_normal((t, c)).astype(np.float32)


def random_pose(rng: np.random.Generator, b: int) -> HeadPose:
    def r(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    return HeadPose(yaw=r(b, 66), pitch=r(b, 66), roll=r(b, 66), t=r(b, 3), exp=r(b, 45) * 0.1)


# ---- renderer inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("start,stop", [(0, 11), (3, 7), (0, 1), (10, 11), (9, 14), (5, 5)])
def test_windows_of_a_range_equal_the_slice_of_the_whole_clip(start, stop):
    seq = driving_sequence(coeffs(np.random.default_rng(0), 11), coeffs(np.random.default_rng(1), 1, 73))
    whole = seq.windows(0, 14)
    np.testing.assert_array_equal(seq.windows(start, stop), whole[start:stop])


def test_window_rows_are_clamped_neighbours():
    g = coeffs(np.random.default_rng(2), 5)
    seq = driving_sequence(g, coeffs(np.random.default_rng(3), 1, 73))
    w = seq.windows(0, 5)
    assert w.shape == (5, 70, 27)
    for f in range(5):
        rows = [min(max(f + k, 0), 4) for k in range(-13, 14)]
        np.testing.assert_array_equal(w[f], g[rows].T)


def test_padding_repeats_the_last_window_and_keeps_contiguous_segments():
    rng = np.random.default_rng(4)
    seq = driving_sequence(coeffs(rng, 7), coeffs(rng, 1, 73), input_roll=[-5, 5])
    target = batched_target(seq, batch_size=3)
    assert padded_length(7, 3) == 9
    assert target.semantics.shape == (3, 3, 70, 27) and target.roll.shape == (3, 3)
    per_frame = seq.windows(0, 7)
    for f in range(9):
        np.testing.assert_array_equal(target.semantics[f // 3, f % 3], per_frame[min(f, 6)])
    np.testing.assert_array_equal(target.roll.reshape(-1)[7:], [target.roll.reshape(-1)[6]] * 2)
    assert target.num_frames == 7


def test_batch_size_dividing_the_clip_adds_no_padding():
    rng = np.random.default_rng(5)
    target = batched_target(driving_sequence(coeffs(rng, 8), coeffs(rng, 1, 73)), batch_size=4)
    assert target.semantics.shape == (4, 2, 70, 27)
    assert target.yaw is None and target.pitch is None and target.roll is None


def test_full_mode_appends_alignment_and_still_keeps_source_pose():
    rng = np.random.default_rng(6)
    g, src = coeffs(rng, 4), coeffs(rng, 1, 73)
    full = driving_coefficients(g, src, "full", still=False, expression_scale=0.5)
    assert full.shape == (4, 73) and full.dtype == np.float32
    np.testing.assert_array_equal(full[:, :64], g[:, :64] * np.float32(0.5))
    np.testing.assert_array_equal(full[:, 64:70], g[:, 64:70])
    np.testing.assert_array_equal(full[:, 70:], np.repeat(src[:, 70:], 4, axis=0))
    still = driving_coefficients(g, src, "crop", still=True)
    assert still.shape == (4, 70)
    np.testing.assert_array_equal(still[:, 64:], np.repeat(src[:, 64:70], 4, axis=0))
    np.testing.assert_array_equal(still[:, :64], g[:, :64])
    assert source_semantics(src, "extfull").shape == (1, 73, 27)
    np.testing.assert_array_equal(source_semantics(src, "crop")[0, :, 5], src[0, :70])
    assert not np.shares_memory(driving_coefficients(g, src, "crop"), g)


def test_single_keyframe_is_constant():
    np.testing.assert_array_equal(keyframe_degrees([7], 5), [7.0] * 5)


def test_two_keyframes_spread_over_the_clip_and_pad_with_the_last_value():
    # Path length 10 over 10 steps: arange(-5, 5, 1) has 10 values, the 11th repeats the last.
    np.testing.assert_array_equal(keyframe_degrees([-5, 5], 11), [-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 4])


def test_several_keyframes_go_back_and_forth_and_are_cut_to_length():
    # Path 0 -> 6 -> 0 = 12 degrees over 6 steps: step 2, segments [0, 2, 4] and [6, 4, 2], padded with 2.
    np.testing.assert_allclose(keyframe_degrees([0, 6, 0], 7), [0, 2, 4, 6, 4, 2, 2])
    # Path of 4 degrees over 2 steps: step 2, one value per segment, 4 values cut to 3.
    np.testing.assert_allclose(keyframe_degrees([0, 1, 0, 1, 0], 3), [0, 1, 0])
    assert keyframe_degrees([4, 4], 3).tolist() == [4, 4, 4]
    assert keyframe_degrees([1, 9], 1).tolist() == [1]


def test_source_image_scaling():
    u8 = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    x = source_image(u8)
    assert x.shape == (1, 3, 4, 4) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, 1], u8[:, :, 1].astype(np.float32) * np.float32(1 / 255))


# ---- keypoints ------------------------------------------------------------------------------------


def test_degrees_are_the_softmax_expectation():
    logits = torch.full((2, 66), -1e4)
    logits[0, 33] = 0.0  # one bin -> exactly 3 * 33 - 99 = 0
    logits[1, 10] = logits[1, 11] = 0.0  # two equal bins -> 3 * 10.5 - 99
    np.testing.assert_allclose(logits_to_degrees(logits).numpy(), [0.0, -67.5], atol=1e-5)


def test_keypoint_transform_matches_formula_and_leaves_inputs_alone():
    rng = np.random.default_rng(7)
    pose = random_pose(rng, 3)
    kp = torch.from_numpy(rng.uniform(-0.8, 0.8, (3, 15, 3)).astype(np.float32))
    before = [x.clone() for x in (kp, pose.yaw, pose.pitch, pose.roll, pose.t, pose.exp)]
    out = transform_keypoints(kp, pose, roll_deg=torch.tensor([10.0, -20.0, 30.0]))
    for x, y in zip((kp, pose.yaw, pose.pitch, pose.roll, pose.t, pose.exp), before):
        assert torch.equal(x, y)
    for i, roll in enumerate([10.0, -20.0, 30.0]):
        yaw, pitch = (float(logits_to_degrees(a)[i]) for a in (pose.yaw, pose.pitch))
        y, p, r = (d / 180 * 3.14 for d in (yaw, pitch, roll))
        rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
        ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
        rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
        expect = kp[i].double().numpy() @ (rx @ ry @ rz).T
        expect[:, 1] += float(pose.t[i, 1])
        expect += pose.exp[i].double().numpy().reshape(15, 3)
        np.testing.assert_allclose(out[i].numpy(), expect, atol=2e-6)


def test_one_canonical_set_serves_a_batch():
    rng = np.random.default_rng(8)
    pose = random_pose(rng, 2)
    kp = torch.from_numpy(rng.uniform(-0.8, 0.8, (1, 15, 3)).astype(np.float32))
    torch.testing.assert_close(transform_keypoints(kp, pose), transform_keypoints(kp.repeat(2, 1, 1), pose), rtol=0, atol=0)


def test_rotation_uses_314_not_pi():
    r = rotation_matrix(torch.tensor([180.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert float(r[0, 0, 0]) == pytest.approx(math.cos(3.14), abs=1e-7)
    assert float(r[0, 0, 2]) == pytest.approx(math.sin(3.14), abs=1e-6)  # sin(pi) would be ~0


# ---- frames ---------------------------------------------------------------------------------------


def test_uint8_conversion_rounds_and_clips():
    x = np.array([0.0, 0.5 / 255, 1.5 / 255, 0.2, 1.0, 1.2, -0.1, 0.3], dtype=np.float32).reshape(1, 1, 2, 4)
    u8 = to_uint8(np.repeat(x, 3, axis=1))
    assert u8.shape == (1, 2, 4, 3) and u8.dtype == np.uint8
    assert u8[0, :, :, 1].reshape(-1).tolist() == [0, 0, 2, 51, 255, 255, 0, 76]


def test_resize_restores_the_crop_aspect():
    assert restored_size(256, (300, 372)) == (256, 317)
    frames = np.random.default_rng(9).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = resize_to_original(frames, (100, 150))
    assert out.shape == (2, 96, 64, 3)


# ---- networks -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renderer(synthetic_checkpoints) -> Renderer:
    return Renderer.from_checkpoints(
        synthetic_checkpoints / packed_file_name(256), synthetic_checkpoints / mapping_file_name(70)
    )


def test_mapping_channel_count_comes_from_the_file(synthetic_checkpoints):
    net = load_network("mapping", synthetic_checkpoints / mapping_file_name(73))
    assert net.coeff_nc == 73
    x = torch.from_numpy(np.random.default_rng(10).standard_normal((3, 73, 27)).astype(np.float32))
    with torch.no_grad():
        batch, alone = net(x), net(x[1:2])
    assert batch.yaw.shape == (3, 66) and batch.t.shape == (3, 3) and batch.exp.shape == (3, 45)
    torch.testing.assert_close(batch.exp[1:2], alone.exp, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="73"):
        net(x[:, :70])


def test_renderer_batch_equals_single_frames(renderer):
    rng = np.random.default_rng(11)
    src = coeffs(rng, 1, 73) * 0.3
    seq = driving_sequence(coeffs(rng, 5) * 0.3, src, input_yaw=[-10, 10])
    # 128 px keeps the test fast; every size whose 1/4 is divisible by 32 runs the same code.
    image = source_image(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    source = renderer.prepare(image, source_semantics(src, "crop"))
    yaw, _, _ = seq.angles(1, 3)
    batch = renderer.render(source, seq.windows(1, 3), yaw_deg=yaw)
    alone = renderer.render(source, seq.windows(2, 3), yaw_deg=yaw[1:])
    assert batch.shape == (2, 3, 128, 128)
    assert 0.0 < float(batch.min()) and float(batch.max()) < 1.0
    torch.testing.assert_close(batch[1:], alone, rtol=0, atol=2e-5)
    assert float((batch[0] - batch[1]).abs().max()) > 1e-3  # different frames really differ
    with pytest.raises(ValueError, match="73"):
        renderer.render(source, np.zeros((1, 73, 27), dtype=np.float32))


class RecordingGenerator(torch.nn.Module):
    """Stands in for the generator: 'renders' each sample as its mean driving keypoint, and logs batches."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.batches: list[int] = []

    def encode_source(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def animate(self, features: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> dict:
        self.batches.append(kp_driving.shape[0])
        value = kp_driving.mean(dim=(1, 2))[:, None, None, None]
        return {"prediction": value.expand(-1, 3, features.shape[2], features.shape[3])}


def test_make_animation_returns_time_order_without_padding(synthetic_checkpoints):
    mapping = load_network("mapping", synthetic_checkpoints / mapping_file_name(70))
    gen = RecordingGenerator()
    kp_detector = lambda image: torch.linspace(-0.5, 0.5, 45).view(1, 15, 3).expand(image.shape[0], -1, -1)  # noqa: E731
    r = Renderer(kp_detector=kp_detector, generator=gen, mapping=mapping)
    rng = np.random.default_rng(12)
    src = coeffs(rng, 1, 73)
    seq = driving_sequence(coeffs(rng, 7), src, input_pitch=[-20, 20])
    target = batched_target(seq, batch_size=3)
    image = source_image(np.zeros((8, 8, 3), dtype=np.uint8))
    frames = r.make_animation(image, source_semantics(src, "crop"), target.semantics, 7, target.yaw, target.pitch, target.roll)
    assert frames.shape == (7, 3, 8, 8) and gen.batches == [3, 3, 3]
    source = r.prepare(image, source_semantics(src, "crop"))
    _, pitch, _ = seq.angles(0, 7)
    expected = r.render(source, seq.windows(0, 7), pitch_deg=pitch)
    torch.testing.assert_close(frames, expected, rtol=0, atol=1e-6)
