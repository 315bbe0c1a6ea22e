"""SadTalker's PIRender path (`--facerender pirender`, PIRender spec 2-3): inputs, frame loop, frames.

Differences from the facevid2vid renderer (`xtalker.render.renderer`), all reproduced here:

- the coefficient rows are always 73 channels (exp | angle | trans | the source's crop triple s, tx, ty,
  appended to every driving row), whatever the preprocess mode; the raw triple (tx, ty in pixels) goes into
  the network unnormalised. `--still` replaces columns 64:73 by the source row, the expression scale applies
  to columns 0:64 in float32;
- the source coefficients and the yaw/pitch/roll keyframes are not used (upstream still computes the source
  window: `source_semantics`);
- the source image is the crop as `float32(u8) * float32(1/255)` in [0, 1] (PIRender itself was trained on
  [-1, 1]; SadTalker does not rescale);
- the network's tanh output in [-1, 1] is written as if it were a [0, 1] image: `rint(x * 255)` clipped, so
  every negative value becomes 0 (`to_frames`);
- the frames padded to a multiple of the batch size are kept: `rendered_frame_count` frames, the extra ones
  repeating the last real frame (so the video is longer than the audio).

XTalker's pipeline keeps the numbers but not the mistakes: its videos are cut to the audio's length, and the
keyframe flags are refused with a clear line (`InferenceConfig.validate`) instead of being ignored.
`PIRenderRenderer` offers the facevid2vid renderer's interface (`prepare`, `render`, `to`, `source_arrays`,
`load_source`), so one pipeline, the workers and the stream drive either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from xtalker.models.pirender import COEFF_NC, FaceGenerator, PreparedSource, load_pirender
from xtalker.render import inputs
from xtalker.render.frames import to_uint8

# The row layout of the full preprocess modes is exactly PIRender's: 70 generated columns + the source's triple.
ROW_LAYOUT = "full"
PRECISIONS = ("fp32", "bf16")


def driving_sequence(
    generated: np.ndarray,
    coeff_3dmm: np.ndarray,
    still: bool = False,
    expression_scale: float = 1.0,
    input_yaw: Sequence[float] | None = None,
    input_pitch: Sequence[float] | None = None,
    input_roll: Sequence[float] | None = None,
) -> inputs.DrivingSequence:
    """(T, 70) generated coefficients -> the (T, 73) rows PIRender's 27-frame windows are cut from.

    Keyframe angles give the same per-frame paths as for facevid2vid, but the PIRender renderer never reads
    them (upstream computes and drops them: `--input_yaw/pitch/roll` have no effect with pirender).
    """
    seq = inputs.driving_sequence(
        generated, coeff_3dmm, ROW_LAYOUT, still=still, expression_scale=expression_scale,
        input_yaw=input_yaw, input_pitch=input_pitch, input_roll=input_roll,
    )
    if seq.channels != COEFF_NC:
        raise ValueError(f"PIRender rows must have {COEFF_NC} channels, got {seq.channels}")
    return seq


def source_semantics(coeff_3dmm: np.ndarray) -> np.ndarray:
    """(1, 73, 27) constant window of the source row: computed upstream, never read by the PIRender renderer."""
    return inputs.source_semantics(coeff_3dmm, ROW_LAYOUT)


def rendered_frame_count(num_frames: int, batch_size: int) -> int:
    """Frames the PIRender path writes: the clip padded to a multiple of the batch size (no cut)."""
    return inputs.padded_length(num_frames, batch_size)


def to_frames(predictions: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 3, S, S) tanh outputs -> (N, S, S, 3) uint8 as SadTalker writes them (`img_as_ubyte`): negatives -> 0."""
    return to_uint8(predictions)


def _tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


class PIRenderRenderer:
    """PIRender's FaceGenerator rendering batches of 73-channel windows for one prepared source image."""

    def __init__(self, net: FaceGenerator):
        self.net = net
        self._compiled = None  # torch.compile'd per-frame forward (`compile`)
        self._batch = 0  # the batch shape compiled for: smaller batches are padded to it

    def compile(self, cache_dir: Path | None = None) -> None:
        """Run the per-frame forward through torch.compile (Inductor): it fuses PIRender's many norms and activations
        (bf16, 256, 2 cores: 0.20 instead of 0.33-0.38 s a frame). Compiling takes about a minute the first time
        on a machine and about 7 s later (Inductor's cache: `cache_dir`/inductor, default beside the int8 graphs).
        Shapes are fixed: a batch smaller than the first one is padded with its last window (PIRender renders each
        sample independently: 1e-5 apart alone or batched, measured)."""
        import os

        from xtalker.render.quantize import default_cache_dir

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str((cache_dir or default_cache_dir()) / "inductor"))
        self._compiled = torch.compile(self.net.render_all, dynamic=False)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @classmethod
    def from_checkpoint(cls, path: str | Path, precision: str = "fp32", device: str | torch.device = "cpu") -> "PIRenderRenderer":
        """The network from an official (or synthetic) `epoch_00190_iteration_000400000_checkpoint.pt`.

        `precision` "bf16" runs the editing net (about 80 % of the work) under bfloat16 autocast and the mapping
        and warping nets in float32: 45.9 dB PSNR against fp32 in the reference's measurement, where bf16
        everywhere gives 38.0 dB (the flow field moves whole regions).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"PIRender precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        net = load_pirender(path, device)
        net.editing_bf16 = precision == "bf16"
        return cls(net)

    @property
    def precision(self) -> str:
        return "bf16" if self.net.editing_bf16 else "fp32"

    @property
    def device(self) -> torch.device:
        return self.net.device

    def to(self, device: torch.device) -> "PIRenderRenderer":
        self.net.to(device)
        return self

    @torch.no_grad()
    def prepare(self, source_image: torch.Tensor | np.ndarray, source_semantics: object = None) -> PreparedSource:
        """Source work done once per video: (1, 3, S, S) float32 crop in [0, 1] (`inputs.source_image`).
        `source_semantics` is accepted for the facevid2vid renderer's signature: PIRender reads no source row."""
        return self.net.prepare(_tensor(source_image))

    @torch.no_grad()
    def render(self, source: PreparedSource, driving: torch.Tensor | np.ndarray, yaw_deg: object = None,
               pitch_deg: object = None, roll_deg: object = None) -> torch.Tensor:
        """(B, 73, 27) driving windows -> (B, 3, S, S) frames, the raw tanh output in [-1, 1]. Angle overrides
        (facevid2vid's keyframes) cannot apply to PIRender and are an error."""
        if any(a is not None for a in (yaw_deg, pitch_deg, roll_deg)):
            raise ValueError("PIRender renders from 3DMM coefficients only: head-angle keyframes do not apply")
        windows = _tensor(driving)
        if self._compiled is None:
            return self.net.render(source, windows)
        b = windows.shape[0]
        self._batch = max(self._batch, b)
        if b < self._batch:  # one compiled shape: pad with the last window, drop the extra frames
            windows = torch.cat([windows, windows[-1:].expand(self._batch - b, -1, -1)])
        return self._compiled(source, windows).fake_image[:b]

    @staticmethod
    def source_arrays(source: PreparedSource) -> dict[str, np.ndarray]:
        """The prepared source as named arrays for a job folder: the image only (the rest is two convolutions)."""
        return {"pirender_image": source.image.cpu().numpy()}

    def load_source(self, arrays: Mapping[str, np.ndarray]) -> PreparedSource:
        """`source_arrays` back: the source work redone on this renderer's device (bit-identical, same code)."""
        return self.prepare(np.asarray(arrays["pirender_image"]))

    @torch.no_grad()
    def render_clip(self, source_image: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Upstream's frame loop: (B, N, 73, 27) windows (`inputs.batched_target`) -> (B, N, 3, S, S) predictions.

        Step i renders windows [:, i] together, as `AnimateFromCoeff_PIRender.generate` does.
        """
        windows = _tensor(target)
        if windows.dim() != 4:
            raise ValueError(f"target windows must be (B, N, {COEFF_NC}, 27), got {tuple(windows.shape)}")
        source = self.prepare(source_image)
        return torch.stack([self.render(source, windows[:, i]) for i in range(windows.shape[1])], dim=1)
