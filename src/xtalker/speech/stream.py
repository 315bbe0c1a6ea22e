"""Speech arriving over time -> the driving coefficients of the offline run, row by row, with a bounded look-ahead.

`CoeffStream.push(samples)` takes 16 kHz mono float samples of any length and returns the (n, 70) coefficient rows
that can no longer change; `finish()` returns the rest. A row is released once everything it depends on is known:

- its mel window (the audio up to ~2120 samples, 0.13 s, past the frame);
- its blink value (the clip is known to last 6 frames past it);
- ExpNet's block of 32 frames (blocks start at frame 0, as offline: a call's batch changes the last bits);
- the pose chunk of 32 frames holding it and those up to 6 frames later (Savitzky-Golay window 13), complete:
  the pose decoder works on whole 32-frame chunks, and the clip's last, partial chunk is decoded from the last
  32 frames, so a frame in an unfinished chunk waits for the chunk to fill up or for the audio to end.

So a row comes out at most ~70 frames (2.8 s) of audio after its own frame, usually fewer, and it is bit for bit
the offline row, with one exception: the blink gaps. Offline draws them from [10, min(T // 2, 70)), which needs
the clip's length T; a stream draws from [10, 70), the offline range of clips of 140 frames (5.6 s) or more. So
streamed clips shorter than 5.6 s blink at other times than offline; longer ones blink identically.
Memory stays bounded: audio, windows and rows are dropped once no later row needs them.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from xtalker.models.audio2exp import EXP_DIM
from xtalker.speech.audio import HOP, N_FFT, SAMPLES_PER_FRAME, frame_windows_from_wav, num_video_frames, window_indices
from xtalker.speech.audio2coeff import (
    BLINK_MIN_FRAMES,
    BLINK_SHAPE,
    COEFF_DIM,
    SAVGOL_WINDOW,
    Audio2Coeff,
    blink_gaps,
    blink_starts,
    smooth_pose,
    windows_to_tensor,
)

LONG_CLIP = 140  # frames from which the offline blink gaps no longer depend on the clip's length
HALF_WINDOW = SAVGOL_WINDOW // 2


def _raw_window(frame: int) -> tuple[int, int]:
    """The samples [first, last + 1) frame `frame`'s mel window reads, before any clamping at the clip's ends."""
    columns = window_indices(frame, frame + 1, 1 << 62)
    return int(columns.min()) * HOP - N_FFT // 2, int(columns.max()) * HOP + N_FFT // 2


class _Rows:
    """Rows [base, base + len) of a growing per-frame array; older rows can be dropped."""

    def __init__(self, width: tuple[int, ...], dtype=np.float32):
        self.base = 0
        self.data = np.zeros((0, *width), dtype=dtype)

    @property
    def stop(self) -> int:
        return self.base + len(self.data)

    def append(self, rows: np.ndarray) -> None:
        self.data = np.concatenate([self.data, rows]) if len(self.data) else np.asarray(rows, self.data.dtype)

    def get(self, start: int, stop: int) -> np.ndarray:
        if start < self.base or stop > self.stop:
            raise IndexError(f"rows [{start}, {stop}) asked, [{self.base}, {self.stop}) held")
        return self.data[start - self.base : stop - self.base]

    def drop_before(self, frame: int) -> None:
        cut = min(max(frame - self.base, 0), len(self.data))
        if cut:
            self.data = self.data[cut:]
            self.base += cut


@dataclass(frozen=True)
class Reference:
    """What the coefficients are relative to: the source's (70,) row, and the optional reference videos' rows."""

    source: np.ndarray  # (70,) float32: the source's expression and pose
    eyeblink: np.ndarray | None = None  # (L, 64) --ref_eyeblink expressions, tiled over time (then no generated blinks)
    pose: np.ndarray | None = None  # (L, 6) --ref_pose poses, tiled; pose[t] += ref[t] - ref[0]

    def exp_rows(self, start: int, stop: int) -> np.ndarray:
        if self.eyeblink is None:
            return np.repeat(self.source[None, :EXP_DIM], stop - start, axis=0)
        return self.eyeblink[np.arange(start, stop) % len(self.eyeblink)]


class CoeffStream:
    """Incremental `speech_coefficients`: the same networks, seeds and arithmetic, fed audio as it arrives."""

    def __init__(self, audio2coeff: Audio2Coeff, reference: Reference, seed: int, pose_style: int = 0,
                 device: torch.device | str = "cpu"):
        self.nets = audio2coeff
        self.ref = reference
        self.device = torch.device(device)
        self.finished = False
        self.samples = 0  # received so far
        self._wav = np.zeros(0, np.float32)
        self._wav_offset = 0  # sample index of _wav[0]
        self._mels = _Rows((80, 16))
        self._exp = _Rows((EXP_DIM,))
        self._pose = _Rows((6,))
        self._smoothed = 0
        self._rows = 0  # coefficient rows released
        self._chunks = 0  # pose chunks decoded
        self._last_embeddings: torch.Tensor | None = None  # the previous chunk's, for the clip's tail chunk
        self._blinks = blink_starts(random.Random(seed), blink_gaps(LONG_CLIP))
        self._blink_queue: deque[int] = deque()
        self._noise = torch.Generator().manual_seed(seed)  # on the CPU on every device, as offline
        pose_net = audio2coeff.pose_net
        self._class_id = pose_net.style(pose_style, 1, self.device)
        self._ref_pose = torch.from_numpy(np.ascontiguousarray(reference.source[None, EXP_DIM:COEFF_DIM])).to(self.device)
        self._seq = pose_net.seq_len

    @property
    def frames(self) -> int:
        """Video frames the audio received so far covers (the clip's length once finished)."""
        return num_video_frames(self.samples)

    @property
    def released(self) -> int:
        return self._rows

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Take more audio; return the coefficient rows (n, 70) float32 that are now final."""
        if self.finished:
            raise RuntimeError("the audio stream has already ended")
        chunk = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._wav = np.concatenate([self._wav, chunk])
        self.samples += len(chunk)
        return self._advance()

    def finish(self) -> np.ndarray:
        """The audio has ended: return the remaining rows."""
        self.finished = True
        return self._advance()

    @torch.inference_mode()
    def _advance(self) -> np.ndarray:
        T = self.frames
        self._windows(T)
        self._expression(T)
        self._poses(T)
        out = self._release(T)
        self._trim()
        return out

    def _windows(self, T: int) -> None:
        start = self._mels.stop
        n = T * SAMPLES_PER_FRAME  # the cropped clip is at least this long
        stop = start
        if self.finished:
            stop = T
        else:
            while stop < T and _raw_window(stop)[1] <= n:
                stop += 1
        if stop > start:
            self._mels.append(frame_windows_from_wav(self._wav, start, stop, offset=self._wav_offset, num_samples=n))

    def _blink(self, start: int, stop: int, T: int) -> np.ndarray:
        """Blink values of frames [start, stop), all known final (see `_blink_ready`)."""
        out = np.zeros((stop - start, 1), np.float32)
        if self.finished and T < BLINK_MIN_FRAMES:
            return out
        while not self._blink_queue or self._blink_queue[-1] < stop:
            self._blink_queue.append(next(self._blinks))
        while self._blink_queue and self._blink_queue[0] + len(BLINK_SHAPE) <= start:
            self._blink_queue.popleft()
        for s in self._blink_queue:
            if s + len(BLINK_SHAPE) > T - 1:  # offline keeps blinks that end before the last frame
                break
            lo, hi = max(s, start), min(s + len(BLINK_SHAPE), stop)
            if lo < hi:
                out[lo - start : hi - start, 0] = BLINK_SHAPE[lo - s : hi - s]
        return out

    def _blink_ready(self, T: int) -> int:
        if self.finished or self.ref.eyeblink is not None:
            return T
        # A blink starting at s <= t is kept iff s + 6 <= T; knowing T >= t + 6 settles every blink over t.
        return max(T - len(BLINK_SHAPE), 0) if T >= BLINK_MIN_FRAMES else 0

    def _expression(self, T: int) -> None:
        ready = min(self._mels.stop, self._blink_ready(T))
        block = self.nets.exp_chunk
        while self._exp.stop < ready:
            start = self._exp.stop
            stop = start + block
            if stop > ready:
                if not (self.finished and ready == T):
                    return
                stop = T
            mels = windows_to_tensor(self._mels.get(start, stop)).to(self.device)
            ref = torch.from_numpy(self.ref.exp_rows(start, stop)[None]).to(self.device)
            blink = (np.zeros((stop - start, 1), np.float32) if self.ref.eyeblink is not None
                     else self._blink(start, stop, T))
            exp = self.nets.expression(mels, ref, torch.from_numpy(blink[None]).to(self.device))
            self._exp.append(exp[0].cpu().numpy())

    def _latent(self) -> torch.Tensor:
        pose_net = self.nets.pose_net
        return torch.randn(1, pose_net.latent, generator=self._noise).to(self.device)

    def _poses(self, T: int) -> None:
        L = self._seq
        if self._pose.stop == 0 and T >= 1:
            self._pose.append(self.ref.source[None, EXP_DIM:COEFF_DIM].copy())  # frame 0: the reference pose, no motion
        while True:
            first = 1 + self._chunks * L
            if T - 1 >= first - 1 + L and self._mels.stop >= first + L:  # a full chunk, whatever follows
                emb = self.nets.pose_net.encode_chunk(self._mel_tensor(first, first + L))
                motion = self.nets.pose_net.decode_chunk(emb, self._ref_pose, self._latent(), self._class_id)
                self._add_motion(motion)
                self._last_embeddings = emb
                self._chunks += 1
                continue
            if self.finished and first < T:  # the clip's tail: decoded from its last 32 frames
                emb = self.nets.pose_net.encode_chunk(self._mel_tensor(first, T))
                if self._last_embeddings is not None:
                    emb = torch.cat([self._last_embeddings, emb], dim=1)[:, -L:]
                motion = self.nets.pose_net.decode_chunk(emb, self._ref_pose, self._latent(), self._class_id)
                self._add_motion(motion[:, L - (T - first) :])
                self._chunks += 1
            return

    def _mel_tensor(self, start: int, stop: int) -> torch.Tensor:
        return windows_to_tensor(self._mels.get(start, stop)).to(self.device)

    def _add_motion(self, motion: torch.Tensor) -> None:
        self._pose.append((self._ref_pose[:, None] + motion)[0].cpu().numpy())

    def _release(self, T: int) -> np.ndarray:
        P = self._pose.stop
        if self.finished and P == T:
            ready = T
        else:
            ready = P - HALF_WINDOW if P >= SAVGOL_WINDOW else 0
        ready = min(ready, self._exp.stop)
        start = self._rows
        if ready <= start:
            return np.zeros((0, COEFF_DIM), np.float32)
        # Smooth a stretch that gives rows [start, ready) exactly their offline values: 6 neighbours each side,
        # or the clip's first / last 13 rows, which the filter's polynomial ends are fitted to.
        end = T if self.finished and ready == T else ready + HALF_WINDOW
        lo = max(0, start - HALF_WINDOW)
        if end == T:
            lo = max(0, min(lo, T - SAVGOL_WINDOW))
        hi = max(end, min(SAVGOL_WINDOW, T)) if lo == 0 else end
        pose = torch.from_numpy(self._pose.get(lo, hi)[None].copy())
        smoothed = smooth_pose(pose)[0, start - lo : ready - lo].numpy()
        rows = np.concatenate([self._exp.get(start, ready), smoothed], axis=1)
        if self.ref.pose is not None:
            ref = self.ref.pose
            rows[:, EXP_DIM:COEFF_DIM] += ref[np.arange(start, ready) % len(ref)] - ref[0]
        self._rows = ready
        return rows

    def _trim(self) -> None:
        """Drop what no later row needs: windows before the next ExpNet block and pose chunk, poses before the
        smoothing stretch, audio before the next window."""
        next_chunk = 1 + self._chunks * self._seq
        self._mels.drop_before(min(self._exp.stop, next_chunk))
        self._exp.drop_before(self._rows)
        self._pose.drop_before(min(self._rows - HALF_WINDOW, self._pose.stop - SAVGOL_WINDOW))
        keep_from = max(_raw_window(self._mels.stop)[0] - 1, 0)  # pre-emphasis reads one sample earlier
        cut = max(0, min(keep_from, self.samples) - self._wav_offset)
        if cut:
            self._wav = self._wav[cut:]
            self._wav_offset += cut
