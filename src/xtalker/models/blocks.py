"""Conv blocks shared by the keypoint detector and the generator (official key names), their inference forms,
and the coordinate grid.

Networks are loaded in the official layout (so strict loading checks every key), then `fuse_for_inference`
rewrites them into exactly equivalent, cheaper modules: BatchNorm folded into the preceding convolution and
convolutions of nearest-upsampled maps computed at low resolution per output phase.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def fold_batch_norm_(conv: nn.Conv2d | nn.Conv3d, norm: nn.BatchNorm2d | nn.BatchNorm3d) -> None:
    """Fold an eval-mode BatchNorm into the (biased) convolution it directly follows.

    The per-channel factors are computed in float64; each weight then takes one float32 multiply, which is
    what a float64 product rounded back would give too.
    """
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    conv.weight.mul_(scale.to(conv.weight.dtype).view((-1,) + (1,) * (conv.weight.dim() - 1)))
    conv.bias.copy_((conv.bias.double() - norm.running_mean.double()) * scale + norm.bias.double())


class ConvNormBlock(nn.Module):
    """Base of the blocks whose `conv` is directly followed by `norm`: fusing folds the norm away."""

    conv: nn.Conv2d | nn.Conv3d
    norm: nn.Module

    def fuse(self) -> nn.Module:
        if not isinstance(self.norm, nn.Identity):
            fold_batch_norm_(self.conv, self.norm)
            self.norm = nn.Identity()
        return self


class DownBlock2d(ConvNormBlock):
    """conv k3 p1 + BN + ReLU + 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x)), inplace=True), 2)


class SameBlock2d(ConvNormBlock):
    """conv + BN + ReLU (or LeakyReLU 0.01) at constant resolution."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, padding: int = 1, leaky: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_ch)
        self.leaky = leaky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.leaky_relu(x, 0.01, inplace=True) if self.leaky else F.relu(x, inplace=True)


class DownBlock3d(ConvNormBlock):
    """conv3d k3 p1 + BN3d + ReLU + (1, 2, 2) average pool (depth is kept)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)), inplace=True)
        # A (1, 2, 2) 3-D pool is a 2-D pool over depth-flattened channels (avg_pool3d has no bf16 CPU kernel).
        return F.avg_pool2d(x.flatten(1, 2), 2).unflatten(1, x.shape[1:3])


class UpBlock3d(nn.Module):
    """Nearest (1, 2, 2) upsample + conv3d k3 p1 + BN3d + ReLU (depth is kept)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return F.relu(self.norm(self.conv(x)), inplace=True)

    def fuse(self) -> nn.Module:
        """The polyphase form: 12 instead of 27 taps per output, no upsampled input."""
        fold_batch_norm_(self.conv, self.norm)
        return PhaseUpBlock3d(PhaseConvBank([(self.conv.weight, self.conv.bias, (1, 2, 2))], relu=True))


class PhaseUpBlock3d(nn.Module):
    """Inference form of UpBlock3d (BN folded, polyphase convolution, ReLU)."""

    def __init__(self, bank: "PhaseConvBank"):
        super().__init__()
        self.bank = bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bank(x)[0]


class ShiftSumConv2d(nn.Module):
    """A conv with few output channels and a large kernel, as ONE 1x1 conv to a map per (tap, output channel)
    followed by the sum of the shifted tap maps.

    oneDNN runs a 1-output 7x7 conv over 1792 channels at a few GFLOP/s; as a 49-wide GEMM it runs near peak.
    Equal up to float summation order; the shifted sum runs in float32.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        out_ch, in_ch, kh, kw = conv.weight.shape
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.bias is None:
            raise ValueError("ShiftSumConv2d needs a plain stride-1 conv with bias")
        taps = conv.weight.detach().permute(2, 3, 0, 1).reshape(kh * kw * out_ch, in_ch, 1, 1)
        self.register_buffer("weight", taps.contiguous())
        self.register_buffer("bias", conv.bias.detach().clone())
        self.kernel = (kh, kw)
        self.padding = tuple(int(p) for p in conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (ph, pw) = self.kernel, self.padding
        taps = F.conv2d(x, self.weight).float()
        b, _, h, w = taps.shape
        taps = F.pad(taps, (pw, pw, ph, ph)).view(b, kh * kw, -1, h + 2 * ph, w + 2 * pw)
        ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
        out = self.bias.float().view(1, -1, 1, 1).expand(b, -1, ho, wo).clone()
        for i in range(kh):
            for j in range(kw):
                out += taps[:, i * kw + j, :, i:i + ho, j:j + wo]
        return out


def _phase_taps(r: int, factor: int) -> tuple[list[list[int]], int]:
    """For output phase r of a nearest upsampling by `factor` followed by a 3-tap kernel: the kernel taps that
    read each input offset (lowest offset first), and that lowest offset.

    With factor 1 every tap reads its own offset: [[0], [1], [2]] from offset -1.
    """
    offsets = [(r + t - 1) // factor for t in range(3)]
    lo = min(offsets)
    return [[t for t in range(3) if offsets[t] == o] for o in range(lo, max(offsets) + 1)], lo


def _phase_kernels(
    weight: torch.Tensor, factors: tuple[int, ...]
) -> list[tuple[tuple[int, ...], torch.Tensor, tuple[int, ...]]]:
    """Every output phase of a k3 conv of an input upsampled by `factors`: (phase, its (O, I, ...) kernel,
    the start of its input window in a padding-1 conv's output).

    One GEMM with a 0/1 matrix sums the taps that read the same input pixel (at most 4 per phase tap): a
    single pass over the weights, fast even for the hourglass' 14M-weight kernels.
    """
    nd = len(factors)
    per_axis = [[_phase_taps(r, f) for r in range(f)] for f in factors]
    rows, layout = [], []
    for phase in itertools.product(*(range(f) for f in factors)):
        chosen = [per_axis[d][r] for d, r in enumerate(phase)]
        groups = [taps for taps, _ in chosen]
        for combo in itertools.product(*groups):
            row = torch.zeros((3,) * nd, dtype=weight.dtype)
            for tap in itertools.product(*combo):
                row[tap] = 1
            rows.append(row.flatten())
        # conv with padding 1 puts input offset `lo` of output pixel 0 at index lo + 1 for any kernel size.
        layout.append((phase, tuple(len(g) for g in groups), tuple(lo + 1 for _, lo in chosen)))
    o, i = weight.shape[:2]
    summed = weight.detach().reshape(o * i, -1) @ torch.stack(rows).T  # (O*I, all phase taps)
    kernels, col = [], 0
    for phase, shape, starts in layout:
        n = math.prod(shape)
        kernels.append((phase, summed[:, col:col + n].reshape(o, i, *shape), starts))
        col += n
    return kernels


class PhaseConvBank(nn.Module):
    """Several k3 p1 convolutions (2-D or 3-D), each of a nearest-upsampled copy of the SAME input with its own
    per-axis integer factors, computed at the input's resolution.

    Each output phase of an upsampled conv sees at most 2 distinct input pixels per axis, so its taps sum into
    a smaller kernel (2x2 per phase for factor 2: 16 instead of 36 multiply-adds per input pixel). All phase
    kernels of all convolutions with the same shape run as ONE wide convolution (wide GEMMs run faster than
    many narrow ones), and the phase windows are interleaved into the output. Equal to the
    plain computation up to float summation order. Output i has the input's spatial size times factors[i].
    """

    def __init__(
        self,
        convs: Sequence[tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]],
        relu: bool = False,
    ):
        super().__init__()
        self.relu = relu
        self.factors = [tuple(int(f) for f in factors) for _, _, factors in convs]
        self.out_channels = [int(weight.shape[0]) for weight, _, _ in convs]
        groups: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor, tuple]]] = {}
        for entry, (weight, bias, factors) in enumerate(convs):
            if weight.shape[2:] != (3,) * len(factors):
                raise ValueError(f"conv {entry}: expected a k3 kernel for factors {factors}, got {tuple(weight.shape)}")
            b = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias.detach()
            for phase, kernel, starts in _phase_kernels(weight, factors):
                groups.setdefault(tuple(kernel.shape[2:]), []).append((kernel, b, (entry, phase, starts)))
        self.placements: list[list[tuple[int, tuple[int, ...], int, tuple[int, ...]]]] = []
        for g, members in enumerate(groups.values()):
            self.register_buffer(f"weight{g}", torch.cat([k for k, _, _ in members]))
            self.register_buffer(f"bias{g}", torch.cat([b for _, b, _ in members]))
            placed, start = [], 0
            for kernel, _, (entry, phase, starts) in members:
                placed.append((entry, phase, start, starts))
                start += kernel.shape[0]
            self.placements.append(placed)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        sizes = tuple(x.shape[2:])
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        windows: list[dict[tuple[int, ...], torch.Tensor]] = [{} for _ in self.factors]
        for g, placed in enumerate(self.placements):
            y = conv(x, getattr(self, f"weight{g}"), getattr(self, f"bias{g}"), padding=1)
            if self.relu:
                y = F.relu(y, inplace=True)
            for entry, phase, c0, starts in placed:
                channels = (slice(None), slice(c0, c0 + self.out_channels[entry]))
                windows[entry][phase] = y[channels + tuple(slice(s, s + n) for s, n in zip(starts, sizes))]
        return [_interleave(w, factors, sizes) for w, factors in zip(windows, self.factors)]


def _interleave(windows: dict[tuple[int, ...], torch.Tensor], factors: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    """Phase maps (B, C, *sizes) -> the upsampled-resolution map whose pixel (i * f + r) is phase r's pixel i.

    One stack and one permuting copy rather than a strided write per phase: as fast in eager mode, and it
    compiles into a plain gather (strided writes into one buffer become a chain of masked selects, measured
    8% of a compiled int8 frame).
    """
    phases = list(itertools.product(*(range(f) for f in factors)))
    if len(phases) == 1:
        return windows[phases[0]]
    first = windows[phases[0]]
    b, c, nd = first.shape[0], first.shape[1], len(factors)
    stacked = torch.stack([windows[p] for p in phases], 2).view(b, c, *factors, *sizes)
    order = [0, 1] + [i for d in range(nd) for i in (2 + nd + d, 2 + d)]
    return stacked.permute(order).reshape(b, c, *(n * f for n, f in zip(sizes, factors)))


def cast_for(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x in the dtype of `module`'s weights: each part of a network runs in the precision it was set to."""
    weight = next(itertools.chain(module.parameters(), module.buffers()))
    return x.to(weight.dtype)


def fuse_for_inference(module: nn.Module) -> nn.Module:
    """Replace, children first, every submodule offering `fuse()` by its exactly equivalent inference form."""
    for name, child in list(module.named_children()):
        setattr(module, name, fuse_for_inference(child))
    fuse = getattr(module, "fuse", None)
    return fuse() if callable(fuse) else module


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
