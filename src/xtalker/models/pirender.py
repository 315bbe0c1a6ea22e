"""PIRender's FaceGenerator: the lightweight face renderer of SadTalker's `--facerender pirender` (PIRender spec 4).

One 73-channel coefficient window (exp 64 | angle 3 | trans 3 | crop s, tx, ty; 27 frames) drives three nets:

- mapping net: temporal convs over the window -> a 256-d motion descriptor `d`;
- warping net: an ADAIN hourglass (every norm modulated by `d`) on the source image -> a flow field on a
  64x64 grid (at 256) -> the source warped by it;
- editing net: a conv encoder on `cat(source, warped)` and a decoder with ADAIN residual blocks -> the frame,
  tanh output in [-1, 1] (SadTalker writes it as a [0, 1] image: see `xtalker.render.pirender`).

Loads the official `epoch_00190_iteration_000400000_checkpoint.pt` (`net_G_ema`, 304 float32 tensors; the
other top-level entries of PIRender's trainer are ignored) with `weights_only=True`. Upstream loads it with
`strict=False`, so a truncated or renamed file silently keeps random weights; here every one of the 304 keys
must be present with its official shape. The 48 tensors of the editing decoder's discarded residual branch
(`res*.res*.conv1/norm1`, see `DEAD_BRANCH`) are accepted and checked but never built: upstream evaluates
that branch and overwrites its result, so skipping it is exact (21.7 of 123.2 GFLOP per frame at 256).

Source-only work: every layer after the first one depends on the descriptor or on the warped image, so
little is per-video. `prepare` keeps the source, its instance-normalised stem features (the first ADAIN's
input) and the source half of the editing net's first conv; `render` does the rest per batch of windows.
"""

from __future__ import annotations

import functools
import logging
import pickle
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xtalker.checkpoints import CheckpointError, validate_state_dict

log = logging.getLogger(__name__)

FILE_NAME = "epoch_00190_iteration_000400000_checkpoint.pt"
TOP_KEY = "net_G_ema"
COEFF_NC = 73
WINDOW = 27
DESCRIPTOR_NC = 256
ADAIN_HIDDEN = 128
MAX_NC = 256
SLOPE = 0.1  # every LeakyReLU
WARP_BASE_NC = 32
WARP_ENCODER_LAYERS = 5
WARP_DECODER_LAYERS = 3
EDIT_BASE_NC = 64
EDIT_LAYERS = 3
EDIT_RES_BLOCKS = 2
MAPPING_LAYERS = 3
IMAGE_NC = 3
# Stored, shape-checked, never built: the residual branch upstream computes and then discards.
DEAD_BRANCH = ("conv1", "norm1")
DOWNLOAD_HINT = (
    f"put PIRender's released {FILE_NAME} (the file SadTalker's PIRender renderer reads) in the checkpoint folder, "
    "or write a synthetic one with scripts/make_synthetic_checkpoints.py OUT_DIR --pirender"
)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, SLOPE)


class LayerNorm2d(nn.Module):
    """`F.layer_norm` over (C, H, W) per sample, eps 1e-5, with a per-channel (C, 1, 1) affine."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[1:]
        return F.layer_norm(x, shape, self.weight.expand(shape), self.bias.expand(shape))


class ADAIN(nn.Module):
    """`IN(x) * (1 + gamma(d)) + beta(d)`: instance norm without affine, scale and shift from the descriptor."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Linear(DESCRIPTOR_NC, ADAIN_HIDDEN), nn.ReLU())
        self.mlp_gamma = nn.Linear(ADAIN_HIDDEN, channels)
        self.mlp_beta = nn.Linear(ADAIN_HIDDEN, channels)

    def modulate(self, normalized: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The affine half, on an already instance-normalised input; `d` is (B, 256)."""
        h = self.mlp_shared(d)
        gamma = self.mlp_gamma(h)[:, :, None, None]
        beta = self.mlp_beta(h)[:, :, None, None]
        return normalized * (1 + gamma) + beta

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.modulate(F.instance_norm(x, eps=1e-5), d)


# ---- mapping net ------------------------------------------------------------------------------


class MappingNet(nn.Module):
    """(B, 73, 27) window -> (B, 256, 1) descriptor: conv k7, three dilated residual convs, mean over time."""

    def __init__(self):
        super().__init__()
        # Sequential wrappers keep the official key names (`first.0.*`, `encoder{i}.1.*`).
        self.first = nn.Sequential(nn.Conv1d(COEFF_NC, DESCRIPTOR_NC, kernel_size=7))
        for i in range(MAPPING_LAYERS):
            conv = nn.Conv1d(DESCRIPTOR_NC, DESCRIPTOR_NC, kernel_size=3, dilation=3)
            self.add_module(f"encoder{i}", nn.Sequential(nn.LeakyReLU(SLOPE), conv))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        h = self.first(window)
        for i in range(MAPPING_LAYERS):
            # Each dilated k3 conv shortens time by 6: the residual is the centre of the input (21 -> 15 -> 9 -> 3).
            h = self.get_submodule(f"encoder{i}")(h) + h[:, :, 3:-3]
        return F.adaptive_avg_pool1d(h, 1)


# ---- warping net ------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """ADAIN -> LReLU -> conv k4 s2 (halves), ADAIN -> LReLU -> conv k3."""

    def __init__(self, in_nc: int, out_nc: int):
        super().__init__()
        self.norm_0 = ADAIN(in_nc)
        self.conv_0 = nn.Conv2d(in_nc, out_nc, kernel_size=4, stride=2, padding=1)
        self.norm_1 = ADAIN(out_nc)
        self.conv_1 = nn.Conv2d(out_nc, out_nc, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, d: torch.Tensor, normalized: torch.Tensor | None = None) -> torch.Tensor:
        """`normalized`: IN(x) when already known (the prepared source stem)."""
        first = self.norm_0(x, d) if normalized is None else self.norm_0.modulate(normalized, d)
        x = self.conv_0(_lrelu(first))
        return self.conv_1(_lrelu(self.norm_1(x, d)))


def _up_conv(in_nc: int, out_nc: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_nc, out_nc, kernel_size=3, stride=2, padding=1, output_padding=1)


class DecoderBlock(nn.Module):
    """Two branches that double the size: ADAIN -> LReLU -> convT (shortcut) and ADAIN -> LReLU -> conv k3 ->
    ADAIN -> LReLU -> convT (main), summed."""

    def __init__(self, in_nc: int, out_nc: int):
        super().__init__()
        hidden = min(in_nc, out_nc)
        self.norm_s = ADAIN(in_nc)
        self.conv_s = _up_conv(in_nc, out_nc)
        self.norm_0 = ADAIN(in_nc)
        self.conv_0 = nn.Conv2d(in_nc, hidden, kernel_size=3, padding=1)
        self.norm_1 = ADAIN(hidden)
        self.conv_1 = _up_conv(hidden, out_nc)

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        # IN(x) is shared by the shortcut's and the main branch's ADAIN (both normalise the same input).
        normalized = F.instance_norm(x, eps=1e-5)
        shortcut = self.conv_s(_lrelu(self.norm_s.modulate(normalized, d)))
        y = self.conv_0(_lrelu(self.norm_0.modulate(normalized, d)))
        y = self.conv_1(_lrelu(self.norm_1(y, d)))
        return shortcut + y


class HourglassEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layer = nn.Conv2d(IMAGE_NC, WARP_BASE_NC, kernel_size=7, padding=3)
        for i in range(WARP_ENCODER_LAYERS):
            in_nc = min(WARP_BASE_NC * 2**i, MAX_NC)
            out_nc = min(WARP_BASE_NC * 2 ** (i + 1), MAX_NC)
            self.add_module(f"encoder{i}", EncoderBlock(in_nc, out_nc))


class HourglassDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        top = WARP_ENCODER_LAYERS - 1
        for i in range(WARP_ENCODER_LAYERS - WARP_DECODER_LAYERS, WARP_ENCODER_LAYERS):
            in_nc = min(WARP_BASE_NC * 2 ** (i + 1), MAX_NC) * (1 if i == top else 2)
            out_nc = min(WARP_BASE_NC * 2**i, MAX_NC)
            self.add_module(f"decoder{i}", DecoderBlock(in_nc, out_nc))


class Hourglass(nn.Module):
    """Five ADAIN encoder levels (sizes /2 .. /32) and three decoder levels back to /4, `[decoded, skip]` concats."""

    def __init__(self):
        super().__init__()
        self.encoder = HourglassEncoder()
        self.decoder = HourglassDecoder()

    @property
    def output_nc(self) -> int:
        level = WARP_ENCODER_LAYERS - WARP_DECODER_LAYERS
        return 2 * min(WARP_BASE_NC * 2**level, MAX_NC)

    def stem(self, image: torch.Tensor) -> torch.Tensor:
        """IN(input_layer(image)): the descriptor-free start of the encoder."""
        return F.instance_norm(self.encoder.input_layer(image), eps=1e-5)

    def forward(self, stem: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        # The first block only ever sees the stem through its ADAIN, so IN(stem input) is all it needs.
        x = self.encoder.encoder0(None, d, normalized=stem)
        skips = [x]
        for i in range(1, WARP_ENCODER_LAYERS):
            x = self.encoder.get_submodule(f"encoder{i}")(x, d)
            skips.append(x)
        out = skips.pop()
        for i in reversed(range(WARP_ENCODER_LAYERS - WARP_DECODER_LAYERS, WARP_ENCODER_LAYERS)):
            out = torch.cat([self.decoder.get_submodule(f"decoder{i}")(out, d), skips.pop()], dim=1)
        return out


def flow_to_deformation(flow: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w) flow in pixels of its grid -> (B, h, w, 2) sampling grid in (x, y) order.

    The base grid is align-corners style (`2 * (i / (n - 1)) - 1`), the offset `2 * flow / (n - 1)`, with
    upstream's operation order.
    """
    b, _, h, w = flow.shape
    xs = 2 * (torch.arange(w, device=flow.device, dtype=flow.dtype) / (w - 1)) - 1
    ys = 2 * (torch.arange(h, device=flow.device, dtype=flow.dtype) / (h - 1)) - 1
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=2)
    offset = 2 * torch.cat([flow[:, :1] / (w - 1), flow[:, 1:] / (h - 1)], dim=1)
    return grid[None].expand(b, h, w, 2) + offset.permute(0, 2, 3, 1)


def warp_image(image: torch.Tensor, deformation: torch.Tensor) -> torch.Tensor:
    """Sample `image` (1 or B, C, H, W) at `deformation` (B, h, w, 2), bilinearly upsampled to H x W first.

    Both the upsampling and `grid_sample` use align_corners=False (so a zero flow is not an exact identity).
    """
    b = deformation.shape[0]
    size = tuple(image.shape[-2:])
    if tuple(deformation.shape[1:3]) != size:
        deformation = F.interpolate(deformation.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
        deformation = deformation.permute(0, 2, 3, 1)
    return F.grid_sample(image.expand(b, -1, -1, -1), deformation, mode="bilinear", padding_mode="zeros", align_corners=False)


class WarpingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.hourglass = Hourglass()
        nc = self.hourglass.output_nc
        # Keys flow_out.0 (LayerNorm2d) and flow_out.2 (conv): index 1 is the parameter-free LeakyReLU.
        self.flow_out = nn.Sequential(LayerNorm2d(nc), nn.LeakyReLU(SLOPE), nn.Conv2d(nc, 2, kernel_size=7, padding=3))


# ---- editing net ------------------------------------------------------------------------------


class ConvNormAct(nn.Module):
    """conv -> LayerNorm2d -> LReLU, keys `model.0` / `model.1`; optional 2x average pool after (encoder) or
    nearest 2x upsampling before (decoder `up*`)."""

    def __init__(self, in_nc: int, out_nc: int, kernel: int = 3, pool: bool = False, upsample: bool = False):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(in_nc, out_nc, kernel_size=kernel, padding=kernel // 2), LayerNorm2d(out_nc))
        self.pool, self.upsample = pool, upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.finish(self.model[0](x))

    def finish(self, conv_out: torch.Tensor) -> torch.Tensor:
        """Everything after the conv."""
        y = _lrelu(self.model[1](conv_out))
        return F.avg_pool2d(y, 2) if self.pool else y


class ResBlock(nn.Module):
    """`ADAIN(conv2(x), d) + x`. Upstream's block also computes LReLU(ADAIN(conv1(x))) and throws it away: not built."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm2 = ADAIN(channels)

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(x), d) + x


class ResBlocks(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        for j in range(EDIT_RES_BLOCKS):
            self.add_module(f"res{j}", ResBlock(channels))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        for j in range(EDIT_RES_BLOCKS):
            x = self.get_submodule(f"res{j}")(x, d)
        return x


class FinalBlock(nn.Module):
    def __init__(self, in_nc: int):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(in_nc, IMAGE_NC, kernel_size=7, padding=3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.model(x))


class EditingEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = ConvNormAct(2 * IMAGE_NC, EDIT_BASE_NC, kernel=7)
        for i in range(EDIT_LAYERS):
            in_nc = min(EDIT_BASE_NC * 2**i, MAX_NC)
            out_nc = min(EDIT_BASE_NC * 2 ** (i + 1), MAX_NC)
            self.add_module(f"down{i}", ConvNormAct(in_nc, out_nc, pool=True))


class EditingDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        for i in reversed(range(EDIT_LAYERS)):
            in_nc = min(EDIT_BASE_NC * 2 ** (i + 1), MAX_NC)
            out_nc = min(EDIT_BASE_NC * 2**i, MAX_NC)
            self.add_module(f"up{i}", ConvNormAct(in_nc, out_nc, upsample=True))
            self.add_module(f"res{i}", ResBlocks(in_nc))
            self.add_module(f"jump{i}", ConvNormAct(out_nc, out_nc))
        self.final = FinalBlock(EDIT_BASE_NC)


class EditingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = EditingEncoder()
        self.decoder = EditingDecoder()

    def source_part(self, source: torch.Tensor) -> torch.Tensor:
        """The source channels' share of the first conv, bias included: conv(cat(s, w)) = conv_s(s) + conv_w(w)."""
        conv = self.encoder.first.model[0]
        return F.conv2d(source, conv.weight[:, :IMAGE_NC], conv.bias, padding=conv.padding)

    def forward(self, source_part: torch.Tensor, warped: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        conv = self.encoder.first.model[0]
        first = source_part + F.conv2d(warped, conv.weight[:, IMAGE_NC:], None, padding=conv.padding)
        feats = [self.encoder.first.finish(first)]
        for i in range(EDIT_LAYERS):
            feats.append(self.encoder.get_submodule(f"down{i}")(feats[-1]))
        out = feats.pop()
        dec = self.decoder
        for i in reversed(range(EDIT_LAYERS)):
            out = dec.get_submodule(f"res{i}")(out, d)
            out = dec.get_submodule(f"up{i}")(out)
            out = dec.get_submodule(f"jump{i}")(feats.pop()) + out
        return dec.final(out)


# ---- the whole generator ----------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedSource:
    """Per-video source state (batch 1), from `FaceGenerator.prepare`."""

    image: torch.Tensor  # (1, 3, S, S) float32 in [0, 1] (SadTalker does not rescale to [-1, 1])
    stem: torch.Tensor  # (1, 32, S, S) instance-normalised warping-net stem
    edit_source: torch.Tensor  # (1, 64, S, S) source share of the editing net's first conv

    @property
    def image_size(self) -> int:
        return int(self.image.shape[-1])


@dataclass(frozen=True)
class Rendered:
    """Everything one forward computes, batch first."""

    descriptor: torch.Tensor  # (B, 256, 1)
    flow_field: torch.Tensor  # (B, 2, S/4, S/4) pixels of the flow grid, channel 0 horizontal
    deformation: torch.Tensor  # (B, S/4, S/4, 2) sampling grid (x, y)
    warp_image: torch.Tensor  # (B, 3, S, S)
    fake_image: torch.Tensor  # (B, 3, S, S) tanh output in [-1, 1]


class FaceGenerator(nn.Module):
    """mapping_net -> warpping_net (sic, the official key prefix) -> editing_net (spec 4)."""

    def __init__(self):
        super().__init__()
        self.mapping_net = MappingNet()
        self.warpping_net = WarpingNet()
        self.editing_net = EditingNet()
        # bf16 autocast for the editing net alone (about 80 % of the FLOPs; mapping and warping stay fp32).
        self.editing_bf16 = False

    @property
    def device(self) -> torch.device:
        return self.mapping_net.first[0].weight.device

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != IMAGE_NC:
            raise ValueError(f"source image must be (N, 3, S, S), got {tuple(x.shape)}")
        if x.shape[-1] != x.shape[-2] or x.shape[-1] % 32:
            raise ValueError(f"source image must be square with a side divisible by 32, got {tuple(x.shape)}")
        return x.to(device=self.device, dtype=torch.float32)

    def prepare(self, source: torch.Tensor) -> PreparedSource:
        """Source work done once per video: (1, 3, S, S) float image in [0, 1]."""
        image = self._image(source)
        if image.shape[0] != 1:
            raise ValueError(f"prepare takes one source image (1, 3, S, S), got {tuple(image.shape)}")
        return PreparedSource(
            image=image,
            stem=self.warpping_net.hourglass.stem(image),
            edit_source=self.editing_net.source_part(image),
        )

    def descriptor(self, windows: torch.Tensor) -> torch.Tensor:
        if windows.dim() != 3 or tuple(windows.shape[1:]) != (COEFF_NC, WINDOW):
            raise ValueError(f"PIRender expects (B, {COEFF_NC}, {WINDOW}) coefficient windows, got {tuple(windows.shape)}")
        return self.mapping_net(windows.to(device=self.device, dtype=torch.float32))

    def render_all(self, source: PreparedSource, windows: torch.Tensor) -> Rendered:
        """(B, 73, 27) windows -> every intermediate of the forward for the prepared source."""
        descriptor = self.descriptor(windows)
        d = descriptor.flatten(1)
        warping = self.warpping_net
        flow = warping.flow_out(warping.hourglass(source.stem, d))
        deformation = flow_to_deformation(flow)
        warped = warp_image(source.image, deformation)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.editing_bf16 else nullcontext()
        with autocast:
            fake = self.editing_net(source.edit_source, warped, d)
        return Rendered(descriptor, flow, deformation, warped, fake.float())

    def render(self, source: PreparedSource, windows: torch.Tensor) -> torch.Tensor:
        """(B, 73, 27) windows -> (B, 3, S, S) frames, the raw tanh output in [-1, 1]."""
        return self.render_all(source, windows).fake_image

    def forward(self, source: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Upstream's call: (1 or B, 3, S, S) source in [0, 1] (the same image for every window) and (B, 73, 27)."""
        image = self._image(source)
        if image.shape[0] > 1 and not bool((image == image[:1]).all()):
            raise ValueError("PIRender renders one source image per call: every batch entry must be the same image")
        return self.render(self.prepare(image[:1]), windows)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> "FaceGenerator":
        """Build from a validated `net_G_ema` state dict (dead-branch tensors are dropped here)."""
        with torch.device("meta"):  # no throw-away random initialisation
            model = cls()
        model.load_state_dict(used_state(state), strict=True, assign=True)
        return model.eval().requires_grad_(False)


# ---- the official file ------------------------------------------------------------------------


def is_dead(key: str) -> bool:
    """Whether `key` belongs to the discarded residual branch of the editing decoder."""
    parts = key.split(".")
    return key.startswith("editing_net.decoder.res") and len(parts) > 4 and parts[4] in DEAD_BRANCH


def used_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not is_dead(k)}


def _dead_layout(model: FaceGenerator) -> dict[str, tuple[int, ...]]:
    """The discarded branch's tensors: conv1 is shaped like conv2, norm1 like norm2, in every res block."""
    shapes = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if key.startswith("editing_net.decoder.res") and len(parts) > 4 and parts[4] in ("conv2", "norm2"):
            parts[4] = parts[4][:-1] + "1"
            shapes[".".join(parts)] = tuple(value.shape)
    return shapes


@functools.cache
def _layout() -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = FaceGenerator()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update(_dead_layout(model))
    return tuple(shapes.items())


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every key -> shape of the official `net_G_ema` state dict (304 tensors, the dead branch's 48 included)."""
    return dict(_layout())


def _unpickler_detail(error: Exception) -> str:
    """The telling part of torch's weights_only error (after "WeightsUnpickler error:"), without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    _, found, after = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (after if found else text).splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else type(error).__name__


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The checked `net_G_ema` state dict of a PIRender checkpoint (all 304 tensors), read with weights_only=True.

    Raises CheckpointError, one line naming the file, for a missing, unreadable, foreign or incomplete file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"PIRender checkpoint not found: {path}; {DOWNLOAD_HINT}")
    try:
        top = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        if "Unsupported global" in detail:  # a pickle that would run code (a class or function reference)
            raise CheckpointError(
                f"{path} is not a plain-weights pickle and was not loaded (weights_only=True refused it: {detail})"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({detail}); the file may be damaged: re-download it ({DOWNLOAD_HINT})"
        ) from None
    except Exception as e:  # zip, pickle and storage errors have many types; report them uniformly
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(e).__name__}: {reason}); "
            f"the file may be truncated: re-download it ({DOWNLOAD_HINT})"
        ) from None
    if not isinstance(top, dict) or not isinstance(top.get(TOP_KEY), dict):
        found = ", ".join(sorted(map(str, top))[:5]) if isinstance(top, dict) else type(top).__name__
        raise CheckpointError(
            f"{path} has no '{TOP_KEY}' state dict (found: {found}); it is not a PIRender checkpoint ({DOWNLOAD_HINT})"
        )
    state = top[TOP_KEY]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: '{TOP_KEY}' is not a state dict of tensors")
    expected = {k: (list(shape), "F32") for k, shape in official_layout().items()}
    try:
        validate_state_dict(dict(state), expected, f"{path} [{TOP_KEY}]")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {DOWNLOAD_HINT}") from None
    return dict(state)


def load_pirender(path: str | Path, device: str | torch.device = "cpu") -> FaceGenerator:
    """Read, check and build PIRender's FaceGenerator from an official (or synthetic) checkpoint, in eval mode."""
    state = read_state(path)
    log.debug("loaded PIRender FaceGenerator from %s (%d tensors, %d used)", path, len(state), len(used_state(state)))
    return FaceGenerator.from_official(state).to(device)
