"""CUDA checks (issue 15), marked `gpu`: `pytest -m gpu tests/test_gpu.py` on a machine with an NVIDIA GPU and a CUDA
build of torch (scripts/gpu_check.sh runs them); without one they skip. The renderer tests need no PyAV or soxr.

One CPU test (not marked) runs the benchmark's gpu suite in its tiniest CPU form, so the GPU check's benchmark is
known to run before a GPU is spent on it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xtalker.config import ConfigError, InferenceConfig

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
FRAMES = 4


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Of float frames in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def renderer_inputs(frames: int = FRAMES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundled portrait at 256 and smooth made-up coefficients: (1, 3, 256, 256), (1, 70, 27), (frames, 70, 27)."""
    import cv2

    from xtalker.render import DrivingSequence, source_image

    rgb = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    s = min(h, w)
    crop = cv2.resize(rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s], (256, 256),
                      interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    row = np.zeros(70, np.float32)
    row[:64] = rng.normal(0.0, 0.3, 64)
    t = np.arange(frames, dtype=np.float32)[:, None] / 25.0
    amplitude = np.concatenate([np.full(64, 0.4), np.full(3, 0.08), np.full(3, 0.02)]).astype(np.float32)
    coeffs = (row + amplitude * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi, 70))).astype(np.float32)
    semantics = np.ascontiguousarray(np.repeat(row[None, :, None], 27, axis=2))
    return source_image(crop), semantics, DrivingSequence(coeffs=coeffs).windows(0, frames)


def render(checkpoints: Path, precision: str, device: str, tf32: bool | None = None) -> np.ndarray:
    """(FRAMES, 3, 256, 256) float32 frames of the synthetic renderer in `precision` on `device`, in batches of 2.

    tf32: None leaves PyTorch's defaults (cuDNN convolutions in TF32 on Ampere and later: what `--precision fp32`
    gets on a GPU); False computes in true float32."""
    from xtalker.checkpoints import find_checkpoints
    from xtalker.render import Renderer

    paths = find_checkpoints(checkpoints, 256)
    renderer = Renderer.from_checkpoints(paths.packed, paths.mapping, paths.coeff_nc, precision=precision)
    for net in (renderer.kp_detector, renderer.mapping, renderer.generator):
        net.to(device)
    image, semantics, windows = renderer_inputs()
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if tf32 is not None:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with torch.inference_mode():
            source = renderer.prepare(image, semantics)
            frames = [renderer.render(source, windows[i:i + 2]).float().cpu() for i in range(0, len(windows), 2)]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return torch.cat(frames).numpy()


@pytest.fixture(scope="module")
def cpu_fp32(synthetic_checkpoints) -> np.ndarray:
    return render(synthetic_checkpoints, "fp32", "cpu")


@pytest.fixture(scope="module")
def cuda_fp32(synthetic_checkpoints) -> np.ndarray:
    return render(synthetic_checkpoints, "fp32", "cuda", tf32=False)


@pytest.mark.parametrize("tf32", [False, None], ids=["tf32-off", "pytorch-defaults"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_fp32_renderer_matches_the_cpu(synthetic_checkpoints, cpu_fp32, tf32):
    frames = render(synthetic_checkpoints, "fp32", "cuda", tf32=tf32)
    assert frames.shape == cpu_fp32.shape and np.isfinite(frames).all()
    db = psnr(frames, cpu_fp32)
    assert db >= 40.0, (f"cuda fp32 vs cpu fp32: {db:.1f} dB (cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
                        f"by default, tf32 here: {tf32})")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_half_precisions_stay_close_to_cuda_fp32(synthetic_checkpoints, cuda_fp32, precision):
    frames = render(synthetic_checkpoints, precision, "cuda")
    assert frames.shape == cuda_fp32.shape and np.isfinite(frames).all()
    db = psnr(frames, cuda_fp32)
    assert db >= 35.0, f"cuda {precision} vs cuda fp32: {db:.1f} dB"


@pytest.mark.gpu
@needs_cuda
def test_generate_on_cuda_writes_a_video(synthetic_checkpoints, tmp_path):
    av = pytest.importorskip("av", reason="PyAV is needed to write a video (carry its wheel, see scripts/gpu_check.sh)")
    pytest.importorskip("soxr", reason="soxr is needed to read the speech (carry its wheel, see scripts/gpu_check.sh)")
    from conftest import write_wav
    from xtalker.media import load_audio
    from xtalker.pipeline import generate
    from xtalker.preprocess import LandmarkBackendError, get_backend

    try:
        get_backend("auto", synthetic_checkpoints)
    except LandmarkBackendError as e:
        pytest.skip(f"no landmark backend here: {e}")
    audio = write_wav(tmp_path / "speech.wav", load_audio(SPEECH)[:16000])
    config = InferenceConfig(driven_audio=audio, source_image=PORTRAIT, checkpoint_dir=synthetic_checkpoints,
                             output=tmp_path / "out.mp4", device="cuda", precision="fp16", seed=0, batch_size=8)
    result = generate(config)
    assert result.output.is_file() and result.output.stat().st_size > 0
    with av.open(str(result.output)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    assert decoded == result.frames == 25


@pytest.mark.gpu
@needs_cuda
def test_int8_on_cuda_is_refused():
    config = InferenceConfig(driven_audio=Path("a.wav"), source_image=Path("a.png"), precision="int8", device="cuda")
    with pytest.raises(ConfigError, match="--precision int8 is a CPU path"):
        config.validate()
    if importlib.util.find_spec("av") is not None:  # the CLI's own path (it imports the pipeline, hence PyAV)
        from xtalker import cli

        args = cli.build_parser().parse_args(["--driven_audio", "a.wav", "--source_image", "a.png",
                                              "--precision", "int8", "--device", "cuda"])
        with pytest.raises(ConfigError, match="--precision int8 is a CPU path"):
            cli.config_from_args(args).validate()


@pytest.mark.slow  # a benchmark script's smoke test; scripts/gpu_check.sh runs it for real on a GPU
def test_the_gpu_benchmark_runs_on_the_cpu(synthetic_checkpoints, tmp_path):
    """`scripts/benchmark.py gpu` in its tiniest CPU form (renderer only: one frame, fp32 and the baseline)."""
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "gpu", "--device", "cpu", "--sizes", "256",
           "--frames", "1", "--precisions", "fp32", "--renderer_only", "--checkpoint_dir", str(synthetic_checkpoints),
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert {"machine", "settings", "inputs", "rows", "end_to_end", "stream", "targets", "elapsed_s"} <= set(data)
    assert data["machine"]["device"] == "cpu"
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"fp32", "baseline"}
    for r in rows.values():
        assert r["status"] == "ok" and r["size"] == 256 and r["frames"] == 1
        for key in ("s_per_frame", "fps", "speedup"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["config"], key, r[key])
        assert r["peak_mem_mb"] is None  # no GPU memory on the CPU
    assert rows["baseline"]["batch"] == 2 and rows["baseline"]["speedup"] == 1.0
    assert math.isfinite(rows["baseline"]["psnr_db"]) and rows["baseline"]["psnr_db"] > 40  # same math, other layout
    assert data["end_to_end"]["status"] == "skipped" and "renderer-only" in data["end_to_end"]["reason"]
    assert [s["status"] for s in data["stream"]] == ["skipped"]
    assert [t["status"] for t in data["targets"]] == ["not measured", "not measured", "not measured",
                                                      "met" if rows["fp32"]["speedup"] >= 5 else "missed"]
    table = (tmp_path / "gpu.md").read_text()
    assert "## Targets" in table and "| 256 | baseline | fp32 | 2 |" in table
