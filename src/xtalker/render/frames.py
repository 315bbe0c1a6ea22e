"""Rendered predictions -> uint8 video frames (spec section 9, steps 1-2)."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def to_uint8(predictions: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 3, H, W) float images in [0, 1] -> (N, H, W, 3) uint8, `rint(x * 255)` in float32, clipped."""
    if isinstance(predictions, torch.Tensor):
        predictions = predictions.detach().cpu().numpy()
    x = np.asarray(predictions, dtype=np.float32).transpose(0, 2, 3, 1) * np.float32(255)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def restored_size(image_size: int, original_size_wh: tuple[int, int]) -> tuple[int, int]:
    """(width, height) that gives back the crop's aspect ratio at width `image_size`."""
    w, h = original_size_wh
    return image_size, int(image_size * h / w)


def resize_to_original(frames: np.ndarray, original_size_wh: tuple[int, int]) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, int(S h / w), S, 3) with OpenCV bilinear, for a crop of size (w, h)."""
    size = restored_size(frames.shape[2], original_size_wh)
    if frames.shape[0] == 0:
        return np.empty((0, size[1], size[0], frames.shape[3]), dtype=frames.dtype)
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_LINEAR) for f in frames])
