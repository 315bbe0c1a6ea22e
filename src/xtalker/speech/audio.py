"""Audio front end (spec section 3): a mono 16 kHz float waveform -> per-video-frame mel windows.

Every step is a separate function so each intermediate can be compared with the reference. The pipeline is

    wav -> crop_to_frames -> preemphasis -> stft_magnitude -> mel (Slaney basis) -> dB -> normalize
        -> frame_windows (T, 80, 16)

Mel columns and frame windows can also be computed for any range, from the cropped waveform alone, with
exactly the values of the full computation; this lets long audio be processed in pieces.
"""

from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
N_FFT = 800
HOP = 200
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS_VALUE = 4.0
AMP_FLOOR = 1e-5  # 10 ** (MIN_LEVEL_DB / 20)
MEL_STEP = 16  # mel columns per video-frame window (200 ms)
MEL_PER_SECOND = SAMPLE_RATE / HOP  # 80
# Mel columns computed per block: bounds the (frames x n_fft) float64 work array to ~13 MB.
_BLOCK_COLUMNS = 2048


def num_video_frames(num_samples: int) -> int:
    """Video frames covered by `num_samples` audio samples (25 fps; a partial last frame is dropped)."""
    return num_samples // SAMPLES_PER_FRAME


def crop_to_frames(wav: np.ndarray) -> np.ndarray:
    """The first 640 * T samples of a mono waveform."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D), got shape {wav.shape}")
    return wav[: num_video_frames(len(wav)) * SAMPLES_PER_FRAME]


def preemphasis(wav: np.ndarray) -> np.ndarray:
    """y[n] = x[n] - 0.97 x[n-1] in float64 (x[-1] = 0)."""
    x = np.asarray(wav, dtype=np.float64)
    y = x.copy()
    y[1:] -= PREEMPHASIS * x[:-1]
    return y


@functools.lru_cache(maxsize=4)
def hann_window(length: int = N_FFT) -> np.ndarray:
    """Periodic Hann window (the DFT-even form used for spectral analysis), float64."""
    n = np.arange(length, dtype=np.float64)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)
    w.flags.writeable = False
    return w


def num_mel_columns(num_samples: int) -> int:
    """STFT frames of a centred transform: one per hop, plus one."""
    return 1 + num_samples // HOP


def stft_magnitude(
    y: np.ndarray, col_start: int = 0, col_stop: int | None = None, *, offset: int = 0, num_samples: int | None = None
) -> np.ndarray:
    """|STFT| columns [col_start, col_stop) of the centred transform of a signal: (n_fft/2 + 1, n) float64.

    The signal is padded with n_fft/2 zeros on each side (constant padding), so column j covers samples
    [j * hop - n_fft/2, j * hop + n_fft/2). `y` holds samples [offset, offset + len(y)) of a signal of
    `num_samples` samples (default: all of it); it must contain every sample the column range reads.
    """
    y = np.asarray(y)
    num_samples = offset + len(y) if num_samples is None else num_samples
    total = num_mel_columns(num_samples)
    col_stop = total if col_stop is None else col_stop
    if not 0 <= col_start <= col_stop <= total:
        raise ValueError(f"column range [{col_start}, {col_stop}) outside [0, {total})")
    if col_stop == col_start:
        return np.zeros((N_FFT // 2 + 1, 0), dtype=np.float64)
    half = N_FFT // 2
    lo, hi = col_start * HOP - half, (col_stop - 1) * HOP + half  # needed samples, unpadded coordinates
    src_lo, src_hi = max(lo, 0), min(hi, num_samples)
    if src_lo < offset or src_hi > offset + len(y):
        raise ValueError(f"samples [{src_lo}, {src_hi}) needed, but only [{offset}, {offset + len(y)}) given")
    segment = np.zeros(hi - lo, dtype=np.float64)
    segment[src_lo - lo : src_hi - lo] = y[src_lo - offset : src_hi - offset]
    frames = np.lib.stride_tricks.sliding_window_view(segment, N_FFT)[::HOP]
    return np.abs(np.fft.rfft(frames * hann_window(N_FFT), axis=1)).T


# Slaney mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic (27 mels per factor 6.4) above.
_MEL_F_SP = 200.0 / 3.0
_MEL_MIN_LOG_HZ = 1000.0
_MEL_MIN_LOG_MEL = _MEL_MIN_LOG_HZ / _MEL_F_SP
_MEL_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(freq: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic (27 mels per factor 6.4) above."""
    f = np.asarray(freq, dtype=np.float64)
    linear = f / _MEL_F_SP
    log_part = _MEL_MIN_LOG_MEL + np.log(np.maximum(f, _MEL_MIN_LOG_HZ) / _MEL_MIN_LOG_HZ) / _MEL_LOGSTEP
    return np.where(f >= _MEL_MIN_LOG_HZ, log_part, linear)


def mel_to_hz(mels: np.ndarray | float) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    m = np.asarray(mels, dtype=np.float64)
    linear = _MEL_F_SP * m
    log_part = _MEL_MIN_LOG_HZ * np.exp(_MEL_LOGSTEP * (np.maximum(m, _MEL_MIN_LOG_MEL) - _MEL_MIN_LOG_MEL))
    return np.where(m >= _MEL_MIN_LOG_MEL, log_part, linear)


@functools.lru_cache(maxsize=4)
def mel_basis(
    sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = FMIN, fmax: float = FMAX
) -> np.ndarray:
    """Triangular Slaney-scale mel filters with Slaney area normalisation: (n_mels, n_fft/2 + 1) float32.

    The triangles are built in float64 and stored as float32 before the normalisation factor (float64) is
    applied and the result rounded to float32 again: the double rounding of the reference's float32 basis.
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area_norm = 2.0 / (edges[2:] - edges[:-2])
    basis = (triangles * area_norm[:, None]).astype(np.float32)
    basis.flags.writeable = False
    return basis


def amp_to_db(mel: np.ndarray) -> np.ndarray:
    """20 log10(max(1e-5, x)) - ref_level_db."""
    return 20.0 * np.log10(np.maximum(AMP_FLOOR, mel)) - REF_LEVEL_DB


def normalize(db: np.ndarray) -> np.ndarray:
    """Map [min_level_db, 0] dB linearly onto [-4, 4], clipped."""
    scaled = 2.0 * MAX_ABS_VALUE * (db - MIN_LEVEL_DB) / (-MIN_LEVEL_DB) - MAX_ABS_VALUE
    return np.clip(scaled, -MAX_ABS_VALUE, MAX_ABS_VALUE)


def mel_columns(
    emphasized: np.ndarray,
    col_start: int = 0,
    col_stop: int | None = None,
    *,
    offset: int = 0,
    num_samples: int | None = None,
) -> np.ndarray:
    """Normalised log-mel columns [col_start, col_stop) of a pre-emphasised signal: (80, n) float64.

    `offset` / `num_samples` as in `stft_magnitude`. Computed in blocks so memory stays bounded for long
    audio; every column depends only on its own STFT frame, so any range equals the slice of the full result.
    """
    num_samples = offset + len(emphasized) if num_samples is None else num_samples
    col_stop = num_mel_columns(num_samples) if col_stop is None else col_stop
    basis = mel_basis().astype(np.float64)
    out = np.empty((N_MELS, max(col_stop - col_start, 0)), dtype=np.float64)
    for b in range(col_start, col_stop, _BLOCK_COLUMNS):
        e = min(b + _BLOCK_COLUMNS, col_stop)
        mag = stft_magnitude(emphasized, b, e, offset=offset, num_samples=num_samples)
        out[:, b - col_start : e - col_start] = normalize(amp_to_db(basis @ mag))
    return out


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Normalised log-mel spectrogram of a (cropped) waveform: (80, 1 + len / 200) float64."""
    return mel_columns(preemphasis(wav))


def window_indices(start: int, stop: int, num_columns: int) -> np.ndarray:
    """Mel-column indices of the windows of video frames [start, stop): (n, 16) int64.

    Frame i starts at int(80 * ((i - 2) / 25)) -- the reference's float expression, truncated toward zero,
    so frames 0 and 1 start at -6 and -3 -- and indices are clamped to [0, num_columns - 1].
    """
    frames = np.arange(start, stop, dtype=np.float64)
    first = np.trunc(MEL_PER_SECOND * ((frames - 2) / FPS)).astype(np.int64)
    idx = first[:, None] + np.arange(MEL_STEP, dtype=np.int64)[None, :]
    return np.clip(idx, 0, num_columns - 1)


def frames_for_columns(num_columns: int) -> int:
    """The T with num_mel_columns(640 * T) == num_columns (unique: 640 T / 200 grows by 3.2 per frame)."""
    m = num_columns - 1
    T = -(-m * HOP // SAMPLES_PER_FRAME)  # ceil(m * 200 / 640)
    if m < 0 or num_mel_columns(T * SAMPLES_PER_FRAME) != num_columns:
        raise ValueError(f"{num_columns} mel columns do not come from a whole number of video frames")
    return T


def frame_windows(mel: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Per-video-frame mel windows of frames [start, stop) from a full spectrogram (80, n): (n_frames, 80, 16) float32.

    `stop` defaults to the number of video frames of the cropped waveform the spectrogram was computed from.
    """
    num_columns = mel.shape[1]
    stop = frames_for_columns(num_columns) if stop is None else stop
    idx = window_indices(start, stop, num_columns)
    return np.ascontiguousarray(mel[:, idx].transpose(1, 0, 2), dtype=np.float32)


def window_samples(start: int, stop: int, num_samples: int) -> tuple[int, int]:
    """The samples [s0, s1) of a cropped waveform of `num_samples` that the windows of frames [start, stop) read."""
    idx = window_indices(start, stop, num_mel_columns(num_samples))
    c0, c1 = int(idx.min()), int(idx.max()) + 1
    return max(c0 * HOP - N_FFT // 2, 0), min((c1 - 1) * HOP + N_FFT // 2, num_samples)


def frame_windows_from_wav(
    wav_cropped: np.ndarray, start: int, stop: int, *, offset: int = 0, num_samples: int | None = None
) -> np.ndarray:
    """Windows of video frames [start, stop) computed from the cropped waveform, touching only the needed samples.

    Equal to `frame_windows(melspectrogram(wav_cropped), start, stop)`; meant for processing long audio in pieces.
    `wav_cropped` may hold only samples [offset, offset + len) of a waveform of `num_samples` samples, as long
    as it holds `window_samples(start, stop, num_samples)` and one sample before them.
    """
    n = offset + len(wav_cropped) if num_samples is None else num_samples
    T = num_video_frames(n)
    if not 0 <= start <= stop <= T:
        raise ValueError(f"frame range [{start}, {stop}) outside [0, {T}]")
    if stop == start:
        return np.zeros((0, N_MELS, MEL_STEP), dtype=np.float32)
    idx = window_indices(start, stop, num_mel_columns(n))
    c0, c1 = int(idx.min()), int(idx.max()) + 1
    s0, s1 = window_samples(start, stop, n)
    # Pre-emphasis of sample s0 needs sample s0 - 1 as well; drop it again afterwards.
    lead = 1 if s0 > 0 else 0
    if s0 - lead < offset or s1 > offset + len(wav_cropped):
        raise ValueError(f"samples [{s0 - lead}, {s1}) needed, but only [{offset}, {offset + len(wav_cropped)}) given")
    emphasized = preemphasis(np.asarray(wav_cropped[s0 - lead - offset : s1 - offset]))[lead:]
    cols = mel_columns(emphasized, c0, c1, offset=s0, num_samples=n)
    return np.ascontiguousarray(cols[:, idx - c0].transpose(1, 0, 2), dtype=np.float32)


def audio_windows(wav: np.ndarray) -> np.ndarray:
    """The whole front end: mono 16 kHz float waveform -> (T, 80, 16) float32 mel windows, T = len // 640."""
    return frame_windows(melspectrogram(crop_to_frames(wav)))
