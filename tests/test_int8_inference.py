"""--precision int8 end to end: the real generator calibrated on the bundled example, quantized, compiled once and
cached; later runs (new processes) load it; frames stay close to float32.

The build takes a few minutes on a 2-core machine and happens once per test session (module fixture).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_wav

from xtalker import cli
from xtalker.config import InferenceConfig
from xtalker.media import load_audio
from xtalker.pipeline import CALIBRATION_SPEECH, TalkingHead, example_inputs
from xtalker.render import quantize as quantize

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
MIN_PSNR_DB = 33.0  # the floor; measured ~35 dB at 256 on synthetic weights


def config(ckpt: Path, cache: Path, **kw) -> InferenceConfig:
    return InferenceConfig(driven_audio=CALIBRATION_SPEECH, source_image=PORTRAIT, checkpoint_dir=ckpt, cache_dir=cache, **kw)


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture(scope="module")
def int8_head(synthetic_checkpoints, int8_cache) -> TalkingHead:
    head = TalkingHead.from_config(config(synthetic_checkpoints, int8_cache, precision="int8"))
    info = head.quantize()
    assert not info.from_cache and info.path.parent == int8_cache
    return head


def test_int8_frames_stay_close_to_fp32(int8_head, synthetic_checkpoints, int8_cache):
    fp32 = TalkingHead.from_config(config(synthetic_checkpoints, int8_cache))
    # Other frames and another voice than the calibration's: the tail of the clip, pitched up by resampling.
    speech = load_audio(CALIBRATION_SPEECH)
    inputs = example_inputs(fp32, PORTRAIT, speech[::-1][::2].copy(), seed=3)
    windows = inputs.sequence.windows(0, 4)
    frames = {}
    for name, head in (("fp32", fp32), ("int8", int8_head)):
        with torch.inference_mode():
            source = head.renderer.prepare(inputs.image, inputs.semantics)
            frames[name] = head.renderer.render(source, windows).float()
    assert int8_head.renderer.precision == "int8" and frames["int8"].shape == (4, 3, 256, 256)
    mse = ((frames["int8"] - frames["fp32"]) ** 2).flatten(1).mean(1)
    psnr = (10 * torch.log10(1 / mse)).tolist()
    assert min(psnr) >= MIN_PSNR_DB, psnr
    assert not torch.equal(frames["int8"], frames["fp32"])  # it is not silently running float32


def test_second_run_loads_the_compiled_graph(int8_head, synthetic_checkpoints, int8_cache, tmp_path):
    """A new process with the same checkpoint, size and settings: no calibration, quantization or compilation."""
    wav = write_wav(tmp_path / "two_frames.wav", load_audio(CALIBRATION_SPEECH)[4000 : 4000 + 2 * 640 + 100])
    out, report = tmp_path / "int8.mp4", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "inference.py"), "--driven_audio", str(wav), "--source_image", str(PORTRAIT),
         "--checkpoint_dir", str(synthetic_checkpoints), "--precision", "int8", "--cache_dir", str(int8_cache),
         "--output", str(out), "--report", str(report), "--seed", "1"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["int8"]["from_cache"] is True and data["int8"]["artifact"] == str(int8_head.int8.path)
    assert data["settings"]["precision"] == "int8" and data["frames"] == 2
    assert "int8 graph" in data["profile"]["stages_s"] and out.stat().st_size > 0
    assert "quantizing and compiling" not in proc.stderr
    # Quiet by default: torch's FutureWarnings and torchao's "no triton" stay out; only XTalker's own lines.
    assert all(line.startswith("WARNING xtalker") for line in proc.stderr.splitlines()), proc.stderr


def test_int8_with_no_compile_is_refused(tmp_path, synthetic_checkpoints, capsys):
    out = tmp_path / "x.mp4"
    code = cli.main(["--driven_audio", str(CALIBRATION_SPEECH), "--source_image", str(PORTRAIT), "--checkpoint_dir",
                     str(synthetic_checkpoints), "--precision", "int8", "--no-compile", "--output", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    assert err.startswith("error: ") and "--no-compile" in err and "bf16" in err


def test_int8_without_a_quantization_library_says_what_to_install(tmp_path, synthetic_checkpoints, monkeypatch, capsys):
    def unavailable():
        raise quantize.QuantizationUnavailableError(f"--precision int8 needs a quantization library: {quantize.INSTALL_HINT}")

    monkeypatch.setattr(quantize, "backend", unavailable)
    out = tmp_path / "x.mp4"
    code = cli.main(["--driven_audio", str(CALIBRATION_SPEECH), "--source_image", str(PORTRAIT), "--checkpoint_dir",
                     str(synthetic_checkpoints), "--precision", "int8", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert err.count("\n") == 1 and "neural-compressor" in err and err.startswith("error: ")


def test_flyte_ships_the_graph_to_every_shard(int8_head, synthetic_checkpoints, int8_cache, local_flyte, monkeypatch,
                                             tmp_path):
    """The Flyte workflow at int8: prepare loads the graph from the pod's cache and each render task loads the job
    folder's copy; nothing is rebuilt, and the video equals the CLI's (same threads: the graph is built for them)."""
    flyte = pytest.importorskip("xtalker.parallel.flyte", reason="the flyte extra is not installed")
    from xtalker.media import iter_video_frames

    def rebuilt(*args, **kwargs):
        raise AssertionError("the int8 graph was rebuilt")

    threads = torch.get_num_threads()  # the fixture's graph was built for this count
    wav = write_wav(tmp_path / "four_frames.wav", load_audio(CALIBRATION_SPEECH)[4000 : 4000 + 4 * 640 + 100])
    out = tmp_path / "cli.mp4"
    subprocess.run([sys.executable, str(REPO / "inference.py"), "--driven_audio", str(wav), "--source_image",
                    str(PORTRAIT), "--checkpoint_dir", str(synthetic_checkpoints), "--precision", "int8",
                    "--cache_dir", str(int8_cache), "--output", str(out), "--seed", "5", "--batch_size", "1",
                    "--threads", str(threads)], check=True, capture_output=True)
    monkeypatch.setenv("XTALKER_CACHE_DIR", str(int8_cache))
    monkeypatch.setattr(quantize, "_build", rebuilt)
    video = flyte.talking_head(source_image=str(PORTRAIT), driven_audio=str(wav), precision="int8",
                               checkpoint_dir=str(synthetic_checkpoints), seed=5, batch_size=1, threads=threads,
                               shards=2)
    graph = int8_head.int8.path
    shipped = sorted(p.name for p in local_flyte.glob("xtalker-render-*/*/compiled/*"))
    assert shipped == sorted([graph.name, graph.with_suffix(".json").name] * 2)
    got, expected = (np.stack(list(iter_video_frames(p)[1])) for p in (Path(video.path), out))
    assert np.array_equal(got, expected)


def test_a_head_knows_whether_its_graph_is_cached(int8_head, synthetic_checkpoints, tmp_path):
    """What `xtalker doctor --quick` asks before measuring int8: load (seconds) or build (minutes)?"""
    empty_cache = TalkingHead.from_config(config(synthetic_checkpoints, tmp_path, precision="int8"))
    assert int8_head.int8_cached() and not empty_cache.int8_cached()
