"""Face renderer: driving coefficient windows -> frames of the source face.

In: the source crop and its 3DMM row, per-frame driving coefficients, optional keyframed head angles. Out:
float predictions batch by batch, then uint8 frames at the crop's aspect ratio.

`inputs` builds the source semantics and the 27-frame driving windows for any frame range (so a video renders
in batches or shards); `renderer` runs the mapping net, the keypoint detector (`keypoints`: pose -> 3-D
keypoints) and the generator, with the source work done once per video; `precision` (fp32 / bf16) and
`quantize` (int8, compiled and cached) decide how the generator runs; `frames` turns predictions into uint8.
`pirender` is the other renderer (`--facerender pirender`): 73-channel windows, PIRender's FaceGenerator, tanh
frames written with their negative half clipped and the padded frames kept.
"""

from xtalker.render.frames import resize_to_original, restored_size, to_uint8
from xtalker.render.inputs import DrivingSequence, driving_sequence, source_image, source_semantics
from xtalker.render.quantize import (
    ArtifactInfo,
    CalibrationBatch,
    Int8Settings,
    QuantizationUnavailableError,
    cached_artifact,
    check_available,
    quantize_generator,
    record_calibration,
    tensor_digest,
)
from xtalker.render.renderer import PreparedSource, Renderer

__all__ = [
    "ArtifactInfo",
    "CalibrationBatch",
    "DrivingSequence",
    "Int8Settings",
    "PreparedSource",
    "QuantizationUnavailableError",
    "Renderer",
    "cached_artifact",
    "check_available",
    "driving_sequence",
    "quantize_generator",
    "record_calibration",
    "resize_to_original",
    "restored_size",
    "source_image",
    "source_semantics",
    "tensor_digest",
    "to_uint8",
]
