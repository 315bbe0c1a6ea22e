"""XTalker benchmarks; results go to benchmarks/results/ as JSON and a markdown table.

    python scripts/benchmark.py speed [--frames 8] [--configs baseline fp32 bf16 ...] [--checkpoint_dir C]
    python scripts/benchmark.py memory [--checkpoint_dir C] [--real 0.4 2] [--stream 10 600]
    python scripts/benchmark.py blend [--repeats 50]
    python scripts/benchmark.py enhance [--frames 4] [--precisions fp32 bf16 int8]
    python scripts/benchmark.py presets [--frames 4] [--presets quality balanced ...]
    python scripts/benchmark.py landmarks [--repeats 3]
    python scripts/benchmark.py parallel [--frames 24] [--precision bf16] [--checkpoint_dir C]
    python scripts/benchmark.py serve [--videos 10] [--frames 4] [--precision bf16] [--checkpoint_dir C]
    python scripts/benchmark.py gpu [--device cuda] [--sizes 256,512] [--precisions fp32,fp16,bf16] [--out DIR]

speed: the same driving inputs (from the bundled example) through each renderer configuration, each in a
  fresh process: seconds per frame, speedup against the fp32 eager batch-2 baseline with upstream's work
  split (source work redone on batch copies every batch) measured in the same run, PSNR and max abs
  difference against our fp32 frames, achieved GFLOP/s (counted FLOPs / time) and its share of a matmul
  peak measured in the same run, peak RSS, real-time factor, and the first batch's extra time (compile /
  quantize). Writes speed.json, speed.md and speed.png.

presets: each preset of configs/presets.yaml as whole CLI runs (fresh processes, crop 256, the bundled example,
  caches warmed by a first run): seconds one more frame costs (an N-frame run against a 1-frame run), the rest of a
  run after loading as a per-video cost, and PSNR of its frames against the same settings in fp32 (its
  renderer and enhancers, only the precision changed; `quality` is the fp32 reference itself). Also writes
  src/xtalker/data/presets_measured.json, which `--list_presets` shows with the machine named.

parallel: whole CLI runs (fresh processes) over a grid of core slots x threads per slot, with
  `--workers` for more than one slot: wall time and speedup against one process using every core.

serve: many short videos, as upstream's users make them (a shell loop of `inference.py` runs, each loading
  every network) against `xtalker batch` over the same list (one load): wall time of each, seconds of
  overhead per video, and what each batch video loaded.

gpu: issue 15 on a CUDA GPU, in one process (torch.compile in a child with a timeout): per size and precision,
  renderer s/frame and fps at a batch (warm-up excluded), PSNR against fp32 frames of the same inputs, peak GPU
  memory, speedup against upstream's computation measured in the same run (official-layout generator, fp32,
  eager, batch 2, source work per batch); rows for cudnn.benchmark, channels-last and torch.compile; a whole
  `generate` run with encode (skipped without PyAV: renderer-only mode, also `--renderer_only`); first-frame latency
  and sustained fps of `XTalker.stream`; the issue's targets as a checklist, and torch.profiler's top kernels when
  one is missed. `--device cpu --sizes 256 --frames 1 --precisions fp32` is a smoke test. Writes gpu.json, gpu.md.

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
import shutil
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


def _write_results(name: str, data: dict, table: str, folder: Path | None = None, echo: bool = True) -> None:
    """benchmarks/results/NAME.json and NAME.md (or in `folder`); the table also goes to stdout unless `echo` is off."""
    folder = RESULTS if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / f"{name}.md").write_text(table)
    if echo:
        sys.stdout.write(table)


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
    from xtalker.render import Renderer

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
    _write_results("memory", {"machine": machine, "rows": rows}, _markdown(rows, machine))


# ---------------------------------------------------------------------------------------------- speed

SPEED_CONFIGS = {
    # name: (precision, batch size, upstream's work (facevid2vid: official-layout generator, source work redone every
    # batch; PIRender: the source work redone every batch), renderer)
    "baseline": ("fp32", 2, True, "facevid2vid"),
    "fp32": ("fp32", 2, False, "facevid2vid"),
    "bf16-b1": ("bf16", 1, False, "facevid2vid"),
    "bf16": ("bf16", 2, False, "facevid2vid"),
    "int8-cold": ("int8", 2, False, "facevid2vid"),  # with an empty cache: calibrates, quantizes and compiles first
    "int8": ("int8", 2, False, "facevid2vid"),  # a later run: the compiled graph comes from the cache
    "int8-b1": ("int8", 1, False, "facevid2vid"),
    "pirender-upstream": ("fp32", 2, True, "pirender"),
    "pirender-fp32": ("fp32", 2, False, "pirender"),
    "pirender-bf16-b1": ("bf16", 1, False, "pirender"),
    "pirender-bf16": ("bf16", 2, False, "pirender"),
    "pirender-fp32-compiled": ("fp32", 2, False, "pirender-compiled"),
    "pirender-bf16-compiled": ("bf16", 2, False, "pirender-compiled"),
}
TARGETS = {"bf16": (4.0, 40.0), "int8": (6.0, 33.0)}  # facevid2vid precision: (speedup, PSNR dB)
PIRENDER_TARGET = (5.0, 40.0)  # fastest PIRender setting: (x faster than the fastest facevid2vid bf16 row, PSNR dB)
REFERENCE = {"facevid2vid": "fp32", "pirender": "pirender-fp32"}  # each renderer's fidelity is against its own fp32 eager


def _head(checkpoint_dir: Path, precision: str = "fp32", cache_dir: Path | None = None, facerender: str = "facevid2vid"):
    """The networks as the CLI builds them for a crop-mode 256 run."""
    from xtalker.checkpoints import find_checkpoints
    from xtalker.pipeline import Setting, TalkingHead
    from xtalker.preprocess import get_backend

    compiled = facerender == "pirender-compiled"  # PIRender through torch.compile, as the CLI runs it by default
    paths = find_checkpoints(checkpoint_dir, facerender="pirender" if compiled else facerender)
    return TalkingHead(Setting(paths, precision, cache_dir=cache_dir, compile=compiled), get_backend("auto", checkpoint_dir))


def _speed_inputs(checkpoint_dir: Path, frames: int, folder: Path, pirender: bool = False) -> Path:
    """Source crop, source semantics and `frames` driving windows from the bundled example (and PIRender's 73-channel
    windows of the same clip), saved once."""
    from xtalker.media import load_audio
    from xtalker.pipeline import example_inputs

    wav = load_audio(_speech_of_length(frames / 25 + 0.1, folder))
    inputs = example_inputs(_head(checkpoint_dir), PORTRAIT, wav)
    arrays = {"image": inputs.image, "semantics": inputs.semantics, "windows": inputs.sequence.windows(0, frames)}
    if pirender:
        arrays["pirender_windows"] = example_inputs(_head(checkpoint_dir, facerender="pirender"), PORTRAIT,
                                                    wav).sequence.windows(0, frames)
    path = folder / "inputs.npz"
    np.savez(path, **arrays)
    return path


def _flops_per_frame(checkpoint_dir: Path, inputs: Path, facerender: str = "facevid2vid") -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of one frame's renderer work, and of the per-video source work."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    data = np.load(inputs)
    renderer = _head(checkpoint_dir, facerender=facerender).renderer
    windows = data["pirender_windows" if facerender == "pirender" else "windows"]
    with torch.inference_mode():
        with FlopCounterMode(display=False) as source_count:
            source = renderer.prepare(data["image"], data["semantics"])
        with FlopCounterMode(display=False) as frame_count:
            renderer.render(source, windows[:1])
    return {"frame": float(frame_count.get_total_flops()), "source": float(source_count.get_total_flops())}


def _matmul_peak(dtype_name: str, seconds: float = 1.5, device: str = "cpu", n: int = 2048) -> float:
    """Sustained GFLOP/s of a large square matmul in this process's thread setting (or on a CUDA `device`)."""
    import torch

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    if dtype_name == "int8":
        a = torch.randint(-100, 100, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-100, 100, (n, n), dtype=torch.int8, device=device)

        def op():
            return torch._int_mm(a, b)
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

        def op():
            return a @ b
    op()
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        op()
        sync()
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def _official_layout_generator(packed: Path):
    """The generator as upstream runs it: BatchNorms, three separate SPADE label convs, full-size convs."""
    from xtalker.checkpoints import read_packed
    from xtalker.models.generator import Generator, fold_spectral_norm

    model = Generator()
    model.load_state_dict(fold_spectral_norm(read_packed(packed, "generator")), strict=True)
    return model.eval()


def _speed_one(args: argparse.Namespace) -> dict:
    """Inside the child process: render the frames with one configuration; save them for comparison."""
    import torch

    from xtalker.render import to_uint8

    precision, batch, per_batch_source, facerender = SPEED_CONFIGS[args.config]
    data = np.load(args.inputs)
    windows = data["windows" if facerender == "facevid2vid" else "pirender_windows"][: args.frames]
    start = time.perf_counter()
    head = _head(args.checkpoint_dir, precision, args.cache_dir, facerender)
    load_s = time.perf_counter() - start
    renderer = head.renderer
    if per_batch_source and facerender == "facevid2vid":
        renderer.generator = _official_layout_generator(head.paths.packed)
    start = time.perf_counter()
    int8 = head.quantize()
    setup_s = time.perf_counter() - start
    image = data["image"]

    def prepare():
        if per_batch_source:
            # Upstream's split: keypoints, source mapping and appearance features recomputed on `batch` copies.
            for _ in range(batch):
                src = renderer.prepare(image, data["semantics"])
            return src
        return renderer.prepare(image, data["semantics"])

    outputs = []
    with torch.inference_mode():
        start = time.perf_counter()
        source = prepare()
        renderer.render(source, windows[:batch])
        first_s = time.perf_counter() - start  # includes any compile / quantize on first use
        start = time.perf_counter()
        if not per_batch_source:
            source = prepare()
        for i in range(0, len(windows), batch):
            if per_batch_source:
                source = prepare()
            outputs.append(renderer.render(source, windows[i : i + batch]).float())
        seconds = time.perf_counter() - start
    frames = torch.cat(outputs).numpy()
    np.save(Path(args.out) / f"{args.config}.npy", frames)
    return {
        "config": args.config, "renderer": facerender.split("-")[0], "compiled": facerender.endswith("compiled"), "precision": precision, "batch_size": batch, "frames": len(frames),
        "s_per_frame": seconds / len(frames), "first_batch_s": first_s, "load_s": load_s, "setup_s": setup_s,
        "compiled_from_cache": None if int8 is None else int8.from_cache,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "u8_checksum": int(to_uint8(torch.from_numpy(frames)).astype(np.int64).sum()),
    }


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _speed_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Renderer speed at 256, {result['frames']} frames, {m['cpu']} ({m['cores']} cores, {m['threads']} threads), "
        f"torch {m['torch']}, synthetic weights. Peaks measured in the same run: fp32 {m['peak_gflops']['fp32']:.0f}, "
        f"bf16 {m['peak_gflops']['bf16']:.0f}, int8 {m['peak_gflops']['int8']:.0f} G(FL)OP/s (2048^2 matmul).",
        "",
        "| config | precision | batch | s/frame | speedup | PSNR vs fp32 (dB) | max abs | GFLOP/s | % of peak | peak RSS (MB) | RTF | setup (s) | first batch extra (s) | target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        target = r.get("target", "")
        lines.append(
            f"| {r['config']} | {r['precision']} | {r['batch_size']} | {r['s_per_frame']:.2f} | {r['speedup']:.2f}x | "
            f"{r['psnr_db']:.1f} | {r['max_abs']:.3g} | {r['gflops']:.0f} | {100 * r['peak_fraction']:.0f} % | "
            f"{r['peak_rss_mb']:.0f} | {r['rtf']:.1f} | {r['setup_s']:.1f} | {r['first_extra_s']:.1f} | {target} |"
        )
    lines += ["", "speedup: against `baseline` (upstream's computation: fp32 eager, batch 2, official-layout generator with BatchNorms and full-size SPADE convs, source work redone on batch copies every batch); "
              "pirender-*: `--facerender pirender` (PIRender's FaceGenerator), PSNR against pirender-fp32 on the [0, 1]-clipped "
              "pictures written, pirender-upstream = its source work redone every batch (upstream also computes a discarded "
              "branch, not counted here); bf16 for PIRender = its editing net only; *-compiled: torch.compile (the CLI's default "
              "for PIRender; its one-off compile time is in `first batch extra`: about a minute the first time on a machine, "
              "~7 s once Inductor's cache holds it); "
              "RTF: seconds of compute per second of video (25 fps); setup: int8 calibration, quantization and "
              "compilation (int8-cold, empty cache) or loading the compiled graph from the cache; first batch extra: time of the "
              "first batch beyond a steady one (compilation, quantization, caches)."]
    return "\n".join(lines) + "\n"


def _speed_chart(result: dict, path: Path) -> None:
    """Horizontal bars of s/frame per configuration, drawn with OpenCV (no plotting dependency)."""
    import cv2

    rows = result["rows"]
    width, bar_h, left = 900, 34, 150
    img = np.full((60 + bar_h * len(rows) + 30, width, 3), 255, np.uint8)
    cv2.putText(img, "seconds per frame at 256 (lower is better)", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2)
    worst = max(r["s_per_frame"] for r in rows)
    for i, r in enumerate(rows):
        y = 50 + i * bar_h
        length = int((width - left - 230) * r["s_per_frame"] / worst)
        colour = {"fp32": (180, 120, 60), "bf16": (60, 160, 60), "int8": (40, 90, 220)}[r["precision"]]
        cv2.rectangle(img, (left, y + 4), (left + length, y + bar_h - 4), colour, -1)
        cv2.putText(img, r["config"], (10, y + 23), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
        label = f"{r['s_per_frame']:.2f} s  {r['speedup']:.1f}x  {r['psnr_db']:.1f} dB"
        cv2.putText(img, label, (left + length + 8, y + 23), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)


def _pirender_target(rows: list[dict]) -> None:
    """Marks the fastest PIRender row that keeps PIRENDER_TARGET's PSNR against the fastest facevid2vid bf16 row."""
    need_x, need_db = PIRENDER_TARGET
    fast = [r for r in rows if r["renderer"] == "pirender" and r["psnr_db"] >= need_db]
    bf16 = [r for r in rows if r["renderer"] == "facevid2vid" and r["precision"] == "bf16"]
    if not fast or not bf16:
        return
    best, other = min(fast, key=lambda r: r["s_per_frame"]), min(bf16, key=lambda r: r["s_per_frame"])
    ratio = other["s_per_frame"] / best["s_per_frame"]
    best["target"] = (f"{'met' if ratio >= need_x else 'MISSED'}: {ratio:.1f}x faster than {other['config']} "
                      f"(>= {need_x:g}x, >= {need_db:g} dB)")


def speed(args: argparse.Namespace) -> None:
    import torch

    from xtalker.synthetic import default_cache_dir, ensure_cached, ensure_pirender

    if args.checkpoint_dir is None:
        args.checkpoint_dir = ensure_cached(default_cache_dir())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pirender = any(SPEED_CONFIGS[name][3] != "facevid2vid" for name in args.configs)
        if pirender:
            ensure_pirender(args.checkpoint_dir)
        inputs = _speed_inputs(args.checkpoint_dir, args.frames, folder, pirender)
        flops = {r: _flops_per_frame(args.checkpoint_dir, inputs, r) for r in ("facevid2vid", "pirender")[: 1 + pirender]}
        peaks = {name: _matmul_peak(name) for name in ("fp32", "bf16", "int8")}
        rows = []
        for name in args.configs:
            cache = folder / "compiled"  # the benchmark's own: a user's cache is neither used nor changed
            if name == "int8-cold":
                shutil.rmtree(cache, ignore_errors=True)
            cmd = [sys.executable, __file__, "_speed", "--config", name, "--inputs", str(inputs), "--frames",
                   str(args.frames), "--checkpoint_dir", str(args.checkpoint_dir), "--out", tmp, "--cache_dir", str(cache)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.stderr.write(f"{name}: failed, left out: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}\n")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        base = next((r for r in rows if r["config"] == "baseline"), None)
        for r in rows:
            # Fidelity on the pictures written: PIRender's tanh output has its negative half clipped to 0.
            frames = np.clip(np.load(folder / f"{r['config']}.npy"), 0, 1)
            ref_path = folder / f"{REFERENCE[r['renderer']]}.npy"
            reference = np.clip(np.load(ref_path), 0, 1) if ref_path.is_file() else None
            r["psnr_db"] = _psnr(frames, reference) if reference is not None else float("nan")
            r["max_abs"] = float(np.abs(frames - reference).max()) if reference is not None else float("nan")
            r["speedup"] = base["s_per_frame"] / r["s_per_frame"] if base else float("nan")
            per_batch_source = SPEED_CONFIGS[r["config"]][2]
            work = flops[r["renderer"]]["frame"] + (flops[r["renderer"]]["source"] if per_batch_source else 0.0)
            r["gflops"] = work / r["s_per_frame"] / 1e9
            r["peak_fraction"] = r["gflops"] / peaks[r["precision"]]
            r["rtf"] = r["s_per_frame"] * 25
            r["first_extra_s"] = max(0.0, r["first_batch_s"] - r["s_per_frame"] * r["batch_size"])
            if r["renderer"] == "facevid2vid" and r["precision"] in TARGETS:
                need_x, need_db = TARGETS[r["precision"]]
                met = r["speedup"] >= need_x and r["psnr_db"] >= need_db
                r["target"] = f"{'met' if met else 'MISSED'} (>= {need_x:g}x, >= {need_db:g} dB)"
        _pirender_target(rows)
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "peak_gflops": peaks},
        "frames": args.frames, "flops_per_frame": flops, "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _speed_markdown(result)
    (RESULTS / f"{args.name}.md").write_text(table)
    _speed_chart(result, RESULTS / f"{args.name}.png")
    sys.stdout.write(table)


# ---------------------------------------------------------------------------------------------- blend

def blend(args: argparse.Namespace) -> None:
    """Paste-back cost per frame and mean difference against `seamless`, on the bundled portrait's real paste box
    (full mode) with its crop, brightened and blurred, standing in for a rendered frame."""
    import cv2

    from xtalker.finish import BLENDS, paste_target
    from xtalker.finish.paste import Paster
    from xtalker.media import first_frame
    from xtalker.preprocess import get_backend
    from xtalker.preprocess.crop import crop_source

    picture = first_frame(PORTRAIT)
    crop = crop_source(picture, get_backend("auto", None).detect(picture)[0].landmarks, mode="full", pic_size=256)
    target = paste_target(picture, crop.info, crop.geometry, extended=False)
    face = cv2.GaussianBlur(cv2.convertScaleAbs(crop.image, alpha=1.0, beta=25), (0, 0), 1.0)
    y1, y2, x1, x2 = target.box
    reference = Paster(target, "seamless")(face)[y1:y2, x1:x2].astype(np.float64)
    rows = []
    for method in BLENDS:
        paste = Paster(target, method)
        out = paste(face)
        start = time.perf_counter()
        for _ in range(args.repeats):
            paste(face)
        rows.append({"blend": method, "ms_per_frame": 1000 * (time.perf_counter() - start) / args.repeats,
                     "mean_abs_vs_seamless": float(np.abs(out[y1:y2, x1:x2] - reference).mean())})
    machine = {"cpu": cpu_name(), "picture_wh": [picture.shape[1], picture.shape[0]], "box_wh": list(target.size_wh)}
    lines = [f"Paste-back of one 256 px frame into the {picture.shape[1]}x{picture.shape[0]} bundled portrait (box "
             f"{target.size_wh[0]}x{target.size_wh[1]}), {machine['cpu']}, {args.repeats} repeats.", "",
             "| blend | ms/frame | mean abs difference vs seamless (levels, in the box) |", "| --- | ---: | ---: |"]
    lines += [f"| {r['blend']} | {r['ms_per_frame']:.2f} | {r['mean_abs_vs_seamless']:.2f} |" for r in rows]
    _write_results("blend", {"machine": machine, "rows": rows}, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- enhance

def _stand_in_frames(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """`count` 256 px face crops of the bundled portrait (slightly shifted each, like rendered frames), the source
    face's 5 points in them, the 512 px portrait and the face's paste box (y1, y2, x1, x2) in it."""
    from xtalker.finish import five_points
    from xtalker.media import first_frame
    from xtalker.preprocess import get_backend
    from xtalker.preprocess.crop import crop_source

    picture = first_frame(PORTRAIT)
    backend = get_backend("mediapipe", None)
    crop = crop_source(picture, backend.detect(picture)[0].landmarks, mode="crop", pic_size=256)
    points = five_points(backend.detect(crop.image)[0].landmarks)
    frames = np.stack([np.roll(crop.image, i, axis=1) for i in range(count)])
    return frames, points, picture, crop.info.paste_box()


def _pasted(frames: np.ndarray, picture: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The full-mode frames: each crop pasted into the picture at `box` (a plain paste: the blend is not timed)."""
    import cv2

    y1, y2, x1, x2 = box
    out = np.repeat(picture[None], len(frames), axis=0)
    for i, f in enumerate(frames):
        out[i, y1:y2, x1:x2] = cv2.resize(f, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    return out


def _time_batches(fn, frames: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Seconds per frame over all frames in batches (after one warm-up batch) and the last outputs."""
    fn(frames[:batch], 0)
    start = time.perf_counter()
    outs = [fn(frames[i : i + batch], i) for i in range(0, len(frames), batch)]
    return (time.perf_counter() - start) / len(frames), np.concatenate(outs)


def _enhance_precisions() -> tuple[str, ...]:
    from xtalker.render import QuantizationUnavailableError, quantize

    try:
        quantize.check_available()
    except QuantizationUnavailableError:
        return ("fp32", "bf16")
    return ("fp32", "bf16", "int8")


def enhance(args: argparse.Namespace) -> None:
    """Per-frame cost of each enhancer mode, synthetic weights, against upstream's procedure in the same run.

    Crop rows: 256 px frames (output 512). `detect` rows time upstream's whole procedure with the face found
    (random detector weights score below its 0.97 threshold, so the detector's time is measured on the frame and the
    rest runs on the source face's points). Background rows: the full mode's 512 px picture with the face pasted in;
    upstream runs RealESRGAN on every whole frame, XTalker on the picture once per video (reported apart) and on the
    face box per frame."""
    from xtalker.finish.background import BackgroundUpsampler, RestoreFormerRestorer, StillBackground
    from xtalker.finish.int8 import enhancer_precision
    from xtalker.finish.enhance import (
        DetectedFaces,
        DetectingEnhancer,
        Restorer,
        Sharpener,
        SourceAlignedEnhancer,
        enhance_detected,
    )
    from xtalker.synthetic import default_aux_dir, ensure_restorers
    from xtalker.synthetic.auxiliary import ensure_all_aux

    folder = ensure_restorers(ensure_all_aux(args.aux_dir or default_aux_dir()))
    frames, points, picture, box = _stand_in_frames(args.frames)
    full = _pasted(frames, picture, box)
    rows, outputs = [], {}

    def add(mode: str, precision: str, fn, batch: int, inputs: np.ndarray = frames, **extra) -> None:
        seconds, out = _time_batches(fn, inputs, batch)
        outputs[(mode, precision)] = out
        rows.append({"mode": mode, "precision": precision, "batch": batch, "ms_per_frame": 1000 * seconds,
                     "out_wh": [int(out.shape[2]), int(out.shape[1])], **extra})

    def detecting(upstream: DetectingEnhancer, background=None):
        faces = DetectedFaces(points[None], np.zeros((1, 5), np.float32))

        def run(batch: np.ndarray, first: int) -> np.ndarray:
            bgr = np.ascontiguousarray(batch[..., ::-1])
            upstream.faces(list(bgr))  # the detector's work on every frame
            out = [enhance_detected(f, faces, lambda c, k=first + i: upstream.restorer(c, [(k, 0)]), upstream.parse,
                                    background=background) for i, f in enumerate(bgr)]
            return np.stack(out)[..., ::-1]

        return run

    def on_rgb(fn):
        """A BGR canvas function as an enhancer stage on RGB frames (the background alone, at twice the size)."""
        return lambda batch, first: np.stack([fn(np.ascontiguousarray(f[..., ::-1]), (2 * f.shape[1], 2 * f.shape[0]))
                                              [..., ::-1] for f in batch])

    add("lightweight", "-", Sharpener(), 2)
    available = _enhance_precisions()
    for precision in [p for p in args.precisions or available if p in available]:
        gfpgan = Restorer(folder / "GFPGANv1.4.pth", precision, seed=0)
        restorers = [("gfpgan", gfpgan)]
        if precision == "int8":  # int8 runs RestoreFormer and RealESRGAN in bf16 (finish.int8.ENHANCER_INT8)
            restorers = [(n, r) for n, r in restorers if enhancer_precision(n, "int8", "cpu") == "int8"]
        else:
            restorers.append(("RestoreFormer", RestoreFormerRestorer(folder / "RestoreFormer.pth", precision)))
        for name, restorer in restorers:
            add(f"{name} source", precision, SourceAlignedEnhancer(restorer, points, (256, 256)), 2)
            add(f"{name} source, --enhance_scale 1", precision, SourceAlignedEnhancer(restorer, points, (256, 256), 1), 2)
            upstream = DetectingEnhancer(restorer, folder / "detection_Resnet50_Final.pth",
                                         folder / "parsing_parsenet.pth", precision)
            add(f"{name} detect" + (" (upstream)" if name == "gfpgan" else ""), precision, detecting(upstream), 1)
        if precision == "int8" and enhancer_precision("realesrgan", "int8", "cpu") != "int8":
            continue
        background = BackgroundUpsampler(folder / "RealESRGAN_x2plus.pth", precision)
        add("realesrgan, crop mode: whole 256 frame", precision, on_rgb(background), 1)
        add("realesrgan, full mode, upstream: whole 512 frame", precision, on_rgb(background), 1, full)
        start = time.perf_counter()
        still = StillBackground(background, np.ascontiguousarray(picture[..., ::-1]), box)
        once = time.perf_counter() - start
        add("realesrgan, full mode: face box per frame", precision, on_rgb(still), 1, full,
            once_per_video_s=round(once, 2))
        upstream = DetectingEnhancer(gfpgan, folder / "detection_Resnet50_Final.pth", folder / "parsing_parsenet.pth",
                                     precision)
        add("gfpgan detect + realesrgan, full 512 (upstream)", precision, detecting(upstream, background), 1, full)
        add("gfpgan detect + realesrgan, full 512 (still picture once)", precision, detecting(upstream, still), 1, full,
            once_per_video_s=round(once, 2))
    # Speedups are against upstream's procedure in the same precision (rows of a precision share its baselines).
    upstream = {(r["mode"], r["precision"]): r["ms_per_frame"] for r in rows}
    for r in rows:
        precision = "fp32" if r["precision"] == "-" else r["precision"]
        face = upstream.get(("gfpgan detect (upstream)", precision))
        if face:
            r["speedup_vs_upstream"] = face / r["ms_per_frame"]
        full = upstream.get(("gfpgan detect + realesrgan, full 512 (upstream)", precision))
        if full and "full" in r["mode"]:
            r["speedup_vs_upstream_full"] = full / r["ms_per_frame"]
        if r["precision"] not in ("fp32", "-") and (r["mode"], "fp32") in outputs:
            mode = r["mode"]
            r["psnr_vs_fp32_db"] = _psnr(outputs[(mode, r["precision"])] / 255.0, outputs[(mode, "fp32")] / 255.0)
    machine = {"cpu": cpu_name(), "threads": int(__import__("torch").get_num_threads()), "frames": args.frames}
    lines = [(f"Face and background enhancers per frame, {machine['cpu']}, {machine['threads']} threads, "
              f"{args.frames} frames, synthetic weights. Crop rows: 256 px frames, output 512 (lightweight and "
              "--enhance_scale 1: 256). Full rows: the 512 px portrait with the face pasted in, output 1024. Speedups are "
              "against upstream's procedure in the same precision: GFPGAN with per-frame detection, and for full rows "
              "also that procedure with RealESRGAN on every whole frame (last column). `once` is the still picture's "
              "RealESRGAN pass, paid once per video."), "",
             "| mode | precision | batch | ms/frame | once (s) | vs upstream gfpgan detect | vs upstream full | "
             "PSNR vs fp32 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        psnr = f"{r['psnr_vs_fp32_db']:.1f} dB" if "psnr_vs_fp32_db" in r else "-"
        face_x = f"{r['speedup_vs_upstream']:.2f}x" if "speedup_vs_upstream" in r else "-"
        full_x = f"{r['speedup_vs_upstream_full']:.2f}x" if "speedup_vs_upstream_full" in r else "-"
        lines.append(f"| {r['mode']} | {r['precision']} | {r['batch']} | {r['ms_per_frame']:.1f} | "
                     f"{r.get('once_per_video_s', '-')} | {face_x} | {full_x} | {psnr} |")
    _write_results("enhance", {"machine": machine, "rows": rows}, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- presets

def _preset_folder(folder: Path) -> Path:
    """Every synthetic file a preset may ask for, in one folder (the landmark net left out, so `--landmarks auto`
    keeps the offline backend: synthetic upstream landmarks are random)."""
    from xtalker.synthetic import default_aux_dir, default_cache_dir, ensure_cached, ensure_pirender, ensure_restorers
    from xtalker.synthetic.auxiliary import ensure_all_aux

    everything = folder / "checkpoints"
    everything.mkdir()
    main = ensure_cached(default_cache_dir())
    ensure_pirender(main)
    aux = ensure_restorers(ensure_all_aux(default_aux_dir()))
    for path in [*main.iterdir(), *aux.iterdir()]:
        if path.is_file() and not path.name.startswith(".") and path.name != "alignment_WFLW_4HG.pth":
            (everything / path.name).symlink_to(path)
    return everything


def _preset_run(argv: list[str], folder: Path, name: str) -> tuple[dict, np.ndarray]:
    from xtalker.media import iter_video_frames

    out, report = folder / f"{name}.mp4", folder / f"{name}.json"
    proc = subprocess.run([sys.executable, str(REPO / "inference.py"), *argv, "--output", str(out), "--report",
                           str(report)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"preset run {name} failed:\n{proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    frames = np.stack(list(iter_video_frames(out)[1]))
    return data, frames


def presets(args: argparse.Namespace) -> None:
    from xtalker.presets import MEASURED_FILE, load_presets

    if args.frames < 2:
        raise SystemExit("presets needs --frames 2 or more (the per-frame cost is the difference to a 1-frame run)")
    chosen = load_presets()
    names = args.presets or list(chosen)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        common = ["--source_image", str(PORTRAIT), "--checkpoint_dir", str(_preset_folder(folder)), "--seed", "1"]
        # A frame is 640 samples; 0.15 of one more keeps the count exact.
        one = [*common, "--driven_audio", str(_speech_of_length(1.15 / 25, folder))]
        base = [*common, "--driven_audio", str(_speech_of_length((args.frames + 0.15) / 25, folder))]
        references: dict[tuple, np.ndarray] = {}
        rows = []
        for name in names:
            # The first 1-frame run builds what is cached on disk (int8 graphs, compiled kernels); the timed runs
            # find it there, as every later run of that preset does.
            _preset_run([*one, "--preset", name], folder, f"{name}-warm")
            short = _preset_run([*one, "--preset", name], folder, f"{name}-1")[0]
            data, frames = _preset_run([*base, "--preset", name], folder, name)
            total = {run["frames"]: run["profile"]["total_s"] - run["profile"]["stages_s"].get("load models", 0.0)
                     for run in (short, data)}
            per_frame = (total[data["frames"]] - total[1]) / (data["frames"] - 1)
            settings = data["settings"]
            key = (settings["facerender"], settings["enhancer"], settings["background_enhancer"])
            if settings["precision"] == "fp32":
                references.setdefault(key, frames)
                psnr = None
            else:
                if key not in references:
                    references[key] = _preset_run([*base, "--preset", name, "--precision", "fp32"], folder,
                                                  f"{name}-fp32")[1]
                psnr = round(_psnr(frames / 255.0, references[key] / 255.0), 1)
            rows.append({"preset": name, "s_per_frame": round(per_frame, 2), "psnr_vs_fp32_db": psnr,
                         "per_video_s": round(total[1] - per_frame, 1),
                         "load_s": round(data["profile"]["stages_s"].get("load models", 0.0), 1),
                         "frames": data["frames"], "size_wh": data["size_wh"], "precision": settings["precision"],
                         "facerender": settings["facerender"], "enhancer": settings["enhancer"],
                         "background_enhancer": settings["background_enhancer"]})
            sys.stderr.write(f"preset {name}: {per_frame:.2f} s/frame\n")
    machine = {"cpu": cpu_name(), "threads": os.cpu_count(), "frames": args.frames,
               "date": time.strftime("%Y-%m-%d")}
    lines = [(f"Presets end to end (crop, 256, bundled example, synthetic weights), {machine['cpu']}, "
              f"{machine['threads']} cores, caches warm (a first run built int8 graphs and compiled kernels). s/frame: "
              f"what one more frame costs (render, enhancers, paste, encode), from a {args.frames}-frame and a "
              "1-frame run; per video: the rest of a run after loading the networks (source work, compiling, first "
              "batch); PSNR: the frames against the same renderer and enhancers in fp32."), "",
             "| preset | precision | renderer | enhancer | background | s/frame | PSNR vs fp32 | per video (s) | load (s) |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        psnr = "reference" if r["psnr_vs_fp32_db"] is None else f"{r['psnr_vs_fp32_db']} dB"
        lines.append(f"| {r['preset']} | {r['precision']} | {r['facerender']} | {r['enhancer'] or '-'} | "
                     f"{r['background_enhancer'] or '-'} | {r['s_per_frame']:.2f} | {psnr} | {r['per_video_s']} | "
                     f"{r['load_s']} |")
    _write_results("presets", {"machine": machine, "rows": rows}, "\n".join(lines) + "\n")
    measured = {"machine": f"{machine['cpu']}, {machine['threads']} cores, {machine['date']}",
                "presets": {r["preset"]: {"s_per_frame": r["s_per_frame"], "psnr_vs_fp32_db": r["psnr_vs_fp32_db"]}
                            for r in rows}}
    MEASURED_FILE.write_text(json.dumps(measured, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- landmarks

def _ms_per_call(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def landmarks(args: argparse.Namespace) -> None:
    """ms per image of the upstream backend's detector (fp32, bf16) and FAN (fp32; bf16 for reference only: it
    moves argmaxes, so the backend never uses it), and of whole backends, on the bundled portrait and its crop."""
    import cv2
    import torch

    from xtalker.media import first_frame
    from xtalker.models.retinaface import load_retinaface
    from xtalker.preprocess import FaceDetector, get_backend
    from xtalker.preprocess.face_detect import to_network_input
    from xtalker.preprocess.landmarks.fan import FanLandmarks, fan_input
    from xtalker.synthetic import default_aux_dir
    from xtalker.synthetic.auxiliary import ensure_all_aux

    folder = ensure_all_aux(args.aux_dir or default_aux_dir())
    picture = first_frame(PORTRAIT)
    images = {f"{picture.shape[1]}x{picture.shape[0]}": picture,
              "256x256": cv2.resize(picture, (256, 256), interpolation=cv2.INTER_AREA)}
    fan = FanLandmarks.from_file(folder / "alignment_WFLW_4HG.pth")
    x = fan_input([cv2.resize(picture, (256, 256))[..., ::-1]])
    rows = []
    eager = load_retinaface(folder / "detection_Resnet50_Final.pth")  # upstream's layout: BNs, NCHW, no fusion
    for size, image in images.items():
        x_det = to_network_input(image[None, ..., ::-1])

        def baseline(x_det=x_det) -> None:
            with torch.inference_mode():
                eager(x_det)

        rows.append({"what": "RetinaFace R50 network, upstream layout (baseline)", "image": size, "precision": "fp32",
                     "ms": _ms_per_call(baseline, args.repeats)})
    for precision in ("fp32", "bf16"):
        detector = FaceDetector.from_file(folder / "detection_Resnet50_Final.pth", precision)
        for size, image in images.items():
            bgr = np.ascontiguousarray(image[..., ::-1])
            rows.append({"what": "RetinaFace R50 detect", "image": size, "precision": precision,
                         "ms": _ms_per_call(lambda d=detector, b=bgr: d.detect([b]), args.repeats)})

        def fan_only(precision=precision) -> None:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                fan.net(x)

        rows.append({"what": "AWing FAN (network)", "image": "256x256 crop", "precision": precision,
                     "ms": _ms_per_call(fan_only, args.repeats)})
    upstream = get_backend("upstream", folder)
    offline = get_backend("mediapipe", None)
    for size, image in images.items():
        faces = len(upstream.detect(image))  # random detector weights find several boxes; FAN runs on each
        rows.append({"what": f"upstream backend (detect + FAN on {faces} face{'s' * (faces != 1)})", "image": size,
                     "precision": "fp32", "ms": _ms_per_call(lambda i=image: upstream.detect(i), args.repeats)})
        rows.append({"what": "offline backend (mediapipe)", "image": size, "precision": "fp32 (tflite)",
                     "ms": _ms_per_call(lambda i=image: offline.detect(i), args.repeats)})
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "repeats": args.repeats}
    lines = [(f"Landmark backends per image, {machine['cpu']}, {machine['threads']} threads, mean of "
              f"{args.repeats} calls after a warm-up, synthetic weights."), "",
             "| what | image | precision | ms/image |", "| --- | --- | --- | ---: |"]
    lines += [f"| {r['what']} | {r['image']} | {r['precision']} | {r['ms']:.1f} |" for r in rows]
    _write_results("landmarks", {"machine": machine, "rows": rows}, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- parallel

def _parallel_one(checkpoint_dir: Path, audio: Path, folder: Path, slots: int, threads: int, precision: str) -> dict:
    """One whole CLI run in a fresh process: `slots` pinned workers of `threads` threads (1 slot: no workers)."""
    out, report = folder / f"s{slots}t{threads}.mp4", folder / f"s{slots}t{threads}.json"
    cmd = [sys.executable, str(REPO / "inference.py"), "--driven_audio", str(audio), "--source_image", str(PORTRAIT),
           "--checkpoint_dir", str(checkpoint_dir), "--output", str(out), "--report", str(report), "--seed", "0",
           "--precision", precision, "--threads", str(threads)]
    if slots > 1:
        cmd += ["--workers", str(slots), "--job", str(folder / f"job_s{slots}t{threads}")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"parallel run failed (slots {slots}, threads {threads}):\n{proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    return {"slots": slots, "threads_per_slot": threads, "frames": data["frames"], "wall_s": round(wall, 2),
            "s_per_frame": wall / data["frames"], "stages_s": data["profile"]["stages_s"]}


def parallel(args: argparse.Namespace) -> None:
    """Whole runs over a slots x threads grid (slots * threads <= cores), the same clip and seed each."""
    import torch

    from xtalker.synthetic import default_cache_dir, ensure_cached

    if args.checkpoint_dir is None:
        args.checkpoint_dir = ensure_cached(default_cache_dir())
    cores = len(os.sched_getaffinity(0))
    grid = [(s, t) for s in range(1, cores + 1) for t in range(1, cores // s + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        audio = _speech_of_length(args.frames / 25, folder)
        rows = [_parallel_one(args.checkpoint_dir, audio, folder, s, t, args.precision) for s, t in grid]
    base = next(r for r in rows if r["slots"] == 1 and r["threads_per_slot"] == cores)
    for r in rows:
        r["speedup"] = base["wall_s"] / r["wall_s"]
    machine = {"cpu": cpu_name(), "cores": cores, "torch": torch.__version__, "precision": args.precision,
               "frames": rows[0]["frames"]}
    lines = [f"Whole runs (load, prepare, render, merge/encode), {machine['frames']} frames at 256, {args.precision}, "
             f"{machine['cpu']} ({cores} cores), torch {machine['torch']}; speedup against one process with {cores} threads.",
             "", "| slots | threads per slot | wall (s) | s/frame | speedup |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['slots']} | {r['threads_per_slot']} | {r['wall_s']:.1f} | {r['s_per_frame']:.2f} | {r['speedup']:.2f}x |"
              for r in rows]
    _write_results("parallel", {"machine": machine, "rows": rows}, "\n".join(lines) + "\n")


def serve(args: argparse.Namespace) -> None:
    """N videos as N CLI processes, then as one `xtalker batch` list: wall time each, same inputs and seeds."""
    import torch

    from xtalker.synthetic import default_cache_dir, ensure_cached

    if args.checkpoint_dir is None:
        args.checkpoint_dir = ensure_cached(default_cache_dir())
    common = ["--checkpoint_dir", str(args.checkpoint_dir), "--precision", args.precision]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        audio = _speech_of_length(args.frames / 25, folder)
        start = time.perf_counter()
        for i in range(args.videos):
            subprocess.run([sys.executable, str(REPO / "inference.py"), "--driven_audio", str(audio), "--source_image",
                            str(PORTRAIT), "--output", str(folder / f"cli{i}.mp4"), "--seed", str(i), *common],
                           capture_output=True, check=True)
        loop_s = time.perf_counter() - start
        listing = folder / "videos.csv"
        listing.write_text("source_image,driven_audio,output,seed\n" + "".join(
            f"{PORTRAIT},{audio},{folder / f'batch{i}.mp4'},{i}\n" for i in range(args.videos)))
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "inference.py"), "batch", str(listing), "--report",
                        str(folder / "batch.json"), *common], capture_output=True, check=True)
        batch_s = time.perf_counter() - start
        report = json.loads((folder / "batch.json").read_text())
    per_video = [v["seconds"] for v in report["videos"]]
    machine = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    data = {"machine": machine, "videos": args.videos, "frames": args.frames, "precision": args.precision,
            "cli_loop_s": round(loop_s, 1), "batch_s": round(batch_s, 1), "speedup": round(loop_s / batch_s, 2),
            "batch_load_s": report["load_s"], "batch_video_s": per_video,
            "batch_loaded": [v["loaded"] for v in report["videos"]]}
    lines = [f"{args.videos} videos of {args.frames} frames at 256, {args.precision}, {machine['cpu']} "
             f"({machine['cores']} cores), torch {machine['torch']}, synthetic weights.", "",
             "| how | wall (s) | per video (s) | speedup |", "| --- | ---: | ---: | ---: |",
             f"| `inference.py` in a loop (loads every network per video) | {loop_s:.1f} | {loop_s / args.videos:.1f} | 1.00x |",
             f"| `xtalker batch` (one load: {report['load_s']:.1f} s) | {batch_s:.1f} | {batch_s / args.videos:.1f} | "
             f"{loop_s / batch_s:.2f}x |", "",
             f"Batch videos after the load: {min(per_video):.1f}-{max(per_video):.1f} s each, networks loaded per "
             f"video: {sorted({len(v) for v in data['batch_loaded']})} (0 = all warm)."]
    _write_results("serve", data, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- gpu

# Issue 15's targets: renderer fps at 256 in fp16/bf16 (at a PSNR floor against fp32), whole runs, first frame of a
# stream, and speedup against upstream's computation.
GPU_TARGETS = {"renderer_fps": 100.0, "renderer_psnr_db": 40.0, "e2e_fps": 25.0, "first_frame_s": 1.0, "speedup": 5.0}
HALF = ("fp16", "bf16")
GPU_DEFAULTS = {  # device type: (timed frames, batch, warm-up batches, end-to-end clip frames)
    "cuda": (32, 8, 2, 100),
    "cpu": (2, 2, 0, None),  # None: the timed frames
}
CHUNK_S = 0.2  # streamed speech per chunk


def _finite(value):
    """JSON-safe: inf / nan -> None, recursively."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


class _Flags:
    """cuDNN settings for one configuration, restored afterwards (tf32 None: PyTorch's defaults, left alone; False:
    convolutions and matmuls in true float32)."""

    def __init__(self, tf32: bool | None = None, benchmark: bool = False):
        self.tf32, self.benchmark = tf32, benchmark

    def __enter__(self):
        import torch

        cudnn = torch.backends.cudnn
        self.saved = (cudnn.allow_tf32, cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
        if self.tf32 is not None:
            cudnn.allow_tf32 = self.tf32
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
        cudnn.benchmark = self.benchmark
        return self

    def __exit__(self, *exc):
        import torch

        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = self.saved
        return False


def _synthetic_renderer_inputs(frames: int) -> dict[str, np.ndarray]:
    """Renderer inputs without the pipeline (no PyAV, soxr or landmark backend): the bundled portrait, centre-cropped,
    and smooth made-up coefficients (expression, angles in radians, translation) around a fixed source row."""
    import cv2

    from xtalker.render import DrivingSequence, source_image

    rgb = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    s = min(h, w)
    crop = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    rng = np.random.default_rng(0)
    row = np.zeros(70, np.float32)
    row[:64] = rng.normal(0.0, 0.3, 64)
    t = np.arange(frames, dtype=np.float32)[:, None] / 25.0
    phase = rng.uniform(0, 2 * np.pi, 70).astype(np.float32)
    amplitude = np.concatenate([np.full(64, 0.4), np.full(3, 0.08), np.full(3, 0.02)]).astype(np.float32)
    coeffs = row + amplitude * np.sin(2 * np.pi * 0.7 * t + phase)
    return {
        "image": source_image(cv2.resize(crop, (256, 256), interpolation=cv2.INTER_AREA)),
        "semantics": np.ascontiguousarray(np.repeat(row[None, :, None], 27, axis=2)),
        "windows": DrivingSequence(coeffs=coeffs.astype(np.float32)).windows(0, frames),
    }


def _at_size(data: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The 256 inputs with the source image resized (bicubic) for another size; the coefficients are size-free."""
    import cv2

    if data["image"].shape[-1] == size:
        return data
    hwc = data["image"][0].transpose(1, 2, 0)
    image = np.clip(cv2.resize(hwc, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1).transpose(2, 0, 1)
    return {**data, "image": np.ascontiguousarray(image[None], dtype=np.float32)}


def _gpu_base(checkpoint_dir: Path, size: int):
    """The fp32 renderer of `size` on the CPU (each configuration starts from a copy) and its checkpoint paths."""
    from xtalker.checkpoints import find_checkpoints
    from xtalker.render import Renderer

    paths = find_checkpoints(checkpoint_dir, size)
    return Renderer.from_checkpoints(paths.packed, paths.mapping, paths.coeff_nc), paths


def _channels_last(module) -> None:
    """Convolution weights to channels-last (2-D) / channels-last-3d (3-D), in place; activations follow them."""
    import torch

    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            fmt = torch.channels_last if m.weight.dim() == 4 else torch.channels_last_3d
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)


def _gpu_renderer(base, paths, precision: str, variants: tuple[str, ...], device, compile_mode: str = "default"):
    """A renderer for one configuration on `device`: a copy of the base generator (or upstream's layout for
    "official") set to `precision`, with the variant options applied."""
    import copy

    import torch

    from xtalker.render import Renderer
    from xtalker.render.precision import prepare_generator

    generator = _official_layout_generator(paths.packed) if "official" in variants else copy.deepcopy(base.generator)
    prepare_generator(generator, precision)
    renderer = Renderer(base.kp_detector.to(device), generator.to(device), base.mapping.to(device))
    if "channels_last" in variants:
        _channels_last(renderer.generator)
    if "compile" in variants:
        renderer.generator.animate = torch.compile(renderer.generator.animate, mode=compile_mode)
    return renderer


def _upstream_source(renderer, image, semantics, batch: int):
    """Upstream's source work for one batch: keypoints, source pose and appearance features of `batch` copies."""
    import torch

    from xtalker.render import PreparedSource
    from xtalker.render.keypoints import transform_keypoints

    device = renderer.device
    images = torch.from_numpy(image).to(device).expand(batch, -1, -1, -1).contiguous()
    sem = torch.from_numpy(semantics).to(device).expand(batch, -1, -1).contiguous()
    kp_canonical = renderer.kp_detector(images)
    return PreparedSource(kp_canonical=kp_canonical, kp_source=transform_keypoints(kp_canonical, renderer.mapping(sem)),
                          features=renderer.generator.encode_source(images), coeff_nc=int(sem.shape[1]),
                          image_size=int(images.shape[-1]))


def _gpu_measure(renderer, data: dict[str, np.ndarray], batch: int, warmup: int, device, upstream: bool = False,
                 count_flops: bool = False) -> tuple[dict, np.ndarray]:
    """Warm-up batches (untimed), then all windows in batches: s/frame of mapping + keypoints + generator on a
    prepared source (upstream: source work redone every batch, the last batch padded like upstream). Frames come
    back as float32 (N, 3, S, S) on the CPU."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    image, semantics, windows = data["image"], data["semantics"], data["windows"]
    n = len(windows)
    if upstream:
        windows = np.concatenate([windows, np.repeat(windows[-1:], -n % batch, axis=0)])
    flops = None
    with torch.inference_mode():
        source = _upstream_source(renderer, image, semantics, batch) if upstream else renderer.prepare(image, semantics)
        first_s = None
        for i in range(warmup):
            counter = FlopCounterMode(display=False) if count_flops and i == 0 else contextlib.nullcontext()
            start = time.perf_counter()
            with counter:
                renderer.render(source, windows[:batch])
            _sync(device)
            if i == 0:
                first_s = time.perf_counter() - start
                if count_flops:
                    flops = float(counter.get_total_flops()) / min(batch, len(windows))
        weights_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
        outputs = []
        _sync(device)
        start = time.perf_counter()
        for i in range(0, len(windows), batch):
            if upstream:
                source = _upstream_source(renderer, image, semantics, batch)
            outputs.append(renderer.render(source, windows[i:i + batch]))
        _sync(device)
        seconds = time.perf_counter() - start
    frames = torch.cat(outputs)[:n].float().cpu().numpy()
    row = {"frames": n, "batch": batch, "s_per_frame": seconds / n, "fps": n / seconds, "first_call_s": first_s,
           "flops_per_frame": flops}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        row.update(peak_mem_mb=peak, weights_mb=weights_mb,
                   activation_mb_per_frame=max(0.0, peak - weights_mb) / min(batch, n) if weights_mb is not None else None)
    else:
        row.update(peak_mem_mb=None, weights_mb=None, activation_mb_per_frame=None)
    return row, frames


def _gpu_config(name: str, base, paths, data, precision: str, variants: tuple[str, ...], device, batch: int,
                warmup: int, compile_mode: str = "default", count_flops: bool = False) -> tuple[dict, np.ndarray | None]:
    """One configuration, errors recorded in its row instead of raised (an OOM or a failed compile moves on)."""
    import gc

    import torch

    upstream = "official" in variants
    row = {"size": paths.size, "config": name, "precision": precision, "variants": list(variants), "status": "ok"}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tf32 = False if "strict" in variants else None  # None: PyTorch's defaults, what a run gets
    frames = renderer = None
    try:
        with _Flags(tf32=tf32 if device.type == "cuda" else None, benchmark="cudnn_benchmark" in variants):
            renderer = _gpu_renderer(base, paths, precision, variants, device, compile_mode)
            measured, frames = _gpu_measure(renderer, data, 2 if upstream else batch,
                                            max(warmup, 1) if "compile" in variants else warmup, device, upstream,
                                            count_flops)
        row.update(measured)
    except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
        row.update(status="error", error=_error(e))
        sys.stderr.write(f"gpu: {paths.size} {name}: {row['error']}\n")
    finally:
        del renderer
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    return row, frames


def _gpu_compile_one(args: argparse.Namespace) -> dict:
    """Inside a child process (so a hang or crash is bounded): the torch.compile configuration; frames saved."""
    import torch

    device = torch.device(args.device)
    data = dict(np.load(args.inputs))
    base, paths = _gpu_base(args.checkpoint_dir, args.size)
    row, frames = _gpu_config(f"{args.precision}+compile", base, paths, data, args.precision, ("compile",), device,
                              args.batch, args.warmup, args.compile_mode)
    if frames is not None:
        np.save(args.frames_out, frames)
    return row


def _gpu_compile_row(args, size: int, precision: str, inputs: Path, folder: Path, timeout: float) -> tuple[dict, np.ndarray | None]:
    frames_out = folder / f"compile_{size}_{precision}.npy"
    cmd = [sys.executable, __file__, "_gpu_compile", "--device", args.device, "--checkpoint_dir", str(args.checkpoint_dir),
           "--size", str(size), "--precision", precision, "--inputs", str(inputs), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--compile_mode", args.compile_mode, "--frames_out", str(frames_out)]
    row = {"size": size, "config": f"{precision}+compile", "precision": precision, "variants": ["compile"]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {**row, "status": "error", "error": f"timed out after {timeout:.0f} s (compile + measurement)"}, None
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        return {**row, "status": "error", "error": tail[:300]}, None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return row, np.load(frames_out) if frames_out.is_file() else None


def _gpu_inputs(args, folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """The 256 renderer inputs: the bundled example through the checkpoint's own networks when the pipeline can run
    here (PyAV, soxr, a landmark backend), else made-up ones (renderer-only mode)."""
    if not args.renderer_only:
        try:
            path = _speed_inputs(args.checkpoint_dir, args.frames, folder)
            return dict(np.load(path)), "the bundled example (portrait + speech through this checkpoint's networks)"
        except Exception as e:  # noqa: BLE001 - ImportError without PyAV/soxr, LandmarkBackendError, ...
            reason = _error(e)
    else:
        reason = "--renderer_only"
    return _synthetic_renderer_inputs(args.frames), f"made-up coefficients on the bundled portrait ({reason})"


def _gpu_end_to_end(args, precision: str, folder: Path) -> dict:
    """A whole `generate` run (crop mode, 256, no enhancer, H.264 encode) with the networks already loaded."""
    out = {"precision": precision, "batch": args.batch, "size": 256}
    if args.renderer_only:
        return {**out, "status": "skipped", "reason": "renderer-only mode (--renderer_only)"}
    try:
        import av  # noqa: F401

        from xtalker.config import InferenceConfig
        from xtalker.pipeline import generate
        from xtalker.warm import Networks
    except ImportError as e:
        return {**out, "status": "skipped", "reason": f"renderer-only mode: {_error(e)}"}
    try:
        audio = _speech_of_length(args.e2e_frames / 25 + 0.01, folder)
        networks = Networks()

        def run(name: str):
            config = InferenceConfig(driven_audio=audio, source_image=PORTRAIT, checkpoint_dir=Path(args.checkpoint_dir),
                                     output=folder / name, seed=0, device=args.device, precision=precision,
                                     batch_size=args.batch, size=256)
            start = time.perf_counter()
            result = generate(config, networks)
            return result, time.perf_counter() - start

        if args.warmup > 0:
            run("warm.mp4")  # loads the networks and warms the kernels; the second run is timed
        result, wall = run("e2e.mp4")
        stages = result.profile.as_dict()["stages_s"]
        excluded = stages.get("load models", 0.0) if args.warmup == 0 else 0.0
        seconds = wall - excluded
        return {**out, "status": "measured", "frames": result.frames, "wall_s": seconds, "fps": result.frames / seconds,
                "timed": "second run" if args.warmup > 0 else "first run minus its 'load models' stage",
                "stages_s": stages}
    except Exception as e:  # noqa: BLE001
        return {**out, "status": "error", "reason": _error(e)}


def _gpu_stream(args, precision: str, folder: Path, paced: bool) -> dict:
    """First-frame latency and sustained fps of `XTalker.stream` fed the speech in 0.2 s chunks (models warm)."""
    out = {"precision": precision, "batch": args.batch, "chunk_s": CHUNK_S}
    if args.renderer_only:
        return {**out, "status": "skipped", "reason": "renderer-only mode (--renderer_only)"}
    try:
        from xtalker.api import XTalker
        from xtalker.media import load_audio
    except ImportError as e:
        return {**out, "status": "skipped", "reason": f"renderer-only mode: {_error(e)}"}
    if not hasattr(XTalker, "stream"):
        return {**out, "status": "not available", "reason": "this xtalker has no XTalker.stream"}
    try:
        xt = XTalker(args.checkpoint_dir, device=args.device, precision=precision, batch_size=args.batch, seed=0)
        wav = load_audio(_speech_of_length(args.e2e_frames / 25 + 0.01, folder))
        step = int(CHUNK_S * 16000)

        def chunks(wav: np.ndarray, start: float, live: bool):
            for i in range(0, len(wav), step):
                if live:  # chunk i exists once its last sample has been spoken
                    time.sleep(max(0.0, start + min(i + step, len(wav)) / 16000 - time.perf_counter()))
                yield wav[i:i + step].astype(np.float32)

        def once(wav: np.ndarray, live: bool) -> dict:
            start = time.perf_counter()
            first = first_n = None
            n = 0
            for frames in xt.stream(PORTRAIT, chunks(wav, start, live)):
                if first is None:
                    first, first_n = time.perf_counter() - start, len(frames)
                n += len(frames)
            total = time.perf_counter() - start
            rest = total - (first or 0.0)
            return {"first_frame_s": first, "frames": n, "wall_s": total,
                    "sustained_fps": (n - first_n) / rest if first is not None and n > first_n and rest > 0 else None}

        if args.warmup > 0:
            once(wav[: 16000 * 2], live=False)  # kernels, cuDNN plans and caches warm
        result = once(wav, live=paced)
        return {**out, "status": "measured", "paced": paced, **result}
    except Exception as e:  # noqa: BLE001
        return {**out, "status": "error", "reason": _error(e)}


def _gpu_profile(base, paths, data, precision: str, variants: tuple[str, ...], device, batch: int) -> dict:
    """torch.profiler's top kernels by self CUDA time for one renderer batch (after a warm-up batch)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with _Flags(benchmark="cudnn_benchmark" in variants):
        renderer = _gpu_renderer(base, paths, precision, tuple(v for v in variants if v != "compile"), device)
        with torch.inference_mode():
            source = renderer.prepare(data["image"], data["semantics"])
            windows = data["windows"][:batch]
            renderer.render(source, windows)
            _sync(device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                renderer.render(source, windows)
                _sync(device)
    events = prof.key_averages()
    table = None
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = events.table(sort_by=key, row_limit=20, max_name_column_width=70)
            break
        except Exception:  # noqa: BLE001 - the sort key's name changed across torch versions
            continue
    top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:20]
    return {"config": f"{paths.size} {precision}{''.join('+' + v for v in variants)}", "batch": batch, "table": table,
            "top": [{"name": e.key, "calls": e.count, "self_cuda_ms": getattr(e, "self_device_time_total", 0) / 1000}
                    for e in top]}


def _gpu_targets(rows: list[dict], e2e: dict, stream: list[dict]) -> list[dict]:
    t = GPU_TARGETS
    ok = [r for r in rows if r.get("status") == "ok" and r["size"] == 256]
    targets = []

    half = [r for r in ok if r["precision"] in HALF and r["config"] != "baseline"]
    fine = [r for r in half if (r.get("psnr_db") or 0) >= t["renderer_psnr_db"]]
    what = f"renderer at 256 >= {t['renderer_fps']:g} fps in fp16 or bf16 at >= {t['renderer_psnr_db']:g} dB vs fp32"
    if not half:
        targets.append({"target": what, "status": "not measured", "value": "no fp16/bf16 row at 256"})
    elif not fine:
        best = max(half, key=lambda r: r.get("psnr_db") or 0)
        targets.append({"target": what, "status": "missed",
                        "value": f"no fp16/bf16 row reaches {t['renderer_psnr_db']:g} dB (best {best['config']} {best.get('psnr_db') or 0:.1f} dB)"})
    else:
        best = max(fine, key=lambda r: r["fps"])
        targets.append({"target": what, "status": "met" if best["fps"] >= t["renderer_fps"] else "missed",
                        "value": f"{best['fps']:.1f} fps ({best['config']}, {best['psnr_db']:.1f} dB)"})

    what = f"end to end (with encode, no enhancer) >= {t['e2e_fps']:g} fps"
    if e2e.get("status") == "measured":
        targets.append({"target": what, "status": "met" if e2e["fps"] >= t["e2e_fps"] else "missed",
                        "value": f"{e2e['fps']:.1f} fps ({e2e['precision']}, {e2e['frames']} frames)"})
    else:
        targets.append({"target": what, "status": "not measured", "value": e2e.get("reason", "")})

    what = f"streaming: first frame < {t['first_frame_s']:g} s"
    measured = [s for s in stream if s.get("status") == "measured" and s.get("first_frame_s") is not None]
    if measured:
        s = max(measured, key=lambda s: s["paced"])  # the live-paced run when there is one: what a user waits
        targets.append({"target": what, "status": "met" if s["first_frame_s"] < t["first_frame_s"] else "missed",
                        "value": f"{s['first_frame_s']:.2f} s ({'speech fed in real time' if s['paced'] else 'speech fed as fast as read'})"})
    else:
        targets.append({"target": what, "status": "not measured",
                        "value": "; ".join(s.get("reason", "") for s in stream) or "not run"})

    what = f">= {t['speedup']:g}x upstream's computation (baseline) at 256, at >= {t['renderer_psnr_db']:g} dB"
    faithful = [r for r in ok if r["config"] != "baseline" and r.get("speedup") and
                (r.get("psnr_db") is None or r["psnr_db"] >= t["renderer_psnr_db"])]
    if faithful:
        best = max(faithful, key=lambda r: r["speedup"])
        targets.append({"target": what, "status": "met" if best["speedup"] >= t["speedup"] else "missed",
                        "value": f"{best['speedup']:.2f}x ({best['config']})"})
    else:
        targets.append({"target": what, "status": "not measured", "value": "no baseline or no row at 256"})
    return targets


def _gpu_markdown(data: dict) -> str:
    m, s = data["machine"], data["settings"]
    where = m.get("gpu") or m["cpu"]
    peaks = m.get("peak_tflops")
    lines = [
        "# GPU benchmark (issue 15)", "",
        f"{where} ({m['device']}), torch {m['torch']}, CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}; "
        f"{s['frames']} timed frames per configuration after {s['warmup']} warm-up batch(es), batch {s['batch']}; "
        f"inputs: {data['inputs']}; checkpoints: {data['checkpoints']}.",
    ]
    if peaks:
        lines.append("Matmul peaks measured in the same run (8192^2): " +
                     ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + " TFLOP/s.")
    lines += ["", "## Targets", ""]
    marks = {"met": "[x] met", "missed": "[ ] MISSED", "not measured": "[ ] not measured"}
    lines += [f"- {marks[t['status']]}: {t['target']} -- {t['value']}" for t in data.get("targets", [])]
    lines += ["", "## Renderer", "",
              "| size | config | precision | batch | s/frame | fps | speedup vs baseline | PSNR vs fp32 (dB) | max abs | "
              "peak GPU memory (MB) | activations / frame (MB) | TFLOP/s | first call (s) | note |",
              "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in data["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['size']} | {r['config']} | {r['precision']} | | | | | | | | | | | "
                         f"{r.get('status')}: {r.get('error') or r.get('reason', '')} |")
            continue
        psnr = "reference" if r["config"] == s["reference"] else num(r.get("psnr_db"), ".1f")
        lines.append(
            f"| {r['size']} | {r['config']} | {r['precision']} | {r['batch']} | {r['s_per_frame']:.4f} | {r['fps']:.1f} | "
            f"{num(r.get('speedup'), '.2f')}x | {psnr} | {num(r.get('max_abs'), '.3g')} | {num(r.get('peak_mem_mb'), '.0f')} | "
            f"{num(r.get('activation_mb_per_frame'), '.0f')} | {num(r.get('tflops'), '.1f')} | {num(r.get('first_call_s'), '.2f')} | |")
    lines += ["", "Rows: `fp32` is the PSNR reference (on CUDA with TF32 off: true float32); `fp32-defaults` is "
              "`--precision fp32` as PyTorch runs it on a GPU by default (cuDNN convolutions in TF32 on Ampere and "
              "later); `baseline` is upstream's computation: "
              "the official-layout generator (BatchNorms, three SPADE label convs, full-size convs), fp32 with PyTorch's "
              "defaults, eager, batch 2, keypoints and source features of the batch's copies recomputed every batch "
              "(timed with it); the others render on a source prepared once. `+cudnn_benchmark`: "
              "torch.backends.cudnn.benchmark; `+channels_last`: convolution weights in channels-last (3-D ones in "
              "channels-last-3d); `+compile`: torch.compile of the generator's per-frame call, in a fresh process (its "
              "compile time is the first call). Peak GPU memory: torch.cuda.max_memory_allocated over the configuration "
              "(weights included); activations / frame: (peak - memory after loading and the warm-up) / batch. "
              "TFLOP/s: FLOPs counted by torch's FlopCounterMode on the fp32 generator / time."]
    e = data.get("end_to_end", {})
    lines += ["", "## End to end", ""]
    if e.get("status") == "measured":
        stages = ", ".join(f"{k} {v:.2f}" for k, v in e["stages_s"].items() if v)
        lines.append(f"{e['frames']} frames at 256, {e['precision']}, batch {e['batch']}, crop mode, H.264 encode, no "
                     f"enhancer: {e['wall_s']:.2f} s = **{e['fps']:.1f} fps** ({e['timed']}; stages in s: {stages}).")
    else:
        lines.append(f"{e.get('status', 'not run')}: {e.get('reason', '')}")
    lines += ["", "## Streaming", ""]
    for st in data.get("stream", []):
        if st.get("status") == "measured":
            how = "speech fed in real time (0.2 s chunks as they are spoken)" if st["paced"] else "speech fed as fast as it is read"
            lines.append(f"- {how}: first frame after **{num(st['first_frame_s'], '.2f')} s**, {st['frames']} frames in "
                         f"{st['wall_s']:.2f} s, sustained {num(st['sustained_fps'], '.1f')} fps after the first batch "
                         f"({st['precision']}, batch {st['batch']}).")
        else:
            lines.append(f"- {st.get('status', 'not run')}: {st.get('reason', '')}")
    p = data.get("profile")
    if p:
        lines += ["", f"## Profile: {p['config']}, one batch of {p['batch']} (a target was missed)", ""]
        lines += ["```", p["table"] or "(no table)", "```"] if p.get("table") or not p.get("error") else [p["error"]]
    if data.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(data["skipped"])]
    lines += ["", f"Whole suite: {data.get('elapsed_s', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def _gpu_machine(device) -> dict:
    import torch

    m = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu_name(),
         "cores": os.cpu_count(), "threads": torch.get_num_threads(), "cudnn": None, "gpu": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        m.update(cudnn=torch.backends.cudnn.version(), gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                 multiprocessors=props.multi_processor_count,
                 tf32_defaults={"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32})
    return m


def gpu(args: argparse.Namespace) -> None:
    """Renderer speed, fidelity and memory per size, precision and CUDA option; a whole run; streaming latency."""
    import torch

    from xtalker.device import resolve_device
    from xtalker.synthetic import default_cache_dir, ensure_cached, is_synthetic_folder

    from xtalker.config import ConfigError

    started = time.perf_counter()
    try:
        device = torch.device(resolve_device(args.device))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    frames, batch, warmup, e2e_frames = GPU_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    args.frames = args.frames or frames
    args.batch = min(args.batch or batch, args.frames)
    args.warmup = warmup if args.warmup is None else args.warmup
    args.e2e_frames = args.e2e_frames or e2e_frames or args.frames
    if args.checkpoint_dir is None:
        args.checkpoint_dir = ensure_cached(default_cache_dir())
    sizes = [int(s) for s in args.sizes.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    cuda = device.type == "cuda"
    variants_on = cuda or args.all_variants
    skipped: list[str] = []
    if not cuda and "fp16" in precisions:
        precisions.remove("fp16")
        skipped.append("fp16 on the CPU (a CUDA path: about 100x slower than fp32 there)")
    compile_precision = args.compile_precision or next((p for p in ("fp16", "bf16") if p in precisions), "fp32")
    compile_sizes = [int(s) for s in args.compile_sizes.split(",") if s] if variants_on else []

    def over_budget(what: str) -> bool:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            skipped.append(f"{what} (past --budget_s {args.budget_s:g})")
            return True
        return False

    out = Path(args.out) if args.out else None
    data = {
        "suite": "gpu", "machine": _gpu_machine(device),
        "settings": {"frames": args.frames, "batch": args.batch, "warmup": args.warmup, "sizes": sizes,
                     "precisions": precisions, "e2e_frames": args.e2e_frames, "renderer_only": args.renderer_only,
                     "all_variants": args.all_variants, "compile_mode": args.compile_mode, "reference": "fp32"},
        "targets_wanted": GPU_TARGETS, "checkpoints": "synthetic" if is_synthetic_folder(args.checkpoint_dir)
        else str(args.checkpoint_dir), "rows": [], "skipped": skipped,
    }

    def save(echo: bool = False) -> None:
        data["elapsed_s"] = time.perf_counter() - started
        _write_results("gpu", _finite(data), _gpu_markdown(data), out, echo)

    if cuda:
        data["machine"]["peak_tflops"] = {p: _matmul_peak(p, 0.4, str(device), 8192) / 1e3 for p in ("fp32", "fp16", "bf16")}
    rows = data["rows"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs256, data["inputs"] = _gpu_inputs(args, folder)
        bases, refs, inputs = {}, {}, {}

        def add(row: dict, frames: np.ndarray | None, size: int) -> None:
            ref = refs.get(size)
            if frames is not None and ref is not None:
                row["psnr_db"] = _psnr(frames, ref)
                row["max_abs"] = float(np.abs(frames - ref).max())
            base_row = next((r for r in rows if r["size"] == size and r["config"] == "baseline" and r["status"] == "ok"), None)
            if row.get("status") == "ok":
                flops = next((r.get("flops_per_frame") for r in rows if r["size"] == size and r.get("flops_per_frame")), None)
                row["flops_per_frame"] = row.get("flops_per_frame") or flops
                row["tflops"] = flops / row["s_per_frame"] / 1e12 if flops and row["config"] != "baseline" else None
                row["speedup"] = base_row["s_per_frame"] / row["s_per_frame"] if base_row else None
            rows.append(row)
            sys.stderr.write(f"gpu: {size} {row['config']}: "
                             + (f"{row['fps']:.1f} fps" if row.get("status") == "ok" else row.get("error", "")) + "\n")
            save()

        # 1. per size: the reference, the baseline, each precision eager
        for size in sizes:
            data_s = inputs[size] = _at_size(inputs256, size)
            np.savez(folder / f"inputs_{size}.npz", **data_s)
            bases[size] = _gpu_base(args.checkpoint_dir, size)
            base, paths = bases[size]
            row, ref = _gpu_config("fp32", base, paths, data_s, "fp32", ("strict",), device, args.batch, args.warmup,
                                   count_flops=args.warmup > 0)
            refs[size] = ref
            add(row, ref, size)
            row, frames_ = _gpu_config("baseline", base, paths, data_s, "fp32", ("official",), device, 2, args.warmup)
            add(row, frames_, size)
            for r in rows:  # speedups of rows measured before the baseline
                if r["size"] == size and r.get("status") == "ok" and row.get("status") == "ok":
                    r["speedup"] = row["s_per_frame"] / r["s_per_frame"]
            if cuda:
                add(*_gpu_config("fp32-defaults", base, paths, data_s, "fp32", ("defaults",), device, args.batch,
                                 args.warmup), size)
            for precision in precisions:
                if precision != "fp32":
                    add(*_gpu_config(precision, base, paths, data_s, precision, (), device, args.batch, args.warmup), size)

        # 2. a whole run and the stream, in the fastest eager half precision at 256
        eager = [r for r in rows if r["size"] == 256 and r.get("status") == "ok" and r["precision"] in HALF and not r["variants"]]
        run_precision = max(eager, key=lambda r: r["fps"])["precision"] if eager else "fp32"
        data["end_to_end"] = _gpu_end_to_end(args, run_precision, folder)
        save()
        data["stream"] = [_gpu_stream(args, run_precision, folder, paced=False)]
        if data["stream"][0].get("status") == "measured" and (cuda or args.all_variants) and not over_budget("paced stream"):
            data["stream"].append(_gpu_stream(args, run_precision, folder, paced=True))
        save()

        # 3. what pays on CUDA, cheapest first: cudnn.benchmark, channels-last and both at 256; a kernel table when a
        # target is missed; torch.compile (a child process, bounded); the same options at the other sizes
        options = ([("cudnn_benchmark",), ("channels_last",), ("channels_last", "cudnn_benchmark")] if cuda
                   else [("channels_last",)]) if variants_on else []

        def variant_rows(size: int) -> None:
            base, paths = bases[size]
            for precision in [p for p in precisions if p in HALF] or ["fp32"]:
                for variant in options:
                    name = precision + "".join("+" + v for v in variant)
                    if not over_budget(f"{size} {name}"):
                        add(*_gpu_config(name, base, paths, inputs[size], precision, variant, device, args.batch,
                                         args.warmup), size)

        first = sizes[:1]
        for size in first:
            variant_rows(size)
        data["targets"] = _gpu_targets(rows, data["end_to_end"], data["stream"])
        if cuda and any(t["status"] == "missed" for t in data["targets"]) and 256 in bases:
            fastest = [r for r in rows if r["size"] == 256 and r.get("status") == "ok" and r["config"] != "baseline"]
            if fastest and not over_budget("profile"):
                best = max(fastest, key=lambda r: r["fps"])
                try:
                    data["profile"] = _gpu_profile(*bases[256], inputs[256], best["precision"],
                                                   tuple(v for v in best["variants"] if v not in ("strict", "defaults")),
                                                   device, args.batch)
                except Exception as e:  # noqa: BLE001
                    data["profile"] = {"config": best["config"], "batch": args.batch, "table": None, "error": _error(e)}
            save()
        for size in [s for s in compile_sizes if s in sizes]:
            if over_budget(f"{size} {compile_precision}+compile"):
                continue
            left = args.compile_timeout if args.budget_s is None else min(
                args.compile_timeout, args.budget_s - (time.perf_counter() - started))
            if left < 20:
                skipped.append(f"{size} {compile_precision}+compile (under 20 s of --budget_s left)")
                continue
            add(*_gpu_compile_row(args, size, compile_precision, folder / f"inputs_{size}.npz", folder, left), size)
        for size in sizes[1:]:
            variant_rows(size)
        data["targets"] = _gpu_targets(rows, data["end_to_end"], data["stream"])
    save(echo=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    mem = sub.add_parser("memory", help="peak memory against clip length")
    mem.add_argument("--checkpoint_dir", type=Path, default=None, help="default: synthetic checkpoints in the cache")
    mem.add_argument("--real", type=float, nargs="*", default=[0.4, 2.0], help="clip lengths (s) with real rendering")
    mem.add_argument("--stream", type=float, nargs="*", default=[10.0, 600.0], help="clip lengths (s), constant frames")
    mem.add_argument("--batch_size", type=int, default=2)
    spd = sub.add_parser("speed", help="renderer speed and fidelity per configuration")
    spd.add_argument("--checkpoint_dir", type=Path, default=None, help="default: synthetic checkpoints in the cache")
    spd.add_argument("--frames", type=int, default=8, help="frames rendered per configuration")
    spd.add_argument("--configs", nargs="+", default=list(SPEED_CONFIGS), choices=list(SPEED_CONFIGS))
    spd.add_argument("--name", default="speed", help="results file name: benchmarks/results/NAME.{json,md,png}")
    bl = sub.add_parser("blend", help="paste-back cost and difference per blend")
    bl.add_argument("--repeats", type=int, default=50)
    enh = sub.add_parser("enhance", help="per-frame cost of each face-enhancer mode")
    enh.add_argument("--frames", type=int, default=4)
    enh.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "int8"), default=None,
                     help="default: all this install runs (int8 needs neural-compressor or torchao)")
    enh.add_argument("--aux_dir", type=Path, default=None, help="folder with the aux weights (default: synthetic cache)")
    pre = sub.add_parser("presets", help="each preset end to end: s/frame and PSNR against its fp32 form")
    pre.add_argument("--frames", type=int, default=4)
    pre.add_argument("--presets", nargs="+", default=None, help="default: all of configs/presets.yaml")
    lmk = sub.add_parser("landmarks", help="ms per image of the landmark backends and their networks")
    lmk.add_argument("--repeats", type=int, default=3)
    lmk.add_argument("--aux_dir", type=Path, default=None, help="folder with the aux weights (default: synthetic cache)")
    par = sub.add_parser("parallel", help="whole runs over a slots x threads grid")
    par.add_argument("--checkpoint_dir", type=Path, default=None, help="default: synthetic checkpoints in the cache")
    par.add_argument("--frames", type=int, default=24, help="clip length in frames")
    par.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "int8"))
    srv = sub.add_parser("serve", help="N videos: a loop of CLI runs against one xtalker batch")
    srv.add_argument("--checkpoint_dir", type=Path, default=None, help="default: synthetic checkpoints in the cache")
    srv.add_argument("--videos", type=int, default=10)
    srv.add_argument("--frames", type=int, default=4, help="frames per video")
    srv.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "int8"))
    gp = sub.add_parser("gpu", help="CUDA: renderer speed, fidelity and memory per size, precision and option; end to "
                                    "end; streaming latency; issue 15's targets")
    gp.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (tiny settings, for a smoke test)")
    gp.add_argument("--checkpoint_dir", type=Path, default=None, help="default: synthetic checkpoints in the cache")
    gp.add_argument("--out", type=Path, default=None, help="write gpu.json and gpu.md here (default: benchmarks/results)")
    gp.add_argument("--sizes", default="256,512", help="comma-separated, e.g. 256")
    gp.add_argument("--precisions", default="fp32,fp16,bf16", help="comma-separated; fp32 is always measured (reference)")
    gp.add_argument("--frames", type=int, default=None, help="timed frames per configuration (default: cuda 32, cpu 2)")
    gp.add_argument("--batch", type=int, default=None, help="renderer batch (default: cuda 8, cpu 2)")
    gp.add_argument("--warmup", type=int, default=None, help="untimed warm-up batches (default: cuda 2, cpu 0)")
    gp.add_argument("--e2e_frames", type=int, default=None, help="clip length of the end-to-end run (default: cuda 100, cpu --frames)")
    gp.add_argument("--renderer_only", action="store_true", help="no end-to-end or streaming runs (also automatic without PyAV/soxr)")
    gp.add_argument("--all_variants", action="store_true", help="channels-last and compile rows on the CPU too")
    gp.add_argument("--compile_sizes", default="256", help="sizes with a torch.compile row (comma-separated; empty: none)")
    gp.add_argument("--compile_precision", default=None, choices=("fp32", "fp16", "bf16"), help="default: fp16 if measured, else bf16")
    gp.add_argument("--compile_mode", default="default", help="torch.compile mode")
    gp.add_argument("--compile_timeout", type=float, default=150.0, help="seconds for the compile row's process")
    gp.add_argument("--budget_s", type=float, default=170.0, help="skip the optional parts (variants, compile, paced "
                                                                   "stream, profile) once the suite has run this long")
    gpc = sub.add_parser("_gpu_compile", help=argparse.SUPPRESS)
    gpc.add_argument("--device", required=True)
    gpc.add_argument("--checkpoint_dir", type=Path, required=True)
    gpc.add_argument("--size", type=int, required=True)
    gpc.add_argument("--precision", required=True)
    gpc.add_argument("--inputs", type=Path, required=True)
    gpc.add_argument("--batch", type=int, required=True)
    gpc.add_argument("--warmup", type=int, required=True)
    gpc.add_argument("--compile_mode", default="default")
    gpc.add_argument("--frames_out", type=Path, required=True)
    sp1 = sub.add_parser("_speed", help=argparse.SUPPRESS)
    sp1.add_argument("--config", choices=list(SPEED_CONFIGS), required=True)
    sp1.add_argument("--inputs", type=Path, required=True)
    sp1.add_argument("--frames", type=int, required=True)
    sp1.add_argument("--checkpoint_dir", type=Path, required=True)
    sp1.add_argument("--out", type=Path, required=True)
    sp1.add_argument("--cache_dir", type=Path, required=True)
    one = sub.add_parser("_one", help=argparse.SUPPRESS)
    one.add_argument("--mode", choices=("real", "stream"), required=True)
    one.add_argument("--seconds", type=float, required=True)
    one.add_argument("--checkpoint_dir", type=Path, required=True)
    one.add_argument("--batch_size", type=int, default=2)
    args = parser.parse_args()
    suites = {"memory": memory, "speed": speed, "parallel": parallel, "blend": blend, "enhance": enhance,
              "presets": presets, "landmarks": landmarks, "serve": serve, "gpu": gpu}
    children = {"_speed": _speed_one, "_one": _measure_one, "_gpu_compile": _gpu_compile_one}  # fresh-process measurements, JSON on stdout
    if args.suite in suites:
        suites[args.suite](args)
    else:
        sys.stdout.write(json.dumps(children[args.suite](args)) + "\n")


if __name__ == "__main__":
    main()
