"""RetinaFace with a ResNet-50 backbone (facexlib's `retinaface_resnet50` face detector, aux spec 1.3-1.5).

Loads the official `detection_Resnet50_Final.pth` exactly: a flat torch pickle whose keys may carry the
`module.` prefix of a DataParallel run (stripped, as facexlib does). The network maps mean-subtracted BGR
images of any size to per-prior box offsets, face probabilities and landmark offsets; priors, decoding and
NMS live in `xtalker.preprocess.face_detect`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xtalker.models import auxfile
from xtalker.models.resnet import ResNet50

log = logging.getLogger(__name__)

FILE_NAME = "detection_Resnet50_Final.pth"
STRIP_PREFIX = "module."
FPN_CHANNELS = 256
ANCHORS = 2  # priors per feature-map location (two min sizes per level)
LEVEL_INPUTS = (512, 1024, 2048)  # backbone stages 2-4 feed the three FPN levels


def _conv_bn(in_ch: int, out_ch: int, kernel: int, relu: bool) -> nn.Sequential:
    """Conv (no bias, `same` padding) + BN (+ ReLU): keys `.0` conv, `.1` BN, as upstream's Sequentials."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FPN(nn.Module):
    """1x1 laterals to 256 channels, top-down nearest upsampling to the exact lower-level size, 3x3 merges."""

    def __init__(self):
        super().__init__()
        self.output1 = _conv_bn(LEVEL_INPUTS[0], FPN_CHANNELS, 1, relu=True)
        self.output2 = _conv_bn(LEVEL_INPUTS[1], FPN_CHANNELS, 1, relu=True)
        self.output3 = _conv_bn(LEVEL_INPUTS[2], FPN_CHANNELS, 1, relu=True)
        self.merge1 = _conv_bn(FPN_CHANNELS, FPN_CHANNELS, 3, relu=True)
        self.merge2 = _conv_bn(FPN_CHANNELS, FPN_CHANNELS, 3, relu=True)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        # Resizing to explicit sizes (not x2) keeps odd input sizes aligned: 10 -> 19 rows is not duplication.
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return o1, o2, o3


class SSH(nn.Module):
    """Single-stage context module: parallel 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) paths, concatenated."""

    def __init__(self, channels: int = FPN_CHANNELS):
        super().__init__()
        half, quarter = channels // 2, channels // 4
        self.conv3X3 = _conv_bn(channels, half, 3, relu=False)
        self.conv5X5_1 = _conv_bn(channels, quarter, 3, relu=True)
        self.conv5X5_2 = _conv_bn(quarter, quarter, 3, relu=False)
        self.conv7X7_2 = _conv_bn(quarter, quarter, 3, relu=True)
        self.conv7x7_3 = _conv_bn(quarter, quarter, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv5X5_1(x)
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(t), self.conv7x7_3(self.conv7X7_2(t))], dim=1)
        return F.relu(out, inplace=True)


class Head(nn.Module):
    """1x1 conv predicting `per_anchor` values for each of the 2 anchors, flattened to (B, h*w*2, per_anchor)."""

    def __init__(self, per_anchor: int, channels: int = FPN_CHANNELS):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(channels, ANCHORS * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC order makes the prior index run over row, column, then anchor.
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)


class RetinaFaceR50(nn.Module):
    """RetinaFace R50: (B, 3, H, W) mean-subtracted BGR -> (loc (B,N,4), conf (B,N,2) softmaxed, landms (B,N,10))."""

    def __init__(self):
        super().__init__()
        self.body = ResNet50()
        self.fpn = FPN()
        self.ssh1 = SSH()
        self.ssh2 = SSH()
        self.ssh3 = SSH()
        self.ClassHead = nn.ModuleList(Head(2) for _ in range(3))
        self.BboxHead = nn.ModuleList(Head(4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(Head(10) for _ in range(3))

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> RetinaFaceR50:
        """Build from the prefix-stripped official state dict (BatchNorm counters optional)."""
        with torch.device("meta"):
            net = cls()
        counters = {k: torch.zeros((), dtype=torch.long) for k in net.state_dict() if k.endswith(auxfile.OPTIONAL_SUFFIX)}
        # The counters are never used; re-adding them keeps the load strict for every other key.
        net.load_state_dict({**counters, **state}, strict=True, assign=True)
        return net

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw head outputs: loc, class logits (before softmax), landms."""
        levels = self.fpn(tuple(self.body.stages(x)[1:]))
        feats = [self.ssh1(levels[0]), self.ssh2(levels[1]), self.ssh3(levels[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1)
        logits = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1)
        landms = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, logits, landms

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loc, logits, landms = self.heads(x)
        return loc, F.softmax(logits, dim=-1), landms


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias computing bn(conv(x)) (inference statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True
    )
    fused.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    fused.bias = nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=False)
    return fused


def fold_batchnorm(net: RetinaFaceR50) -> RetinaFaceR50:
    """An inference copy with every BatchNorm folded into its conv (BNs become Identity; keys differ).

    Folding an already folded network changes nothing.
    """
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        for module in list(net.modules()):
            # Conv/BN pairs are `.0`/`.1` in the Sequentials and convN/bnN in the stem and bottlenecks.
            pairs = [("0", "1")] if isinstance(module, nn.Sequential) else [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            for conv_name, bn_name in pairs:
                conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(module, conv_name, _fold(conv, bn))
                    setattr(module, bn_name, nn.Identity())
    return net


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every model key -> shape of the official file (without `module.`), BatchNorm counters included."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in RetinaFaceR50().state_dict().items()}


def read_retinaface_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The checked, prefix-stripped state dict of a detection_Resnet50_Final.pth file."""
    return auxfile.read_state(path, FILE_NAME, official_layout(), strip_prefix=STRIP_PREFIX)


def load_retinaface(path: str | Path) -> RetinaFaceR50:
    """Read, check and build RetinaFaceR50 from an official (or synthetic) detection_Resnet50_Final.pth, eval mode."""
    state = read_retinaface_state(path)
    log.debug("loaded RetinaFaceR50 from %s (%d tensors)", path, len(state))
    return RetinaFaceR50.from_official(state).eval()
