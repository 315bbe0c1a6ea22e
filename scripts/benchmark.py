"""XTalker benchmarks; results go to benchmarks/results/ as JSON and a markdown table.

    python scripts/benchmark.py speed [--frames 8] [--configs baseline fp32 bf16 ...] [--checkpoint_dir C]
    python scripts/benchmark.py memory [--checkpoint_dir C] [--real 0.4 2] [--stream 10 600]
    python scripts/benchmark.py blend [--repeats 50]
    python scripts/benchmark.py enhance [--frames 4]
    python scripts/benchmark.py landmarks [--repeats 3]
    python scripts/benchmark.py parallel [--frames 24] [--precision bf16] [--checkpoint_dir C]
    python scripts/benchmark.py serve [--videos 10] [--frames 4] [--precision bf16] [--checkpoint_dir C]

speed: the same driving inputs (from the bundled example) through each renderer configuration, each in a
  fresh process: seconds per frame, speedup against the fp32 eager batch-2 baseline with upstream's work
  split (source work redone on batch copies every batch) measured in the same run, PSNR and max abs
  difference against our fp32 frames, achieved GFLOP/s (counted FLOPs / time) and its share of a matmul
  peak measured in the same run, peak RSS, real-time factor, and the first batch's extra time (compile /
  quantize). Writes speed.json, speed.md and speed.png.

parallel: whole CLI runs (fresh processes) over a grid of core slots x threads per slot, with
  `--workers` for more than one slot: wall time and speedup against one process using every core.

serve: many short videos, as upstream's users make them (a shell loop of `inference.py` runs, each loading
  every network) against `xtalker batch` over the same list (one load): wall time of each, seconds of
  overhead per video, and what each batch video loaded.

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


def _write_results(name: str, data: dict, table: str) -> None:
    """benchmarks/results/NAME.json and NAME.md; the table also goes to stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
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
    # name: (precision, batch size, upstream's work: official-layout generator, source work redone every batch)
    "baseline": ("fp32", 2, True),
    "fp32": ("fp32", 2, False),
    "bf16-b1": ("bf16", 1, False),
    "bf16": ("bf16", 2, False),
    "int8-cold": ("int8", 2, False),  # with an empty cache: calibrates, quantizes and compiles first
    "int8": ("int8", 2, False),  # a later run: the compiled graph comes from the cache
    "int8-b1": ("int8", 1, False),
}
TARGETS = {"bf16": (4.0, 40.0), "int8": (6.0, 33.0)}  # precision: (speedup, PSNR dB)


def _head(checkpoint_dir: Path, precision: str = "fp32", cache_dir: Path | None = None):
    """The networks as the CLI builds them for a crop-mode 256 run."""
    from xtalker.checkpoints import find_checkpoints
    from xtalker.pipeline import Setting, TalkingHead
    from xtalker.preprocess import get_backend

    return TalkingHead(Setting(find_checkpoints(checkpoint_dir), precision, cache_dir=cache_dir),
                       get_backend("auto", checkpoint_dir))


def _speed_inputs(checkpoint_dir: Path, frames: int, folder: Path) -> Path:
    """Source crop, source semantics and `frames` driving windows from the bundled example, saved once."""
    from xtalker.media import load_audio
    from xtalker.pipeline import example_inputs

    inputs = example_inputs(_head(checkpoint_dir), PORTRAIT, load_audio(_speech_of_length(frames / 25 + 0.1, folder)))
    path = folder / "inputs.npz"
    np.savez(path, image=inputs.image, semantics=inputs.semantics, windows=inputs.sequence.windows(0, frames))
    return path


def _flops_per_frame(checkpoint_dir: Path, inputs: Path) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of one frame's renderer work, and of the per-video source work."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from xtalker.checkpoints import find_checkpoints
    from xtalker.render import Renderer

    data = np.load(inputs)
    paths = find_checkpoints(checkpoint_dir)
    renderer = Renderer.from_checkpoints(paths.packed, paths.mapping, paths.coeff_nc)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as source_count:
            source = renderer.prepare(data["image"], data["semantics"])
        with FlopCounterMode(display=False) as frame_count:
            renderer.render(source, data["windows"][:1])
    return {"frame": float(frame_count.get_total_flops()), "source": float(source_count.get_total_flops())}


def _matmul_peak(dtype_name: str, seconds: float = 1.5) -> float:
    """Sustained GFLOP/s of a large square matmul in this process's thread setting."""
    import torch

    n = 2048
    if dtype_name == "int8":
        a = torch.randint(-100, 100, (n, n), dtype=torch.int8)
        b = torch.randint(-100, 100, (n, n), dtype=torch.int8)

        def op():
            return torch._int_mm(a, b)
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)

        def op():
            return a @ b
    op()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        op()
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

    precision, batch, per_batch_source = SPEED_CONFIGS[args.config]
    data = np.load(args.inputs)
    windows = data["windows"][: args.frames]
    start = time.perf_counter()
    head = _head(args.checkpoint_dir, precision, args.cache_dir)
    load_s = time.perf_counter() - start
    renderer = head.renderer
    if per_batch_source:
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
        "config": args.config, "precision": precision, "batch_size": batch, "frames": len(frames),
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


def speed(args: argparse.Namespace) -> None:
    import torch

    from xtalker.synthetic import default_cache_dir, ensure_cached

    if args.checkpoint_dir is None:
        args.checkpoint_dir = ensure_cached(default_cache_dir())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = _speed_inputs(args.checkpoint_dir, args.frames, folder)
        flops = _flops_per_frame(args.checkpoint_dir, inputs)
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
        reference = np.load(folder / "fp32.npy") if (folder / "fp32.npy").is_file() else None
        base = next((r for r in rows if r["config"] == "baseline"), None)
        for r in rows:
            frames = np.load(folder / f"{r['config']}.npy")
            r["psnr_db"] = _psnr(frames, reference) if reference is not None else float("nan")
            r["max_abs"] = float(np.abs(frames - reference).max()) if reference is not None else float("nan")
            r["speedup"] = base["s_per_frame"] / r["s_per_frame"] if base else float("nan")
            work = flops["frame"] + (flops["source"] if r["config"] == "baseline" else 0.0)
            r["gflops"] = work / r["s_per_frame"] / 1e9
            r["peak_fraction"] = r["gflops"] / peaks[r["precision"]]
            r["rtf"] = r["s_per_frame"] * 25
            r["first_extra_s"] = max(0.0, r["first_batch_s"] - r["s_per_frame"] * r["batch_size"])
            if r["precision"] in TARGETS:
                need_x, need_db = TARGETS[r["precision"]]
                met = r["speedup"] >= need_x and r["psnr_db"] >= need_db
                r["target"] = f"{'met' if met else 'MISSED'} (>= {need_x:g}x, >= {need_db:g} dB)"
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "peak_gflops": peaks},
        "frames": args.frames, "flops_per_frame": flops, "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _speed_markdown(result)
    (RESULTS / "speed.md").write_text(table)
    _speed_chart(result, RESULTS / "speed.png")
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

def _stand_in_frames(count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` 256 px face crops of the bundled portrait (slightly shifted each, like rendered frames) and the
    source face's 5 points in them."""
    from xtalker.finish import five_points
    from xtalker.media import first_frame
    from xtalker.preprocess import get_backend
    from xtalker.preprocess.crop import crop_source

    picture = first_frame(PORTRAIT)
    backend = get_backend("mediapipe", None)
    crop = crop_source(picture, backend.detect(picture)[0].landmarks, mode="crop", pic_size=256)
    points = five_points(backend.detect(crop.image)[0].landmarks)
    frames = np.stack([np.roll(crop.image, i, axis=1) for i in range(count)])
    return frames, points


def _time_batches(fn, frames: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Seconds per frame over all frames in batches (after one warm-up batch) and the last outputs."""
    fn(frames[:batch], 0)
    start = time.perf_counter()
    outs = [fn(frames[i : i + batch], i) for i in range(0, len(frames), batch)]
    return (time.perf_counter() - start) / len(frames), np.concatenate(outs)


def enhance(args: argparse.Namespace) -> None:
    """Per-frame cost of each enhancer mode on 256 px frames (output 512), synthetic weights; `detect` rows time
    upstream's whole procedure with the face found (random detector weights score below its 0.97 threshold, so
    the detector's time is measured on the frame and the rest runs on the source face's points)."""
    from xtalker.finish.enhance import (
        DetectedFaces,
        DetectingEnhancer,
        Restorer,
        Sharpener,
        SourceAlignedEnhancer,
        enhance_detected,
    )
    from xtalker.synthetic import default_aux_dir
    from xtalker.synthetic.auxiliary import ensure_all_aux

    folder = ensure_all_aux(args.aux_dir or default_aux_dir())
    frames, points = _stand_in_frames(args.frames)
    rows, outputs = [], {}

    def add(mode: str, precision: str, fn, batch: int) -> None:
        seconds, out = _time_batches(fn, frames, batch)
        outputs[(mode, precision)] = out
        rows.append({"mode": mode, "precision": precision, "batch": batch, "ms_per_frame": 1000 * seconds,
                     "out_wh": [int(out.shape[2]), int(out.shape[1])]})

    add("lightweight", "-", Sharpener(), 2)
    for precision in ("fp32", "bf16"):
        restorer = Restorer(folder / "GFPGANv1.4.pth", precision, seed=0)
        add("gfpgan source", precision, SourceAlignedEnhancer(restorer, points, (256, 256)), 2)
        upstream = DetectingEnhancer(restorer, folder / "detection_Resnet50_Final.pth", folder / "parsing_parsenet.pth",
                                     precision)
        faces = DetectedFaces(points[None], np.zeros((1, 5), np.float32))

        def detect_then_enhance(batch: np.ndarray, first: int, upstream=upstream, faces=faces) -> np.ndarray:
            bgr = np.ascontiguousarray(batch[..., ::-1])
            upstream.faces(list(bgr))  # the detector's work on every frame
            out = [enhance_detected(f, faces, lambda c, k=first + i: upstream.restorer(c, [(k, 0)]), upstream.parse)
                   for i, f in enumerate(bgr)]
            return np.stack(out)[..., ::-1]

        add("gfpgan detect (upstream)", precision, detect_then_enhance, 1)
    baseline = next(r for r in rows if r["mode"].startswith("gfpgan detect") and r["precision"] == "fp32")
    for r in rows:
        r["speedup_vs_upstream_fp32"] = baseline["ms_per_frame"] / r["ms_per_frame"]
        if r["precision"] == "bf16":
            mode = r["mode"]
            r["psnr_vs_fp32_db"] = _psnr(outputs[(mode, "bf16")] / 255.0, outputs[(mode, "fp32")] / 255.0)
    machine = {"cpu": cpu_name(), "threads": int(__import__("torch").get_num_threads()), "frames": args.frames}
    lines = [(f"Face enhancer per 256 px frame (output 512 except lightweight), {machine['cpu']}, "
              f"{machine['threads']} threads, {args.frames} frames, synthetic weights."), "",
             "| mode | precision | batch | ms/frame | vs upstream procedure fp32 | PSNR vs fp32 |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        psnr = f"{r['psnr_vs_fp32_db']:.1f} dB" if "psnr_vs_fp32_db" in r else "-"
        lines.append(f"| {r['mode']} | {r['precision']} | {r['batch']} | {r['ms_per_frame']:.1f} | "
                     f"{r['speedup_vs_upstream_fp32']:.2f}x | {psnr} |")
    _write_results("enhance", {"machine": machine, "rows": rows}, "\n".join(lines) + "\n")


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
    bl = sub.add_parser("blend", help="paste-back cost and difference per blend")
    bl.add_argument("--repeats", type=int, default=50)
    enh = sub.add_parser("enhance", help="per-frame cost of each face-enhancer mode")
    enh.add_argument("--frames", type=int, default=4)
    enh.add_argument("--aux_dir", type=Path, default=None, help="folder with the aux weights (default: synthetic cache)")
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
              "landmarks": landmarks, "serve": serve}
    children = {"_speed": _speed_one, "_one": _measure_one}  # fresh-process measurements, JSON on stdout
    if args.suite in suites:
        suites[args.suite](args)
    else:
        sys.stdout.write(json.dumps(children[args.suite](args)) + "\n")


if __name__ == "__main__":
    main()
