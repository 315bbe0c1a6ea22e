"""GFPGANv1Clean (GFPGAN v1.4 face restorer): U-Net encoder + SFT-conditioned StyleGAN2 decoder (aux spec 3).

Loads the official `GFPGANv1.4.pth` exactly: a torch pickle `{"params_ema": state_dict}` (`"params"` as the
fallback). The 45 tensors upstream never uses at inference (style MLP, intermediate toRGB heads, stored
noise buffers) are checked and dropped; noise is drawn fresh per call or passed in explicitly.

Two ways to run it:

- `GFPGANv1Clean.forward` (`encode` + `decode`): the upstream graph op for op; the reference for parity.
- `fast_plan(net, precision).restore(x, noise)`: the inference path the enhancer uses, built once per network
  and precision (`FastGFPGAN`). Same function, less work: channels-last; faces run one at a time, so each
  modulated conv is one plain conv whose kernel is the shared weight scaled by style x demodulation x sqrt(2)
  (demodulation from precomputed squared-weight sums); resampled 1x1 skip convs run at the lower resolution;
  where the output is at least 256 px, "bilinear x2 then 3x3 conv" is one stride-2 transposed 6x6 conv on the
  low-resolution map (no upsampled copy); in fp32, Winograd F(2x2, 3x3) for the 256/512-channel convs on maps
  up to 64 px (modulated ones scale the input by the style and the output by the demodulation); in-place
  activations. fp32: about 0.66x the upstream time, within the golden tolerances
  (channels-last convs round differently: about twice the reference's difference from the golden image).
  "bf16": bfloat16 copies of the conv weights and bfloat16 activations (styles, demodulation and the RGB sum
  stay fp32): about 0.36x the fp32 upstream time (0.58x upstream under bf16 autocast), ~60 dB PSNR against
  fp32 where autocast gives ~57.5 dB.
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
from xtalker.models.plans import cached_plan

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

STYLE_GAIN = math.sqrt(2.0)  # StyleConv's output gain
# "Bilinear x2, then 3x3 conv" runs as one transposed conv when its output is at least this large: measured
# faster there (no upsampled copy, 15-25 % less time), slower for the small 512-channel maps.
TRANSPOSED_MIN_SIZE = 256
# Bilinear x2 (align_corners=False) is a stride-2 transposed conv with taps (1/4, 3/4, 3/4, 1/4) over the
# replicate-padded input; composed with a 3x3 conv it is one stride-2 transposed 6x6 conv (padding 4) whose
# kernel row q weights conv row k by tap q + k - 2:
_BILINEAR_TAPS = (0.25, 0.75, 0.75, 0.25)
_UP_TAPS = torch.tensor(
    [[_BILINEAR_TAPS[q + k - 2] if 0 <= q + k - 2 < 4 else 0.0 for k in range(3)] for q in range(6)],
    dtype=torch.float64,
)
# fp32 only: Winograd F(2x2, 3x3) (2.25x fewer multiplications) for convs with at least this many input channels on
# maps of at most this size; elsewhere its transforms (extra passes over the maps in eager torch) cost more than
# it saves. Not in bf16: CPU bf16 GEMMs round their products to bf16 before the output transform sums nine of
# them (measured -5 dB PSNR for 7 % less time).
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_MAX_SIZE = 64
_WINOGRAD_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


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

    def down(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The U-Net's down path: the bottleneck features (after final_conv) and the skips of every level."""
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        return _lrelu(self.final_conv(feat)), skips

    def encode(self, x: torch.Tensor) -> Encoded:
        """U-Net pass: W+ latents from the bottleneck and the SFT conditions from the up path."""
        _check_input(x)
        feat, skips = self.down(x)
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


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, OUT_SIZE, OUT_SIZE):
        raise ValueError(f"GFPGANv1Clean expects (B, 3, {OUT_SIZE}, {OUT_SIZE}) images, got {tuple(x.shape)}")


def _conv_method(in_ch: int, size: int, upsample: bool, dtype: torch.dtype, device: torch.device | None = None) -> str:
    """How the plan runs a 3x3 conv with `size` px output maps (input upsampled x2 first if `upsample`). The
    hand-written Winograd is a CPU path (measured there); on a GPU cuDNN picks its own conv algorithms."""
    if upsample and size >= TRANSPOSED_MIN_SIZE:
        return "transposed"
    on_cpu = device is None or device.type == "cpu"
    if on_cpu and dtype == torch.float32 and in_ch >= WINOGRAD_MIN_CHANNELS and size <= WINOGRAD_MAX_SIZE:
        return "winograd"
    return "direct"


def _up_kernel(w: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) kernel of "bilinear x2, then 3x3 conv" -> the equivalent (in, out, 6, 6) transposed kernel,
    computed in float64."""
    taps = _UP_TAPS.to(w.device)
    return torch.einsum("ak,bl,oikl->ioab", taps, taps, w.double())


def _winograd_kernel(w: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) kernel -> its (16, in, out) Winograd F(2x2, 3x3) form G w G^T, computed in float64."""
    g = _WINOGRAD_G.to(w.device)
    return torch.einsum("ak,oikl,bl->abio", g, w.double(), g).reshape(16, w.shape[1], w.shape[0])


def _conv_upsampled(x: torch.Tensor, kernel: torch.Tensor, up_kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Zero-padded 3x3 conv (`kernel`) of bilinear_x2(x), computed through `up_kernel` (its `_up_kernel` form)."""
    y = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), up_kernel, bias, stride=2, padding=4)
    # Beyond the border the transposed conv sees the upsampled map continued by replication where the conv
    # sees zeros: the outer rows and columns are redone from the 2-pixel edge strips of the upsampled map.
    y[:, :, :1] = F.conv2d(_resample(x[:, :, :2], 2)[:, :, :2], kernel, bias, padding=1)[:, :, :1]
    y[:, :, -1:] = F.conv2d(_resample(x[:, :, -2:], 2)[:, :, 2:], kernel, bias, padding=1)[:, :, -1:]
    y[..., :1] = F.conv2d(_resample(x[..., :2], 2)[..., :2], kernel, bias, padding=1)[..., :1]
    y[..., -1:] = F.conv2d(_resample(x[..., -2:], 2)[..., 2:], kernel, bias, padding=1)[..., -1:]
    return y


def _winograd_input(d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, d3: torch.Tensor, out: torch.Tensor) -> None:
    """B^T d over four rows (or columns) of the 4 x 4 input tiles, into out[0..3]."""
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])


def _winograd_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Zero-padded 3x3 conv of a channels-last (B, in, H, W) map (H, W even) with a (16, in, out)
    `_winograd_kernel`: 2 x 2 output tiles from overlapping 4 x 4 input tiles, 16 GEMMs over the channels."""
    b, c, h, w = x.shape
    th, tw = h // 2, w // 2
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, H + 2, W + 2, C), contiguous
    rows = x.new_empty(4, b, th, w + 2, c)
    _winograd_input(*(padded[:, i : i + 2 * th : 2] for i in range(4)), out=rows)
    tiles = x.new_empty(4, 4, b, th, tw, c)
    _winograd_input(*(rows[:, :, :, j : j + 2 * tw : 2] for j in range(4)), out=tiles.transpose(0, 1))
    m = x.new_empty(16, b * th * tw, kernel.shape[-1])
    for k, (t, u) in enumerate(zip(tiles.view(16, -1, c), kernel)):
        torch.mm(t, u, out=m[k])  # 10-15 % faster than one bmm
    m = m.view(4, 4, b, th, tw, -1)
    # A^T m A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: over the tile rows, then the columns into the output.
    half = x.new_empty(2, *m.shape[1:])
    torch.add(m[0], m[1], out=half[0]).add_(m[2])
    torch.sub(m[1], m[2], out=half[1]).sub_(m[3])
    cols = half.permute(1, 2, 3, 0, 4, 5)  # (4 tile columns, B, th, 2 rows, tw, out)
    y = x.new_empty(b, th, 2, tw, 2, m.shape[-1])
    torch.add(cols[0], cols[1], out=y[..., 0, :]).add_(cols[2])
    torch.sub(cols[1], cols[2], out=y[..., 1, :]).sub_(cols[3])
    return y.view(b, h, w, -1).permute(0, 3, 1, 2)


def _conv3x3(
    x: torch.Tensor,
    method: str,
    kernel: torch.Tensor | None,
    alt_kernel: torch.Tensor | None,
    bias: torch.Tensor | None,
    upsample: bool,
) -> torch.Tensor:
    """Zero-padded 3x3 conv of x (bilinear_x2(x) if `upsample`) by `method`; `alt_kernel` is the transposed or
    Winograd form of `kernel` those methods need."""
    if method == "transposed":
        return _conv_upsampled(x, kernel, alt_kernel, bias)
    if upsample:
        x = _resample(x, 2)
    if method == "winograd":
        y = _winograd_conv(x, alt_kernel)
        return y if bias is None else y.add_(bias.view(-1, 1, 1))
    return F.conv2d(x, kernel, bias, padding=1)


class _Conv:
    """A fixed conv of the plan (weights in the plan's dtype) with `size` px output maps; leaky ReLU in place
    if asked."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, size: int, act: bool = False, upsample: bool = False):
        w = conv.weight.detach()
        self.method = _conv_method(w.shape[1], size, upsample, dtype, w.device) if w.shape[-1] == 3 else "direct"
        self.upsample = upsample
        self.weight = w.to(dtype)
        alt = {"transposed": _up_kernel, "winograd": _winograd_kernel}.get(self.method)
        self.alt_weight = None if alt is None else alt(w).to(dtype)
        self.bias = None if conv.bias is None else conv.bias.detach().to(dtype)
        self.act = act

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[-1] == 1:
            y = F.conv2d(x, self.weight, self.bias)
        else:
            y = _conv3x3(x, self.method, self.weight, self.alt_weight, self.bias, self.upsample)
        return F.leaky_relu_(y, LRELU_SLOPE) if self.act else y


class _FastResBlock:
    """ResBlock with 2x2 averaging for the "down" resampling and the 1x1 skip conv at the lower resolution
    (bilinear resampling commutes with a 1x1 conv)."""

    def __init__(self, block: ResBlock, dtype: torch.dtype, in_size: int):
        self.down = block.factor < 1
        out_size = in_size // 2 if self.down else in_size * 2
        self.conv1 = _Conv(block.conv1, dtype, in_size, act=True)
        self.conv2 = _Conv(block.conv2, dtype, out_size, act=True, upsample=not self.down)
        self.skip = _Conv(block.skip, dtype, out_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            # Bilinear 0.5 on even sizes is the 2 x 2 average.
            return self.conv2(F.avg_pool2d(self.conv1(x), 2)).add_(self.skip(F.avg_pool2d(x, 2)))
        return self.conv2(self.conv1(x)).add_(_resample(self.skip(x), 2))


class _FastStyleConv:
    """StyleConv on one face. Winograd convs run the shared kernel on the style-scaled input map and demodulate
    the output; the others scale the kernel per (out, in) by style x demodulation x sqrt(2) (cheaper for their
    large maps). Demodulation comes from precomputed squared-weight sums."""

    def __init__(self, layer: StyleConv, dtype: torch.dtype, size: int):
        conv = layer.modulated_conv
        self.weight = conv.weight.detach()[0]
        # sum_{i,kh,kw} (W[o,i] s[i])^2 = sum_i |W[o,i]|^2 s[i]^2: demodulation without building the kernel first.
        self.norms = self.weight.pow(2).sum([2, 3])
        self.upsample = conv.upsample
        self.method = _conv_method(self.weight.shape[1], size, conv.upsample, dtype, self.weight.device)
        self.alt_weight = None
        if self.method == "transposed":
            self.alt_weight = _up_kernel(self.weight).float()
        elif self.method == "winograd":
            self.alt_weight = _winograd_kernel(self.weight).to(dtype)
        self.modulation = (conv.modulation.weight.detach(), conv.modulation.bias.detach())
        self.noise_strength = layer.weight.detach()
        self.bias = layer.bias.detach().flatten().to(dtype)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        style = F.linear(w, *self.modulation)[0]
        demod = torch.rsqrt(self.norms @ style.square() + DEMOD_EPS) * STYLE_GAIN
        if self.method == "winograd":
            x = x * style.to(self.dtype).view(-1, 1, 1)
            y = _conv3x3(x, self.method, None, self.alt_weight, None, self.upsample)
            y.mul_(demod.to(self.dtype).view(-1, 1, 1)).add_(self.bias.view(-1, 1, 1))
        else:
            scale = demod[:, None] * style[None, :]
            kernel = (self.weight * scale[:, :, None, None]).to(self.dtype)
            alt = None if self.alt_weight is None else (self.alt_weight * scale.t()[:, :, None, None]).to(self.dtype)
            y = _conv3x3(x, self.method, kernel, alt, self.bias, self.upsample)
        y.add_((self.noise_strength * noise).to(self.dtype))
        return F.leaky_relu_(y, LRELU_SLOPE)


class _FastToRGB:
    """ToRGB on one face; the RGB image is accumulated in fp32."""

    def __init__(self, layer: ToRGB, dtype: torch.dtype):
        conv = layer.modulated_conv
        self.weight = conv.weight.detach()[0]
        self.modulation = (conv.modulation.weight.detach(), conv.modulation.bias.detach())
        self.bias = layer.bias.detach()
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, w: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        style = F.linear(w, *self.modulation)[0]
        kernel = (self.weight * style[None, :, None, None]).to(self.dtype)
        y = F.conv2d(x, kernel).float().add_(self.bias)
        return y if previous is None else y.add_(_resample(previous, 2))


class FastGFPGAN:
    """Inference plan of a GFPGANv1Clean (see the module docstring): conv weights in `dtype`, channels-last
    activations. Built from the network's current weights; build a new plan after changing them."""

    def __init__(self, net: GFPGANv1Clean, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        with torch.no_grad():
            self.first = _Conv(net.conv_body_first, dtype, OUT_SIZE, act=True)
            self.down = [_FastResBlock(b, dtype, OUT_SIZE >> j) for j, b in enumerate(net.conv_body_down)]
            self.final_conv = _Conv(net.final_conv, dtype, 4, act=True)
            self.final_linear = (net.final_linear.weight.detach(), net.final_linear.bias.detach())
            self.up = [_FastResBlock(b, dtype, r // 2) for b, r in zip(net.conv_body_up, LEVELS)]
            self.conditions = [
                [(_Conv(c[0], dtype, r, act=True), _Conv(c[2], dtype, r)) for c in (scale, shift)]
                for scale, shift, r in zip(net.condition_scale, net.condition_shift, LEVELS)
            ]
            decoder = net.stylegan_decoder
            self.constant = decoder.constant_input.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
            self.style_conv1 = _FastStyleConv(decoder.style_conv1, dtype, 4)
            self.to_rgb1 = _FastToRGB(decoder.to_rgb1, dtype)
            sizes = [r for r in LEVELS for _ in range(2)]
            self.style_convs = [_FastStyleConv(c, dtype, r) for c, r in zip(decoder.style_convs, sizes)]
            self.to_rgbs = [_FastToRGB(t, dtype) for t in decoder.to_rgbs]

    def restore(
        self,
        x: torch.Tensor,
        noise: Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, 3, 512, 512) RGB in [-1, 1] -> restored (B, 3, 512, 512) float32, as `GFPGANv1Clean.forward`.
        Faces run one at a time: batching gains nothing at these map sizes, and a face's result then does not
        depend on its batch."""
        _check_input(x)
        noise = list(noise) if noise is not None else draw_noise(x.shape[0], generator)
        noise = [n.to(x.device) for n in noise]  # drawn on the CPU (a CPU generator), used where x is
        if len(noise) != len(NOISE_SIZES):
            raise ValueError(f"GFPGANv1Clean needs {len(NOISE_SIZES)} noise maps, got {len(noise)}")
        with torch.inference_mode():
            faces = [self._restore_one(x[i : i + 1], [n[i : i + 1] for n in noise]) for i in range(x.shape[0])]
            return torch.cat(faces) if faces else x.new_zeros(x.shape)

    def _restore_one(self, x: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
        latents, conditions = self._encode(x.to(self.dtype).contiguous(memory_format=torch.channels_last))
        return self._decode(latents, conditions, noise)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        feat = self.first(x)
        skips = []
        for block in self.down:
            feat = block(feat)
            skips.append(feat)
        feat = self.final_conv(feat)
        latents = F.linear(feat.float().flatten(1), *self.final_linear).view(NUM_LATENTS, 1, STYLE_DIM)
        conditions = []
        for j, block in enumerate(self.up):
            feat = block(feat.add_(skips[-1 - j]))
            (scale1, scale2), (shift1, shift2) = self.conditions[j]
            conditions.append((scale2(scale1(feat)), shift2(shift1(feat))))
        return latents, conditions

    def _decode(
        self, latents: torch.Tensor, conditions: list[tuple[torch.Tensor, torch.Tensor]], noise: list[torch.Tensor]
    ) -> torch.Tensor:
        h = self.style_conv1(self.constant, latents[0], noise[0])
        rgb = self.to_rgb1(h, latents[1], None)
        for j, (scale, shift) in enumerate(conditions):
            i = 1 + 2 * j
            h = self.style_convs[2 * j](h, latents[i], noise[1 + 2 * j])
            h[:, h.shape[1] // 2 :].mul_(scale).add_(shift)  # SFT on the second half of the channels
            h = self.style_convs[2 * j + 1](h, latents[i + 1], noise[2 + 2 * j])
            rgb = self.to_rgbs[j](h, latents[i + 2], rgb)
        return rgb


def fast_plan(net: GFPGANv1Clean, precision: str = "fp32") -> FastGFPGAN:
    """The network's inference plan for `precision` ("fp32" or "bf16"), built on first use and kept on the network
    (from the weights it has then)."""
    return cached_plan(net, precision, FastGFPGAN)


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
