"""Face detection stage: RetinaFace R50 as facexlib's `detect_faces` runs it (aux spec 1.2, 1.6-1.9).

Pipeline per image: float32(BGR u8) - (104, 117, 123) at the original size, the network, priors for that
size, threshold on the face probability, decode, greedy NMS. Results are float32 rows
`[x1, y1, x2, y2, score, x_le, y_le, x_re, y_re, x_n, y_n, x_ml, y_ml, x_mr, y_mr]`, highest score first.
The thresholding and NMS reproduce upstream's float32/float64 comparisons exactly (1.8), so scores at the
threshold and IoUs at float32(0.4) fall on the same side as in SadTalker.

Colour order is the caller's business: SadTalker's first detection pass feeds RGB data as if it were BGR.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from xtalker.models import plans
from xtalker.models.retinaface import RetinaFaceR50, fold_batchnorm, load_retinaface

MEAN_BGR = (104.0, 117.0, 123.0)
STEPS = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
CENTER_VARIANCE = 0.1
SIZE_VARIANCE = 0.2
DET_COLUMNS = 15
CONF_THRESHOLD = 0.97
NMS_THRESHOLD = 0.4
EYE_DIST_THRESHOLD = 5.0

Images = Sequence[np.ndarray] | np.ndarray


class HeadOutputs(NamedTuple):
    """One image's network outputs, float32: loc (N, 4), conf (N, 2) after softmax, landms (N, 10)."""

    loc: np.ndarray
    conf: np.ndarray
    landms: np.ndarray


def feature_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Feature-map (rows, cols) of the stride 8, 16 and 32 levels: every stride-2 layer rounds up."""
    return [(math.ceil(h / s), math.ceil(w / s)) for s in STEPS]


@functools.lru_cache(maxsize=16)
def _priors(h: int, w: int) -> np.ndarray:
    levels = []
    for (rows, cols), step, sizes in zip(feature_sizes(h, w), STEPS, MIN_SIZES):
        # float64 like upstream's Python arithmetic, in its (row, column, size) order.
        cx = (np.arange(cols, dtype=np.float64) + 0.5) * step / w
        cy = (np.arange(rows, dtype=np.float64) + 0.5) * step / h
        m = np.asarray(sizes, dtype=np.float64)
        grid = np.empty((rows, cols, len(sizes), 4), dtype=np.float64)
        grid[..., 0] = cx[None, :, None]
        grid[..., 1] = cy[:, None, None]
        grid[..., 2] = m / w
        grid[..., 3] = m / h
        levels.append(grid.reshape(-1, 4))
    out = np.concatenate(levels).astype(np.float32)
    out.flags.writeable = False  # shared by every caller through the cache
    return out


def priors(h: int, w: int) -> np.ndarray:
    """(N, 4) float32 anchor boxes (cx, cy, w, h) normalised by the image size, for an h x w image (read-only)."""
    return _priors(int(h), int(w))


def _f32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _tensor32(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float()
    return torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: the input may be read-only


def decode(
    loc: np.ndarray | torch.Tensor, landms: np.ndarray | torch.Tensor, priors: np.ndarray, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """Head offsets -> pixel boxes (..., N, 4) x1,y1,x2,y2 and landmarks (..., N, 10), float32 throughout.

    Torch ops in upstream's order: torch's vectorised exp differs from numpy's by an ulp, and for one image's
    (N, 4) offsets this reproduces upstream's decoded boxes bit for bit.
    """
    loc, landms, p = _tensor32(loc), _tensor32(landms), _tensor32(priors)
    centre, size = p[:, :2], p[:, 2:]
    with torch.inference_mode():
        c = centre + loc[..., :2] * CENTER_VARIANCE * size
        wh = size * torch.exp(loc[..., 2:] * SIZE_VARIANCE)
        x1y1 = c - wh / 2
        boxes = torch.cat([x1y1, x1y1 + wh], dim=-1) * torch.tensor([w, h, w, h], dtype=torch.float32)
        points = landms.reshape(*landms.shape[:-1], 5, 2)
        points = centre[:, None, :] + points * CENTER_VARIANCE * size[:, None, :]
        points = points * torch.tensor([w, h], dtype=torch.float32)
    return boxes.numpy(), points.reshape(landms.shape).numpy()


def candidate_indices(scores: np.ndarray, conf_threshold: float = CONF_THRESHOLD) -> np.ndarray:
    """Prior indices with score > threshold (float32 comparison), by descending score as upstream sorts them."""
    scores = _f32(scores)
    inds = np.flatnonzero(scores > np.float32(conf_threshold))
    # numpy's reversed argsort, exactly as upstream, so even tied scores come out in the same order.
    return inds[np.argsort(scores[inds])[::-1]]


def nms(dets: np.ndarray, threshold: float = NMS_THRESHOLD) -> np.ndarray:
    """Greedy NMS over rows [x1, y1, x2, y2, score, ...]: indices kept, by descending score (ties: row order).

    IoU is float32 arithmetic on unclipped boxes with areas (x2 - x1) * (y2 - y1); a box is suppressed
    when IoU > threshold compared in float64, so an IoU of exactly float32(0.4) is suppressed at 0.4.
    """
    dets = _f32(dets)
    x1, y1, x2, y2 = (np.ascontiguousarray(dets[:, i]) for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-dets[:, 4], kind="stable")
    suppressed = np.zeros(len(dets), dtype=bool)
    keep = []
    zero = np.float32(0)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 for empty boxes is NaN, never > threshold
        for pos, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(i)
            rest = order[pos + 1 :]
            iw = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
            ih = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
            inter = iw * ih
            iou = inter / (areas[i] + areas[rest] - inter)
            # float64 comparison: numpy would otherwise round the threshold to float32.
            suppressed[rest[iou.astype(np.float64) > float(threshold)]] = True
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    loc: np.ndarray | torch.Tensor,
    conf: np.ndarray | torch.Tensor,
    landms: np.ndarray | torch.Tensor,
    image_hw: tuple[int, int],
    conf_threshold: float = CONF_THRESHOLD,
    nms_threshold: float = NMS_THRESHOLD,
) -> np.ndarray:
    """One image's head outputs ((N, k) or (1, N, k); conf after softmax) -> (K, 15) float32 detections."""
    h, w = int(image_hw[0]), int(image_hw[1])
    loc, conf, landms = _f32(loc).reshape(-1, 4), _f32(conf).reshape(-1, 2), _f32(landms).reshape(-1, 10)
    if len(loc) != len(priors(h, w)):
        raise ValueError(f"{len(loc)} head outputs do not match the {len(priors(h, w))} priors of a {h}x{w} image")
    idx = candidate_indices(conf[:, 1], conf_threshold)
    # Decoding all priors (not just the candidates) keeps each exp on upstream's vector/scalar code path.
    boxes, points = decode(loc, landms, priors(h, w), h, w)
    dets = np.concatenate([boxes[idx], conf[idx, 1:2], points[idx]], axis=1)
    return dets[nms(dets, nms_threshold)].reshape(-1, DET_COLUMNS)


def eye_distance(dets: np.ndarray) -> np.ndarray:
    """Distance between the two eye landmarks of each detection (float32 differences, float64 norm)."""
    dets = _f32(dets).reshape(-1, DET_COLUMNS)
    return np.hypot((dets[:, 5] - dets[:, 7]).astype(np.float64), (dets[:, 6] - dets[:, 8]).astype(np.float64))


def restore_helper_faces(
    dets: np.ndarray, eye_dist_threshold: float | None = EYE_DIST_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """FaceRestoreHelper's pick: detections with eye distance >= threshold (all if None), in order.

    Returns landmarks5 (K, 5, 2) float32 and det_faces (K, 5) float32 (box + score).
    """
    dets = _f32(dets).reshape(-1, DET_COLUMNS)
    if eye_dist_threshold is not None:
        dets = dets[~(eye_distance(dets) < eye_dist_threshold)]
    return dets[:, 5:].reshape(-1, 5, 2).copy(), dets[:, :5].copy()


def box_ints(det: np.ndarray) -> tuple[int, int, int, int]:
    """`int()` of a detection's box, truncating toward zero, as SadTalker crops the face for the landmark net."""
    x1, y1, x2, y2 = (int(v) for v in np.asarray(det)[:4])
    return x1, y1, x2, y2


def to_network_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) BGR uint8 -> (B, 3, H, W) float32 minus the BGR means (a channels-last view, no resize)."""
    u8 = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if u8.dtype != torch.uint8 or u8.dim() != 4 or u8.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) uint8 BGR images, got {tuple(u8.shape)} {u8.dtype}")
    return (u8.float() - torch.tensor(MEAN_BGR, device=u8.device)).permute(0, 3, 1, 2)


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"expected HWC uint8 BGR images, got {type(image).__name__} {shape}")
    return image


def _same_size_chunks(images: Sequence[np.ndarray], batch_size: int) -> Iterator[list[int]]:
    """Indices of images grouped by size (first-seen order), in chunks of at most `batch_size`."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape[:2], []).append(i)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            yield members[start : start + batch_size]


class FaceDetector:
    """RetinaFace R50 plus upstream's post-processing, batched over same-size images.

    The network runs with BatchNorm folded into the convs and channels-last activations (same fp32 results
    within 1e-5). "bf16" runs every network op in bfloat16 (what bf16 autocast does with this network, without
    re-casting the weights each call) but softmax, decoding and thresholds in float32; its scores move by up to
    about 0.014, enough to cross 0.97 (aux spec 6.5).

    `device` ("cpu", "cuda:N"): where the network runs; images go across as uint8, the head outputs come back to
    the CPU, where priors, decoding and NMS run as upstream's.
    """

    def __init__(self, net: RetinaFaceR50, precision: str = "fp32", batch_size: int = 8, device: str = "cpu"):
        if precision not in plans.PRECISIONS:
            raise ValueError(f"unknown detector precision {precision!r}; choose one of {', '.join(plans.PRECISIONS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dtype = plans.PRECISIONS[precision]
        self.device = torch.device(device)
        self.net = fold_batchnorm(net).to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
        self.precision = precision
        self.batch_size = batch_size

    @classmethod
    def from_file(cls, path: str | Path, precision: str = "fp32", batch_size: int = 8, device: str = "cpu") -> FaceDetector:
        """Load an official (or synthetic) detection_Resnet50_Final.pth."""
        return cls(load_retinaface(path), precision, batch_size, device)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loc, logits, landms = self.net.heads(x.to(self.dtype))
        # Scores and offsets leave the network as float32 before softmax and decoding, whatever ran inside.
        return loc.float(), F.softmax(logits.float(), dim=-1), landms.float()

    def head_outputs(self, images: Images, batch_size: int | None = None) -> list[HeadOutputs]:
        """Raw per-image network outputs (float32, conf after softmax) for HWC uint8 BGR images."""
        images = [_check_image(im) for im in images]
        found: dict[int, HeadOutputs] = {}
        with torch.inference_mode():
            for chunk in _same_size_chunks(images, batch_size or self.batch_size):
                x = to_network_input(torch.from_numpy(np.stack([images[i] for i in chunk])).to(self.device))
                loc, conf, landms = (t.cpu().numpy() for t in self._forward(x))
                found.update((i, HeadOutputs(loc[b], conf[b], landms[b])) for b, i in enumerate(chunk))
        return [found[i] for i in range(len(images))]

    def detect(
        self,
        images: Images,
        conf_threshold: float = CONF_THRESHOLD,
        nms_threshold: float = NMS_THRESHOLD,
        batch_size: int | None = None,
    ) -> list[np.ndarray]:
        """(K, 15) float32 detections per HWC uint8 BGR image (any sizes; same-size images share a forward)."""
        heads = self.head_outputs(images, batch_size)
        return [
            postprocess(*head, images[i].shape[:2], conf_threshold, nms_threshold) for i, head in enumerate(heads)
        ]
