"""GFPGANv1Clean (GFPGAN v1.4 face restorer): U-Net encoder + SFT-conditioned StyleGAN2 decoder (aux spec 3).

Loads the official `GFPGANv1.4.pth` exactly: a torch pickle `{"params_ema": state_dict}` (`"params"` as the
fallback). The 45 tensors upstream never uses at inference (style MLP, intermediate toRGB heads, stored
noise buffers) are checked and dropped; noise is drawn fresh per call or passed in explicitly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xtalker.models import auxfile

log = logging.getLogger(__name__)

FILE_NAME = "GFPGANv1.4.pth"
OUT_SIZE = 512
STYLE_DIM = 512
NUM_LATENTS = 16
NUM_MLP = 8
LRELU_SLOPE = 0.2
DEMOD_EPS = 1e-8

# U-Net (half-width) channels by resolution, down path 512 -> 4.
UNET_CHANNELS = {512: 32, 256: 64, 128: 128, 64: 256, 32: 256, 16: 256, 8: 256, 4: 256}
# StyleGAN2 decoder (channel_multiplier 2) channels by resolution.
DECODER_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64}
LEVELS = [8 * 2**j for j in range(7)]  # decoder/up-path resolutions 8 .. 512
# One noise map per StyleConv in forward order: style_conv1 (4x4), then two per level.
NOISE_SIZES = [4] + [r for r in LEVELS for _ in range(2)]

UNUSED_PREFIXES = ("stylegan_decoder.style_mlp.", "toRGB.", "stylegan_decoder.noises.")


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def _resample(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class ResBlock(nn.Module):
    """Two 3x3 convs with bilinear resampling between them and a resampled 1x1 skip (no bias)."""

    def __init__(self, in_ch: int, out_ch: int, factor: float):
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _resample(_lrelu(self.conv1(x)), self.factor)
        h = _lrelu(self.conv2(h))
        return h + self.skip(_resample(x, self.factor))


class ModulatedConv2d(nn.Module):
    """Per-sample style-scaled kernel, optionally demodulated; input upsampled x2 (bilinear) when asked."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, demodulate: bool, upsample: bool):
        super().__init__()
        self.demodulate = demodulate
        self.upsample = upsample
        self.padding = kernel // 2
        self.weight = nn.Parameter(torch.empty(1, out_ch, in_ch, kernel, kernel))
        self.modulation = nn.Linear(STYLE_DIM, in_ch)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        style = self.modulation(w).view(b, 1, c, 1, 1)
        kernel = self.weight * style
        if self.demodulate:
            demod = torch.rsqrt(kernel.pow(2).sum([2, 3, 4]) + DEMOD_EPS)
            kernel = kernel * demod.view(b, -1, 1, 1, 1)
        if self.upsample:
            x = _resample(x, 2)
        out_ch, k = kernel.shape[1], kernel.shape[-1]
        # One grouped conv runs every sample with its own kernel.
        y = F.conv2d(x.reshape(1, b * c, *x.shape[2:]), kernel.reshape(b * out_ch, c, k, k), padding=self.padding, groups=b)
        return y.view(b, out_ch, *y.shape[2:])


class StyleConv(nn.Module):
    """Modulated 3x3 conv, noise injection (`weight` = strength), bias, leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, upsample: bool):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_ch, out_ch, 3, demodulate=True, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        y = self.modulated_conv(x, w) * math.sqrt(2.0)
        y = y + self.weight * noise
        return _lrelu(y + self.bias)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB (no demodulation) plus the bilinearly upsampled previous RGB."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_ch, 3, 1, demodulate=False, upsample=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        y = self.modulated_conv(x, w) + self.bias
        return y if previous is None else y + _resample(previous, 2)


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, size, size))


class StyleGAN2Decoder(nn.Module):
    """StyleGAN2 synthesis network driven by 16 W+ latents, with SFT on half the channels of each level."""

    def __init__(self):
        super().__init__()
        self.constant_input = ConstantInput(DECODER_CHANNELS[4], 4)
        self.style_conv1 = StyleConv(DECODER_CHANNELS[4], DECODER_CHANNELS[4], upsample=False)
        self.to_rgb1 = ToRGB(DECODER_CHANNELS[4])
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_ch = DECODER_CHANNELS[4]
        for r in LEVELS:
            out_ch = DECODER_CHANNELS[r]
            self.style_convs.append(StyleConv(in_ch, out_ch, upsample=True))
            self.style_convs.append(StyleConv(out_ch, out_ch, upsample=False))
            self.to_rgbs.append(ToRGB(out_ch))
            in_ch = out_ch

    def forward(
        self, latents: torch.Tensor, conditions: Sequence[tuple[torch.Tensor, torch.Tensor]], noise: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        b = latents.shape[0]
        h = self.constant_input.weight.expand(b, -1, -1, -1)
        h = self.style_conv1(h, latents[:, 0], noise[0])
        rgb = self.to_rgb1(h, latents[:, 1], None)
        for j, (scale, shift) in enumerate(conditions):
            i = 1 + 2 * j
            h = self.style_convs[2 * j](h, latents[:, i], noise[1 + 2 * j])
            same, sft = h.split(h.shape[1] // 2, dim=1)
            h = torch.cat([same, sft * scale + shift], dim=1)
            h = self.style_convs[2 * j + 1](h, latents[:, i + 1], noise[2 + 2 * j])
            rgb = self.to_rgbs[j](h, latents[:, i + 2], rgb)
        return rgb


def _condition_branch(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.LeakyReLU(LRELU_SLOPE),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


class Encoded(NamedTuple):
    """Encoder results: W+ latents (B, 16, 512) and one (scale, shift) SFT pair per decoder level (8 .. 512)."""

    style_code: torch.Tensor
    conditions: list[tuple[torch.Tensor, torch.Tensor]]


class GFPGANv1Clean(nn.Module):
    """GFPGAN v1.4 restorer: (B, 3, 512, 512) RGB in [-1, 1] -> restored (B, 3, 512, 512), nominally [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv_body_first = nn.Conv2d(3, UNET_CHANNELS[OUT_SIZE], 1)
        self.conv_body_down = nn.ModuleList()
        r = OUT_SIZE
        while r > 4:
            self.conv_body_down.append(ResBlock(UNET_CHANNELS[r], UNET_CHANNELS[r // 2], 0.5))
            r //= 2
        self.final_conv = nn.Conv2d(UNET_CHANNELS[4], UNET_CHANNELS[4], 3, padding=1)
        self.conv_body_up = nn.ModuleList(
            ResBlock(UNET_CHANNELS[r // 2], UNET_CHANNELS[r], 2.0) for r in LEVELS
        )
        self.final_linear = nn.Linear(UNET_CHANNELS[4] * 16, NUM_LATENTS * STYLE_DIM)
        self.stylegan_decoder = StyleGAN2Decoder()
        self.condition_scale = nn.ModuleList(_condition_branch(UNET_CHANNELS[r]) for r in LEVELS)
        self.condition_shift = nn.ModuleList(_condition_branch(UNET_CHANNELS[r]) for r in LEVELS)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> GFPGANv1Clean:
        """Build from the official state dict (the `params_ema` entry); unused tensors are ignored."""
        used = {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}
        with torch.device("meta"):
            net = cls()
        # assign=True adopts the loaded tensors instead of initialising 84 M parameters first.
        net.load_state_dict(used, strict=True, assign=True)
        return net

    def encode(self, x: torch.Tensor) -> Encoded:
        """U-Net pass: W+ latents from the bottleneck and the SFT conditions from the up path."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, OUT_SIZE, OUT_SIZE):
            raise ValueError(f"GFPGANv1Clean expects (B, 3, {OUT_SIZE}, {OUT_SIZE}) images, got {tuple(x.shape)}")
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        feat = _lrelu(self.final_conv(feat))
        style_code = self.final_linear(feat.flatten(1)).view(x.shape[0], NUM_LATENTS, STYLE_DIM)
        conditions = []
        for j, block in enumerate(self.conv_body_up):
            feat = block(feat + skips[-1 - j])
            conditions.append((self.condition_scale[j](feat), self.condition_shift[j](feat)))
        return Encoded(style_code, conditions)

    def decode(
        self,
        encoded: Encoded,
        noise: Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """StyleGAN2 decoder; without explicit noise, N(0, 1) maps are drawn in upstream's order."""
        b = encoded.style_code.shape[0]
        like = encoded.style_code
        noise = list(noise) if noise is not None else draw_noise(b, generator, like.dtype, like.device)
        if len(noise) != len(NOISE_SIZES):
            raise ValueError(f"GFPGANv1Clean needs {len(NOISE_SIZES)} noise maps, got {len(noise)}")
        return self.stylegan_decoder(encoded.style_code, encoded.conditions, noise)

    def forward(
        self,
        x: torch.Tensor,
        noise: Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return self.decode(self.encode(x), noise, generator)


def draw_noise(
    batch: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """The 15 noise maps (B, 1, r, r), drawn one after another like upstream (global generator if None)."""
    return [torch.empty(batch, 1, r, r, dtype=dtype, device=device).normal_(generator=generator) for r in NOISE_SIZES]


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every key -> shape of the official GFPGANv1.4 state dict, including the 45 tensors unused at inference."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GFPGANv1Clean().state_dict().items()}
    for i in range(NUM_MLP):
        layer = 2 * i + 1  # upstream interleaves the linears with activations (keys 1, 3, ..., 15)
        shapes[f"stylegan_decoder.style_mlp.{layer}.weight"] = (STYLE_DIM, STYLE_DIM)
        shapes[f"stylegan_decoder.style_mlp.{layer}.bias"] = (STYLE_DIM,)
    for j, r in enumerate(LEVELS):
        shapes[f"toRGB.{j}.weight"] = (3, UNET_CHANNELS[r], 1, 1)
        shapes[f"toRGB.{j}.bias"] = (3,)
    for i, r in enumerate(NOISE_SIZES):
        shapes[f"stylegan_decoder.noises.noise{i}"] = (1, 1, r, r)
    return shapes


def check_state(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError naming `source` and the first offending keys unless `state` has the official layout."""
    auxfile.check_state(state, official_layout(), FILE_NAME, source)


def read_gfpgan_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The checked state dict of a GFPGANv1.4 file: `params_ema`, else `params` (as GFPGANer picks)."""
    return auxfile.read_state(path, FILE_NAME, official_layout(), top_keys=("params_ema", "params"))


def load_gfpgan(path: str | Path) -> GFPGANv1Clean:
    """Read, check and build GFPGANv1Clean from an official (or synthetic) GFPGANv1.4.pth, in eval mode."""
    state = read_gfpgan_state(path)
    log.debug("loaded GFPGANv1Clean from %s (%d tensors)", path, len(state))
    return GFPGANv1Clean.from_official(state).eval()


def preprocess_bgr_u8(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, 512, 512, 3) BGR uint8 aligned crops -> (B, 3, 512, 512) RGB float32 in [-1, 1], as GFPGANer does."""
    u8 = torch.as_tensor(crops)
    if u8.dtype != torch.uint8 or u8.dim() != 4 or u8.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) uint8 BGR crops, got {tuple(u8.shape)} {u8.dtype}")
    # Upstream divides in float64 and only then rounds to float32.
    x = (u8.to(torch.float64) / 255.0).to(torch.float32)
    x = x.flip(-1).permute(0, 3, 1, 2)
    return ((x - 0.5) / 0.5).contiguous()


def postprocess_to_bgr_u8(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB network output -> (B, H, W, 3) BGR uint8: clamp to [-1, 1], rescale, round half to even."""
    y = (image.to(torch.float32).clamp(-1.0, 1.0) + 1.0) / 2.0
    y = y.permute(0, 2, 3, 1).flip(-1)
    return torch.round(y * 255.0).to(torch.uint8)
