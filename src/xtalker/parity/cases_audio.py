"""Parity runners for the audio stages: the mel front end and audio -> coefficients."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch

from xtalker.parity.core import Case, Check, Context, exact, max_abs
from xtalker.speech import Audio2Coeff
from xtalker.speech import audio as audio
from xtalker.speech.audio2coeff import EXP_DIM, savgol_window

# README section 4 tolerances.
TOL_MEL_BASIS = 1e-7
TOL_MEL = 1e-6
TOL_WINDOWS = 1e-5
TOL_WAVEFORM = 1e-12
TOL_EXP = 1e-4
TOL_POSE = 1e-5


def _require(case: Case, key: str, expected: float | int, actual: float | int) -> None:
    value = case.meta.get(key, expected)
    if value != expected:
        raise ValueError(f"case {key}={value} is not supported (front end is fixed at {expected}); ours is {actual}")


def run_audio_mel(case: Case, ctx: Context) -> list[Check]:
    _require(case, "sample_rate", audio.SAMPLE_RATE, audio.SAMPLE_RATE)
    _require(case, "fps", audio.FPS, audio.FPS)
    keys = set(case.keys())
    if "input.wav_f32" in keys:
        wav = case.array("input.wav_f32")
    else:
        wav = case.array("input.pcm16").astype(np.float32) / np.float32(32768)

    T = audio.num_video_frames(len(wav))
    cropped = audio.crop_to_frames(wav)
    emphasized = audio.preemphasis(cropped)
    mel = audio.mel_columns(emphasized)
    windows = audio.frame_windows(mel, 0, T)
    candidates: dict[str, Callable[[np.ndarray], Check]] = {
        "out.num_frames_i64": lambda e: exact("num_frames", np.array([T], dtype=np.int64), e),
        "out.wav_cropped_f32": lambda e: max_abs("wav_cropped", cropped, e, TOL_WAVEFORM),
        "out.preemphasized_f64": lambda e: max_abs("preemphasized", emphasized, e, TOL_WAVEFORM),
        "out.mel_basis_f32": lambda e: max_abs("mel_basis", audio.mel_basis(), e, TOL_MEL_BASIS),
        "out.mel_f64": lambda e: max_abs("mel", mel, e, TOL_MEL),
        "out.window_index_i64": lambda e: exact("window_index", audio.window_indices(0, T, mel.shape[1]), e),
        "out.indiv_mels_f32": lambda e: max_abs("indiv_mels", windows, e, TOL_WINDOWS),
    }
    return [check(case.array(key)) for key, check in candidates.items() if key in keys]


def _indexed(case: Case, prefix: str) -> list[str]:
    """Keys `prefix{i}` sorted by i."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    found = [(int(m.group(1)), k) for k in case.keys() if (m := pattern.match(k))]
    return [k for _, k in sorted(found)]


def run_audio2coeff(case: Case, ctx: Context) -> list[Check]:
    weights = ctx.packed_file(case)
    stage = Audio2Coeff(ctx.network("audio2exp", weights), ctx.network("audio2pose", weights))
    mels = case.tensor("input.indiv_mels")
    T = mels.shape[1]
    if "num_frames" in case.meta and int(case.meta["num_frames"]) != T:
        raise ValueError(f"metadata num_frames {case.meta['num_frames']} != input frames {T}")
    keys = set(case.keys())
    style = case.tensor("input.class_id") if "input.class_id" in keys else int(case.meta["pose_style"])
    zs = [case.tensor(k) for k in _indexed(case, "input.z_chunk")]
    pred = stage.predict(mels, case.tensor("input.ref"), case.tensor("input.ratio"), style, zs)

    checks: list[Check] = []
    if "savgol_window" in case.meta:
        checks.append(exact("savgol_window", np.array(savgol_window(T)), np.array(int(case.meta["savgol_window"]))))
    outputs = {
        "out.exp_coeff_pred": (pred.exp, TOL_EXP),
        "out.pose_motion_pred": (pred.pose_motion, TOL_POSE),
        "out.pose_pred": (pred.pose, TOL_POSE),
        "out.pose_pred_savgol": (pred.pose_smoothed, TOL_POSE),
    }
    for key, (actual, tol) in outputs.items():
        if key in keys:
            checks.append(max_abs(key[len("out."):], actual, case.tensor(key), tol))
    for i, key in enumerate(_indexed(case, "out.audio_emb_chunk")):
        actual = pred.audio_embeddings[i] if i < len(pred.audio_embeddings) else torch.empty(0)
        checks.append(max_abs(key[len("out."):], actual, case.tensor(key), TOL_EXP))
    if "out.coeffs_pred_70" in keys:
        expected = case.tensor("out.coeffs_pred_70")
        checks.append(max_abs("coeffs_pred_70.exp", pred.coeffs[..., :EXP_DIM], expected[..., :EXP_DIM], TOL_EXP))
        checks.append(max_abs("coeffs_pred_70.pose", pred.coeffs[..., EXP_DIM:], expected[..., EXP_DIM:], TOL_POSE))
    return checks


RUNNERS: dict[str, Callable[[Case, Context], list[Check]]] = {
    "audio_mel": run_audio_mel,
    "audio2coeff": run_audio2coeff,
}
