"""ExpNet (`audio2exp.`): per-frame mel window + reference expression + blink -> 64 expression coefficients.

Also home of the 13-block audio encoder shared (with separate weights) by the pose network (spec section 5).
"""

from __future__ import annotations

import torch
from torch import nn

AUDIO_FEATURE_DIM = 512
EXP_DIM = 64
MEL_BANDS = 80
MEL_STEP = 16

# (in, out, kernel, stride, padding, residual) of the 13 encoder blocks; shapes per frame in the spec table.
ENCODER_BLOCKS: tuple[tuple[int, int, int, tuple[int, int], int, bool], ...] = (
    (1, 32, 3, (1, 1), 1, False),
    (32, 32, 3, (1, 1), 1, True),
    (32, 32, 3, (1, 1), 1, True),
    (32, 64, 3, (3, 1), 1, False),
    (64, 64, 3, (1, 1), 1, True),
    (64, 64, 3, (1, 1), 1, True),
    (64, 128, 3, (3, 3), 1, False),
    (128, 128, 3, (1, 1), 1, True),
    (128, 128, 3, (1, 1), 1, True),
    (128, 256, 3, (3, 2), 1, False),
    (256, 256, 3, (1, 1), 1, True),
    (256, 512, 3, (1, 1), 0, False),
    (512, 512, 1, (1, 1), 0, False),
)


class ConvBlock(nn.Module):
    """Conv + BN + ReLU; a residual block adds its input after BN, before the ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: tuple[int, int], padding: int, residual: bool):
        super().__init__()
        # `conv_block.{0,1}` are the official key names.
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return torch.relu(out)


def build_audio_encoder() -> nn.Sequential:
    """The 13-block encoder: (N, 1, 80, 16) mel windows -> (N, 512, 1, 1)."""
    return nn.Sequential(*(ConvBlock(*spec) for spec in ENCODER_BLOCKS))


def encode_windows(encoder: nn.Sequential, mels: torch.Tensor) -> torch.Tensor:
    """Run the encoder over windows of any leading shape (..., 1, 80, 16) or (..., 80, 16) -> (..., 512)."""
    if mels.shape[-2:] != (MEL_BANDS, MEL_STEP):
        raise ValueError(f"mel windows must end in ({MEL_BANDS}, {MEL_STEP}), got {tuple(mels.shape)}")
    if mels.dim() >= 3 and mels.shape[-3] == 1:
        mels = mels.squeeze(-3)
    lead = mels.shape[:-2]
    flat = mels.reshape(-1, 1, MEL_BANDS, MEL_STEP)
    if flat.shape[0] == 0:
        return flat.new_zeros((*lead, AUDIO_FEATURE_DIM))
    return encoder(flat).reshape(*lead, AUDIO_FEATURE_DIM)


class ExpNet(nn.Module):
    """Audio encoder + Linear(512 + 64 + 1 -> 64). Frames are independent, so any batching gives the same result."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = build_audio_encoder()
        self.mapping1 = nn.Linear(AUDIO_FEATURE_DIM + EXP_DIM + 1, EXP_DIM)

    def encode(self, mels: torch.Tensor) -> torch.Tensor:
        """(..., 1, 80, 16) mel windows -> (..., 512) audio features."""
        return encode_windows(self.audio_encoder, mels)

    def head(self, audio_feature: torch.Tensor, ref_exp: torch.Tensor, blink: torch.Tensor) -> torch.Tensor:
        """(..., 512), (..., 64), (..., 1) -> (..., 64). No residual to the reference expression."""
        return self.mapping1(torch.cat([audio_feature, ref_exp, blink], dim=-1))

    def forward(self, mels: torch.Tensor, ref_exp: torch.Tensor, blink: torch.Tensor) -> torch.Tensor:
        """mels (B, T, 1, 80, 16), ref_exp (B, T, 64), blink (B, T, 1) -> expression (B, T, 64)."""
        return self.head(self.encode(mels), ref_exp, blink)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> "ExpNet":
        model = cls()
        model.load_state_dict(state, strict=True)
        return model
