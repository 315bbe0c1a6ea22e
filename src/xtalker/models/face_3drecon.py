"""3DMM face reconstruction network (`face_3drecon.`): ResNet-50 backbone and seven 1x1 coefficient heads.

Input (B, 3, 224, 224) RGB in [0, 1] without mean/std normalisation; output (B, 257) coefficients
id 80 | exp 64 | tex 80 | angle 3 | gamma 27 | trans 3. Module names follow the official checkpoint
(`backbone.layerN.M.convK`, `final_layers.i`), so the prefix-stripped state dict loads strictly.
"""

from __future__ import annotations

import torch
from torch import nn

# (name, width) of the heads in output order; (tx, ty) and tz are separate heads upstream.
HEADS: tuple[tuple[str, int], ...] = (
    ("id", 80),
    ("exp", 64),
    ("tex", 80),
    ("angle", 3),
    ("gamma", 27),
    ("trans_xy", 2),
    ("trans_z", 1),
)
COEFF_SLICES: dict[str, slice] = {
    "id": slice(0, 80),
    "exp": slice(80, 144),
    "tex": slice(144, 224),
    "angle": slice(224, 227),
    "gamma": slice(227, 254),
    "trans": slice(254, 257),
}
BLOCKS_PER_LAYER = (3, 4, 6, 3)
EXPANSION = 4


def split_coeff(coeff: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 257) -> named views id, exp, tex, angle, gamma, trans."""
    return {name: coeff[:, sl] for name, sl in COEFF_SLICES.items()}


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    def __init__(self, in_ch: int, width: int, stride: int, downsample: bool):
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            if downsample
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 feature extractor up to global average pooling: (B, 3, H, W) -> (B, 2048, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for i, blocks in enumerate(BLOCKS_PER_LAYER):
            width = 64 * 2**i
            stride = 1 if i == 0 else 2
            layer = [Bottleneck(in_ch, width, stride, downsample=True)]
            in_ch = width * EXPANSION
            layer += [Bottleneck(in_ch, width, 1, downsample=False) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)


class ReconNet(nn.Module):
    """Deep3DFaceRecon coefficient regressor: ResNet-50 features -> 257 3DMM coefficients per image."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet50()
        self.final_layers = nn.ModuleList(nn.Conv2d(2048, n, 1, bias=True) for _, n in HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) float RGB in [0, 1] -> (B, 257)."""
        feat = self.backbone(x)
        return torch.cat([head(feat) for head in self.final_layers], dim=1).flatten(1)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> "ReconNet":
        net = cls()
        net.load_state_dict(state, strict=True)
        return net
