"""XTalker benchmarks; results go to benchmarks/results/ as JSON and a markdown table.

    python scripts/benchmark.py memory [--checkpoint_dir C] [--real 0.4 2] [--stream 10 600]

memory: peak resident memory of whole runs in fresh processes, for clips of several lengths.
  * real: the full pipeline, networks included (fp32 rendering is slow, so these clips are short);
  * stream: the full pipeline on long clips with the generator's output replaced by a constant frame,
    which measures everything that could grow with the audio (decoding, mel, coefficients, driving
    windows, streaming encode) at full length; the renderer's own memory is per batch by construction
    and shows in the real rows.
Flat memory means the long clip's peak is the short clip's peak plus about the decoded audio itself
(16 kHz float32 = 3.84 MB per minute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"
RESULTS = REPO / "benchmarks" / "results"


def _speech_of_length(seconds: float, folder: Path) -> Path:
    """The bundled speech clip repeated to `seconds`, as a 16 kHz wav."""
    import wave

    from xtalker.media import load_audio

    speech = load_audio(SPEECH)
    n = int(seconds * 16000)
    samples = np.tile(speech, -(-n // len(speech)))[:n]
    path = folder / f"speech_{seconds:g}s.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes())
    return path


def _measure_one(args: argparse.Namespace) -> dict:
    """Inside the child process: one run, then this process's peak RSS."""
    import torch

    from xtalker.config import InferenceConfig
    from xtalker.pipeline import generate
    from xtalker.renderer import Renderer

    if args.mode == "stream":
        def constant_frames(self, source, driving, *angles):
            return torch.full((len(driving), 3, source.image_size, source.image_size), 0.5)

        Renderer.render = constant_frames
    with tempfile.TemporaryDirectory() as tmp:
        audio = _speech_of_length(args.seconds, Path(tmp))
        config = InferenceConfig(driven_audio=audio, source_image=PORTRAIT, checkpoint_dir=Path(args.checkpoint_dir),
                                 output=Path(tmp) / "out.mp4", seed=0, batch_size=args.batch_size)
        start = time.perf_counter()
        result = generate(config)
        seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": args.mode, "audio_s": args.seconds, "frames": result.frames, "peak_rss_mb": round(peak_kb / 1024, 1),
            "wall_s": round(seconds, 2), "stages_s": result.profile.as_dict()["stages_s"]}


def _run_child(mode: str, seconds: float, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "_one", "--mode", mode, "--seconds", str(seconds),
           "--checkpoint_dir", str(args.checkpoint_dir), "--batch_size", str(args.batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark run failed ({mode}, {seconds} s):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    """The CPU model as the kernel reports it (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        f"Memory, {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}, batch size {machine['batch_size']}",
        "",
        "| mode | audio (s) | frames | peak RSS (MB) | growth vs shortest of its mode (MB) | wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base: dict[str, float] = {}
    for r in rows:
        base.setdefault(r["mode"], r["peak_rss_mb"])
        lines.append(f"| {r['mode']} | {r['audio_s']:g} | {r['frames']} | {r['peak_rss_mb']:.1f} | "
                     f"{r['peak_rss_mb'] - base[r['mode']]:+.1f} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def memory(args: argparse.Namespace) -> None:
    import torch

    from xtalker.synthetic import default_cache_dir, ensure_cached

    if args.checkpoint_dir is None:
        args.checkpoint_dir = ensure_cached(default_cache_dir())
    rows = [_run_child("real", s, args) for s in args.real] + [_run_child("stream", s, args) for s in args.stream]
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "batch_size": args.batch_size}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    table = _markdown(rows, machine)
    (RESULTS / "memory.md").write_text(table)
    sys.stdout.write(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    mem = sub.add_parser("memory", help="peak memory against clip length")
    mem.add_argument("--checkpoint_dir", type=Path, default=None, help="default: synthetic checkpoints in the cache")
    mem.add_argument("--real", type=float, nargs="*", default=[0.4, 2.0], help="clip lengths (s) with real rendering")
    mem.add_argument("--stream", type=float, nargs="*", default=[10.0, 600.0], help="clip lengths (s), constant frames")
    mem.add_argument("--batch_size", type=int, default=2)
    one = sub.add_parser("_one", help=argparse.SUPPRESS)
    one.add_argument("--mode", choices=("real", "stream"), required=True)
    one.add_argument("--seconds", type=float, required=True)
    one.add_argument("--checkpoint_dir", type=Path, required=True)
    one.add_argument("--batch_size", type=int, default=2)
    args = parser.parse_args()
    if args.suite == "memory":
        memory(args)
    else:
        sys.stdout.write(json.dumps(_measure_one(args)) + "\n")


if __name__ == "__main__":
    main()
