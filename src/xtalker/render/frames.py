"""Rendered predictions -> uint8 video frames (spec section 9, steps 1-2).

On a CUDA device the conversion runs there and only uint8 crosses to the host (a quarter of the float bytes),
through page-locked buffers reused from batch to batch (`PinnedPool`) on a copy stream of its own.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import cv2
import numpy as np
import torch


def to_uint8(predictions: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 3, H, W) float images in [0, 1] -> (N, H, W, 3) uint8, `rint(x * 255)` in float32, clipped.

    CUDA tensors are converted on their GPU (the same values: `uint8_nhwc`) and copied into a pinned buffer.
    """
    if isinstance(predictions, torch.Tensor) and predictions.device.type == "cuda":
        return _cuda_to_host(uint8_nhwc(predictions))
    if isinstance(predictions, torch.Tensor):
        predictions = predictions.detach().cpu().numpy()
    x = np.asarray(predictions, dtype=np.float32).transpose(0, 2, 3, 1) * np.float32(255)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def uint8_nhwc(predictions: torch.Tensor) -> torch.Tensor:
    """`to_uint8`'s arithmetic in torch, on the tensor's device: a float32 product with float32(255), rounding half
    to even (`torch.round`, as `np.rint`), clipped to 0..255, as a contiguous (N, H, W, 3) uint8 tensor."""
    with torch.no_grad():
        x = predictions.detach().to(torch.float32) * 255.0
        return torch.round(x).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class PinnedPool:
    """Page-locked host buffers by shape, reused once the frames handed out in them are no longer referenced.

    `take` lends a buffer as (tensor, numpy view): the buffer stays lent while that array, or any view of it, is
    alive. It gives a free buffer of the shape, else a new one while the shape has fewer than `per_shape`, else
    None (the caller then copies to ordinary memory). Only the `shapes` most recently used shapes are kept (a
    lent buffer of a dropped shape lives on in its array until that goes). So the pool holds at most
    `shapes * per_shape` buffers, whatever the consumer keeps.
    """

    def __init__(self, per_shape: int = 4, shapes: int = 2,
                 allocate: Callable[[tuple[int, ...]], torch.Tensor] | None = None):
        self.per_shape, self.shapes = per_shape, shapes
        self._allocate = allocate or (lambda shape: torch.empty(shape, dtype=torch.uint8, pin_memory=True))
        # shape -> [buffer, weak reference to the array it was last lent as (None: never lent)]
        self._buffers: OrderedDict[tuple[int, ...], list[list]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray] | None:
        shape = tuple(shape)
        with self._lock:
            kept = self._buffers.setdefault(shape, [])
            self._buffers.move_to_end(shape)
            while len(self._buffers) > self.shapes:
                self._buffers.popitem(last=False)
            entry = next((e for e in kept if e[1] is None or e[1]() is None), None)
            if entry is None:
                if len(kept) >= self.per_shape:
                    return None
                entry = [self._allocate(shape), None]
                kept.append(entry)
            array = entry[0].numpy()
            entry[1] = weakref.ref(array)
            return entry[0], array

    def __len__(self) -> int:
        with self._lock:
            return sum(len(kept) for kept in self._buffers.values())


_PINNED = PinnedPool()
_COPY_STREAMS: dict[int, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COPY_STREAMS:
        _COPY_STREAMS[index] = torch.cuda.Stream(device=index)
    return _COPY_STREAMS[index]


def _cuda_to_host(frames: torch.Tensor) -> np.ndarray:
    """A CUDA uint8 tensor -> numpy, through a pinned buffer filled by a non-blocking copy on a copy stream;
    returns once the copy is complete (the array is then safe to read)."""
    lent = _PINNED.take(tuple(frames.shape))
    if lent is None:  # every buffer of this shape is still held by the consumer: an ordinary copy
        return frames.cpu().numpy()
    host, array = lent
    compute = torch.cuda.current_stream(frames.device)
    stream = _copy_stream(frames.device)
    stream.wait_stream(compute)  # the conversion must be finished before the copy reads it
    with torch.cuda.stream(stream):
        host.copy_(frames, non_blocking=True)
    frames.record_stream(stream)  # the allocator keeps `frames` until the copy stream is done with it
    stream.synchronize()
    return array


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
