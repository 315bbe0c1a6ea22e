"""RestoreFormer (`--enhancer RestoreFormer`): VQ-dictionary face restorer with cross attention (restorers spec 2).

Loads the official `RestoreFormer.pth` exactly: a torch pickle `{"params_ema": state_dict}` (`"params"` as the
fallback), read with `weights_only=True` and checked against the manifest layout (`models.restorerfile`). The six
`norm2` tensors of the encoder's attention blocks (which run without a second input) are checked and dropped.

Graph (all upstream key names): encoder (6 levels of ResnetBlocks, 8-head attention at 16 x 16, mid blocks) ->
`quant_conv` -> nearest codebook row (`quantize`, 1024 x 256) -> `post_quant_conv` -> decoder (mid blocks, 6 levels,
attention at 16 x 16 whose queries come from the encoder's features F16a / F16b) -> RGB, nominally [-1, 1].
Pre/post-processing is GFPGAN's (`gfpgan.preprocess_bgr_u8` / `gfpgan.postprocess_to_bgr_u8`; `restore_bgr_u8` does
all of it on uint8 crops). The network needs exactly 512 x 512 inputs.

Two ways to run it: `forward` / `intermediates` (the upstream graph op for op, batched; the parity reference) and
`restore(x, precision)` (the inference path: `FastRestoreFormer`, faces one at a time). "fp32" runs everything in
float32 (within the golden fp32 tolerances). "bf16" keeps the encoder and the quantizer in float32 and runs only the
decoder (69 % of the FLOPs) in bfloat16 (the numbers of bf16 autocast): the codebook lookup is discrete, and a bf16
encoder moves `z` across code boundaries (restorers spec 5: 5-9 of 256 codes change, ~35 dB), while a bf16 decoder
keeps every code (here by construction: the encoder is the fp32 one). Measured on the `restoreformer_a` golden input
against the fp32 golden image: image max abs 0.034, PSNR 51.5 dB on the (y + 1) / 2 scale (upstream's decoder-only
autocast: 51.7 dB), restored uint8 face 50.2 dB (at most 4 levels, on 48 % of values).

Speed (this 2-thread CPU, one 512 face, `restore`): fp32 3.8 s (the op-for-op `forward` 4.1 s), bf16 1.9 s (encoder
1.4 s of it). See `FastRestoreFormer`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xtalker.models import restorerfile
from xtalker.models.plans import cached_plan

log = logging.getLogger(__name__)

FILE_NAME = "RestoreFormer.pth"
SIZE = 512
CH = 64
CH_MULT = (1, 2, 2, 4, 4, 8)
NUM_RES_BLOCKS = 2
ATTN_LEVEL = len(CH_MULT) - 1  # attention only at the 16 x 16 level
Z_CHANNELS = 256
N_EMBED = 1024
HEADS = 8
GN_GROUPS = 32
GN_EPS = 1e-6
# The encoder's attention blocks get no second input, so their norm2 is never used.
UNUSED_KEYS = tuple(
    f"encoder.{block}.norm2.{leaf}"
    for block in ("down.5.attn.0", "down.5.attn.1", "mid.attn_1")
    for leaf in ("weight", "bias")
)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS)


def _swish_(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) in place (on fresh GroupNorm outputs only)."""
    return F.silu(x, inplace=True)


class ResnetBlock(nn.Module):
    """x' + conv2(swish(GN(conv1(swish(GN(x)))))), x' = 1x1 conv of x when the width changes."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish_(self.norm1(x)))
        h = self.conv2(_swish_(self.norm2(h)))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class MultiHeadAttnBlock(nn.Module):
    """8-head attention over the 16 x 16 positions: keys and values from x, queries from y (when given, through
    `norm2`) or x; x + proj_out(heads concatenated)."""

    def __init__(self, channels: int, cross: bool):
        super().__init__()
        self.heads = HEADS
        self.norm1 = _norm(channels)
        self.norm2 = _norm(channels) if cross else None
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        hx = self.norm1(x)
        hy = hx if y is None else self.norm2(y)
        b, c, h, w = x.shape
        d = c // self.heads
        # Channel c is component c % d of head c // d; positions row-major.
        q = self.q(hy).reshape(b, self.heads, d, h * w).transpose(2, 3)
        k = self.k(hx).reshape(b, self.heads, d, h * w)
        v = self.v(hx).reshape(b, self.heads, d, h * w).transpose(2, 3)
        attn = torch.softmax(torch.matmul(q * int(d) ** -0.5, k), dim=-1)
        out = torch.matmul(attn, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero pad one column right and one row at the bottom, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (at 16 x 16 only), `downsample` / `upsample`."""

    def __init__(self, widths: list[tuple[int, int]], attn: bool, cross: bool, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in widths)
        self.attn = nn.ModuleList(MultiHeadAttnBlock(widths[-1][1], cross) for _ in widths) if attn else nn.ModuleList()
        if resample == "down":
            self.downsample = Downsample(widths[-1][1])
        elif resample == "up":
            self.upsample = Upsample(widths[-1][1])


class _Mid(nn.Module):
    def __init__(self, channels: int, cross: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = MultiHeadAttnBlock(channels, cross)
        self.block_2 = ResnetBlock(channels, channels)


class EncoderFeatures(NamedTuple):
    """Encoder output `h` (B, 256, 16, 16) and the two maps the decoder attends to (B, 512, 16, 16): F16a after
    `mid.block_1` (upstream `block_5_atten`), F16b after `mid.block_2` (`mid_atten`)."""

    h: torch.Tensor
    f16a: torch.Tensor
    f16b: torch.Tensor


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, CH, 3, padding=1)
        widths_in = (1, *CH_MULT)
        self.down = nn.ModuleList()
        for i, mult in enumerate(CH_MULT):
            c_in, c_out = CH * widths_in[i], CH * mult
            widths = [(c_in, c_out)] + [(c_out, c_out)] * (NUM_RES_BLOCKS - 1)
            last = i == len(CH_MULT) - 1
            self.down.append(_Level(widths, attn=i == ATTN_LEVEL, cross=False, resample=None if last else "down"))
        top = CH * CH_MULT[-1]
        self.mid = _Mid(top, cross=False)
        self.norm_out = _norm(top)
        self.conv_out = nn.Conv2d(top, Z_CHANNELS, 3, padding=1)

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        f16a = self.mid.block_1(h)
        f16b = self.mid.block_2(self.mid.attn_1(f16a))
        h = self.conv_out(_swish_(self.norm_out(f16b)))
        return EncoderFeatures(h, f16a, f16b)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        top = CH * CH_MULT[-1]
        self.conv_in = nn.Conv2d(Z_CHANNELS, top, 3, padding=1)
        self.mid = _Mid(top, cross=True)
        levels = []
        c_in = top
        for i in reversed(range(len(CH_MULT))):
            c_out = CH * CH_MULT[i]
            widths = [(c_in, c_out)] + [(c_out, c_out)] * NUM_RES_BLOCKS
            levels.append(_Level(widths, attn=i == ATTN_LEVEL, cross=True, resample="up" if i else None))
            c_in = c_out
        self.up = nn.ModuleList(reversed(levels))  # up[i] is level i; level 5 runs first
        self.norm_out = _norm(CH)
        self.conv_out = nn.Conv2d(CH, 3, 3, padding=1)

    def forward(
        self, z: torch.Tensor, f16a: torch.Tensor, f16b: torch.Tensor,
        upsample: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`upsample(level, h)`, when given, replaces `up[level].upsample(h)` (the fast plans' rewrite)."""
        h = self.mid.block_1(self.conv_in(z))
        h = self.mid.block_2(self.mid.attn_1(h, f16b))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h, f16a)
            if i:
                h = level.upsample(h) if upsample is None else upsample(i, h)
        return self.conv_out(_swish_(self.norm_out(h)))


class Quantized(NamedTuple):
    """Quantizer results: `z_q` (B, 256, 16, 16) = z + (e_k - z) in float32 (upstream's straight-through form),
    `indices` (B, 256) code per position (row-major), `gap` (B, 256) second-best minus best distance."""

    z_q: torch.Tensor
    indices: torch.Tensor
    gap: torch.Tensor


class _Codebook(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(N_EMBED, Z_CHANNELS)


class Intermediates(NamedTuple):
    """Everything the golden case compares: encoder features, VQ input/results and the image."""

    features: EncoderFeatures
    z: torch.Tensor
    quantized: Quantized
    image: torch.Tensor


class RestoreFormer(nn.Module):
    """(B, 3, 512, 512) RGB in [-1, 1] -> restored (B, 3, 512, 512) RGB, nominally [-1, 1] (not clamped)."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.quant_conv = nn.Conv2d(Z_CHANNELS, Z_CHANNELS, 1)
        self.quantize = _Codebook()
        self.post_quant_conv = nn.Conv2d(Z_CHANNELS, Z_CHANNELS, 1)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> RestoreFormer:
        """Build from the official state dict (the `params_ema` entry); the unused encoder `norm2` tensors are
        ignored."""
        used = {k: v for k, v in state.items() if k not in UNUSED_KEYS}
        with torch.device("meta"):
            net = cls()
        net.load_state_dict(used, strict=True, assign=True)
        return net

    def encode(self, x: torch.Tensor) -> tuple[EncoderFeatures, torch.Tensor]:
        """Encoder features and the VQ input z = quant_conv(encoder output)."""
        _check_input(x)
        features = self.encoder(x)
        return features, self.quant_conv(features.h)

    def quantize_codes(self, z: torch.Tensor) -> Quantized:
        """Nearest codebook row per position by upstream's float32 distance |z|^2 + |e|^2 - 2 z.e (first index on
        ties)."""
        b, c, h, w = z.shape
        rows = z.float().permute(0, 2, 3, 1).reshape(-1, c)
        codes = self.quantize.embedding.weight.float()
        d = rows.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * torch.matmul(rows, codes.t())
        best2 = torch.topk(d, 2, dim=1, largest=False, sorted=True).values
        indices = torch.argmin(d, dim=1)
        chosen = codes[indices]
        z_q = rows + (chosen - rows)
        z_q = z_q.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return Quantized(z_q, indices.view(b, h * w), (best2[:, 1] - best2[:, 0]).view(b, h * w))

    def decode(self, z_q: torch.Tensor, features: EncoderFeatures) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q), features.f16a, features.f16b)

    def intermediates(self, x: torch.Tensor) -> Intermediates:
        """The fp32 forward with every intermediate the reference exposes."""
        features, z = self.encode(x)
        quantized = self.quantize_codes(z)
        return Intermediates(features, z, quantized, self.decode(quantized.z_q, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediates(x).image

    def restore(self, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(B, 3, 512, 512) -> float32 image, as `forward`, through the network's fast plan for `precision` (see
        the module docstring): the encoder and the codebook lookup always in float32, the decoder in `precision`."""
        return fast_plan(self, precision).restore(x)


def _phase_kernels(w: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) kernel of "nearest x2, then 3x3 conv" -> (4 * out, in, 2, 2): output phase (a, b) (row and
    column parity) of the upsampled map is a 2x2 conv of the low-resolution map, block 2a + b of the channels.
    Along an axis, phase 0 reads (i - 1, i) with taps (w0, w1 + w2) and phase 1 reads (i, i + 1) with taps
    (w0 + w1, w2). Summed in float64."""
    w = w.detach().double()
    taps = (((0,), (1, 2)), ((0, 1), (2,)))  # per phase: the 3x3 taps that fall on each of the 2 rows / columns

    def tap(rows: tuple[int, ...], cols: tuple[int, ...]) -> torch.Tensor:
        return w[:, :, list(rows)][:, :, :, list(cols)].sum((2, 3))

    kernels = [
        torch.stack([torch.stack([tap(r, c) for c in taps[b]], -1) for r in taps[a]], -2)
        for a in range(2)
        for b in range(2)
    ]
    return torch.cat(kernels, 0)


def _upsample_conv(x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Zero-padded 3x3 conv of nearest_x2(x) through its `_phase_kernels` (4 / 9 of the multiplications): one 2x2
    conv of the 1-padded map gives all four phases on an (H + 1) x (W + 1) grid; phase (a, b) is its window
    starting at (a, b), interleaved into the output."""
    b, _, h, w = x.shape
    out_ch = kernels.shape[0] // 4
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels, bias)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last:
        out = x.new_empty(b, h, 2, w, 2, out_ch)
        for p in range(4):
            a, c = divmod(p, 2)
            out[:, :, a, :, c] = y[:, p * out_ch : (p + 1) * out_ch, a : a + h, c : c + w].permute(0, 2, 3, 1)
        return out.view(b, 2 * h, 2 * w, out_ch).permute(0, 3, 1, 2)
    out = x.new_empty(b, out_ch, h, 2, w, 2)
    for p in range(4):
        a, c = divmod(p, 2)
        out[:, :, :, a, :, c] = y[:, p * out_ch : (p + 1) * out_ch, a : a + h, c : c + w]
    return out.view(b, out_ch, 2 * h, 2 * w)


class FastRestoreFormer:
    """Inference plan of a RestoreFormer for one decoder dtype. The encoder and quantizer are the network's own
    float32 modules (NCHW, exactly the reference computation, so the codes never depend on the precision). The
    decoder's "nearest x2 + 3x3 conv" steps run as phase convs (`_upsample_conv`). float32: the network's decoder,
    NCHW (channels-last convs here round far enough from the reference to use half the golden image tolerance);
    bfloat16: a bfloat16 channels-last copy of the decoder (weights cast once; the same numbers as bf16 autocast
    of the decoder, about twice as fast as autocast on NCHW maps). Build a new plan after changing the weights."""

    def __init__(self, net: RestoreFormer, dtype: torch.dtype = torch.float32):
        self.net, self.dtype = net, dtype
        self.memory_format = torch.contiguous_format if dtype == torch.float32 else torch.channels_last
        with torch.no_grad():
            if dtype == torch.float32:
                self.post_quant_conv, self.decoder = net.post_quant_conv, net.decoder
            else:
                self.post_quant_conv = copy.deepcopy(net.post_quant_conv).to(dtype, memory_format=self.memory_format)
                self.decoder = copy.deepcopy(net.decoder).to(dtype, memory_format=self.memory_format)
            self.upsample = {
                i: (_phase_kernels(level.upsample.conv.weight).to(dtype).contiguous(memory_format=self.memory_format),
                    level.upsample.conv.bias.detach().repeat(4).to(dtype))
                for i, level in enumerate(net.decoder.up)
                if i
            }

    def _upsample(self, level: int, h: torch.Tensor) -> torch.Tensor:
        return _upsample_conv(h, *self.upsample[level])

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype).contiguous(memory_format=self.memory_format)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 512, 512) RGB in [-1, 1] -> (B, 3, 512, 512) float32 image (see the class docstring). Faces run
        one at a time: on the CPU a batch of 512 px faces is slower per face (measured 1.3x for two), and a face's
        result then does not depend on its batch."""
        _check_input(x)
        with torch.inference_mode():
            faces = [self._restore_one(x[i : i + 1].float()) for i in range(x.shape[0])]
            return torch.cat(faces) if faces else x.new_zeros(x.shape, dtype=torch.float32)

    def _restore_one(self, x: torch.Tensor) -> torch.Tensor:
        features, z = self.net.encode(x)
        z_q = self.net.quantize_codes(z).z_q
        h = self.post_quant_conv(self._cast(z_q))
        image = self.decoder(h, self._cast(features.f16a), self._cast(features.f16b), upsample=self._upsample)
        return image.float().contiguous()


def fast_plan(net: RestoreFormer, precision: str = "fp32") -> FastRestoreFormer:
    """The network's inference plan for `precision` ("fp32" or "bf16": decoder-only bfloat16), built on first use and
    kept on the network."""
    return cached_plan(net, precision, FastRestoreFormer)


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, SIZE, SIZE):
        raise ValueError(f"RestoreFormer expects (B, 3, {SIZE}, {SIZE}) images, got {tuple(x.shape)}")


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every key -> shape of the official RestoreFormer state dict (405 tensors, the 6 unused included)."""
    return restorerfile.official_layout(FILE_NAME)


def read_restoreformer_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The checked state dict of a RestoreFormer file: `params_ema`, else `params` (as GFPGANer picks)."""
    return restorerfile.read_state(path, FILE_NAME)


def load_restoreformer(path: str | Path) -> RestoreFormer:
    """Read, check and build RestoreFormer from an official (or synthetic) RestoreFormer.pth, in eval mode, without
    gradients (an inference-only network: a forward outside inference mode records no graph).
    Errors: `restorerfile.RestorerWeightsError` (a CheckpointError and a ValueError), one line naming the file."""
    state = read_restoreformer_state(path)
    log.debug("loaded RestoreFormer from %s (%d tensors)", path, len(state))
    return RestoreFormer.from_official(state).eval().requires_grad_(False)


def restore_bgr_u8(net: RestoreFormer, crops_bgr_u8: np.ndarray | torch.Tensor, precision: str = "fp32") -> np.ndarray:
    """(B, 512, 512, 3) aligned BGR uint8 crops -> restored crops, same layout, as GFPGANer with
    arch='RestoreFormer' (GFPGAN's pre/post-processing around `net.restore`), on the network's device."""
    from xtalker.models.gfpgan import postprocess_to_bgr_u8, preprocess_bgr_u8

    crops = torch.as_tensor(np.ascontiguousarray(crops_bgr_u8)).to(next(net.parameters()).device)
    if crops.shape[0] == 0:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return postprocess_to_bgr_u8(net.restore(preprocess_bgr_u8(crops), precision)).cpu().numpy()
