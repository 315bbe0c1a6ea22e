"""Audio -> 3DMM coefficient stage (spec sections 4 and 6): expression, head pose, blinks, smoothing.

Given the per-frame mel windows, the source coefficient row, a blink curve, a pose style and the pose
latents (or a seed), `Audio2Coeff.predict` returns (B, T, 70) coefficients `exp (64) | angle (3) | trans (3)`.
All randomness comes from explicitly passed generators; the global RNGs are never used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from scipy.signal import savgol_filter

from xtalker.models.audio2exp import EXP_DIM, ExpNet
from xtalker.models.audio2pose import POSE_DIM, Audio2Pose, PoseNoise

COEFF_DIM = EXP_DIM + POSE_DIM  # 70
SAVGOL_WINDOW = 13
SAVGOL_POLYORDER = 2
# Frames per ExpNet call, in blocks from frame 0 (upstream uses 10). Frames are independent up to the last bits,
# which depend on the call's batch: a stream calls ExpNet on the same blocks, so 32 keeps its look-ahead short.
EXP_CHUNK = 32
BLINK_SHAPE = (0.5, 0.9, 1.0, 0.9, 0.5)
BLINK_MIN_FRAMES = 21  # clips of 20 frames or fewer get no blinks


def windows_to_tensor(windows: np.ndarray) -> torch.Tensor:
    """(T, 80, 16) mel windows from `xtalker.speech.audio` -> network input (1, T, 1, 80, 16) float32."""
    return torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))[None, :, None]


def _randrange(rng: random.Random | np.random.Generator, lo: int, hi: int) -> int:
    # random.Random.randrange draws exactly like upstream's random.choice(range(lo, hi)).
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(lo, hi))
    return rng.randrange(lo, hi)


def blink_gaps(num_frames: int) -> tuple[int, int]:
    """The range [lo, hi) blink gaps are drawn from for a clip of `num_frames` frames (at least 140: [10, 70))."""
    lo = min(10, num_frames)
    return lo, max(min(num_frames // 2, 70), lo + 1)


def blink_starts(rng: random.Random | np.random.Generator, gaps: tuple[int, int]) -> Iterator[int]:
    """First frames of the blinks, in order, without end: each a random gap after the previous blink ends."""
    frame = 0
    while True:
        start = frame + _randrange(rng, *gaps)
        yield start
        frame = start + len(BLINK_SHAPE)


def blink_ratio(num_frames: int, rng: random.Random | np.random.Generator) -> np.ndarray:
    """Eye-blink curve (T, 1) float32: 5-frame blinks separated by random gaps (spec section 4).

    Gaps are uniform in [min(10, T), min(T // 2, 70)), as upstream. For T = 21 that range is empty and
    upstream crashes; here the gap is then 10 (the range's lower end), which gives the same single blink
    at frames 10-14 that T = 22 always gets. A blink is kept while it ends before the last frame.
    """
    ratio = np.zeros((num_frames, 1), dtype=np.float32)
    if num_frames < BLINK_MIN_FRAMES:
        return ratio
    for start in blink_starts(rng, blink_gaps(num_frames)):
        if start + len(BLINK_SHAPE) > num_frames - 1:
            return ratio
        ratio[start : start + len(BLINK_SHAPE), 0] = BLINK_SHAPE
    return ratio


def savgol_window(num_frames: int, window: int = SAVGOL_WINDOW) -> int:
    """`window`, or the largest odd number <= T when the clip is shorter."""
    w = min(window, num_frames)
    return w if w % 2 == 1 else w - 1


def smooth_pose(pose: torch.Tensor, window: int = SAVGOL_WINDOW, polyorder: int = SAVGOL_POLYORDER) -> torch.Tensor:
    """Savitzky-Golay filter along time (axis -2) of (..., T, 6), mode `interp`, in the input's dtype.

    When the window cannot exceed the polynomial order (T <= 2 with order 2; upstream fails there) the
    pose is returned unchanged: a degree-2 fit through at most 3 points reproduces them anyway.
    """
    w = savgol_window(pose.shape[-2], window)
    if w <= polyorder:
        return pose.clone()
    smoothed = savgol_filter(pose.detach().cpu().numpy(), w, polyorder, axis=-2, mode="interp")
    return torch.from_numpy(np.ascontiguousarray(smoothed)).to(device=pose.device, dtype=pose.dtype)


def apply_ref_pose(coeffs: torch.Tensor, ref_pose: torch.Tensor) -> torch.Tensor:
    """`--ref_pose`: add the reference video's pose change, pose[t] += ref[t] - ref[0].

    coeffs (..., T, 70); ref_pose (L, 6), tiled (or cut) to T frames.
    """
    T = coeffs.shape[-2]
    ref = ref_pose.to(device=coeffs.device, dtype=coeffs.dtype)
    reps = -(-T // ref.shape[0])
    tiled = ref.repeat(reps, 1)[:T]
    out = coeffs.clone()
    out[..., EXP_DIM:COEFF_DIM] += tiled - tiled[:1]
    return out


@dataclass
class CoeffPrediction:
    exp: torch.Tensor  # (B, T, 64)
    pose_motion: torch.Tensor  # (B, T, 6), frame 0 is zero
    pose: torch.Tensor  # (B, T, 6) = reference pose + motion
    pose_smoothed: torch.Tensor  # (B, T, 6)
    coeffs: torch.Tensor  # (B, T, 70) = exp | smoothed pose
    audio_embeddings: list[torch.Tensor]  # pose audio encoder output per chunk
    z: list[torch.Tensor]  # pose latents per chunk


class Audio2Coeff:
    """ExpNet + Audio2Pose + smoothing: mel windows -> (B, T, 70) driving coefficients."""

    def __init__(self, exp_net: ExpNet, pose_net: Audio2Pose, exp_chunk: int = EXP_CHUNK):
        self.exp_net = exp_net.eval()
        self.pose_net = pose_net.eval()
        self.exp_chunk = exp_chunk

    @classmethod
    def from_checkpoint(cls, packed_file: str | Path) -> "Audio2Coeff":
        from xtalker.checkpoints import load_network

        return cls(load_network("audio2exp", packed_file), load_network("audio2pose", packed_file))

    def expression(self, mels: torch.Tensor, ref_exp: torch.Tensor, blink: torch.Tensor) -> torch.Tensor:
        """(B, T, 1, 80, 16), (B, T, 64), (B, T, 1) -> (B, T, 64), `exp_chunk` frames per network call."""
        B, T = mels.shape[:2]
        flat_mels = mels.reshape(B * T, *mels.shape[2:])
        flat_ref = ref_exp.reshape(B * T, EXP_DIM)
        flat_blink = blink.reshape(B * T, 1)
        out = []
        for s in range(0, B * T, self.exp_chunk):
            part = slice(s, s + self.exp_chunk)
            out.append(self.exp_net(flat_mels[part], flat_ref[part], flat_blink[part]))
        return torch.cat(out, dim=0).reshape(B, T, EXP_DIM) if out else mels.new_zeros((B, T, EXP_DIM))

    @torch.inference_mode()
    def predict(
        self,
        mels: torch.Tensor,
        ref: torch.Tensor,
        blink: torch.Tensor,
        pose_style: int | torch.Tensor = 0,
        noise: PoseNoise = 0,
    ) -> CoeffPrediction:
        """mels (B, T, 1, 80, 16); ref: source coefficients (B, 70) or per frame (B, T, 70) (the expression
        part may vary per frame, the pose reference is frame 0); blink (B, T, 1) or (B, T); pose_style int
        in [0, 46) or (B,); noise: pose latents, a torch.Generator or an int seed (see `Audio2Pose`)."""
        if mels.dim() != 5:
            raise ValueError(f"mels must be (B, T, 1, 80, 16), got {tuple(mels.shape)}")
        B, T = mels.shape[:2]
        if ref.dim() == 2:
            ref = ref[:, None].expand(B, T, ref.shape[-1])
        if ref.shape[-1] < COEFF_DIM:
            raise ValueError(f"ref must hold at least {COEFF_DIM} coefficients, got {ref.shape[-1]}")
        blink = blink.reshape(B, T, 1).to(mels.dtype)
        exp = self.expression(mels, ref[..., :EXP_DIM], blink)
        ref_pose = ref[:, 0, EXP_DIM:COEFF_DIM]
        pose_out = self.pose_net(mels, ref_pose, pose_style, noise)
        pose = ref_pose[:, None] + pose_out.motion
        smoothed = smooth_pose(pose)
        return CoeffPrediction(
            exp=exp,
            pose_motion=pose_out.motion,
            pose=pose,
            pose_smoothed=smoothed,
            coeffs=torch.cat([exp, smoothed], dim=-1),
            audio_embeddings=pose_out.audio_embeddings,
            z=pose_out.z,
        )
