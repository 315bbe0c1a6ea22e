"""Renderer inputs (spec section 7): source image and semantics, driving windows, batch layout, keyframe angles.

Everything per frame is available for any frame range [start, stop) (`DrivingSequence.windows`,
`DrivingSequence.angles`), so a video can be rendered batch by batch or in shards. Frames at or beyond
the clip length repeat the last frame, which is exactly upstream's padding to a multiple of the batch
size. `to_batch_layout` gives upstream's (batch_size, N, ...) arrangement: frame f at [f // N, f % N].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from xtalker.checkpoints import coeff_channels

SEMANTIC_RADIUS = 13
EXP_DIMS = 64  # expression part of a coefficient row; pose (6) and, in full modes, alignment (3) follow
CROP_CHANNELS = 70


def source_image(png_rgb_u8: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 crop -> (1, 3, S, S) float32 `u8 * float32(1/255)` (upstream's img_as_float32)."""
    x = png_rgb_u8.astype(np.float32) * np.float32(1 / 255)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def first_row(coeff_3dmm: np.ndarray) -> np.ndarray:
    """Row 0 of the source's (N, 73) coefficients (also accepts a single (73,) row), as float32."""
    coeff = np.asarray(coeff_3dmm, dtype=np.float32)
    return coeff.reshape(-1, coeff.shape[-1])[0]


def source_semantics(coeff_3dmm: np.ndarray, preprocess: str, radius: int = SEMANTIC_RADIUS) -> np.ndarray:
    """(1, C, 2 radius + 1) constant window of the source row; C = 73 in full modes, else 70."""
    row = first_row(coeff_3dmm)[: coeff_channels(preprocess)]
    return np.ascontiguousarray(np.repeat(row[None, :, None], 2 * radius + 1, axis=2))


def driving_coefficients(
    generated: np.ndarray,
    coeff_3dmm: np.ndarray,
    preprocess: str,
    still: bool = False,
    expression_scale: float = 1.0,
) -> np.ndarray:
    """(T, 70) generated coefficients -> (T, C) rows the driving windows are cut from.

    The expression is scaled in float32; full modes append the source's alignment triple; still mode
    replaces the pose (and triple) by the source's.
    """
    g = np.array(generated, dtype=np.float32)
    if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] < CROP_CHANNELS:
        raise ValueError(f"generated coefficients must be (T >= 1, 70), got {g.shape}")
    g = np.ascontiguousarray(g[:, :CROP_CHANNELS])
    g[:, :EXP_DIMS] *= np.float32(expression_scale)
    src = first_row(coeff_3dmm)[: coeff_channels(preprocess)]
    if src.shape[0] > CROP_CHANNELS:
        g = np.concatenate([g, np.broadcast_to(src[CROP_CHANNELS:], (g.shape[0], src.shape[0] - CROP_CHANNELS))], axis=1)
    if still:
        g[:, EXP_DIMS:] = src[EXP_DIMS:]
    return g


def padded_length(num_frames: int, batch_size: int) -> int:
    """Frame count rounded up to a multiple of the batch size."""
    return -(-num_frames // batch_size) * batch_size


def to_batch_layout(per_frame: np.ndarray, batch_size: int) -> np.ndarray:
    """(T_pad, ...) frames in time order -> (batch_size, T_pad / batch_size, ...) contiguous segments."""
    if per_frame.shape[0] % batch_size:
        raise ValueError(f"{per_frame.shape[0]} frames are not a multiple of batch size {batch_size}")
    return per_frame.reshape(batch_size, -1, *per_frame.shape[1:])


def _frame_indices(start: int, stop: int, num_frames: int) -> np.ndarray:
    if not 0 <= start <= stop:
        raise ValueError(f"bad frame range [{start}, {stop})")
    return np.minimum(np.arange(start, stop), num_frames - 1)


def keyframe_degrees(keyframes: Sequence[float], num_frames: int) -> np.ndarray:
    """(T,) float64 angle path through the keyframes, as upstream builds it for `--input_yaw` and friends.

    One keyframe: constant. Several: the total path length sum |d_k+1 - d_k| is spread evenly over T - 1
    steps, each segment is `np.arange(d_k, d_k+1, +-step)`, and the result is cut or padded with its last
    value to T. Upstream divides by zero for T = 1 or two equal consecutive keyframes; here those give
    the first keyframe, and equal neighbours add no frames.
    """
    values = [float(d) for d in keyframes]
    if not values:
        raise ValueError("keyframe list is empty")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    total = sum(abs(b - a) for a, b in zip(values, values[1:]))
    if len(values) == 1 or num_frames == 1 or total == 0:
        return np.full(num_frames, values[0], dtype=np.float64)
    per_frame = total / (num_frames - 1)
    segments = [np.arange(a, b, per_frame if b > a else -per_frame) for a, b in zip(values, values[1:]) if a != b]
    path = np.concatenate(segments)[:num_frames]
    return np.concatenate([path, np.full(num_frames - path.shape[0], path[-1])])


@dataclass(frozen=True)
class DrivingSequence:
    """A clip's driving rows (T, C) and optional per-frame angle overrides (T,) in degrees.

    A streamed clip holds only the rows near the frames being rendered: rows [offset, offset + len(coeffs)) of a
    clip of `length` frames (None: the clip ends with the rows held).
    """

    coeffs: np.ndarray
    yaw: np.ndarray | None = None
    pitch: np.ndarray | None = None
    roll: np.ndarray | None = None
    radius: int = SEMANTIC_RADIUS
    offset: int = 0
    length: int | None = None

    @property
    def num_frames(self) -> int:
        return self.length if self.length is not None else self.offset + int(self.coeffs.shape[0])

    @property
    def channels(self) -> int:
        return int(self.coeffs.shape[1])

    @property
    def has_angles(self) -> bool:
        return any(a is not None for a in (self.yaw, self.pitch, self.roll))

    def _held(self, rows: np.ndarray) -> np.ndarray:
        """Clip row numbers -> indices into the rows held."""
        local = rows - self.offset
        if local.size and (local.min() < 0 or local.max() >= self.coeffs.shape[0]):
            raise IndexError(f"rows {rows.min()}..{rows.max()} asked, {self.offset}..{self.offset + len(self.coeffs) - 1} held")
        return local

    def windows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, C, 2 radius + 1) windows: rows f - radius .. f + radius of frame f, clamped."""
        frames = _frame_indices(start, stop, self.num_frames)
        offsets = np.arange(-self.radius, self.radius + 1)
        rows = np.clip(frames[:, None] + offsets[None, :], 0, self.num_frames - 1)
        return np.ascontiguousarray(self.coeffs[self._held(rows)].transpose(0, 2, 1))

    def angles(self, start: int, stop: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(yaw, pitch, roll) overrides of frames [start, stop) as float32 (stop - start,), None where absent."""
        frames = self._held(_frame_indices(start, stop, self.num_frames))
        return tuple(None if a is None else a[frames].astype(np.float32) for a in (self.yaw, self.pitch, self.roll))


def driving_sequence(
    generated: np.ndarray,
    coeff_3dmm: np.ndarray,
    preprocess: str = "crop",
    still: bool = False,
    expression_scale: float = 1.0,
    input_yaw: Sequence[float] | None = None,
    input_pitch: Sequence[float] | None = None,
    input_roll: Sequence[float] | None = None,
) -> DrivingSequence:
    """Everything the renderer needs per frame, from the generated (T, 70) and the source's coefficients."""
    coeffs = driving_coefficients(generated, coeff_3dmm, preprocess, still, expression_scale)
    n = coeffs.shape[0]

    def path(keys: Sequence[float] | None) -> np.ndarray | None:
        return None if keys is None else keyframe_degrees(keys, n)

    return DrivingSequence(coeffs=coeffs, yaw=path(input_yaw), pitch=path(input_pitch), roll=path(input_roll))


@dataclass(frozen=True)
class BatchedTarget:
    """Upstream's whole-clip renderer input: (B, N, C, 27) windows and (B, N) angle sequences."""

    semantics: np.ndarray
    yaw: np.ndarray | None
    pitch: np.ndarray | None
    roll: np.ndarray | None
    num_frames: int


def batched_target(sequence: DrivingSequence, batch_size: int) -> BatchedTarget:
    """All windows and angles, padded by repeating the last frame and laid out as (batch_size, N, ...)."""
    stop = padded_length(sequence.num_frames, batch_size)
    yaw, pitch, roll = (None if a is None else to_batch_layout(a, batch_size) for a in sequence.angles(0, stop))
    return BatchedTarget(
        semantics=to_batch_layout(sequence.windows(0, stop), batch_size),
        yaw=yaw,
        pitch=pitch,
        roll=roll,
        num_frames=sequence.num_frames,
    )
