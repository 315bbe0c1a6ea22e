"""Head pose -> 3D keypoints (spec G3): degrees from bin logits, rotation, translation and offsets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xtalker.models.mapping import HeadPose

# Upstream converts with 3.14, not pi; the weights were trained with it.
PI_APPROX = 3.14
BIN_WIDTH_DEG = 3.0
DEG_OFFSET = 99.0


def logits_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """(B, 66) bin logits -> (B,) degrees: softmax expectation of the bin index, times 3, minus 99."""
    idx = torch.arange(logits.shape[1], dtype=logits.dtype, device=logits.device)
    prob = torch.softmax(logits, dim=1)
    return torch.sum(prob * idx, dim=1) * BIN_WIDTH_DEG - DEG_OFFSET


def rotation_matrix(yaw_deg: torch.Tensor, pitch_deg: torch.Tensor, roll_deg: torch.Tensor) -> torch.Tensor:
    """(B,) degrees each -> (B, 3, 3) = Rx(pitch) @ Ry(yaw) @ Rz(roll)."""
    yaw = yaw_deg / 180 * PI_APPROX
    pitch = pitch_deg / 180 * PI_APPROX
    roll = roll_deg / 180 * PI_APPROX
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)

    def mat(*rows: torch.Tensor) -> torch.Tensor:
        return torch.stack(rows, dim=1).view(-1, 3, 3)

    rx = mat(one, zero, zero, zero, pitch.cos(), -pitch.sin(), zero, pitch.sin(), pitch.cos())
    ry = mat(yaw.cos(), zero, yaw.sin(), zero, one, zero, -yaw.sin(), zero, yaw.cos())
    rz = mat(roll.cos(), -roll.sin(), zero, roll.sin(), roll.cos(), zero, zero, zero, one)
    return rx @ ry @ rz


@dataclass(frozen=True)
class PoseDegrees:
    """Per-sample angles in degrees, (B,) each."""

    yaw: torch.Tensor
    pitch: torch.Tensor
    roll: torch.Tensor


def pose_degrees(
    pose: HeadPose,
    yaw_deg: torch.Tensor | None = None,
    pitch_deg: torch.Tensor | None = None,
    roll_deg: torch.Tensor | None = None,
) -> PoseDegrees:
    """Degrees from the logits; a given (B,) override replaces that angle (the `--input_yaw` style keyframes)."""

    def pick(override: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        if override is None:
            return logits_to_degrees(logits)
        return override.to(dtype=logits.dtype, device=logits.device).reshape(logits.shape[0])

    return PoseDegrees(yaw=pick(yaw_deg, pose.yaw), pitch=pick(pitch_deg, pose.pitch), roll=pick(roll_deg, pose.roll))


def transform_keypoints(
    kp_canonical: torch.Tensor,
    pose: HeadPose,
    yaw_deg: torch.Tensor | None = None,
    pitch_deg: torch.Tensor | None = None,
    roll_deg: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, K, 3) canonical keypoints -> R @ kp + (0, t_y, 0) + exp.reshape(K, 3), inputs left untouched.

    `kp_canonical` may have batch 1 (one source for the whole batch). Upstream zeroes t_x and t_z (in
    place on the mapping output); only the vertical translation is used.
    """
    deg = pose_degrees(pose, yaw_deg, pitch_deg, roll_deg)
    rot = rotation_matrix(deg.yaw, deg.pitch, deg.roll)
    if kp_canonical.shape[0] == 1:
        kp_canonical = kp_canonical.expand(rot.shape[0], -1, -1)
    rotated = torch.einsum("bmp,bkp->bkm", rot, kp_canonical)
    t = pose.t * torch.tensor([0.0, 1.0, 0.0], dtype=pose.t.dtype, device=pose.t.device)
    return rotated + t[:, None, :] + pose.exp.view(pose.exp.shape[0], -1, 3)
