"""Face detection and 68 iBUG-300W landmarks behind one backend interface.

In: RGB uint8 images. Out: `Face`s (box, score, (68, 2) landmarks). `get_backend(name)` returns a backend by
name (`auto` picks the most faithful one whose files and packages are present); backends are imported only
when asked for, so a missing optional package fails with an install hint. The interface lives in `base`;
`mediapipe` is the offline backend, `upstream` upstream's RetinaFace + AWing FAN (`fan`: crop, heatmap
decoding, 98 -> 68).
"""

from xtalker.preprocess.landmarks.base import (
    Face,
    LandmarkBackend,
    LandmarkBackendError,
    NoFaceError,
    backend_names,
    get_backend,
)

__all__ = ["Face", "LandmarkBackend", "LandmarkBackendError", "NoFaceError", "backend_names", "get_backend"]
