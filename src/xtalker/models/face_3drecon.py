"""3DMM face reconstruction network (`face_3drecon.`): ResNet-50 backbone and seven 1x1 coefficient heads.

Input (B, 3, 224, 224) RGB in [0, 1] without mean/std normalisation; output (B, 257) coefficients
id 80 | exp 64 | tex 80 | angle 3 | gamma 27 | trans 3. Module names follow the official checkpoint
(`backbone.layerN.M.convK`, `final_layers.i`), so the prefix-stripped state dict loads strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xtalker.models.resnet import ResNet50

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


def split_coeff(coeff: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 257) -> named views id, exp, tex, angle, gamma, trans."""
    return {name: coeff[:, sl] for name, sl in COEFF_SLICES.items()}


class ReconNet(nn.Module):
    """Deep3DFaceRecon coefficient regressor: ResNet-50 features -> 257 3DMM coefficients per image."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet50()
        self.final_layers = nn.ModuleList(nn.Conv2d(2048, n, 1, bias=True) for _, n in HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) float RGB in [0, 1] -> (B, 257)."""
        feat = F.adaptive_avg_pool2d(self.backbone(x), 1)
        return torch.cat([head(feat) for head in self.final_layers], dim=1).flatten(1)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> "ReconNet":
        net = cls()
        net.load_state_dict(state, strict=True)
        return net
