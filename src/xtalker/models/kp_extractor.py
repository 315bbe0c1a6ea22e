"""KPDetector: source image -> 15 canonical 3-D keypoints (spec G2), plus the conv blocks the renderer shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xtalker.models.blocks import DownBlock2d, UpBlock3d, coordinate_grid, fuse_for_inference

NUM_KP = 15
TEMPERATURE = 0.1
DOWN_FACTOR = 4
GAUSSIAN_RADIUS = 6  # 13x13 kernel, sigma 1.5
BLOCK_EXPANSION = 32
NUM_BLOCKS = 5
MAX_FEATURES = 1024
DEPTH = 16


class AntiAliasDown(nn.Module):
    """Gaussian blur (zero padding) then every 4th pixel; the 13x13 kernel is the checkpoint's `down.weight`."""

    def __init__(self, channels: int = 3):
        super().__init__()
        size = 2 * GAUSSIAN_RADIUS + 1
        self.register_buffer("weight", torch.zeros(channels, 1, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A strided conv gives exactly the kept samples of blur-then-subsample without computing the others.
        return F.conv2d(x, self.weight, stride=DOWN_FACTOR, padding=GAUSSIAN_RADIUS, groups=x.shape[1])


class KPHourglass(nn.Module):
    """2-D encoder to 1024 x (S/128)^2, 1x1 conv lifted to a 16-deep volume, 3-D decoder back to S/4."""

    def __init__(self, in_features: int = 3):
        super().__init__()
        self.down_blocks = nn.Sequential()
        channels = in_features
        for i in range(NUM_BLOCKS):
            out = min(MAX_FEATURES, BLOCK_EXPANSION * 2 ** (i + 1))
            self.down_blocks.add_module(f"down{i}", DownBlock2d(channels, out))
            channels = out
        self.conv = nn.Conv2d(channels, MAX_FEATURES * DEPTH, kernel_size=1)
        self.up_blocks = nn.Sequential()
        channels = MAX_FEATURES
        for i in range(NUM_BLOCKS):
            out = min(MAX_FEATURES, BLOCK_EXPANSION * 2 ** (NUM_BLOCKS - i - 1))
            self.up_blocks.add_module(f"up{i}", UpBlock3d(channels, out))
            channels = out
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.down_blocks(x))
        b, c, h, w = x.shape
        # Channel index = feature * 16 + depth (feature-major), as the official weights were trained.
        return self.up_blocks(x.view(b, c // DEPTH, DEPTH, h, w))


class KPDetector(nn.Module):
    """Image (B, 3, S, S) in [0, 1] -> canonical keypoints (B, 15, 3) as (x, y, z) in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.down = AntiAliasDown(3)
        self.predictor = KPHourglass(3)
        self.kp = nn.Conv3d(self.predictor.out_channels, NUM_KP, kernel_size=3, padding=1)

    def antialias_down(self, image: torch.Tensor) -> torch.Tensor:
        """The 1/4 anti-aliased down-sampling, (B, 3, S/4, S/4)."""
        return self.down(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"KPDetector expects (B, 3, S, S) images, got {tuple(image.shape)}")
        heatmap = self.kp(self.predictor(self.antialias_down(image)))
        return heatmap_to_keypoints(heatmap)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> "KPDetector":
        """Strict load in the official layout, then the inference form (BN folded, polyphase up blocks)."""
        model = cls()
        model.load_state_dict(state, strict=True)
        return fuse_for_inference(model)


def heatmap_to_keypoints(heatmap: torch.Tensor) -> torch.Tensor:
    """Soft-argmax: softmax of logits / 0.1 over the whole volume, expectation of the coordinate grid."""
    b, k, d, h, w = heatmap.shape
    prob = F.softmax(heatmap.reshape(b, k, -1) / TEMPERATURE, dim=2).view(b, k, d, h, w, 1)
    # An elementwise product + sum (pairwise reduction) reproduces the reference bit for bit; a matmul
    # over the 65,536 positions accumulates differently and drifts by up to 4e-5.
    return (prob * coordinate_grid(d, h, w, like=prob)).sum(dim=(2, 3, 4))
