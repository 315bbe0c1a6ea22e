"""ParseNet (facexlib face parsing, 19 classes): the paste-back mask network of GFPGANer (aux spec 4).

Loads the official `parsing_parsenet.pth` exactly: a flat torch-pickled state dict (BatchNorm counters optional).
Two ways to run it:

- `ParseNet.forward`: the upstream graph op for op (nearest x2, reflection pad, conv, BatchNorm, leaky ReLU),
  returning `(mask_logits, image)`; the reference for parity.
- `parse_classes` / `mask_logits`: the inference path the enhancer uses. It runs a plan built once per network
  and precision (`FastParseNet`) that computes the same function with less work: BatchNorm folded into the
  convs; channels-last; every "nearest x2, reflection pad, 3x3 conv" rewritten as a stride-2 transposed 4x4
  conv on the low-resolution map (the same sums with 4 instead of 9 taps per output: 113 of the 469 GFLOP);
  zero-padded convs whose border rows are recomputed from reflection-padded strips (no padded copy of any
  map); the unused image head skipped. fp32 stays within the golden tolerances at about half the upstream
  time; "bf16" runs the convs with bfloat16 weights and activations, twice as fast again (spec 6.5: about
  1.4 % of the labels flip, which the blurred paste mask hides).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xtalker.models import auxfile
from xtalker.models.plans import cached_plan

log = logging.getLogger(__name__)

FILE_NAME = "parsing_parsenet.pth"
SIZE = 512
NUM_CLASSES = 19
LRELU_SLOPE = 0.2
BN_EPS = 1e-5
# Encoder widths 512 -> 32 (base 64, doubled per halving, clipped to [32, 256]); the decoder mirrors them.
ENCODER_CHANNELS = (64, 128, 256, 256, 256)
BODY_DEPTH = 10

# float32(u8) / 255 (a float32 division, as numpy does upstream), then (x - 0.5) / 0.5, per byte value.
_INPUT_LUT = torch.from_numpy((np.arange(256, dtype=np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5))


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def _reflect1(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 1, 1, 1), mode="reflect")


class NormLayer(nn.Module):
    """Upstream wraps its BatchNorm in a module of its own (keys `*.norm.norm.*`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ConvLayer(nn.Module):
    """[nearest x2] -> reflection pad 1 -> 3x3 conv (stride 2 for "down"; bias only without BN) -> [BN] -> [lrelu]."""

    def __init__(self, in_ch: int, out_ch: int, scale: str = "none", norm: bool = False, act: bool = False):
        super().__init__()
        if scale not in ("none", "up", "down"):
            raise ValueError(f"unknown scale {scale!r}")
        self.scale = scale
        self.act = act
        self.conv2d = nn.Conv2d(in_ch, out_ch, 3, stride=2 if scale == "down" else 1, bias=not norm)
        self.norm = NormLayer(out_ch) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.conv2d(_reflect1(x))
        if self.norm is not None:
            x = self.norm(x)
        return _lrelu(x) if self.act else x


class ResidualBlock(nn.Module):
    """shortcut + conv2(conv1(x)); the resampling sits on conv2 ("down") or conv1 ("up"); no final activation."""

    def __init__(self, in_ch: int, out_ch: int, scale: str = "none"):
        super().__init__()
        self.scale = scale
        plain = scale == "none" and in_ch == out_ch
        self.shortcut_func = None if plain else ConvLayer(in_ch, out_ch, scale)
        self.conv1 = ConvLayer(in_ch, out_ch, "up" if scale == "up" else "none", norm=True, act=True)
        self.conv2 = ConvLayer(out_ch, out_ch, "down" if scale == "down" else "none", norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut_func is None else self.shortcut_func(x)
        return shortcut + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """(B, 3, 512, 512) RGB in [-1, 1] -> (mask logits (B, 19, 512, 512), image (B, 3, 512, 512))."""

    def __init__(self):
        super().__init__()
        enc = ENCODER_CHANNELS
        self.encoder = nn.Sequential(
            ConvLayer(3, enc[0]), *(ResidualBlock(a, b, "down") for a, b in itertools.pairwise(enc))
        )
        self.body = nn.Sequential(*(ResidualBlock(enc[-1], enc[-1]) for _ in range(BODY_DEPTH)))
        dec = enc[::-1]
        self.decoder = nn.Sequential(*(ResidualBlock(a, b, "up") for a, b in itertools.pairwise(dec)))
        self.out_img_conv = ConvLayer(enc[0], 3)
        self.out_mask_conv = ConvLayer(enc[0], NUM_CLASSES)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> ParseNet:
        """Build from the official flat state dict; BatchNorm `num_batches_tracked` may be absent."""
        with torch.device("meta"):
            net = cls()
        counters = {k for k in net.state_dict() if k.endswith(auxfile.OPTIONAL_SUFFIX)}
        full = dict(state)
        # The counters are never used; zeros stand in for the absent ones so the load itself stays strict.
        for k in counters - set(full):
            full[k] = torch.zeros((), dtype=torch.long)
        net.load_state_dict(full, strict=True, assign=True)
        return net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 64-channel 512 x 512 map both heads read."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, SIZE, SIZE):
            raise ValueError(f"ParseNet expects (B, 3, {SIZE}, {SIZE}) images, got {tuple(x.shape)}")
        feat = self.encoder(x)
        feat = feat + self.body(feat)
        return self.decoder(feat)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.features(x)
        return self.out_mask_conv(feat), self.out_img_conv(feat)


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every key -> shape of the official parsing_parsenet.pth state dict (BatchNorm counters included)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ParseNet().state_dict().items()}


def read_parsenet_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The checked flat state dict of a parsing_parsenet.pth file, without BatchNorm counters."""
    return auxfile.read_state(path, FILE_NAME, official_layout())


def load_parsenet(path: str | Path) -> ParseNet:
    """Read, check and build ParseNet from an official (or synthetic) parsing_parsenet.pth, in eval mode."""
    state = read_parsenet_state(path)
    log.debug("loaded ParseNet from %s (%d tensors)", path, len(state))
    return ParseNet.from_official(state).eval()


def preprocess_bgr_u8(faces: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) BGR uint8 faces -> (B, 3, 512, 512) RGB float32 in [-1, 1], as FaceRestoreHelper does.

    Faces of another size are first resized to 512 x 512 with cv2 INTER_LINEAR (upstream always calls the
    resize; at 512 it is the identity, so it is skipped).
    """
    # Views such as `[..., ::-1]` have negative strides, which torch cannot wrap.
    u8 = torch.from_numpy(np.ascontiguousarray(faces)) if isinstance(faces, np.ndarray) else faces
    if u8.dtype != torch.uint8 or u8.dim() != 4 or u8.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) uint8 BGR faces, got {tuple(u8.shape)} {u8.dtype}")
    if tuple(u8.shape[1:3]) != (SIZE, SIZE):
        resized = [cv2.resize(f, (SIZE, SIZE)) for f in u8.numpy()]
        u8 = torch.from_numpy(np.stack(resized)) if resized else u8.new_empty((0, SIZE, SIZE, 3))
    return _INPUT_LUT[u8.flip(-1).permute(0, 3, 1, 2).long()].contiguous()


# Nearest x2 then a 3x3 conv over the reflection-padded result reads, for output row 2m, input rows (m-1, m, m)
# with taps (w0, w1, w2) and, for row 2m+1, rows (m, m, m+1); at the borders the reflection lands on a copy
# of the edge row, i.e. replicate padding of the low-resolution input. As a stride-2 transposed conv with
# padding 3 over that replicate-padded input, kernel row a (0..3) sums these original taps:
_UP_TAPS = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float64)


def _folded(layer: ConvLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the layer's conv with its inference-mode BatchNorm folded in, computed in float64."""
    w = layer.conv2d.weight.detach().double()
    b = (layer.conv2d.bias.detach().double() if layer.conv2d.bias is not None
         else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    if layer.norm is not None:
        bn = layer.norm.norm
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * scale.view(-1, 1, 1, 1)
        b = (b - bn.running_mean.double()) * scale + bn.bias.double()
    return w, b


def _up_kernel(w: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) kernel of "nearest x2, then conv" -> the (in, out, 4, 4) equivalent transposed kernel."""
    taps = _UP_TAPS.to(w.device)
    k = torch.einsum("at,bu,oitu->ioab", taps, taps, w)
    return k.contiguous()


class _Conv:
    """One conv of the plan: folded weights in the plan's dtype, channels-last."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, stride: int = 1, up: bool = False):
        self.weight = w.to(dtype).contiguous(memory_format=torch.channels_last)
        self.bias = b.to(dtype)
        self.stride = stride
        self.up = up

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on `x`: reflection-padded 3x3 conv, or for `up` the transposed conv on replicate-padded `x`."""
        if self.up:
            return F.conv_transpose2d(x, self.weight, self.bias, stride=2, padding=3)
        # Zero padding inside the conv saves a padded copy of `x`; only the outer output rows/columns whose
        # window reaches the padding differ, and those are recomputed from reflection-padded 3-pixel strips.
        y = F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=1)
        y[:, :, :1] = self._valid(_reflect1(x[:, :, :3]))[:, :, :1]
        y[:, :, :, :1] = self._valid(_reflect1(x[:, :, :, :3]))[:, :, :, :1]
        if self._reaches_end_padding(x.shape[-2]):
            y[:, :, -1:] = self._valid(_reflect1(x[:, :, -3:]))[:, :, -1:]
        if self._reaches_end_padding(x.shape[-1]):
            y[:, :, :, -1:] = self._valid(_reflect1(x[:, :, :, -3:]))[:, :, :, -1:]
        return y

    def _reaches_end_padding(self, size: int) -> bool:
        """Whether the last output's window covers the padding after `size` pixels (not for stride 2 on even sizes)."""
        return (size - 1) // self.stride * self.stride + 2 > size

    def _valid(self, padded: torch.Tensor) -> torch.Tensor:
        return F.conv2d(padded, self.weight, self.bias, stride=self.stride)


def _plain(layer: ConvLayer, dtype: torch.dtype) -> _Conv:
    return _Conv(*_folded(layer), dtype, stride=2 if layer.scale == "down" else 1)


def _upsampling(layer: ConvLayer, dtype: torch.dtype) -> _Conv:
    w, b = _folded(layer)
    return _Conv(_up_kernel(w), b, dtype, up=True)


class _Block:
    """A ResidualBlock as plan steps; every padded input is made once and read by both convs that need it."""

    def __init__(self, block: ResidualBlock, dtype: torch.dtype):
        self.scale = block.scale
        make = _upsampling if block.scale == "up" else _plain
        self.conv1 = make(block.conv1, dtype)
        self.conv2 = _plain(block.conv2, dtype)
        self.shortcut = None if block.shortcut_func is None else make(block.shortcut_func, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The transposed convs read the replicate-padded input (made once for conv1 and the shortcut).
        source = F.pad(x, (1, 1, 1, 1), mode="replicate") if self.scale == "up" else x
        y = self.conv2(F.leaky_relu_(self.conv1(source), LRELU_SLOPE))
        return y.add_(x if self.shortcut is None else self.shortcut(source))


class FastParseNet:
    """Inference plan of a ParseNet (mask head only): folded BatchNorm, channels-last, `dtype` weights and
    activations. Built from the network's current weights; build a new plan after changing them."""

    def __init__(self, net: ParseNet, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        with torch.no_grad():
            self.stem = _plain(net.encoder[0], dtype)
            self.encoder = [_Block(b, dtype) for b in net.encoder[1:]]
            self.body = [_Block(b, dtype) for b in net.body]
            self.decoder = [_Block(b, dtype) for b in net.decoder]
            self.head = _plain(net.out_mask_conv, dtype)
        self.device = self.head.weight.device  # the network's: inputs are moved here

    def mask_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 512, 512) normalised RGB -> (B, 19, 512, 512) mask logits in the plan's dtype (channels-last)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, SIZE, SIZE):
            raise ValueError(f"ParseNet expects (B, 3, {SIZE}, {SIZE}) images, got {tuple(x.shape)}")
        feat = self.stem(x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last))
        for block in self.encoder:
            feat = block(feat)
        body = feat
        for block in self.body:
            body = block(body)
        feat = body.add_(feat)
        for block in self.decoder:
            feat = block(feat)
        return self.head(feat)


def fast_plan(net: ParseNet, precision: str = "fp32") -> FastParseNet:
    """The network's inference plan for `precision` ("fp32" or "bf16"), built on first use and kept on the network
    (from the weights it has then)."""
    return cached_plan(net, precision, FastParseNet)


def mask_logits(net: ParseNet, faces_bgr_u8: np.ndarray | torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """(B, H, W, 3) BGR uint8 faces -> (B, 19, 512, 512) float32 mask logits through the inference plan (run on
    the network's device, returned on the CPU)."""
    with torch.inference_mode():
        return fast_plan(net, precision).mask_logits(preprocess_bgr_u8(faces_bgr_u8)).float().cpu()


def parse_classes(net: ParseNet, faces_bgr_u8: np.ndarray | torch.Tensor, precision: str = "fp32") -> np.ndarray:
    """(B, H, W, 3) BGR uint8 faces -> (B, 512, 512) uint8 parse classes (argmax of the 19 mask logits), computed on
    the network's device."""
    plan = fast_plan(net, precision)
    with torch.inference_mode():
        return plan.mask_logits(preprocess_bgr_u8(faces_bgr_u8)).argmax(1).to(torch.uint8).cpu().numpy()
