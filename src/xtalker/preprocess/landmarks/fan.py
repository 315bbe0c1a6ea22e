"""SadTalker's upstream landmark step: AWing FAN on a detector box -> 68 iBUG points (aux spec 2.2-2.6).

Reproduces upstream's numbers exactly, quirks included, batched over (image, box) pairs:
- the box is truncated with `int()` and the crop is a numpy slice, so a coordinate <= -1 becomes a negative
  index that slices from the far end of the image (the crop then is not what the box says), while the
  landmarks are still shifted by that negative `int(x1)`, `int(y1)`;
- the heatmap decoder's neighbour rules are global per image: one landmark in the first / last heatmap row
  switches every landmark's vertical neighbour to element 0 / 4095 of its own map; index 0 reads its left
  neighbour from element 4095 (numpy's wrap); the right neighbour of a row end is the next row's first pixel.
Upstream raises a bare IndexError when a landmark peaks at the very last heatmap pixel (its right neighbour
is past the map) and the whole run aborts; here that neighbour reads element 4095 itself, the stand-in
upstream's own last-row rule uses for vertical neighbours. The network runs
in float32 only (bf16 moves argmaxes, aux spec 6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from xtalker.models.awing import FAN, INPUT_SIZE, NUM_LANDMARKS, load_awing

# iBUG-68 point <- WFLW-98 point pair; the 68-point coordinate is the pair's mean (a == b: copied).
_WFLW_PAIRS: list[tuple[int, int]] = (
    [(i, i) for i in range(0, 33, 2)]  # jaw 0..16: even WFLW contour points
    + [(33, 33), (34, 41), (35, 40), (36, 39), (37, 38)]  # right brow: corner, then upper/lower means
    + [(42, 50), (43, 49), (44, 48), (45, 47), (46, 46)]  # left brow
    + [(i, i) for i in range(51, 60)]  # nose 27..35
    + [(i, i) for i in (60, 61, 63, 64, 65, 67)]  # right eye 36..41
    + [(i, i) for i in (68, 69, 71, 72, 73, 75)]  # left eye 42..47
    + [(i, i) for i in range(76, 96)]  # mouth 48..67
)
WFLW_TO_68_A = np.array([a for a, _ in _WFLW_PAIRS])
WFLW_TO_68_B = np.array([b for _, b in _WFLW_PAIRS])
DEFAULT_MAX_BATCH = 4  # faces per network call: ~35 MB of activations each


def decode_heatmaps(heatmaps: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's `calculate_points` per image: (B, 98 or 99, H, W) maps -> argmax (B, 98) int64 and points.

    Points are (B, 98, 2) float64 (x, y) in heatmap units, including the +0.5; a 99th (boundary) map is
    ignored. A peak at the last pixel (upstream: IndexError) reads its right neighbour from that pixel.
    """
    maps = heatmaps.detach().cpu().numpy() if isinstance(heatmaps, torch.Tensor) else np.asarray(heatmaps)
    if maps.ndim != 4 or maps.shape[1] not in (NUM_LANDMARKS, NUM_LANDMARKS + 1):
        raise ValueError(f"expected (B, {NUM_LANDMARKS} or {NUM_LANDMARKS + 1}, H, W) heatmaps, got {maps.shape}")
    b, _, h, w = maps.shape
    n = h * w
    flat = maps[:, :NUM_LANDMARKS].astype(np.float32, copy=False).reshape(b, NUM_LANDMARKS, n)
    idx = flat.argmax(axis=-1)  # first occurrence on ties, as numpy's

    def at(i: np.ndarray) -> np.ndarray:
        return np.take_along_axis(flat, i[..., None], axis=-1)[..., 0]

    x_up = at(np.minimum(idx + 1, n - 1))  # past a row's end: the next row's first pixel; the last pixel: itself
    x_down = at((idx - 1) % n)  # idx 0 -> element n - 1 (numpy's negative index)
    # One landmark on the top / bottom border switches the rule for all landmarks of that image.
    last_row = (idx + w >= n).any(axis=1, keepdims=True)
    first_row = (idx - w <= 0).any(axis=1, keepdims=True)
    y_up = np.where(last_row, flat[..., n - 1], at(np.minimum(idx + w, n - 1)))
    y_down = np.where(first_row, flat[..., 0], at(np.maximum(idx - w, 0)))
    # float32 differences and signs (0 for equal neighbours), then quarter-pixel steps in float64.
    step = np.stack([np.sign(x_up - x_down), np.sign(y_up - y_down)], axis=-1).astype(np.float64)
    pts = np.stack([idx % w, idx // w], axis=-1).astype(np.float64)
    return idx.astype(np.int64), pts + 0.25 * step + 0.5


def wflw98_to_68(pts98: np.ndarray) -> np.ndarray:
    """(..., 98, 2) WFLW points -> (..., 68, 2) iBUG-68 float32 (pair means in float64, as upstream)."""
    p = np.asarray(pts98, dtype=np.float64)
    if p.shape[-2:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"expected (..., {NUM_LANDMARKS}, 2) points, got {p.shape}")
    return ((p[..., WFLW_TO_68_A, :] + p[..., WFLW_TO_68_B, :]) / 2).astype(np.float32)


def crop_for_fan(
    image_rgb_u8: np.ndarray, box_xyxy: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Upstream's crop `img[int(y1):int(y2), int(x1):int(x2)]` and its 256 x 256 BGR resize (INTER_LINEAR).

    Returns (crop RGB uint8, resized BGR uint8, (int(x1), int(y1))). `int()` truncates toward zero and a
    negative result is a numpy index from the far end (upstream quirk, reproduced); an empty crop is refused.
    """
    image = np.asarray(image_rgb_u8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    x1, y1, x2, y2 = (int(float(v)) for v in np.asarray(box_xyxy).reshape(-1)[:4])
    crop = image[y1:y2, x1:x2]
    if crop.size == 0:
        raise ValueError(
            f"box {tuple(np.asarray(box_xyxy).reshape(-1)[:4].tolist())} gives an empty crop of the "
            f"{image.shape[1]}x{image.shape[0]} image (slice [{y1}:{y2}, {x1}:{x2}])"
        )
    resized = cv2.resize(crop, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
    return crop, np.ascontiguousarray(resized[..., ::-1]), (x1, y1)


def fan_input(resized_bgr_u8: Sequence[np.ndarray]) -> torch.Tensor:
    """256 x 256 BGR uint8 crops -> (B, 3, 256, 256) float32 in [0, 1] (a float32 division by 255)."""
    u8 = torch.from_numpy(np.stack([np.asarray(r, dtype=np.uint8) for r in resized_bgr_u8]))
    if u8.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise ValueError(f"expected ({INPUT_SIZE}, {INPUT_SIZE}, 3) crops, got {tuple(u8.shape[1:])}")
    return (u8.permute(0, 3, 1, 2).to(torch.float32) / 255.0).contiguous()


@dataclass(frozen=True)
class FanSteps:
    """Every intermediate of the landmark step for B (image, box) pairs (crops differ in size: lists)."""

    crops_rgb_u8: list[np.ndarray]
    resized_bgr_u8: list[np.ndarray]
    offsets_xy: np.ndarray  # (B, 2) int64: (int(x1), int(y1))
    heatmaps: torch.Tensor  # (B, 99, 64, 64): the last stack, boundary map last
    boundaries: torch.Tensor  # (B, 3, 64, 64): boundary maps of the earlier stacks
    argmax: np.ndarray  # (B, 98) int64 flat index
    pts98_heatmap: np.ndarray  # (B, 98, 2) float64
    pts98_crop: np.ndarray  # (B, 98, 2) float64
    lm68_crop: np.ndarray  # (B, 68, 2) float32
    lm68_image: np.ndarray  # (B, 68, 2) float32


class FanLandmarks:
    """The AWing FAN landmark step as SadTalker runs it, on several faces at once. The network runs on `device`
    ("cpu", "cuda:N"); crops, heatmap decoding and points stay on the CPU."""

    def __init__(self, net: FAN, max_batch: int = DEFAULT_MAX_BATCH, device: str = "cpu"):
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.max_batch = max_batch

    @classmethod
    def from_file(cls, path: str | Path, max_batch: int = DEFAULT_MAX_BATCH, device: str = "cpu") -> FanLandmarks:
        return cls(load_awing(path), max_batch, device)

    @torch.inference_mode()
    def heatmaps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FAN heatmaps (B, 99, 64, 64) and earlier boundary maps, in float32 whatever autocast is active, on the
        CPU (the network runs on its device)."""
        x = x.to(self.device)
        with torch.autocast(self.device.type, enabled=False):
            parts = [self.net.forward_with_boundaries(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()

    def steps(self, images_rgb_u8: Sequence[np.ndarray], boxes: Sequence[Sequence[float]] | np.ndarray) -> FanSteps:
        """Run the whole step for image i with box i (each box (x1, y1, x2, y2, ...) in image pixels)."""
        if len(images_rgb_u8) != len(boxes) or len(boxes) == 0:
            raise ValueError(f"need one box per image and at least one pair, got {len(images_rgb_u8)} and {len(boxes)}")
        crops, resized, offsets = zip(*(crop_for_fan(img, box) for img, box in zip(images_rgb_u8, boxes)))
        heatmaps, boundaries = self.heatmaps(fan_input(resized))
        argmax, pts = decode_heatmaps(heatmaps)
        h, w = heatmaps.shape[-2:]
        # Heatmap units -> crop pixels: (Wc / 64, Hc / 64) per image.
        scale = np.array([(c.shape[1] / w, c.shape[0] / h) for c in crops], dtype=np.float64)
        pts_crop = pts * scale[:, None, :]
        lm68_crop = wflw98_to_68(pts_crop)
        offsets_xy = np.array(offsets, dtype=np.int64)
        lm68_image = lm68_crop + offsets_xy.astype(np.float32)[:, None, :]
        return FanSteps(
            list(crops), list(resized), offsets_xy, heatmaps, boundaries, argmax, pts, pts_crop, lm68_crop, lm68_image
        )

    def landmarks68(self, images_rgb_u8: Sequence[np.ndarray], boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """(B, 68, 2) float32 iBUG-68 landmarks in image coordinates, one set per (image, box) pair."""
        return self.steps(images_rgb_u8, boxes).lm68_image
