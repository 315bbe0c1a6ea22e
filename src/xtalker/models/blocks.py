"""Conv blocks and the coordinate grid shared by the keypoint detector and the generator (official key names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DownBlock2d(nn.Module):
    """conv k3 p1 + BN + ReLU + 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x)), inplace=True), 2)


class SameBlock2d(nn.Module):
    """conv + BN + ReLU (or LeakyReLU 0.01) at constant resolution."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, padding: int = 1, leaky: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_ch)
        self.leaky = leaky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.leaky_relu(x, 0.01, inplace=True) if self.leaky else F.relu(x, inplace=True)


class DownBlock3d(nn.Module):
    """conv3d k3 p1 + BN3d + ReLU + (1, 2, 2) average pool (depth is kept)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(F.relu(self.norm(self.conv(x)), inplace=True), kernel_size=(1, 2, 2))


class UpBlock3d(nn.Module):
    """Nearest (1, 2, 2) upsample + conv3d k3 p1 + BN3d + ReLU (depth is kept)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return F.relu(self.norm(self.conv(x)), inplace=True)


def coordinate_grid(
    depth: int, height: int, width: int, like: torch.Tensor | None = None
) -> torch.Tensor:
    """(D, H, W, 3) grid of (x, y, z), each axis `2 * (i / (n - 1)) - 1`: endpoints -1 and 1 included.

    Built in float32, then moved to the device and dtype of `like` when given.
    """

    def axis(n: int) -> torch.Tensor:
        return 2 * (torch.arange(n, dtype=torch.float32) / (n - 1)) - 1

    z, y, x = torch.meshgrid(axis(depth), axis(height), axis(width), indexing="ij")
    grid = torch.stack([x, y, z], dim=-1)
    return grid if like is None else grid.to(device=like.device, dtype=like.dtype)
