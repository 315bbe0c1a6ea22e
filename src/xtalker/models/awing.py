"""AWing FAN, 4 stacked hourglasses, 98 WFLW landmarks + 1 boundary map (aux spec 2.1-2.3).

Loads the official `alignment_WFLW_4HG.pth` exactly: a torch pickle `{"state_dict": sd}` of which only
`state_dict` is read. Module names reproduce the official keys, BatchNorms stay eval-mode `nn.BatchNorm2d`
(they are pre-activation: each feeds a ReLU and then a conv, so there is no conv to fold them into).
Input: (B, 3, 256, 256) BGR float32 in [0, 1]; output: the last stack's (B, 99, 64, 64) heatmaps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xtalker.models import auxfile

log = logging.getLogger(__name__)

FILE_NAME = "alignment_WFLW_4HG.pth"
NUM_LANDMARKS = 98
NUM_MAPS = NUM_LANDMARKS + 1  # the 99th map is the boundary heatmap
NUM_STACKS = 4
HOURGLASS_DEPTH = 4
INPUT_SIZE = 256
FEATURES = 256
BOUNDARY_THRESHOLD = 0.05
COORD_CHANNELS = 3  # xx, yy, rr
BOUNDARY_CHANNELS = 2  # xx, yy gated by the previous stack's boundary map


def coordinate_maps(n: int, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(B, 3, n, n) AddCoords channels: xx varies along the height (!), yy along the width, rr = radius / max."""
    t = torch.arange(n, dtype=dtype, device=device) / (n - 1) * 2 - 1
    xx = t.view(n, 1).expand(n, n)
    yy = t.view(1, n).expand(n, n)
    rr = torch.sqrt(xx * xx + yy * yy)
    rr = rr / rr.max()
    return torch.stack([xx, yy, rr]).unsqueeze(0).expand(batch, -1, -1, -1)


def _with_coords(x: torch.Tensor, boundary: torch.Tensor | None) -> torch.Tensor:
    """`x` followed by its coordinate channels and, given the previous boundary map (B, n, n), the gated xx, yy."""
    coords = coordinate_maps(x.shape[-1], x.shape[0], x.dtype, x.device)
    parts = [x, coords]
    if boundary is not None:
        # Per image: the gate is where that image's previous boundary map exceeds the threshold.
        gate = (boundary.clamp(0, 1) > BOUNDARY_THRESHOLD).unsqueeze(1)
        parts.append(torch.where(gate, coords[:, :2], torch.zeros((), dtype=x.dtype, device=x.device)))
    return torch.cat(parts, dim=1)


class CoordConv(nn.Module):
    """Coordinate channels appended, then a conv with bias (`conv`)."""

    def __init__(self, in_ch: int, out_ch: int, with_boundary: bool, **conv_args: int):
        super().__init__()
        self.with_boundary = with_boundary
        extra = COORD_CHANNELS + (BOUNDARY_CHANNELS if with_boundary else 0)
        self.conv = nn.Conv2d(in_ch + extra, out_ch, **conv_args)

    def forward(self, x: torch.Tensor, boundary: torch.Tensor | None = None) -> torch.Tensor:
        if self.with_boundary != (boundary is not None):
            raise ValueError("CoordConv: boundary map given iff the layer was built with boundary channels")
        return self.conv(_with_coords(x, boundary))


class ConvBlock(nn.Module):
    """Pre-activation block: three 3x3 convs (out/2, out/4, out/4 channels) concatenated, plus the residual."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        half, quarter = out_ch // 2, out_ch // 4
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, quarter, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = nn.Conv2d(quarter, quarter, 3, padding=1, bias=False)
        self.downsample: nn.Sequential | None = None
        if in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, out_ch, 1, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.conv1(F.relu(self.bn1(x), inplace=True))
        o2 = self.conv2(F.relu(self.bn2(o1), inplace=True))
        o3 = self.conv3(F.relu(self.bn3(o2), inplace=True))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat([o1, o2, o3], dim=1).add_(residual)


class HourGlass(nn.Module):
    """CoordConv (1x1) followed by a depth-4 hourglass of ConvBlock(256, 256)s (`b1_L`, `b2_L`, `b2_plus_1`, `b3_L`)."""

    def __init__(self, depth: int, features: int, first: bool):
        super().__init__()
        self.depth = depth
        self.coordconv = CoordConv(features, features, with_boundary=not first, kernel_size=1)
        self._add_level(depth, features)

    def _add_level(self, level: int, features: int) -> None:
        # Registration order follows the official state dict: b1, b2 of a level, the inner levels, then b3.
        self.add_module(f"b1_{level}", ConvBlock(features, features))
        self.add_module(f"b2_{level}", ConvBlock(features, features))
        if level > 1:
            self._add_level(level - 1, features)
        else:
            self.add_module("b2_plus_1", ConvBlock(features, features))
        self.add_module(f"b3_{level}", ConvBlock(features, features))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        up = self.get_submodule(f"b1_{level}")(x)
        low = self.get_submodule(f"b2_{level}")(F.avg_pool2d(x, 2, stride=2))
        low = self._level(level - 1, low) if level > 1 else self.b2_plus_1(low)
        low = self.get_submodule(f"b3_{level}")(low)
        # Nearest x2 upsampling as a broadcast add into the 2x2 blocks of `up`: no upsampled copy.
        b, c, h, w = low.shape
        up.view(b, c, h, 2, w, 2).add_(low[:, :, :, None, :, None])
        return up

    def forward(self, x: torch.Tensor, boundary: torch.Tensor | None = None) -> torch.Tensor:
        return self._level(self.depth, self.coordconv(x, boundary))


class FAN(nn.Module):
    """AWing FAN(num_modules=4, num_landmarks=98): (B, 3, 256, 256) BGR in [0, 1] -> (B, 99, 64, 64) heatmaps."""

    def __init__(self):
        super().__init__()
        self.conv1 = CoordConv(3, 64, with_boundary=False, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, FEATURES)
        for i in range(NUM_STACKS):
            self.add_module(f"m{i}", HourGlass(HOURGLASS_DEPTH, FEATURES, first=i == 0))
            self.add_module(f"top_m_{i}", ConvBlock(FEATURES, FEATURES))
            self.add_module(f"conv_last{i}", nn.Conv2d(FEATURES, FEATURES, 1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(FEATURES))
            self.add_module(f"l{i}", nn.Conv2d(FEATURES, NUM_MAPS, 1))
            if i < NUM_STACKS - 1:
                self.add_module(f"bl{i}", nn.Conv2d(FEATURES, FEATURES, 1))
                self.add_module(f"al{i}", nn.Conv2d(NUM_MAPS, FEATURES, 1))

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> FAN:
        """Build from the official state dict (the `state_dict` entry); BatchNorm counters may be absent."""
        with torch.device("meta"):
            net = cls()
        # The counters are never used at inference; zeros stand in for absent ones so strict loading still
        # checks every other key.
        counters = {
            k: torch.zeros((), dtype=torch.long)
            for k in net.state_dict()
            if k.endswith(auxfile.OPTIONAL_SUFFIX) and k not in state
        }
        # assign=True adopts the loaded tensors instead of initialising 24 M parameters first.
        net.load_state_dict({**state, **counters}, strict=True, assign=True)
        return net

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"FAN expects (B, 3, {INPUT_SIZE}, {INPUT_SIZE}) images, got {tuple(x.shape)}")

    def _stack(self, i: int, feat: torch.Tensor, boundary: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hourglass i and its head: the features `ll` and the (B, 99, 64, 64) heatmaps."""
        ll = self.get_submodule(f"top_m_{i}")(self.get_submodule(f"m{i}")(feat, boundary))
        ll = F.relu(self.get_submodule(f"bn_end{i}")(self.get_submodule(f"conv_last{i}")(ll)), inplace=True)
        return ll, self.get_submodule(f"l{i}")(ll)

    def forward_with_boundaries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last stack's (B, 99, 64, 64) heatmaps and the boundary maps of stacks 0-2 (B, 3, 64, 64)."""
        self._check_input(x)
        feat = F.relu(self.bn1(self.conv1(x)), inplace=True)
        feat = self.conv4(self.conv3(F.avg_pool2d(self.conv2(feat), 2, stride=2)))
        boundaries: list[torch.Tensor] = []
        for i in range(NUM_STACKS - 1):
            ll, heatmaps = self._stack(i, feat, boundaries[-1] if boundaries else None)
            feat = (feat + self.get_submodule(f"bl{i}")(ll)).add_(self.get_submodule(f"al{i}")(heatmaps))
            boundaries.append(heatmaps[:, NUM_LANDMARKS])
        _, heatmaps = self._stack(NUM_STACKS - 1, feat, boundaries[-1])
        return heatmaps, torch.stack(boundaries, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_boundaries(x)[0]


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every key -> shape of the official FAN state dict, BatchNorm `num_batches_tracked` counters included."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in FAN().state_dict().items()}


def read_awing_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The checked state dict of an alignment_WFLW_4HG.pth file (its `state_dict` entry), without counters."""
    return auxfile.read_state(path, FILE_NAME, official_layout(), top_keys=("state_dict",))


def load_awing(path: str | Path) -> FAN:
    """Read, check and build the AWing FAN from an official (or synthetic) alignment_WFLW_4HG.pth, in eval mode."""
    state = read_awing_state(path)
    log.debug("loaded AWing FAN from %s (%d tensors)", path, len(state))
    return FAN.from_official(state).eval()
