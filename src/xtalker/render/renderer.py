"""Face renderer (spec G5): driving coefficient windows -> frames of the source face.

Unlike upstream, the source-only work (canonical keypoints, source head pose and keypoints, the
generator's appearance features) runs once per video on a single copy of the source and is reused for
every driving batch; a sample's result does not depend on the batch it is rendered in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xtalker.checkpoints import load_network
from xtalker.models.mapping import MappingNet
from xtalker.render.keypoints import transform_keypoints
from xtalker.render.precision import check_precision, generator_precision, prepare_generator

log = logging.getLogger(__name__)

Angles = torch.Tensor | np.ndarray | None


@dataclass(frozen=True)
class PreparedSource:
    """Per-video source state, batch 1."""

    kp_canonical: torch.Tensor  # (1, 15, 3)
    kp_source: torch.Tensor  # (1, 15, 3)
    features: Any  # the generator's SourceFeatures
    coeff_nc: int
    image_size: int


def _as_tensor(x: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=torch.float32)


class Renderer:
    """KPDetector + MappingNet + Generator, rendering batches of driving windows for one prepared source."""

    def __init__(self, kp_detector: nn.Module, generator: nn.Module, mapping: MappingNet):
        self.kp_detector = kp_detector
        self.generator = generator
        self.mapping = mapping

    @classmethod
    def from_checkpoints(
        cls,
        packed_path: str | Path,
        mapping_path: str | Path,
        coeff_nc: int | None = None,
        precision: str = "fp32",
    ) -> "Renderer":
        """Networks from the packed SadTalker file and a mapping pickle.

        `coeff_nc` (70 or 73) is what the preprocess mode needs; a mapping file of the other kind is then an
        error naming the file. Without it the file's own channel count is taken. `precision` ("fp32" or
        "bf16") applies to the generator's per-frame work only (see `xtalker.render.precision`); the keypoint
        detector and the mapping net always run in float32. "int8" loads the generator in float32:
        `xtalker.render.quantize` (through `pipeline.TalkingHead.quantize`) swaps in the compiled int8 one.
        """
        check_precision(precision)
        return cls(
            kp_detector=load_network("kp_extractor", packed_path),
            generator=prepare_generator(load_network("generator", packed_path), precision),
            mapping=load_network("mapping", mapping_path, coeff_nc),
        )

    @property
    def precision(self) -> str:
        return generator_precision(self.generator)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def coeff_nc(self) -> int:
        return self.mapping.coeff_nc

    def to(self, device: torch.device) -> "Renderer":
        for net in (self.kp_detector, self.mapping, self.generator):
            net.to(device)
        return self

    @staticmethod
    def source_arrays(source: PreparedSource) -> dict[str, np.ndarray]:
        """The prepared source as named arrays (a job folder's inputs.npz), CPU float32."""
        arrays = {"kp_canonical": source.kp_canonical, "kp_source": source.kp_source}
        arrays.update({f"feature_{f.name}": getattr(source.features, f.name) for f in dataclasses.fields(source.features)})
        return {**{k: v.cpu().numpy() for k, v in arrays.items()}, "image_size": np.array(source.image_size)}

    def load_source(self, arrays: Mapping[str, np.ndarray]) -> PreparedSource:
        """`source_arrays` back, on this renderer's device (no network runs)."""
        from xtalker.models.generator import SourceFeatures

        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(np.asarray(arrays[name])).to(self.device)

        features = SourceFeatures(**{f.name: tensor(f"feature_{f.name}") for f in dataclasses.fields(SourceFeatures)})
        return PreparedSource(kp_canonical=tensor("kp_canonical"), kp_source=tensor("kp_source"), features=features,
                              coeff_nc=self.coeff_nc, image_size=int(arrays["image_size"]))

    @torch.no_grad()
    def prepare(self, source_image: torch.Tensor | np.ndarray, source_semantics: torch.Tensor | np.ndarray) -> PreparedSource:
        """Source work done once: (1, 3, S, S) image in [0, 1] and (1, C, 27) source window."""
        image = _as_tensor(source_image, self.device)
        semantics = _as_tensor(source_semantics, self.device)
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise ValueError(f"source image must be (1, 3, S, S), got {tuple(image.shape)}")
        if semantics.dim() != 3 or semantics.shape[0] != 1:
            raise ValueError(f"source semantics must be (1, C, 27), got {tuple(semantics.shape)}")
        self._check_channels(semantics.shape[1])
        kp_canonical = self.kp_detector(image)
        kp_source = transform_keypoints(kp_canonical, self.mapping(semantics))
        return PreparedSource(
            kp_canonical=kp_canonical,
            kp_source=kp_source,
            features=self.generator.encode_source(image),
            coeff_nc=int(semantics.shape[1]),
            image_size=int(image.shape[-1]),
        )

    @torch.no_grad()
    def render(
        self,
        source: PreparedSource,
        driving: torch.Tensor | np.ndarray,
        yaw_deg: Angles = None,
        pitch_deg: Angles = None,
        roll_deg: Angles = None,
    ) -> torch.Tensor:
        """(B, C, 27) driving windows (+ optional (B,) degree overrides) -> (B, 3, S, S) frames in [0, 1]."""
        windows = _as_tensor(driving, self.device)
        if windows.dim() != 3 or windows.shape[1] != source.coeff_nc:
            raise ValueError(f"driving windows must be (B, {source.coeff_nc}, 27), got {tuple(windows.shape)}")
        b = windows.shape[0]
        overrides = {
            name: None if a is None else _as_tensor(a, self.device).reshape(b)
            for name, a in (("yaw_deg", yaw_deg), ("pitch_deg", pitch_deg), ("roll_deg", roll_deg))
        }
        kp_driving = transform_keypoints(source.kp_canonical, self.mapping(windows), **overrides)
        kp_source = source.kp_source.expand(b, -1, -1)
        return self.generator.animate(source.features, kp_source, kp_driving)["prediction"]

    def _check_channels(self, channels: int) -> None:
        if channels != self.coeff_nc:
            raise ValueError(
                f"coefficient windows have {channels} channels but the mapping net expects {self.coeff_nc} "
                "(70: crop/resize modes with mapping_00229, 73: full modes with mapping_00109)"
            )

    def make_animation(
        self,
        source_image: torch.Tensor | np.ndarray,
        source_semantics: torch.Tensor | np.ndarray,
        target_semantics: torch.Tensor | np.ndarray,
        num_frames: int,
        yaw_seq: Angles = None,
        pitch_seq: Angles = None,
        roll_seq: Angles = None,
    ) -> torch.Tensor:
        """Upstream's loop over a (B, N, C, 27) target: slot n renders frames [:, n] as one batch.

        Angle sequences are (B, N) degrees. Returns (num_frames, 3, S, S) in time order, padding dropped.
        """
        source = self.prepare(source_image, source_semantics)
        target = _as_tensor(target_semantics, self.device)
        if target.dim() != 4:
            raise ValueError(f"target semantics must be (B, N, C, 27), got {tuple(target.shape)}")
        b, n = target.shape[:2]
        if not 0 <= num_frames <= b * n:
            raise ValueError(f"num_frames {num_frames} does not fit a ({b}, {n}) target")
        seqs = [None if s is None else _as_tensor(s, self.device).reshape(b, n) for s in (yaw_seq, pitch_seq, roll_seq)]
        slots = []
        for i in range(n):
            yaw, pitch, roll = (None if s is None else s[:, i] for s in seqs)
            slots.append(self.render(source, target[:, i], yaw, pitch, roll))
            log.debug("rendered slot %d/%d", i + 1, n)
        frames = torch.stack(slots, dim=1)
        return frames.reshape(b * n, *frames.shape[2:])[:num_frames]
