"""Audio front end, blink curve, pose chunking, smoothing and ExpNet batching."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import savgol_filter

from xtalker.models.audio2pose import pose_chunks
from xtalker.speech import Audio2Coeff, apply_ref_pose, blink_ratio, windows_to_tensor
from xtalker.speech import audio as audio
from xtalker.speech.audio2coeff import savgol_window, smooth_pose


def _signal(num_samples: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / audio.SAMPLE_RATE
    wav = 0.4 * np.sin(2 * np.pi * 330 * t) + 0.2 * np.sin(2 * np.pi * 2100 * t) + 0.05 * rng.standard_normal(num_samples)
    wav[: num_samples // 5] = 0.0  # a silent stretch exercises the -4 floor
    return wav.astype(np.float32)


# ---------------------------------------------------------------------------------------------- front end


def test_mel_column_matches_direct_float64_computation():
    wav = audio.crop_to_frames(_signal(16000 + 333))
    assert len(wav) == 25 * 640
    mel = audio.melspectrogram(wav)
    assert mel.shape == (80, 1 + len(wav) // 200)
    assert mel.dtype == np.float64

    j = 57
    x = wav.astype(np.float64)
    emph = np.concatenate([[x[0]], x[1:] - 0.97 * x[:-1]])
    padded = np.concatenate([np.zeros(400), emph, np.zeros(400)])
    frame = padded[200 * j : 200 * j + 800] * np.hanning(801)[:-1]  # periodic Hann
    k = np.arange(401)[:, None]
    n = np.arange(800)[None, :]
    spectrum = np.abs(np.exp(-2j * np.pi * k * n / 800) @ frame)
    column = audio.mel_basis().astype(np.float64) @ spectrum
    expected = np.clip(8 * (20 * np.log10(np.maximum(1e-5, column)) - 20 + 100) / 100 - 4, -4, 4)
    np.testing.assert_allclose(mel[:, j], expected, rtol=0, atol=1e-9)
    assert mel[:, 2].max() == -4.0  # silence


def test_mel_basis_slaney_properties():
    basis = audio.mel_basis()
    assert basis.shape == (80, 401) and basis.dtype == np.float32
    assert audio.hz_to_mel(1000.0) == pytest.approx(15.0)
    assert audio.hz_to_mel(6400.0) == pytest.approx(42.0)
    f = np.array([55.0, 700.0, 1000.0, 3000.0, 7600.0])
    np.testing.assert_allclose(audio.mel_to_hz(audio.hz_to_mel(f)), f, rtol=1e-12)
    # Slaney area normalisation: each triangle's peak is 2 / bandwidth; nothing below 55 Hz or above 7600 Hz.
    freqs = np.linspace(0, 8000, 401)
    assert np.all(basis[:, freqs < 55] == 0) and np.all(basis[:, freqs > 7600] == 0)
    assert np.all(basis.max(axis=1) > 0)


def test_window_indices_truncate_toward_zero_and_clamp():
    idx = audio.window_indices(0, 4, num_columns=20)
    assert idx[0].tolist() == [0] * 7 + list(range(1, 10))  # starts at -6
    assert idx[1].tolist() == [0] * 4 + list(range(1, 13))  # starts at -3
    assert idx[2, 0] == 0 and idx[3, 0] == 3
    assert audio.window_indices(10, 11, num_columns=40)[0, -1] == 39  # clamped at the end


@pytest.mark.parametrize("ranges", [[(0, 1), (1, 2), (0, 12)], [(0, 37), (37, 61)], [(13, 14), (5, 60), (60, 61)]])
def test_frame_range_windows_equal_slices_of_full_windows(ranges):
    wav = audio.crop_to_frames(_signal(61 * 640 + 17, seed=3))
    full = audio.audio_windows(wav)
    assert full.shape == (61, 80, 16) and full.dtype == np.float32
    mel = audio.melspectrogram(wav)
    for start, stop in ranges:
        np.testing.assert_array_equal(audio.frame_windows_from_wav(wav, start, stop), full[start:stop])
        np.testing.assert_array_equal(audio.frame_windows(mel, start, stop), full[start:stop])
    np.testing.assert_array_equal(audio.mel_columns(audio.preemphasis(wav), 30, 75), mel[:, 30:75])


def test_short_audio():
    assert audio.audio_windows(np.zeros(639, np.float32)).shape == (0, 80, 16)
    one = audio.audio_windows(np.full(640, 0.1, np.float32))
    assert one.shape == (1, 80, 16)


# ---------------------------------------------------------------------------------------------- blinks


def _upstream_blinks(num_frames: int, rng: random.Random) -> np.ndarray:
    """The reference procedure, written out with random.choice over a range."""
    ratio = np.zeros((num_frames, 1))
    frame_id = 0
    while True:
        start = rng.choice(range(min(10, num_frames), min(int(num_frames / 2), 70)))
        if frame_id + start + 5 <= num_frames - 1:
            ratio[frame_id + start : frame_id + start + 5, 0] = [0.5, 0.9, 1.0, 0.9, 0.5]
            frame_id = frame_id + start + 5
        else:
            return ratio.astype(np.float32)


@pytest.mark.parametrize("num_frames", [1, 2, 20, 21, 22, 23, 57, 400])
def test_blink_ratio_deterministic_and_defined(num_frames):
    a = blink_ratio(num_frames, random.Random(7))
    b = blink_ratio(num_frames, random.Random(7))
    c = blink_ratio(num_frames, np.random.default_rng(7))
    d = blink_ratio(num_frames, np.random.default_rng(7))
    assert a.shape == (num_frames, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, d)
    if num_frames <= 20:
        assert not a.any()
    elif num_frames in (21, 22):
        expected = np.zeros((num_frames, 1), np.float32)
        expected[10:15, 0] = [0.5, 0.9, 1.0, 0.9, 0.5]
        np.testing.assert_array_equal(a, expected)
    else:
        np.testing.assert_array_equal(a, _upstream_blinks(num_frames, random.Random(7)))
        assert a.max() == 1.0


def test_blink_ratio_uses_no_global_rng():
    random.seed(1)
    expected = random.random()
    random.seed(1)
    blink_ratio(300, random.Random(5))
    assert random.random() == expected


# ---------------------------------------------------------------------------------------------- smoothing


@pytest.mark.parametrize("num_frames,window", [(1, 1), (2, 1), (3, 3), (10, 9), (12, 11), (13, 13), (50, 13)])
def test_savgol_short_clips(num_frames, window):
    assert savgol_window(num_frames) == window
    pose = torch.from_numpy(np.random.default_rng(num_frames).standard_normal((2, num_frames, 6)).astype(np.float32))
    out = smooth_pose(pose)
    assert out.shape == pose.shape and out.dtype == torch.float32
    if num_frames <= 3:
        # Degree-2 fit through <= 3 points: nothing to smooth (and upstream's filter fails for T <= 2).
        torch.testing.assert_close(out, pose, rtol=0, atol=1e-5)
    else:
        expected = savgol_filter(pose.numpy(), window, 2, axis=1, mode="interp")
        np.testing.assert_array_equal(out.numpy(), expected)
        assert not torch.allclose(out, pose)


def test_apply_ref_pose_tiles_reference():
    coeffs = torch.zeros(1, 7, 70)
    ref = torch.tensor([[1.0] * 6, [3.0] * 6, [4.0] * 6])
    out = apply_ref_pose(coeffs, ref)
    assert out[0, :, 64].tolist() == [0.0, 2.0, 3.0, 0.0, 2.0, 3.0, 0.0]
    assert not out[..., :64].any()
    assert apply_ref_pose(coeffs[:, :2], ref)[0, :, 69].tolist() == [0.0, 2.0]


# ---------------------------------------------------------------------------------------------- networks


@pytest.fixture(scope="module")
def stage(synthetic_checkpoints: Path) -> Audio2Coeff:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return Audio2Coeff.from_checkpoint(synthetic_checkpoints / "SadTalker_V0.0.2_256.safetensors")


def _mels(num_frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, num_frames, 1, 80, 16, generator=g) * 8 - 4).float()


def _ref(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 70, generator=torch.Generator().manual_seed(seed))


def test_expnet_batch_invariance(stage):
    mels = _mels(23, batch=2)
    ref = _ref(2)[:, None].expand(2, 23, 70)[..., :64]
    blink = torch.rand(2, 23, 1, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        together = stage.exp_net(mels, ref, blink)
        singles = torch.cat([stage.exp_net(mels[i : i + 1], ref[i : i + 1], blink[i : i + 1]) for i in range(2)])
        per_frame = torch.stack([stage.exp_net(mels[:, t], ref[:, t], blink[:, t]) for t in range(23)], dim=1)
        chunked = Audio2Coeff(stage.exp_net, stage.pose_net, exp_chunk=10).expression(mels, ref, blink)
    assert together.shape == (2, 23, 64)
    torch.testing.assert_close(singles, together, rtol=0, atol=1e-5)
    torch.testing.assert_close(per_frame, together, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, together, rtol=0, atol=1e-5)
    assert (together[0] - together[1]).abs().max() > 1e-2  # the two items really differ


@pytest.mark.parametrize("num_frames", [40, 33, 65, 10, 2])
def test_pose_chunking(stage, num_frames):
    net = stage.pose_net
    mels = _mels(num_frames, seed=num_frames)
    ref_pose = _ref()[:, 64:70]
    plan = pose_chunks(num_frames)
    zs = [torch.randn(1, 64, generator=torch.Generator().manual_seed(10 + i)) for i in range(plan.count)]
    with torch.inference_mode():
        out = net(mels, ref_pose, 5, zs)
        emb = net.audio_encoder(mels[:, 1:])
        decode = lambda e, z: net.netG.decoder(e, ref_pose, z, torch.tensor([5]))  # noqa: E731
        expected = [torch.zeros(1, 1, 6)]
        for i in range(plan.full):
            expected.append(decode(emb[:, 32 * i : 32 * i + 32], zs[i]))
        if plan.tail:
            tail = emb[:, -32:]
            if tail.shape[1] < 32:
                tail = torch.cat([tail[:, :1].repeat(1, 32 - tail.shape[1], 1), tail], dim=1)
            expected.append(decode(tail, zs[-1])[:, -plan.tail :])
    expected = torch.cat(expected, dim=1)
    assert out.motion.shape == (1, num_frames, 6)
    assert not out.motion[:, 0].any()
    assert len(out.audio_embeddings) == plan.count
    if plan.tail:
        assert out.audio_embeddings[-1].shape == (1, min(32, num_frames - 1), 512)
    torch.testing.assert_close(out.motion, expected, rtol=0, atol=1e-5)


def test_pose_seeding_and_batches(stage):
    net = stage.pose_net
    mels = _mels(45, batch=2, seed=4)
    ref_pose = _ref(2)[:, 64:70]
    with torch.inference_mode():
        a = net(mels, ref_pose, torch.tensor([0, 45]), 123)
        b = net(mels, ref_pose, torch.tensor([0, 45]), torch.Generator().manual_seed(123))
        c = net(mels, ref_pose, torch.tensor([0, 45]), a.z)
        singles = [net(mels[i : i + 1], ref_pose[i : i + 1], [0, 45][i], [z[i : i + 1] for z in a.z]) for i in range(2)]
    assert len(a.z) == 2 and a.z[0].shape == (2, 64)
    torch.testing.assert_close(a.motion, b.motion, rtol=0, atol=0)
    torch.testing.assert_close(a.motion, c.motion, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([s.motion for s in singles]), a.motion, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pose latents"):
        net(mels, ref_pose, 0, a.z[:1])
    with pytest.raises(ValueError, match="pose style"):
        net(mels, ref_pose, 46, 0)


@pytest.mark.parametrize("num_frames", [1, 2, 5])
def test_predict_short_clips(stage, num_frames):
    wav = _signal(num_frames * 640, seed=num_frames)
    mels = windows_to_tensor(audio.audio_windows(wav))
    blink = torch.from_numpy(blink_ratio(num_frames, random.Random(0)))[None]
    pred = stage.predict(mels, _ref(), blink, pose_style=3, noise=0)
    assert pred.coeffs.shape == (1, num_frames, 70)
    assert torch.isfinite(pred.coeffs).all()
    torch.testing.assert_close(pred.pose, _ref()[:, None, 64:70] + pred.pose_motion, rtol=0, atol=0)
    torch.testing.assert_close(pred.coeffs[..., 64:], pred.pose_smoothed, rtol=0, atol=0)
    if num_frames <= 2:
        torch.testing.assert_close(pred.pose_smoothed, pred.pose, rtol=0, atol=0)
