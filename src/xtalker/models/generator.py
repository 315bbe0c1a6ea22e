"""OcclusionAwareSPADEGenerator: warp the source's 3-D features by the keypoint motion and decode (spec G4).

The work is split so that everything depending only on the source image (`encode_source`) runs once per video
and `animate` runs per driving frame; source features of batch 1 serve a driving batch of any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xtalker.models.blocks import DownBlock2d, DownBlock3d, SameBlock2d, UpBlock3d, coordinate_grid
from xtalker.models.kp_extractor import NUM_KP

IMAGE_CHANNELS = 3
BLOCK_EXPANSION = 64
FEATURE_CHANNELS = 32  # 512 channels of `second` viewed as 32 x depth 16
DEPTH = 16
NUM_RESBLOCKS = 6
MOTION_EXPANSION = 32
MOTION_BLOCKS = 5
MOTION_MAX_FEATURES = 1024
COMPRESS = 4
KP_VARIANCE = 0.01
MASK_CUT = 1e-3
SPADE_HIDDEN = 128
SPADE_LABEL = 256
NUM_MIDDLE = 6
SPECTRAL_CONVS = ("conv_0", "conv_1", "conv_s")


@dataclass
class SourceFeatures:
    """Everything `animate` needs from the source image; batch 1 is broadcast over any driving batch."""

    volume: torch.Tensor  # (B, 32, 16, S/4, S/4) appearance features after the 3-D res blocks
    compressed: torch.Tensor  # (B, 4, 16, S/4, S/4) dense-motion input after compress + BN + ReLU

    @property
    def batch(self) -> int:
        return int(self.volume.shape[0])


def fold_spectral_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace `X.weight_orig / X.weight_u / X.weight_v` by the effective kernel `X.weight = orig / (u . W v)`."""
    out = {k: v for k, v in state.items() if not k.endswith((".weight_orig", ".weight_u", ".weight_v"))}
    for key, orig in state.items():
        if not key.endswith(".weight_orig"):
            continue
        base = key[: -len("_orig")]
        u, v = state[base + "_u"], state[base + "_v"]
        sigma = torch.dot(u, torch.mv(orig.reshape(orig.shape[0], -1), v))
        out[base] = orig / sigma
    return out


def sample_volume(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Trilinear grid_sample (zeros, align_corners=False) of (S, C, D, H, W) at (B, Do, Ho, Wo, 3), S = B or 1.

    With a single source the driving batch is folded into the output depth axis, so the volume is never
    copied per sample; the result may then be a non-contiguous (B, C, Do, Ho, Wo) view.
    """
    s, b = volume.shape[0], grid.shape[0]
    if s == b:
        return F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if s != 1:
        raise ValueError(f"source batch {s} cannot serve a driving batch of {b}")
    do, ho, wo = grid.shape[1:4]
    out = F.grid_sample(
        volume, grid.reshape(1, b * do, ho, wo, 3), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.view(volume.shape[1], b, do, ho, wo).transpose(0, 1)


def upsampled_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, factor: int
) -> torch.Tensor:
    """`conv2d(nearest_upsample(x, factor), weight, bias, padding=1)` computed on x itself (polyphase form).

    Every output phase (ry, rx) of the upsampled map sees at most 2x2 distinct input pixels, so summing the
    3x3 taps that hit the same pixel gives a smaller kernel per phase: 2.25x (factor 2) to 4x (factor 4) fewer
    multiply-adds, and the upsampled input is never built. Equal up to float summation order.
    """
    if factor == 1:
        return F.conv2d(x, weight, bias, padding=1)
    b, _, h, w = x.shape
    c_out = weight.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    out = x.new_empty(b, c_out, h * factor, w * factor)
    selectors = [_phase_selector(r, factor, weight) for r in range(factor)]
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for ry in range(factor):
        for rx in range(factor):
            groups.setdefault((selectors[ry][0].shape[0], selectors[rx][0].shape[0]), []).append((ry, rx))
    for phases in groups.values():
        # Phases with the same kernel size share one conv; each one then reads its own offset window.
        kernels = [
            torch.einsum("ay,oiyx,bx->oiab", selectors[ry][0], weight, selectors[rx][0]) for ry, rx in phases
        ]
        y = F.conv2d(padded, torch.cat(kernels), None if bias is None else bias.repeat(len(phases)))
        for i, (ry, rx) in enumerate(phases):
            oy, ox = selectors[ry][1] + 1, selectors[rx][1] + 1
            out[:, :, ry::factor, rx::factor] = y[:, i * c_out:(i + 1) * c_out, oy:oy + h, ox:ox + w]
    return out


def _phase_selector(r: int, factor: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For output phase r: a (taps, 3) 0/1 matrix sending each 3x3 kernel row to its input offset, and the lowest
    offset (-1, 0)."""
    offsets = [(r + t - 1) // factor for t in range(3)]
    lo = min(offsets)
    sel = torch.zeros(max(offsets) - lo + 1, 3, dtype=like.dtype, device=like.device)
    for t, o in enumerate(offsets):
        sel[o - lo, t] = 1
    return sel, lo


class ResBlock3d(nn.Module):
    """Pre-activation residual block: BN, ReLU, conv3d, BN, ReLU, conv3d, + input."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.BatchNorm3d(channels)
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.norm2 = nn.BatchNorm3d(channels)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x), inplace=True))
        out = self.conv2(F.relu(self.norm2(out), inplace=True))
        return out + x


class Encoder3d(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        chans = [in_ch] + [min(MOTION_MAX_FEATURES, MOTION_EXPANSION * 2 ** (i + 1)) for i in range(MOTION_BLOCKS)]
        self.down_blocks = nn.ModuleList(DownBlock3d(chans[i], chans[i + 1]) for i in range(MOTION_BLOCKS))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class Decoder3d(nn.Module):
    """Up blocks, each followed by concatenation with the matching encoder output, then conv + BN + ReLU."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(MOTION_BLOCKS)):
            skip = 1 if i == MOTION_BLOCKS - 1 else 2
            c_in = skip * min(MOTION_MAX_FEATURES, MOTION_EXPANSION * 2 ** (i + 1))
            self.up_blocks.append(UpBlock3d(c_in, min(MOTION_MAX_FEATURES, MOTION_EXPANSION * 2**i)))
        self.out_channels = MOTION_EXPANSION + in_ch
        self.conv = nn.Conv3d(self.out_channels, self.out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_channels)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        out = skips.pop()
        for block in self.up_blocks:
            # Popping drops each encoder output as soon as it has been used.
            out = torch.cat([block(out), skips.pop()], dim=1)
        return F.relu(self.norm(self.conv(out)), inplace=True)


class Hourglass3d(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.encoder = Encoder3d(in_ch)
        self.decoder = Decoder3d(in_ch)
        self.out_channels = self.decoder.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DenseMotionNetwork(nn.Module):
    """Keypoints + compressed source volume -> per-keypoint soft masks, dense deformation, occlusion map."""

    def __init__(self):
        super().__init__()
        num_regions = NUM_KP + 1
        self.hourglass = Hourglass3d(num_regions * (COMPRESS + 1))
        self.mask = nn.Conv3d(self.hourglass.out_channels, num_regions, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(FEATURE_CHANNELS, COMPRESS, kernel_size=1)
        self.norm = nn.BatchNorm3d(COMPRESS)
        self.occlusion = nn.Conv2d(self.hourglass.out_channels * DEPTH, 1, kernel_size=7, padding=3)

    def compress_source(self, volume: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.compress(volume)), inplace=True)

    def forward(
        self, compressed: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        b = kp_driving.shape[0]
        d, h, w = compressed.shape[2:]
        grid = coordinate_grid(d, h, w, like=compressed)
        motions = sparse_motions(grid, kp_source, kp_driving)  # (B, 16, d, h, w, 3)
        regions = motions.shape[1]
        # All 16 warps of the one compressed volume in a single call: the motions are stacked along depth.
        deformed = sample_volume(compressed, motions.view(b, regions * d, h, w, 3))
        deformed = deformed.reshape(b, COMPRESS, regions, d, h, w).transpose(1, 2)
        heat = keypoint_heatmaps(grid, kp_source, kp_driving)
        # Per region: [heatmap, 4 warped channels] -> 80 channels, region-major.
        x = torch.cat([heat.unsqueeze(2), deformed], dim=2).view(b, regions * (COMPRESS + 1), d, h, w)
        del deformed, heat
        prediction = self.hourglass(x)
        del x
        mask = F.softmax(self.mask(prediction), dim=1)
        # 112 channels x 16 depths flattened feature-major (channel = c * 16 + depth) for the 2-D conv.
        occlusion = torch.sigmoid(self.occlusion(prediction.view(b, -1, h, w)))
        del prediction
        # The cut is not renormalised (upstream behaviour the weights were trained with).
        kept = torch.where(mask < MASK_CUT, torch.zeros((), dtype=mask.dtype, device=mask.device), mask)
        deformation = (motions * kept.unsqueeze(-1)).sum(dim=1)
        return {"mask": mask, "deformation": deformation, "occlusion_map": occlusion}


def sparse_motions(grid: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> torch.Tensor:
    """(B, 16, D, H, W, 3): identity for the background, `G - kp_driving[k] + kp_source[k]` per keypoint."""
    b, k = kp_driving.shape[:2]
    shift = (grid - kp_driving.reshape(b, k, 1, 1, 1, 3)) + kp_source.reshape(-1, k, 1, 1, 1, 3)
    return torch.cat([grid.expand(b, 1, *grid.shape), shift], dim=1)


def keypoint_heatmaps(grid: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> torch.Tensor:
    """(B, 16, D, H, W): zero background, then Gaussian(driving) - Gaussian(source) per keypoint."""
    b, k = kp_driving.shape[:2]

    def gaussian(kp: torch.Tensor) -> torch.Tensor:
        diff = grid - kp.reshape(-1, k, 1, 1, 1, 3)
        return torch.exp(-0.5 * (diff**2).sum(-1) / KP_VARIANCE)

    heat = gaussian(kp_driving) - gaussian(kp_source)
    return torch.cat([heat.new_zeros(b, 1, *grid.shape[:3]), heat], dim=1)


class SPADE(nn.Module):
    """Instance norm of x modulated by gamma/beta predicted from the label map."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv2d(SPADE_LABEL, SPADE_HIDDEN, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(SPADE_HIDDEN, channels, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(SPADE_HIDDEN, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """`seg` is the label map at its own (lower) resolution; x's size is an integer multiple of it."""
        factor = x.shape[-1] // seg.shape[-1]
        conv = self.mlp_shared[0]
        hidden = F.relu(upsampled_conv3x3(seg, conv.weight, conv.bias, factor), inplace=True)
        # gamma is released before beta exists: at 512 each map is up to 256 MiB per sample.
        out = F.instance_norm(x, eps=1e-5).mul_(self.mlp_gamma(hidden).add_(1))
        return out.add_(self.mlp_beta(hidden))


class SPADEResnetBlock(nn.Module):
    """SPADE residual block; conv_0/1/s hold the folded spectral-norm kernels."""

    def __init__(self, fin: int, fout: int):
        super().__init__()
        fmid = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.conv_0 = nn.Conv2d(fin, fmid, kernel_size=3, padding=1)
        self.conv_1 = nn.Conv2d(fmid, fout, kernel_size=3, padding=1)
        self.norm_0 = SPADE(fin)
        self.norm_1 = SPADE(fmid)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, kernel_size=1, bias=False)
            self.norm_s = SPADE(fin)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2, inplace=True))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2, inplace=True))
        return dx.add_(shortcut)


class SPADEDecoder(nn.Module):
    """256-channel warped features (also the label map) -> image (B, 3, 4h, 4w) in (0, 1)."""

    def __init__(self):
        super().__init__()
        ic, oc = SPADE_LABEL, 64
        self.fc = nn.Conv2d(ic, 2 * ic, kernel_size=3, padding=1)
        for i in range(NUM_MIDDLE):
            self.add_module(f"G_middle_{i}", SPADEResnetBlock(2 * ic, 2 * ic))
        self.up_0 = SPADEResnetBlock(2 * ic, ic)
        self.up_1 = SPADEResnetBlock(ic, oc)
        self.conv_img = nn.Conv2d(oc, 3, kernel_size=3, padding=1)

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        x = self.fc(seg)
        for i in range(NUM_MIDDLE):
            x = getattr(self, f"G_middle_{i}")(x, seg)
        x = self.up_0(F.interpolate(x, scale_factor=2.0, mode="nearest"), seg)
        x = self.up_1(F.interpolate(x, scale_factor=2.0, mode="nearest"), seg)
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2, inplace=True)))


class Generator(nn.Module):
    """OcclusionAwareSPADEGenerator with its DenseMotionNetwork; `forward` = `encode_source` + `animate`."""

    def __init__(self):
        super().__init__()
        self.first = SameBlock2d(IMAGE_CHANNELS, BLOCK_EXPANSION)
        self.down_blocks = nn.ModuleList([DownBlock2d(64, 128), DownBlock2d(128, 256)])
        self.second = nn.Conv2d(256, FEATURE_CHANNELS * DEPTH, kernel_size=1)
        self.resblocks_3d = nn.Sequential()
        for i in range(NUM_RESBLOCKS):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(FEATURE_CHANNELS))
        self.dense_motion_network = DenseMotionNetwork()
        self.third = SameBlock2d(FEATURE_CHANNELS * DEPTH, 256, leaky=True)
        self.fourth = nn.Conv2d(256, 256, kernel_size=1)
        self.decoder = SPADEDecoder()

    def encode_source(self, source_image: torch.Tensor) -> SourceFeatures:
        """Source image (B, 3, S, S) in [0, 1] -> the per-video features (appearance volume, compressed volume)."""
        if source_image.dim() != 4 or source_image.shape[1] != IMAGE_CHANNELS:
            raise ValueError(f"Generator expects (B, 3, S, S) source images, got {tuple(source_image.shape)}")
        x = self.first(source_image)
        for block in self.down_blocks:
            x = block(x)
        x = self.second(x)
        b, c, h, w = x.shape
        volume = self.resblocks_3d(x.view(b, c // DEPTH, DEPTH, h, w))
        return SourceFeatures(volume=volume, compressed=self.dense_motion_network.compress_source(volume))

    def animate(
        self, features: SourceFeatures, kp_source: torch.Tensor, kp_driving: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Render a driving batch: 'prediction' (B, 3, S, S), 'occlusion_map', 'mask' (pre-cut), 'deformation'.

        `kp_source` is (1 or B, 15, 3), `kp_driving` (B, 15, 3); features of batch 1 are shared by all B.
        """
        b = _check_keypoints(kp_source, kp_driving, features.batch)
        motion = self.dense_motion_network(features.compressed, kp_source, kp_driving)
        warped = sample_volume(features.volume, motion["deformation"])
        h, w = warped.shape[-2:]
        x = self.fourth(self.third(warped.reshape(b, -1, h, w)))
        del warped
        motion["prediction"] = self.decoder(x.mul_(motion["occlusion_map"]))
        return motion

    def forward(
        self, source_image: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return self.animate(self.encode_source(source_image), kp_source, kp_driving)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> "Generator":
        """Build from the official `generator.` tensors; spectral norms are folded once here."""
        model = cls()
        model.load_state_dict(fold_spectral_norm(state), strict=True)
        return model


def _check_keypoints(kp_source: torch.Tensor, kp_driving: torch.Tensor, source_batch: int) -> int:
    if kp_driving.dim() != 3 or kp_driving.shape[1:] != (NUM_KP, 3):
        raise ValueError(f"kp_driving must be (B, {NUM_KP}, 3), got {tuple(kp_driving.shape)}")
    b = kp_driving.shape[0]
    if kp_source.shape[1:] != (NUM_KP, 3) or kp_source.shape[0] not in (1, b):
        raise ValueError(f"kp_source must be (1 or {b}, {NUM_KP}, 3), got {tuple(kp_source.shape)}")
    if source_batch not in (1, b):
        raise ValueError(f"source features of batch {source_batch} cannot serve a driving batch of {b}")
    return b
