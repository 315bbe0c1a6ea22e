"""OcclusionAwareSPADEGenerator: warp the source's 3-D features by the keypoint motion and decode (spec G4).

The work is split so that everything depending only on the source image (`encode_source`) runs once per video
and `animate` runs per driving frame; source features of batch 1 serve a driving batch of any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xtalker.models.blocks import (
    ConvNormBlock,
    DownBlock2d,
    DownBlock3d,
    PhaseConvBank,
    SameBlock2d,
    ShiftSumConv2d,
    UpBlock3d,
    cast_for,
    coordinate_grid,
    fold_batch_norm_,
    fuse_for_inference,
)
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
IN_EPS = 1e-5


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

    def fuse(self) -> nn.Module:
        # norm1 normalises the block input, which the residual sum also reads: only norm2 (after conv1) folds.
        if not isinstance(self.norm2, nn.Identity):
            fold_batch_norm_(self.conv1, self.norm2)
            self.norm2 = nn.Identity()
        return self


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


class Decoder3d(ConvNormBlock):
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
    """Keypoints + compressed source volume -> per-keypoint soft masks, dense deformation, occlusion map.

    Keypoint math, the warps of the compressed volume, the mask softmax and the deformation always run in
    float32; the hourglass and the mask / occlusion convolutions run in the dtype of their own weights.
    """

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
        prediction = self.hourglass(cast_for(x, self.hourglass))
        del x
        mask = F.softmax(self.mask(cast_for(prediction, self.mask)).float(), dim=1)
        # 112 channels x 16 depths flattened feature-major (channel = c * 16 + depth) for the 2-D conv.
        occlusion = self.occlusion(cast_for(prediction, self.occlusion).reshape(b, -1, h, w))
        occlusion = torch.sigmoid(occlusion.float())
        del prediction
        # The cut is not renormalised (upstream behaviour the weights were trained with).
        kept = torch.where(mask < MASK_CUT, torch.zeros((), dtype=mask.dtype, device=mask.device), mask)
        deformation = blend_motions(grid, kept, kp_source, kp_driving)
        return {"mask": mask, "deformation": deformation, "occlusion_map": occlusion}

    def fuse(self) -> nn.Module:
        if not isinstance(self.norm, nn.Identity):
            fold_batch_norm_(self.compress, self.norm)
            self.norm = nn.Identity()
        if isinstance(self.occlusion, nn.Conv2d):
            self.occlusion = ShiftSumConv2d(self.occlusion)
        return self


def sparse_motions(grid: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> torch.Tensor:
    """(B, 16, D, H, W, 3): identity for the background, `G - kp_driving[k] + kp_source[k]` per keypoint."""
    b, k = kp_driving.shape[:2]
    shift = (grid - kp_driving.reshape(b, k, 1, 1, 1, 3)) + kp_source.reshape(-1, k, 1, 1, 1, 3)
    return torch.cat([grid.expand(b, 1, *grid.shape), shift], dim=1)


def keypoint_heatmaps(grid: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> torch.Tensor:
    """(B, 16, D, H, W): zero background, then Gaussian(driving) - Gaussian(source) per keypoint."""
    b, k = kp_driving.shape[:2]
    axes = (grid[0, 0, :, 0], grid[0, :, 0, 1], grid[:, 0, 0, 2])  # x along W, y along H, z along D

    def gaussian(kp: torch.Tensor) -> torch.Tensor:
        # exp of a sum of squares = product of exps: the 3-D Gaussian is an outer product of three 1-D ones.
        fx, fy, fz = (torch.exp(-0.5 * (axis - kp[..., i, None]) ** 2 / KP_VARIANCE) for i, axis in enumerate(axes))
        return fz[..., :, None, None] * fy[..., None, :, None] * fx[..., None, None, :]

    heat = gaussian(kp_driving) - gaussian(kp_source)
    return torch.cat([heat.new_zeros(b, 1, *grid.shape[:3]), heat], dim=1)


def blend_motions(
    grid: torch.Tensor, weights: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor
) -> torch.Tensor:
    """(B, D, H, W, 3) = sum over regions of weight * sparse motion, without building the weighted motions.

    Every motion is the grid plus a constant (zero for the background), so the sum is
    `grid * sum(weights) + sum_k weight_k * (kp_source_k - kp_driving_k)`.
    """
    shifts = (kp_source - kp_driving).expand(weights.shape[0], -1, -1)  # (B, 15, 3)
    offset = torch.einsum("bkdhw,bkc->bdhwc", weights[:, 1:], shifts)
    return torch.addcmul(offset, grid, weights.sum(dim=1).unsqueeze(-1))


class SPADE(nn.Module):
    """Instance norm of x modulated by gamma/beta predicted from the label map (official layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv2d(SPADE_LABEL, SPADE_HIDDEN, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(SPADE_HIDDEN, channels, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(SPADE_HIDDEN, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """`seg` is the label map at its own (lower) resolution; x's size is an integer multiple of it."""
        factor = x.shape[-1] // seg.shape[-1]
        hidden = self.mlp_shared(F.interpolate(seg, scale_factor=float(factor), mode="nearest"))
        return F.instance_norm(x, eps=IN_EPS) * (1 + self.mlp_gamma(hidden)) + self.mlp_beta(hidden)

    def modulation(self, shortcut: nn.Conv2d | None = None) -> tuple[nn.Conv2d, nn.Conv2d]:
        """Inference (gamma, beta) convs: gamma's bias holds the `1 +`, and with a (linear, bias-free) `shortcut`
        conv, beta comes pre-mixed by it: conv_s(n * g + beta) = conv_s(n * g) + (conv_s o mlp_beta)(hidden),
        a 3x3 conv with conv_s's (fewer) output channels."""
        dtype = self.mlp_gamma.weight.dtype
        gamma = _conv_like(self.mlp_gamma, self.mlp_gamma.weight, (self.mlp_gamma.bias.double() + 1).to(dtype))
        if shortcut is None:
            return gamma, _conv_like(self.mlp_beta, self.mlp_beta.weight, self.mlp_beta.bias)
        mix = shortcut.weight.detach().double().flatten(1)
        weight = torch.einsum("of,fiyx->oiyx", mix, self.mlp_beta.weight.double())
        return gamma, _conv_like(self.mlp_beta, weight.to(dtype), (mix @ self.mlp_beta.bias.double()).to(dtype))


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A conv with `conv`'s geometry and the given (detached) weight and bias."""
    out = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=conv.kernel_size, padding=conv.padding)
    out.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    out.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return out


class SPADEResnetBlock(nn.Module):
    """SPADE residual block (official layout); conv_0/1/s hold the folded spectral-norm kernels."""

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
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return dx + shortcut

    def norms(self) -> list[SPADE]:
        """The SPADE layers in the order the fused block consumes their hidden maps."""
        return [self.norm_0, self.norm_1] + ([self.norm_s] if self.learned_shortcut else [])


class FusedSPADEResnetBlock(nn.Module):
    """Inference form of SPADEResnetBlock: hidden maps come precomputed, the `1 +` of gamma is in its bias, the
    instance norm of x is shared by norm_0 and norm_s, and the shortcut's beta is pre-mixed by conv_s.

    With `upsample` the block takes x at half resolution: the instance norm of a nearest-upsampled map equals
    the upsampled instance norm, so x is normalised small and only the result is upsampled.
    """

    def __init__(self, block: SPADEResnetBlock, upsample: bool = False):
        super().__init__()
        self.learned_shortcut = block.learned_shortcut
        self.upsample = upsample
        self.conv_0, self.conv_1 = block.conv_0, block.conv_1
        self.gamma_0, self.beta_0 = block.norm_0.modulation()
        self.gamma_1, self.beta_1 = block.norm_1.modulation()
        if self.learned_shortcut:
            self.conv_s = block.conv_s
            self.gamma_s, self.beta_s = block.norm_s.modulation(shortcut=block.conv_s)
        elif upsample:
            raise ValueError("an upsampling block needs a learned shortcut (x itself is never upsampled)")

    def forward(self, x: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        """`hidden` = [norm_0's, norm_1's(, norm_s's)] maps; they are popped, so each is freed once used."""
        normed = F.instance_norm(x, eps=IN_EPS)
        if self.upsample:
            normed = F.interpolate(normed, scale_factor=2.0, mode="nearest")
        shortcut = x
        if self.learned_shortcut:
            h = hidden.pop()
            shortcut = self.conv_s(normed * self.gamma_s(h)).add_(self.beta_s(h))
        h = hidden.pop(0)
        # beta first, then gamma: at most two full-size maps besides `normed` (at 512 each is up to 256 MiB).
        dx = self.beta_0(h).addcmul_(normed, self.gamma_0(h))
        del normed
        dx = self.conv_0(F.leaky_relu(dx, 0.2, inplace=True))
        h = hidden.pop(0)
        dx = self.beta_1(h).addcmul_(F.instance_norm(dx, eps=IN_EPS), self.gamma_1(h))
        del h
        return self.conv_1(F.leaky_relu(dx, 0.2, inplace=True)).add_(shortcut)


class SPADEDecoder(nn.Module):
    """256-channel warped features (also the label map) -> image (B, 3, 4h, 4w) in (0, 1) (official layout)."""

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
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))

    def fuse(self) -> nn.Module:
        return FusedSPADEDecoder(self)


class FusedSPADEDecoder(nn.Module):
    """Inference form of SPADEDecoder. The first conv of every SPADE layer reads the same label map, so per
    resolution stage (middle blocks at 1x, up_0 at 2x, up_1 at 4x) all of them run as one polyphase bank on the
    label map itself: upsampled label maps are never built, and stage by stage only the current hidden maps
    are alive (all 18 at once would be ~0.6 GiB per sample at 512)."""

    def __init__(self, decoder: SPADEDecoder):
        super().__init__()
        self.fc, self.conv_img = decoder.fc, decoder.conv_img
        middle = [f"G_middle_{i}" for i in range(NUM_MIDDLE)]
        # Per stage: (block name, number of SPADE layers) in order; the stage's bank yields their maps in turn.
        self.stages: list[list[tuple[str, int]]] = []
        for s, (names, factor) in enumerate([(middle, 1), (["up_0"], 2), (["up_1"], 4)]):
            convs: list[tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]] = []
            for name in names:
                block = getattr(decoder, name)
                self.add_module(name, FusedSPADEResnetBlock(block, upsample=factor > 1))
                convs += [(n.mlp_shared[0].weight, n.mlp_shared[0].bias, (factor, factor)) for n in block.norms()]
            self.add_module(f"label_{s}", PhaseConvBank(convs, relu=True))
            self.stages.append([(name, len(getattr(decoder, name).norms())) for name in names])

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        seg = cast_for(seg, self.fc)
        x = self.fc(seg)
        for s, blocks in enumerate(self.stages):
            hidden = getattr(self, f"label_{s}")(seg)
            for name, count in blocks:
                # The block pops from its own list: no other reference keeps a used map alive.
                part, hidden = hidden[:count], hidden[count:]
                x = getattr(self, name)(x, part)
        x = self.conv_img(F.leaky_relu(x, 0.2, inplace=True))
        return torch.sigmoid(x.float())


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
        x = self.fourth(self.third(cast_for(warped.reshape(b, -1, h, w), self.third)))
        del warped
        motion["prediction"] = self.decoder(x.mul_(motion["occlusion_map"]))
        return motion

    def forward(
        self, source_image: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return self.animate(self.encode_source(source_image), kp_source, kp_driving)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> "Generator":
        """Build from the official `generator.` tensors, then rewrite into the inference form.

        Spectral norms are folded before the strict load (the official file stores their factors), everything
        else after it (see `fuse_for_inference`).
        """
        model = cls()
        model.load_state_dict(fold_spectral_norm(state), strict=True)
        return fuse_for_inference(model)


def _check_keypoints(kp_source: torch.Tensor, kp_driving: torch.Tensor, source_batch: int) -> int:
    if kp_driving.dim() != 3 or kp_driving.shape[1:] != (NUM_KP, 3):
        raise ValueError(f"kp_driving must be (B, {NUM_KP}, 3), got {tuple(kp_driving.shape)}")
    b = kp_driving.shape[0]
    if kp_source.shape[1:] != (NUM_KP, 3) or kp_source.shape[0] not in (1, b):
        raise ValueError(f"kp_source must be (1 or {b}, {NUM_KP}, 3), got {tuple(kp_source.shape)}")
    if source_batch not in (1, b):
        raise ValueError(f"source features of batch {source_batch} cannot serve a driving batch of {b}")
    return b
