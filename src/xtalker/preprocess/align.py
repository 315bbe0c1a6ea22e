"""5-point alignment to 224 and the per-image 3DMM coefficient row (spec A5, A6; Deep3DFaceRecon convention).

The landmarks are flipped to y-up, reduced to 5 points, fitted to a standard 3D face with a
least-squares similarity (POS), and the image is scaled and cut to 224x224 with Pillow 13's bicubic (reimplemented
in `resample.py`, so any Pillow gives the same pixels) so the face recon network sees a normalised face. The dtypes follow upstream (float32 landmarks, float64 fit and
transform, float32 coefficient row) so every value matches the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from xtalker.models.face_3drecon import ReconNet, split_coeff
from xtalker.preprocess.resample import resize_bicubic

TARGET_SIZE = 224
RESCALE_FACTOR = 102.0

# The standard face's five 3D points (left-eye centre, right-eye centre, nose tip, left and right mouth
# corner), derived upstream from Deep3DFaceRecon's similarity_Lm3D_all.mat; float32 as upstream keeps them.
LM3D_STD_5 = np.array(
    [
        [-0.31148657, 0.29036078, 0.13377953],
        [0.30979887, 0.28972036, 0.13179526],
        [0.0032534988, -0.046179324, 0.55244243],
        [-0.25216928, -0.38133916, 0.22405732],
        [0.2484662, -0.38128236, 0.22235769],
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class Alignment:
    """One image aligned to 224. `trans_params` = (W, H, s', tx, ty) in float64; landmarks are y-up."""

    image: np.ndarray
    trans_params: np.ndarray
    lm68_flipped: np.ndarray
    lm5p: np.ndarray
    pos_t: np.ndarray
    pos_s: float
    lm68_aligned: np.ndarray


@dataclass(frozen=True)
class SourceCoefficients:
    """Face-recon result for a batch: `coeff_3dmm` (B, 73) float32 and the raw network output (B, 257)."""

    coeff_3dmm: np.ndarray
    full_3dmm: np.ndarray
    alignments: list[Alignment]


def flip_y(lm68: np.ndarray, height: int) -> np.ndarray:
    """Image landmarks (y down) to y up, `y -> H - 1 - y`, float32 as upstream stores them."""
    lm = np.array(lm68, dtype=np.float32)
    lm[:, 1] = height - 1 - lm[:, 1]
    return lm


def five_points(lm68: np.ndarray) -> np.ndarray:
    """Left-eye centre, right-eye centre, nose tip, mouth corners; eye centres from the two corners only."""
    return np.stack(
        [
            np.mean(lm68[[36, 39]], axis=0),
            np.mean(lm68[[42, 45]], axis=0),
            lm68[30],
            lm68[48],
            lm68[54],
        ]
    )


def pos_fit(lm5p: np.ndarray, lm3d: np.ndarray = LM3D_STD_5) -> tuple[np.ndarray, float]:
    """Least-squares scaled orthographic fit of 3D points to 2D points: translation (2,) and scale."""
    n = lm3d.shape[0]
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3] = lm3d
    a[0::2, 3] = 1
    a[1::2, 4:7] = lm3d
    a[1::2, 7] = 1
    b = np.reshape(lm5p, (2 * n, 1))
    k = np.linalg.lstsq(a, b, rcond=None)[0][:, 0]
    s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.array([k[3], k[7]]), float(s)


def _resize_and_crop(
    image: np.ndarray, lm: np.ndarray, t: np.ndarray, s: float, target_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scale the image by s, cut target_size around the face (PIL zero-fills outside), move landmarks along."""
    h0, w0 = image.shape[:2]
    # Upstream truncates with int32 casts (toward zero, also for negative offsets); int() does the same.
    w = int(w0 * s)
    h = int(h0 * s)
    left = int(w / 2 - target_size / 2 + float((t[0] - w0 / 2) * s))
    up = int(h / 2 - target_size / 2 + float((h0 / 2 - t[1]) * s))
    aligned = _cut(resize_bicubic(image, (w, h)), left, up, target_size)
    return aligned, _to_aligned(lm, w0, h0, s, t, target_size)


def _cut(image: np.ndarray, left: int, up: int, size: int) -> np.ndarray:
    """The size x size window at (left, up), zeros where it leaves the image (as PIL's crop fills)."""
    out = np.zeros((size, size, *image.shape[2:]), image.dtype)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(left, 0), max(up, 0), min(left + size, w), min(up + size, h)
    if x1 > x0 and y1 > y0:
        out[y0 - up : y1 - up, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return out


def _aligned_offset(w0: int, h0: int, s: float, target_size: int) -> np.ndarray:
    """Shift between the scaled image centre frame and the aligned crop (uses the truncated scaled size)."""
    w = int(w0 * s)
    h = int(h0 * s)
    return np.array([[w / 2 - target_size / 2, h / 2 - target_size / 2]])


def _to_aligned(lm: np.ndarray, w0: int, h0: int, s: float, t: np.ndarray, target_size: int) -> np.ndarray:
    lm_new = np.stack([lm[:, 0] - t[0] + w0 / 2, lm[:, 1] - t[1] + h0 / 2], axis=1) * s
    return lm_new - _aligned_offset(w0, h0, s, target_size)


def to_aligned(points: np.ndarray, trans_params: np.ndarray, target_size: int = TARGET_SIZE) -> np.ndarray:
    """y-up image points (N, 2) to aligned-crop coordinates (y up), as upstream moves the landmarks."""
    w0, h0, s, tx, ty = (float(v) for v in trans_params)
    return _to_aligned(np.asarray(points), int(w0), int(h0), s, np.array([tx, ty]), target_size)


def from_aligned(points: np.ndarray, trans_params: np.ndarray, target_size: int = TARGET_SIZE) -> np.ndarray:
    """Inverse of `to_aligned`: aligned-crop points (N, 2) back to y-up image points, float64."""
    w0, h0, s, tx, ty = (float(v) for v in trans_params)
    shifted = np.asarray(points, dtype=np.float64) + _aligned_offset(int(w0), int(h0), s, target_size)
    return shifted / s + np.array([[tx - w0 / 2, ty - h0 / 2]])


def align_face(
    image: np.ndarray,
    lm68: np.ndarray,
    target_size: int = TARGET_SIZE,
    rescale_factor: float = RESCALE_FACTOR,
) -> Alignment:
    """Align one RGB uint8 HWC image given its 68 image-space landmarks (x right, y down)."""
    h0, w0 = image.shape[:2]
    lm = flip_y(lm68, h0)
    lm5p = five_points(lm)
    t, pos_s = pos_fit(lm5p)
    s = rescale_factor / pos_s
    aligned, lm_aligned = _resize_and_crop(image, lm, t, s, target_size)
    trans_params = np.array([w0, h0, s, t[0], t[1]], dtype=np.float64)
    return Alignment(
        image=aligned,
        trans_params=trans_params,
        lm68_flipped=lm,
        lm5p=lm5p,
        pos_t=t,
        pos_s=pos_s,
        lm68_aligned=lm_aligned,
    )


def recon_input(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """Aligned uint8 HWC images to the (B, 3, 224, 224) network input; /255 in float64 as upstream."""
    batch = np.stack([np.asarray(im) for im in images]) / 255.0
    return torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def coeff_rows(recon_output: torch.Tensor | np.ndarray, trans_params: np.ndarray) -> np.ndarray:
    """(B, 73) float32 rows exp | angle | trans | (s', tx, ty) from (B, 257) outputs and (B, 5) trans_params."""
    coeffs = split_coeff(torch.as_tensor(recon_output))
    align3 = np.asarray(trans_params, dtype=np.float64).reshape(-1, 5)[:, 2:].astype(np.float32)
    parts = [coeffs[k].detach().cpu().numpy().astype(np.float32) for k in ("exp", "angle", "trans")]
    return np.concatenate(parts + [align3], axis=1)


def source_coefficients(
    net: ReconNet, images: Sequence[np.ndarray], landmarks: Sequence[np.ndarray]
) -> SourceCoefficients:
    """Align each image (sizes may differ) and run the face recon on the whole batch at once."""
    if len(images) != len(landmarks):
        raise ValueError(f"{len(images)} images but {len(landmarks)} landmark sets")
    alignments = [align_face(im, lm) for im, lm in zip(images, landmarks)]
    x = recon_input([a.image for a in alignments])
    param = next(net.parameters())
    with torch.inference_mode():
        full = net(x.to(device=param.device, dtype=param.dtype)).float().cpu()
    trans = np.stack([a.trans_params for a in alignments])
    return SourceCoefficients(coeff_3dmm=coeff_rows(full, trans), full_3dmm=full.numpy(), alignments=alignments)
