"""RealESRGAN x2plus (`--background_enhancer realesrgan`): the RRDBNet x2 and RealESRGANer's tiled enhance
(restorers spec 3, 4).

Loads the official `RealESRGAN_x2plus.pth` exactly: a torch pickle `{"params_ema": state_dict}` (`"params"` as the
fallback), read with `weights_only=True` and checked against the manifest layout (`models.restorerfile`); an x4plus
file (same keys, `conv_first` on 3 channels) is named as such.

- `RRDBNet`: pixel-unshuffle by 2, `conv_first`, 23 RRDBs (3 dense blocks each, growth 32), `conv_body`, two
  nearest-x2 + conv stages, `conv_hr`, `conv_last`; raw output (not clamped), 2H x 2W. Each dense block writes its
  growth channels into one preallocated feature buffer instead of concatenating (the same sums).
- `RealESRGANer`: upstream's `enhance(img, outscale)` arithmetic exactly: float32 division by 255, BGR -> RGB,
  right/bottom reflect `pre_pad`, reflect mod pad to even sizes, tiles of `tile` px each run alone on its box grown
  by `tile_pad` (clipped to the image; so every conv's zero padding sits at the tile border), the unpadded part of
  each tile output copied into the output, pads cut, clamp, RGB -> BGR, round half to even, LANCZOS4 resize when
  `outscale` differs from the scale. Tiled and untiled results differ near tile borders, as upstream's do.

Precision: "fp32" is the reference computation (bit-identical on `rrdbnet_x2plus_a`; 4e-7 on the 4 px wide tiles
of `realesrganer_tile_a`, where this CPU's oneDNN kernels round differently from the reference machine's). "bf16"
runs the network under bfloat16 autocast (the RRDB trunk's sums then round to bf16; upstream's CUDA path runs it in
fp16): against the fp32 golden data, `rrdbnet_x2plus_a` output PSNR 53.1 dB (max abs 0.0086; upstream's autocast
53.0 dB), the tiled `realesrganer_tile_a` uint8 output 49.9 dB (at most 3 levels, on 52 % of values; upstream
50.0 dB). Speed (this 2-thread CPU, 256 x 256 input, one forward): fp32 2.8 s, bf16 0.95 s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xtalker.models import restorerfile

log = logging.getLogger(__name__)

FILE_NAME = "RealESRGAN_x2plus.pth"
SCALE = 2
NUM_FEAT = 64
NUM_BLOCK = 23
NUM_GROW = 32
LRELU_SLOPE = 0.2
RESIDUAL_SCALE = 0.2
PRECISIONS = ("fp32", "bf16")
# SadTalker's RealESRGANer settings (tile 400 never splits a frame of at most 400 px).
SADTALKER_TILE = 400
SADTALKER_TILE_PAD = 10
SADTALKER_PRE_PAD = 0


def _lrelu_(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu_(x, LRELU_SLOPE)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs over the growing concatenation [x, x1, .., x4]; returns x5 * 0.2 + x."""

    def __init__(self, feat: int = NUM_FEAT, grow: int = NUM_GROW):
        super().__init__()
        self.feat, self.grow = feat, grow
        for i in range(4):
            setattr(self, f"conv{i + 1}", nn.Conv2d(feat + i * grow, grow, 3, padding=1))
        self.conv5 = nn.Conv2d(feat + 4 * grow, feat, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # One buffer holds x, x1 .. x4 side by side: each conv reads a leading channel slice (contiguous for a
        # single image), each output is written into the next slice, nothing is concatenated.
        buf = x.new_empty(b, self.feat + 4 * self.grow, h, w)
        buf[:, : self.feat] = x
        for i in range(4):
            end = self.feat + i * self.grow
            conv = getattr(self, f"conv{i + 1}")
            buf[:, end : end + self.grow] = _lrelu_(conv(buf[:, :end]))
        return self.conv5(buf) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    def __init__(self):
        super().__init__()
        self.rdb1 = ResidualDenseBlock()
        self.rdb2 = ResidualDenseBlock()
        self.rdb3 = ResidualDenseBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] (H, W even) -> (B, 3, 2H, 2W) raw output (RealESRGANer clamps it)."""

    scale = SCALE

    def __init__(self):
        super().__init__()
        self.conv_first = nn.Conv2d(3 * 4, NUM_FEAT, 3, padding=1)
        self.body = nn.Sequential(*(RRDB() for _ in range(NUM_BLOCK)))
        self.conv_body = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, padding=1)
        self.conv_up1 = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, padding=1)
        self.conv_up2 = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, padding=1)
        self.conv_hr = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, padding=1)
        self.conv_last = nn.Conv2d(NUM_FEAT, 3, 3, padding=1)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> RRDBNet:
        with torch.device("meta"):
            net = cls()
        net.load_state_dict(state, strict=True, assign=True)
        return net

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first features, trunk output before `conv_body`) at half the input size."""
        h, w = x.shape[-2:]
        if x.dim() != 4 or x.shape[1] != 3 or h % 2 or w % 2:
            raise ValueError(f"RRDBNet x2 expects (B, 3, H, W) images with even H and W, got {tuple(x.shape)}")
        feat = self.conv_first(F.pixel_unshuffle(x, 2))
        return feat, self.body(feat)

    def head(self, feat: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        feat = feat + self.conv_body(body)
        feat = _lrelu_(self.conv_up1(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        feat = _lrelu_(self.conv_up2(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        return self.conv_last(_lrelu_(self.conv_hr(feat)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.trunk(x))

    def run(self, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """`forward` in `precision` ("bf16": bfloat16 autocast), float32 out."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        with torch.inference_mode():
            if precision == "fp32":
                return self(x.float())
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self(x.float()).float()


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every key -> shape of the official RealESRGAN_x2plus state dict (702 tensors)."""
    return restorerfile.official_layout(FILE_NAME)


def read_rrdbnet_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The checked state dict of a RealESRGAN_x2plus file: `params_ema`, else `params` (as RealESRGANer picks)."""
    return restorerfile.read_state(path, FILE_NAME)


def load_rrdbnet(path: str | Path) -> RRDBNet:
    """Read, check and build the x2plus RRDBNet from an official (or synthetic) RealESRGAN_x2plus.pth, in eval mode,
    without gradients.
    Errors: `restorerfile.RestorerWeightsError` (a CheckpointError and a ValueError), one line naming the file."""
    state = read_rrdbnet_state(path)
    log.debug("loaded RRDBNet x2 from %s (%d tensors)", path, len(state))
    return RRDBNet.from_official(state).eval().requires_grad_(False)


# ---- RealESRGANer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One tile on the padded image (end-exclusive): its box, the box the network sees (grown by tile_pad, clipped),
    and where its output goes. `row()` is the golden cases' 16 numbers."""

    y0: int
    y1: int
    x0: int
    x1: int
    py0: int
    py1: int
    px0: int
    px1: int
    scale: int

    @property
    def output_box(self) -> tuple[int, int, int, int]:
        s = self.scale
        return self.y0 * s, self.y1 * s, self.x0 * s, self.x1 * s

    @property
    def crop(self) -> tuple[int, int, int, int]:
        """Rows and columns of the tile's network output that are kept."""
        s = self.scale
        cy0, cx0 = (self.y0 - self.py0) * s, (self.x0 - self.px0) * s
        return cy0, cy0 + (self.y1 - self.y0) * s, cx0, cx0 + (self.x1 - self.x0) * s

    def row(self) -> list[int]:
        box = [self.y0, self.y1, self.x0, self.x1]
        return [*box, self.py0, self.py1, self.px0, self.px1, *self.output_box, *self.crop]


def tiles(height: int, width: int, tile: int, tile_pad: int, scale: int = SCALE) -> list[Tile]:
    """RealESRGANer's tiles of a (padded) height x width image, row-major; one tile covering everything for tile 0."""
    if tile <= 0:
        return [Tile(0, height, 0, width, 0, height, 0, width, scale)]
    out = []
    for yi in range(math.ceil(height / tile)):
        for xi in range(math.ceil(width / tile)):
            y0, x0 = yi * tile, xi * tile
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            out.append(Tile(y0, y1, x0, x1, max(y0 - tile_pad, 0), min(y1 + tile_pad, height),
                            max(x0 - tile_pad, 0), min(x1 + tile_pad, width), scale))
    return out


@dataclass
class Upsampled:
    """What one `RealESRGANer.enhance` produced: the uint8 image it returns and what the golden cases compare."""

    image: np.ndarray  # (round(H * outscale), ..., 3) BGR uint8, what upstream returns
    float_bgr: np.ndarray  # (sH, sW, 3) clamped float32 before rounding (before any outscale resize)
    tiles: list[Tile]


class RealESRGANer:
    """RealESRGANer(scale=2, model, tile, tile_pad, pre_pad) for 3-channel uint8 BGR frames, fp32 or bf16
    (upstream's `half` is fp16 on CUDA only; see the module docstring). `run`, when given, replaces
    `net.run(tile, precision)` for every tile (the int8 graph, `finish.int8`); the tiling stays the same."""

    def __init__(self, net: RRDBNet, tile: int = SADTALKER_TILE, tile_pad: int = SADTALKER_TILE_PAD,
                 pre_pad: int = SADTALKER_PRE_PAD, precision: str = "fp32",
                 run: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if tile < 0 or tile_pad < 0 or pre_pad < 0:
            raise ValueError(f"tile, tile_pad and pre_pad must be >= 0, got {tile}, {tile_pad}, {pre_pad}")
        self.net, self.scale = net, net.scale
        self.tile, self.tile_pad, self.pre_pad, self.precision = tile, tile_pad, pre_pad, precision
        self.run = run if run is not None else lambda part: net.run(part, precision)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _input(self, img: np.ndarray) -> torch.Tensor:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"RealESRGANer here takes (H, W, 3) uint8 BGR frames, got {img.shape} {img.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(img)).to(self.device)
        # float32 division (upstream: img.astype(float32) / 255), then BGR -> RGB, (1, 3, H, W).
        x = x.to(torch.float32) / torch.tensor(255.0, dtype=torch.float32)
        return x.flip(-1).permute(2, 0, 1).unsqueeze(0).contiguous()

    def pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Right/bottom reflect pre_pad, then the reflect mod pad to even sizes; returns (padded, (mod_h, mod_w))."""
        if self.pre_pad:
            x = F.pad(x, (0, self.pre_pad, 0, self.pre_pad), mode="reflect")
        mod_h, mod_w = x.shape[2] % self.scale, x.shape[3] % self.scale
        mod_h, mod_w = (self.scale - mod_h) % self.scale, (self.scale - mod_w) % self.scale
        if mod_h or mod_w:
            x = F.pad(x, (0, mod_w, 0, mod_h), mode="reflect")
        return x, (mod_h, mod_w)

    def network_inputs(self, x: torch.Tensor) -> Iterator[tuple[Tile, torch.Tensor]]:
        """(tile, the network input of that tile) for a padded (1, 3, Hp, Wp) image."""
        for t in tiles(x.shape[2], x.shape[3], self.tile, self.tile_pad, self.scale):
            yield t, x[:, :, t.py0 : t.py1, t.px0 : t.px1]

    def process(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Tile]]:
        """The scaled float32 (1, 3, sHp, sWp) output of a padded image, tile by tile."""
        s = self.scale
        out = x.new_zeros(x.shape[0], 3, x.shape[2] * s, x.shape[3] * s)
        done = []
        for t, part in self.network_inputs(x):
            y = self.run(part)
            oy0, oy1, ox0, ox1 = t.output_box
            cy0, cy1, cx0, cx1 = t.crop
            out[:, :, oy0:oy1, ox0:ox1] = y[:, :, cy0:cy1, cx0:cx1]
            done.append(t)
        return out, done

    def enhance(self, img: np.ndarray, outscale: float | None = None) -> Upsampled:
        """Upstream's `enhance(img, outscale)[0]` and its intermediates (see `Upsampled`)."""
        h, w = img.shape[:2]
        x, (mod_h, mod_w) = self.pad(self._input(img))
        out, done = self.process(x)
        s = self.scale
        out = out[:, :, : out.shape[2] - mod_h * s, : out.shape[3] - mod_w * s]
        if self.pre_pad:
            out = out[:, :, : out.shape[2] - self.pre_pad * s, : out.shape[3] - self.pre_pad * s]
        float_bgr = out[0].float().clamp_(0, 1).flip(0).permute(1, 2, 0).cpu().numpy()
        image = np.round(float_bgr * np.float32(255.0)).astype(np.uint8)
        if outscale is not None and outscale != s:
            image = cv2.resize(image, (int(w * outscale), int(h * outscale)), interpolation=cv2.INTER_LANCZOS4)
        return Upsampled(image, float_bgr, done)
