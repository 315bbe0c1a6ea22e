"""Speech: driving audio -> per-frame 3DMM coefficients.

In: a mono 16 kHz float waveform (decoded by `xtalker.media.load_audio`), the source's coefficient row, a pose
style and a seed. Out: (T, 70) coefficients per video frame at 25 fps (64 expression + 6 pose values).

`audio` is the mel front end (float64, like upstream) and its per-frame 16-column windows; `audio2coeff` runs
ExpNet (expression, with generated or reference blinks) and the PoseVAE decoder (head motion), smooths the
pose (Savitzky-Golay) and applies a reference pose video when given.
"""

from xtalker.speech.audio import SAMPLE_RATE, audio_windows, crop_to_frames, num_video_frames
from xtalker.speech.audio2coeff import Audio2Coeff, apply_ref_pose, blink_ratio, windows_to_tensor

__all__ = [
    "SAMPLE_RATE",
    "Audio2Coeff",
    "apply_ref_pose",
    "audio_windows",
    "blink_ratio",
    "crop_to_frames",
    "num_video_frames",
    "windows_to_tensor",
]
