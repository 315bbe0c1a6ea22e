"""MappingNet: a 27-frame window of 3DMM coefficients -> head pose logits, translation and keypoint offsets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DESCRIPTOR_NC = 1024
NUM_BINS = 66
NUM_KP = 15
NUM_ENCODER_BLOCKS = 3
WINDOW = 27


@dataclass(frozen=True)
class HeadPose:
    """Mapping output for a batch: angle logits over 66 three-degree bins, translation, keypoint offsets."""

    yaw: torch.Tensor  # (B, 66)
    pitch: torch.Tensor  # (B, 66)
    roll: torch.Tensor  # (B, 66)
    t: torch.Tensor  # (B, 3)
    exp: torch.Tensor  # (B, 45) = 15 keypoints x (x, y, z)


class MappingNet(nn.Module):
    """Temporal conv encoder over (B, coeff_nc, 27) windows with five linear heads (spec G1)."""

    def __init__(self, coeff_nc: int = 70):
        super().__init__()
        self.coeff_nc = coeff_nc
        # Sequential wrappers reproduce the official key names (`first.0.*`, `encoder{i}.1.*`).
        self.first = nn.Sequential(nn.Conv1d(coeff_nc, DESCRIPTOR_NC, kernel_size=7, padding=0, bias=True))
        for i in range(NUM_ENCODER_BLOCKS):
            block = nn.Sequential(
                nn.LeakyReLU(0.1),
                nn.Conv1d(DESCRIPTOR_NC, DESCRIPTOR_NC, kernel_size=3, padding=0, dilation=3),
            )
            self.add_module(f"encoder{i}", block)
        self.fc_roll = nn.Linear(DESCRIPTOR_NC, NUM_BINS)
        self.fc_pitch = nn.Linear(DESCRIPTOR_NC, NUM_BINS)
        self.fc_yaw = nn.Linear(DESCRIPTOR_NC, NUM_BINS)
        self.fc_t = nn.Linear(DESCRIPTOR_NC, 3)
        self.fc_exp = nn.Linear(DESCRIPTOR_NC, 3 * NUM_KP)

    def forward(self, semantics: torch.Tensor) -> HeadPose:
        if semantics.dim() != 3 or semantics.shape[1] != self.coeff_nc or semantics.shape[2] != WINDOW:
            raise ValueError(
                f"MappingNet expects (B, {self.coeff_nc}, {WINDOW}) coefficient windows, got {tuple(semantics.shape)}"
            )
        h = self.first(semantics)
        for i in range(NUM_ENCODER_BLOCKS):
            # Each dilated k3 conv shortens time by 6; the residual is the centre-cropped input.
            h = getattr(self, f"encoder{i}")(h) + h[:, :, 3:-3]
        feat = h.mean(dim=2)
        return HeadPose(
            yaw=self.fc_yaw(feat),
            pitch=self.fc_pitch(feat),
            roll=self.fc_roll(feat),
            t=self.fc_t(feat),
            exp=self.fc_exp(feat),
        )

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> "MappingNet":
        """Build from the `mapping` state dict; coeff_nc (70 crop / 73 full) comes from `first.0.weight`."""
        model = cls(coeff_nc=int(state["first.0.weight"].shape[1]))
        model.load_state_dict(state, strict=True)
        return model
