"""Audio2Pose (`audio2pose.`): the PoseVAE decoder that turns audio + a latent + a pose style into head motion.

Only the audio encoder and the CVAE decoder are used at inference (spec section 6); the stored CVAE encoder
and motion discriminator are dropped by the checkpoint loader.

Chunking: frame 0 is the reference (motion 0); frames 1..T-1 are decoded in chunks of 32 frames, each with
its own latent z. A remainder of `re` frames is decoded from the last 32 windows (front-padded with the
first embedding when fewer exist) and only its last `re` frames are kept. Latents are consumed in the order
full chunks first, then the tail chunk. Each chunk is encoded and decoded by its own calls, so a stream that
sees the audio chunk by chunk (xtalker.speech.stream) computes exactly the same motion.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from xtalker.models.audio2exp import AUDIO_FEATURE_DIM, build_audio_encoder, encode_windows

SEQ_LEN = 32
POSE_DIM = 6
LATENT_DIM = 64
NUM_CLASSES = 46
# Frames encoded per encoder call: bounds activation memory (~0.5 MB per frame) for long clips.
ENCODE_BLOCK = 128

# Latents for the pose chunks: explicit tensors (each (B, latent) or (latent,)), a generator to draw them
# from, or an int seed for a fresh generator.
PoseNoise = Union[Sequence[torch.Tensor], torch.Generator, int]


class PoseAudioEncoder(nn.Module):
    """Wrapper whose only child reproduces the official `audio_encoder.audio_encoder.*` keys."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = build_audio_encoder()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """(B, N, 1, 80, 16) -> (B, N, 512).

        Upstream flattens (B, N) time-major and reshapes the result batch-major, which mixes batch items
        when B > 1 (the CLI always has B = 1). Here frames are flattened batch-major on both sides, which
        equals upstream for B = 1 and is correct for B > 1.
        """
        out = []
        for s in range(0, mels.shape[1], ENCODE_BLOCK):
            out.append(encode_windows(self.audio_encoder, mels[:, s : s + ENCODE_BLOCK]))
        if not out:
            return mels.new_zeros((mels.shape[0], 0, AUDIO_FEATURE_DIM))
        return torch.cat(out, dim=1)


class ResidualConv(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv(stride)-BN-ReLU-conv, plus conv(stride)+BN skip."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int]):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 3, stride, 1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1),
        )
        self.conv_skip = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x) + self.conv_skip(x)


class Upsample(nn.Module):
    """Transposed conv doubling the time axis."""

    def __init__(self, channels: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(channels, channels, kernel_size=(2, 1), stride=(2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class ResUNet(nn.Module):
    """U-Net over a (time 32, pose 6) single-channel image; time is halved three times, the pose axis kept."""

    def __init__(self, channels: tuple[int, int, int, int] = (32, 64, 128, 256)):
        super().__init__()
        c0, c1, c2, c3 = channels
        down = (2, 1)
        self.input_layer = nn.Sequential(
            nn.Conv2d(1, c0, 3, 1, 1), nn.BatchNorm2d(c0), nn.ReLU(), nn.Conv2d(c0, c0, 3, 1, 1)
        )
        self.input_skip = nn.Sequential(nn.Conv2d(1, c0, 3, 1, 1))
        self.residual_conv_1 = ResidualConv(c0, c1, down)
        self.residual_conv_2 = ResidualConv(c1, c2, down)
        self.bridge = ResidualConv(c2, c3, down)
        self.upsample_1 = Upsample(c3)
        self.up_residual_conv1 = ResidualConv(c3 + c2, c2, (1, 1))
        self.upsample_2 = Upsample(c2)
        self.up_residual_conv2 = ResidualConv(c2 + c1, c1, (1, 1))
        self.upsample_3 = Upsample(c1)
        self.up_residual_conv3 = ResidualConv(c1 + c0, c0, (1, 1))
        self.output_layer = nn.Sequential(nn.Conv2d(c0, 1, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.input_layer(x) + self.input_skip(x)
        x2 = self.residual_conv_1(x1)
        x3 = self.residual_conv_2(x2)
        x4 = self.bridge(x3)
        x5 = self.up_residual_conv1(torch.cat([self.upsample_1(x4), x3], dim=1))
        x6 = self.up_residual_conv2(torch.cat([self.upsample_2(x5), x2], dim=1))
        x7 = self.up_residual_conv3(torch.cat([self.upsample_3(x6), x1], dim=1))
        return self.output_layer(x7)


class PoseDecoder(nn.Module):
    """CVAE decoder: (ref pose, z + class bias, per-frame audio) -> motion of one 32-frame chunk."""

    def __init__(self, num_classes: int = NUM_CLASSES, latent: int = LATENT_DIM, seq_len: int = SEQ_LEN):
        super().__init__()
        self.seq_len = seq_len
        self.classbias = nn.Parameter(torch.zeros(num_classes, latent))
        self.linear_audio = nn.Linear(AUDIO_FEATURE_DIM, POSE_DIM)
        hidden = 128
        self.MLP = nn.Sequential(
            OrderedDict(
                L0=nn.Linear(POSE_DIM + latent + seq_len * POSE_DIM, hidden),
                A0=nn.ReLU(),
                L1=nn.Linear(hidden, seq_len * POSE_DIM),
                A1=nn.Sigmoid(),
            )
        )
        self.resunet = ResUNet()
        self.pose_linear = nn.Linear(POSE_DIM, POSE_DIM)

    def forward(
        self, audio_emb: torch.Tensor, ref_pose: torch.Tensor, z: torch.Tensor, class_id: torch.Tensor
    ) -> torch.Tensor:
        """audio_emb (N, 32, 512), ref_pose (N, 6), z (N, latent), class_id (N,) long -> motion (N, 32, 6)."""
        n = audio_emb.shape[0]
        audio = self.linear_audio(audio_emb).reshape(n, -1)
        h = torch.cat([ref_pose, z + self.classbias[class_id], audio], dim=-1)
        img = self.MLP(h).reshape(n, 1, self.seq_len, POSE_DIM)
        return self.pose_linear(self.resunet(img).reshape(n, self.seq_len, POSE_DIM))


class PoseCVAE(nn.Module):
    """Holds the decoder under the official `netG.decoder.*` names."""

    def __init__(self, num_classes: int, latent: int, seq_len: int):
        super().__init__()
        self.decoder = PoseDecoder(num_classes, latent, seq_len)


@dataclass(frozen=True)
class PoseChunks:
    """How frames 1..T-1 are split: `full` chunks of seq_len frames, then a tail of `tail` frames (0 = none)."""

    full: int
    tail: int

    @property
    def count(self) -> int:
        return self.full + (1 if self.tail else 0)


def pose_chunks(num_frames: int, seq_len: int = SEQ_LEN) -> PoseChunks:
    n = max(num_frames - 1, 0)
    return PoseChunks(full=n // seq_len, tail=n % seq_len)


@dataclass
class PoseOutput:
    motion: torch.Tensor  # (B, T, 6), frame 0 is zero
    audio_embeddings: list[torch.Tensor]  # per chunk (B, <=32, 512), the tail before front padding
    z: list[torch.Tensor]  # per chunk (B, latent), in consumption order


class Audio2Pose(nn.Module):
    """Audio encoder + PoseVAE decoder (spec section 6)."""

    def __init__(self, num_classes: int = NUM_CLASSES, latent: int = LATENT_DIM, seq_len: int = SEQ_LEN):
        super().__init__()
        self.seq_len = seq_len
        self.latent = latent
        self.num_classes = num_classes
        self.audio_encoder = PoseAudioEncoder()
        self.netG = PoseCVAE(num_classes, latent, seq_len)

    def _latents(self, noise: PoseNoise, count: int, batch: int, like: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(noise, int):
            noise = torch.Generator().manual_seed(noise)
        if isinstance(noise, torch.Generator):
            # One draw per chunk, in chunk order, like upstream's per-chunk torch.randn.
            return [
                torch.randn(batch, self.latent, generator=noise).to(device=like.device, dtype=like.dtype)
                for _ in range(count)
            ]
        zs = [torch.as_tensor(z).to(device=like.device, dtype=like.dtype).reshape(-1, self.latent) for z in noise]
        if len(zs) != count:
            raise ValueError(f"{count} pose latents needed for this clip, {len(zs)} given")
        if any(z.shape[0] not in (1, batch) for z in zs):
            raise ValueError(f"pose latents must be ({batch}, {self.latent}) or (1, {self.latent}) for a batch of {batch}")
        return [z.expand(batch, -1) for z in zs]

    def style(self, pose_style: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """Pose style(s) as (B,) class ids, checked against the number of classes."""
        class_id = torch.as_tensor(pose_style, dtype=torch.long, device=device).reshape(-1).expand(batch)
        if bool(((class_id < 0) | (class_id >= self.num_classes)).any()):
            raise ValueError(f"pose style must be in [0, {self.num_classes - 1}], got {class_id.tolist()}")
        return class_id

    def encode_chunk(self, mels: torch.Tensor) -> torch.Tensor:
        """Mel windows of one chunk's frames (B, <=32, 1, 80, 16) -> (B, <=32, 512).

        Chunks are encoded one at a time, offline and streamed alike, because a frame's embedding depends
        in its last bits on which frames share the encoder call.
        """
        return self.audio_encoder(mels)

    def decode_chunk(
        self, embeddings: torch.Tensor, ref_pose: torch.Tensor, z: torch.Tensor, class_id: torch.Tensor
    ) -> torch.Tensor:
        """Motion (B, 32, 6) of one chunk from its 32 embeddings (B, <=32, 512); fewer are front-padded with
        the first one (the tail of a clip shorter than a chunk)."""
        B, n = embeddings.shape[:2]
        if n < self.seq_len:
            pad = embeddings[:, :1].expand(B, self.seq_len - n, AUDIO_FEATURE_DIM)
            embeddings = torch.cat([pad, embeddings], dim=1)
        return self.netG.decoder(embeddings, ref_pose, z, class_id)

    def forward(
        self, mels: torch.Tensor, ref_pose: torch.Tensor, pose_style: int | torch.Tensor, noise: PoseNoise
    ) -> PoseOutput:
        """mels (B, T, 1, 80, 16), ref_pose (B, 6), pose_style int or (B,) -> motion (B, T, 6) and intermediates."""
        B, T = mels.shape[:2]
        class_id = self.style(pose_style, B, mels.device)
        plan = pose_chunks(T, self.seq_len)
        zs = self._latents(noise, plan.count, B, mels)
        L = self.seq_len
        chunks = [self.encode_chunk(mels[:, 1 + k * L : 1 + (k + 1) * L]) for k in range(plan.count)]
        parts = [mels.new_zeros((B, 1, POSE_DIM))]
        parts.extend(self.decode_chunk(chunks[k], ref_pose, zs[k], class_id) for k in range(plan.full))
        embeddings = chunks[: plan.full]
        if plan.tail:
            tail = torch.cat(chunks[-2:], dim=1)[:, -L:]  # the last 32 frames' embeddings
            embeddings.append(tail)
            parts.append(self.decode_chunk(tail, ref_pose, zs[-1], class_id)[:, L - plan.tail :])
        return PoseOutput(motion=torch.cat(parts, dim=1), audio_embeddings=embeddings, z=zs)

    @classmethod
    def from_official(cls, state: dict[str, torch.Tensor]) -> "Audio2Pose":
        """Build from `audio_encoder.*` + `netG.decoder.*`; classes, latent size and sequence length from the shapes."""
        num_classes, latent = state["netG.decoder.classbias"].shape
        seq_len = int(state["netG.decoder.MLP.L1.weight"].shape[0]) // POSE_DIM
        model = cls(num_classes=int(num_classes), latent=int(latent), seq_len=seq_len)
        model.load_state_dict(state, strict=True)
        return model
