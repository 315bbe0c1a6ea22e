"""Face-restore geometry: 5-point alignment to the 512 FFHQ template, inverse warp and masked paste (aux spec 4.4, 5).

These are the image operations upstream's face-restore helper runs around GFPGAN, with the same OpenCV calls
(4.x: its uint8 warps and LMedS estimate are what the golden data was made with). They take the restored
faces and the parse classes as inputs, so the enhancer can compute the expensive parts once per video (fast
path) or per frame (upstream path).
"""

from __future__ import annotations

import cv2
import numpy as np

FACE_SIZE = 512
# (x, y) of left eye, right eye, nose, left and right mouth corner (as seen in the image) in the 512 face.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ]
)
CROP_BORDER_BGR = (135, 133, 132)
# Parse classes kept in the paste mask: skin, brows, eyes, glasses, ears, earring, nose, mouth, lips, neck_l;
# background, neck, cloth, hair and hat are not pasted.
FACE_CLASSES = (*range(1, 14), 15)
MASK_BLUR_KERNEL = 101
MASK_BLUR_SIGMA = 11
MASK_BORDER = 10


def five_points(lm68: np.ndarray) -> np.ndarray:
    """(68, 2) landmarks -> (5, 2) float32: eye centres, nose tip and mouth corners, in template order."""
    lm68 = np.asarray(lm68, dtype=np.float64)
    return np.stack(
        [lm68[36:42].mean(0), lm68[42:48].mean(0), lm68[30], lm68[48], lm68[54]]
    ).astype(np.float32)


def align_affine(lm5: np.ndarray, template: np.ndarray = FFHQ_TEMPLATE_512) -> np.ndarray:
    """(2, 3) float64 similarity taking the 5 points onto the template: OpenCV's LMedS estimate, as upstream.

    LMedS rejects a badly placed point instead of averaging it in, so it can differ from least squares by
    many pixels; OpenCV seeds its sampler, so the result is deterministic.
    """
    affine, _ = cv2.estimateAffinePartial2D(
        np.asarray(lm5, dtype=np.float32), np.asarray(template, dtype=np.float32), method=cv2.LMEDS
    )
    if affine is None:
        raise ValueError("the 5 face points are degenerate: no similarity maps them onto the face template")
    return affine


def warp_face(image: np.ndarray, affine: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """The aligned `size` x `size` face crop (bilinear, upstream's grey border)."""
    return cv2.warpAffine(image, affine, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=CROP_BORDER_BGR)


def inverse_affine(affine: np.ndarray, upscale: float = 2.0) -> np.ndarray:
    """Face -> output-image matrix for an output `upscale` times the input, with upstream's half-pixel offset."""
    inv = cv2.invertAffineTransform(affine) * upscale
    if upscale > 1:
        inv[:, 2] += 0.5 * upscale
    return inv


def parse_mask(classes: np.ndarray) -> np.ndarray:
    """(512, 512) float64 paste weights in [0, 1] from parse classes: face classes, blurred twice, a zeroed
    10 px frame (upstream's hard inner edge, kept for identical results)."""
    mask = np.where(np.isin(classes, FACE_CLASSES), 255.0, 0.0)
    for _ in range(2):
        mask = cv2.GaussianBlur(mask, (MASK_BLUR_KERNEL, MASK_BLUR_KERNEL), MASK_BLUR_SIGMA)
    b = MASK_BORDER
    mask[:b, :] = 0
    mask[-b:, :] = 0
    mask[:, :b] = 0
    mask[:, -b:] = 0
    return mask / 255.0


def warp_mask(mask: np.ndarray, inverse: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """The soft mask in output-image coordinates (upstream passes flags=3, which warpAffine runs as bilinear)."""
    return cv2.warpAffine(mask, inverse, size_wh, flags=cv2.INTER_LINEAR)


def upscale_background(image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """The frame at the output size (Lanczos), the canvas restored faces are pasted on."""
    return cv2.resize(image, size_wh, interpolation=cv2.INTER_LANCZOS4)


def paste_face(canvas: np.ndarray, restored: np.ndarray, inverse: np.ndarray, soft_mask: np.ndarray) -> np.ndarray:
    """`soft_mask * face + (1 - soft_mask) * canvas` in float64 with the restored face warped back; the float
    canvas is returned so several faces blend in order before one `to_u8`."""
    h, w = canvas.shape[:2]
    face = cv2.warpAffine(restored, inverse, (w, h))
    weight = soft_mask[:, :, None]
    return weight * face + (1.0 - weight) * canvas


def to_u8(canvas: np.ndarray) -> np.ndarray:
    """Blended float canvas -> uint8 by truncation, as upstream (values lie in [0, 255])."""
    return canvas.astype(np.uint8)
