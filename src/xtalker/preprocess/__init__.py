"""Source preprocessing: a portrait (or a reference video) -> the renderer's face crop + 3DMM coefficients.

In: an RGB picture (or video frames) and a landmark backend. Out: a `PreparedFace` with the square face crop,
its crop geometry (for paste-back), the crop's landmarks and the 73-value 3DMM coefficient row.

The steps run in the order of the modules: `landmarks` (face + 68 points behind a backend interface:
`mediapipe`, upstream's RetinaFace + AWing FAN), `crop` (FFHQ-style crop geometry), `align` (5-point
alignment to 224 and the ResNet-50 recon net), `source` (the whole stage for a picture or a video).
`face_detect` is upstream's RetinaFace post-processing, also used by the per-frame face enhancer.
"""

from xtalker.preprocess.crop import PREPROCESS_MODES, CropGeometry, CropInfo
from xtalker.preprocess.face_detect import FaceDetector, restore_helper_faces
from xtalker.preprocess.landmarks import LandmarkBackend, LandmarkBackendError, NoFaceError, get_backend
from xtalker.preprocess.source import PreparedFace, SourceError, prepare_source, video_coefficients

__all__ = [
    "PREPROCESS_MODES",
    "CropGeometry",
    "CropInfo",
    "FaceDetector",
    "LandmarkBackend",
    "LandmarkBackendError",
    "NoFaceError",
    "PreparedFace",
    "SourceError",
    "get_backend",
    "prepare_source",
    "restore_helper_faces",
    "video_coefficients",
]
