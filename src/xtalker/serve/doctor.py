"""`xtalker doctor` (also `xtalker-doctor`): what this machine has and can do, and what to fix.

Versions, the CPU features that pick the fast paths, cores, memory and disk, the checkpoints (official or
synthetic), the auxiliary files and the landmark backend `auto` will use, int8's prerequisites and its compiled
graphs, the video encoder. `--quick` then renders a few frames per precision and recommends a preset. Human
readable, or `--json`. Exit status 1 when something a run needs is missing (each such line says how to fix it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# CPU flags (as /proc/cpuinfo names them) that decide XTalker's fast paths.
CPU_FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX-512 BF16 (bf16 renderer at full speed)",
    "avx512_vnni": "AVX-512 VNNI (int8 convolutions)",
    "amx_tile": "AMX tiles",
    "amx_bf16": "AMX BF16",
    "amx_int8": "AMX INT8",
}
PACKAGES = ("numpy", "opencv-python-headless", "av", "pillow", "safetensors", "neural-compressor", "torchao",
            "gradio", "flytekit")
PSNR_FLOOR = {"bf16": 40.0, "int8": 33.0}  # below this a precision is not recommended
PRESET_OF = {"fp32": "quality", "bf16": "balanced", "int8": "fast"}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # the line that fixes it (when not ok)
    needed: bool = True  # a run cannot work without it (else: an optional capability)


@dataclass
class Report:
    facts: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    quick: dict[str, Any] | None = None

    @property
    def healthy(self) -> bool:
        return all(c.ok for c in self.checks if c.needed)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flag_line = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    if "avx512vnni" in flags:  # some kernels spell it without the underscore
        flags.add("avx512_vnni")
    import torch

    return {
        "model": model.group(1).strip() if model else platform.processor() or platform.machine(),
        "features": {name: name in flags for name in CPU_FEATURES},
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [{"index": i, "name": torch.cuda.get_device_name(i),
             "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())]


def _memory() -> dict[str, float]:
    info = {}
    if Path("/proc/meminfo").is_file():
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                info[key] = round(int(value.split()[0]) / 2**20, 1)
    return {"total_gb": info.get("MemTotal", 0.0), "available_gb": info.get("MemAvailable", 0.0)}


def _free_gb(path: Path) -> float:
    for folder in (path, *path.resolve().parents):
        if folder.exists():
            return round(shutil.disk_usage(folder).free / 2**30, 1)
    return 0.0


def _onednn() -> str:
    import torch

    found = re.search(r"(?:oneDNN|MKL-DNN) v([\d.]+)", torch.__config__.show())
    return found.group(1) if found else "not built in"


def versions() -> dict[str, Any]:
    import torch

    from xtalker import __version__

    return {"xtalker": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onednn": _onednn(), **{name: _version(name) for name in PACKAGES}}


def _checkpoint_checks(folder: Path, report: Report) -> None:
    from xtalker.checkpoints import CheckpointError, find_checkpoints
    from xtalker.synthetic import is_synthetic_folder

    kind = "synthetic (meaningless pictures)" if is_synthetic_folder(folder) else "official"
    found, legacy = {}, False
    for size in (256, 512):
        for preprocess in ("crop", "full"):
            try:
                legacy |= find_checkpoints(folder, size, preprocess).legacy
                found[f"{size} {preprocess}"] = True
            except CheckpointError:
                found[f"{size} {preprocess}"] = False
    if legacy:  # no *.safetensors here: the legacy per-network files, as upstream falls back to them
        kind += ", legacy per-network files"
    report.facts["checkpoints"] = {"folder": str(folder.resolve()), "kind": kind if any(found.values()) else None,
                                   "settings": found}
    fix = f"run scripts/download_models.sh {folder} (or pass --checkpoint_dir with the SadTalker files)"
    report.checks.append(Check("checkpoints 256", found["256 crop"],
                               f"{folder}: {kind}" if found["256 crop"] else f"none in {folder.resolve()}", fix))
    report.checks.append(Check("checkpoints 512", found["512 crop"], "for --size 512", fix, needed=False))
    report.checks.append(Check("full/extfull modes", found["256 full"], "mapping_00109-model.pth.tar", fix,
                               needed=False))
    from xtalker.models.pirender import FILE_NAME

    pirender = (folder / FILE_NAME).is_file()
    report.facts["checkpoints"]["pirender"] = pirender
    report.checks.append(Check("PIRender renderer", pirender, f"{FILE_NAME} for --facerender pirender",
                               f"put {FILE_NAME} in {folder} (see checkpoints/README.md)", needed=False))


def _aux_checks(folder: Path, report: Report) -> None:
    from xtalker.models import auxfile, awing, gfpgan, parsenet, restoreformer, retinaface, rrdbnet
    from xtalker.preprocess.landmarks.base import backend_names, unavailable_reason

    purposes = {gfpgan.FILE_NAME: "--enhancer gfpgan (presets fast, balanced)",
                restoreformer.FILE_NAME: "--enhancer RestoreFormer (preset quality)",
                rrdbnet.FILE_NAME: "--background_enhancer realesrgan (preset quality)",
                retinaface.FILE_NAME: "--enhance_align detect, upstream landmarks",
                parsenet.FILE_NAME: "--enhance_align detect", awing.FILE_NAME: "upstream landmarks (AWing FAN)"}
    files = {}
    for name, purpose in purposes.items():
        where = auxfile.locate(name, folder)
        files[name] = str(where) if where else None
        report.checks.append(Check(name, where is not None, f"for {purpose}",
                                   f"run scripts/download_models.sh {folder} (it fetches the enhancer files too)",
                                   needed=False))
    reasons = {name: unavailable_reason(name, folder) for name in backend_names()}
    chosen = next((name for name, reason in reasons.items() if reason is None), None)
    report.facts["aux_files"] = files
    report.facts["landmarks"] = {"auto": chosen, "unavailable": {k: v for k, v in reasons.items() if v}}
    report.checks.append(Check("landmark backend", chosen is not None, f"auto uses {chosen}" if chosen else
                               "; ".join(f"{k}: {v}" for k, v in reasons.items()),
                               "install the core requirements (pip install -e .) for the offline mediapipe backend"))


def _int8_checks(cache_dir: Path | None, report: Report) -> None:
    from xtalker.render import QuantizationUnavailableError
    from xtalker.render import quantize

    cache = Path(cache_dir) if cache_dir else quantize.default_cache_dir()
    graphs = sorted(cache.glob("generator-int8-*.pt2")) if cache.is_dir() else []
    report.facts["int8"] = {"cache": str(cache), "compiled_graphs": len(graphs),
                            "cache_mb": round(sum(g.stat().st_size for g in graphs) / 2**20, 1)}
    try:
        engine = quantize.check_available()
        report.facts["int8"]["engine"] = engine
        report.checks.append(Check("int8", True, f"{engine}; C++ compiler found; {len(graphs)} compiled graph(s) in "
                                                 f"{cache}", needed=False))
    except QuantizationUnavailableError as e:
        report.facts["int8"]["engine"] = None
        report.checks.append(Check("int8", False, str(e).split(";")[0], str(e), needed=False))
    features = report.facts["cpu"]["features"]
    if not (features["avx512_vnni"] or features["amx_int8"]):
        report.checks.append(Check("int8 hardware", False, "no VNNI/AMX: int8 runs, but not faster than bf16",
                                   "use --preset balanced (bf16) on this CPU", needed=False))
    if not (features["avx512_bf16"] or features["amx_bf16"]):
        report.checks.append(Check("bf16 hardware", False, "no AVX-512 BF16/AMX: bf16 is emulated and slow",
                                   "use --preset quality (fp32) on this CPU", needed=False))


def _encoder_checks(report: Report) -> None:
    try:
        import av
    except ImportError:
        report.checks.append(Check("video encoder", False, "PyAV is not installed", "pip install av"))
        return
    codecs = {}
    for name in ("libx264", "h264", "aac"):
        try:
            av.codec.Codec(name, "w")
            codecs[name] = True
        except Exception:  # PyAV raises different errors for unknown and decode-only codecs
            codecs[name] = False
    report.facts["encoders"] = {"av": av.__version__, **codecs}
    h264 = codecs["libx264"] or codecs["h264"]
    report.checks.append(Check("H.264 + AAC encoders", h264 and codecs["aac"],
                               f"PyAV {av.__version__}: " + ", ".join(k for k, v in codecs.items() if v),
                               "pip install --force-reinstall av (its wheels bundle FFmpeg with libx264)"))


def examine(checkpoint_dir: Path, cache_dir: Path | None = None) -> Report:
    report = Report()
    report.facts["versions"] = versions()
    report.facts["cpu"] = _cpu()
    report.facts["memory"] = _memory()
    report.facts["gpus"] = _gpus()
    report.facts["disk_free_gb"] = {"checkpoints": _free_gb(checkpoint_dir)}
    _checkpoint_checks(checkpoint_dir, report)
    _aux_checks(checkpoint_dir, report)
    _int8_checks(cache_dir, report)
    _encoder_checks(report)
    memory = report.facts["memory"]["available_gb"]
    report.checks.append(Check("memory", memory >= 3.0, f"{memory} GB available (a 256 run peaks near 2.5 GB, "
                               "512 near 4.5 GB)", "close other programs, or use --size 256", needed=False))
    return report


def quick_test(checkpoint_dir: Path, cache_dir: Path | None, frames: int, build_int8: bool) -> dict[str, Any]:
    """A few frames of the bundled example per precision: s/frame and PSNR against fp32; a recommended preset."""
    import numpy as np
    import torch

    from xtalker.checkpoints import find_checkpoints
    from xtalker.media import load_audio
    from xtalker.pipeline import CALIBRATION_PORTRAIT, CALIBRATION_SPEECH, Setting, TalkingHead, example_inputs
    from xtalker.preprocess import get_backend
    from xtalker.presets import auto_workers
    from xtalker.render import QuantizationUnavailableError
    from xtalker.render import quantize

    paths = find_checkpoints(checkpoint_dir)
    landmarks = get_backend("auto", checkpoint_dir)
    wav = load_audio(CALIBRATION_SPEECH)[: (frames + 2) * 640]
    precisions = ["fp32", "bf16"]
    notes = {}
    try:
        quantize.check_available()
        precisions.append("int8")
    except QuantizationUnavailableError as e:
        notes["int8"] = f"not measured: {e}"
    rows, reference = {}, None
    for precision in precisions:
        head = TalkingHead(Setting(paths, precision, cache_dir=cache_dir), landmarks)
        if precision == "int8":
            if not build_int8 and not head.int8_cached():
                notes["int8"] = "not measured: no compiled graph yet (--build_int8 builds it once, a few minutes)"
                continue
            head.quantize()
        inputs = example_inputs(head, CALIBRATION_PORTRAIT, wav)
        windows = inputs.sequence.windows(0, frames)
        renderer = head.renderer
        with torch.inference_mode():
            source = renderer.prepare(inputs.image, inputs.semantics)
            renderer.render(source, windows[:1])  # first call: caches, lazy plans
            start = time.perf_counter()
            out = torch.cat([renderer.render(source, windows[i : i + 1]).float() for i in range(frames)]).numpy()
            seconds = (time.perf_counter() - start) / frames
        if reference is None:
            reference = out
        mse = float(np.mean((out.astype(np.float64) - reference) ** 2))
        rows[precision] = {"s_per_frame": round(seconds, 3),
                           "psnr_db": None if mse == 0 else round(10 * np.log10(1.0 / mse), 1)}
    fp32 = rows["fp32"]["s_per_frame"]
    for row in rows.values():
        row["speedup"] = round(fp32 / row["s_per_frame"], 2)
    good = [p for p, r in rows.items() if p == "fp32" or (r["psnr_db"] or 99) >= PSNR_FLOOR[p]]
    best = min(good, key=lambda p: rows[p]["s_per_frame"] * (1.0 if p == "fp32" else 1.05))  # ties go to quality
    preset = PRESET_OF[best]
    if best == "int8" and auto_workers(len(os.sched_getaffinity(0))) > 1:
        preset = "ultra_fast"
    return {"frames": frames, "size": 256, "threads": torch.get_num_threads(), "precisions": rows, "notes": notes,
            "recommended_preset": preset}


def _enhancer_note(name: str) -> str:
    """What the recommended preset adds after the renderer (the quick test times the renderer only)."""
    from xtalker.presets import PresetError, get_preset

    try:
        settings = get_preset(name).settings
    except PresetError:
        return ""
    added = [f"--{k} {settings[k]}" for k in ("enhancer", "background_enhancer") if settings.get(k)]
    return f" (it also runs {' and '.join(added)}: add --enhancer none to go without)" if added else ""


def render_text(report: Report) -> str:
    f = report.facts
    v, cpu, mem = f["versions"], f["cpu"], f["memory"]
    lines = [
        f"XTalker {v['xtalker']}  python {v['python']}  torch {v['torch']}  oneDNN {v['onednn']}",
        "packages: " + ", ".join(f"{k} {val}" for k, val in v.items()
                                 if k not in ("xtalker", "python", "torch", "onednn") and val),
        f"CPU: {cpu['model']}; {cpu['usable_cores']} usable of {cpu['cores']} cores, torch uses "
        f"{cpu['torch_threads']} threads; torch capability {cpu['torch_capability']}",
        "CPU features: " + ", ".join(f"{label} {'yes' if cpu['features'][name] else 'no'}"
                                     for name, label in CPU_FEATURES.items()),
        f"memory: {mem['available_gb']} of {mem['total_gb']} GB available; disk free by the checkpoints: "
        f"{f['disk_free_gb']['checkpoints']} GB",
        "GPUs: " + (", ".join(f"cuda:{g['index']} {g['name']} ({g['memory_gb']} GB)" for g in f["gpus"])
                    or "none visible to torch (--device auto runs on the CPU)"),
        "",
    ]
    for c in report.checks:
        mark = "ok  " if c.ok else ("MISSING" if c.needed else "no  ")
        lines.append(f"{mark:<8}{c.name}: {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':<8}-> {c.fix}")
    if report.quick:
        q = report.quick
        lines += ["", f"quick test: {q['frames']} frames at 256 of the bundled example, {q['threads']} threads"]
        for precision, r in q["precisions"].items():
            psnr = "reference" if precision == "fp32" else f"{r['psnr_db']} dB vs fp32"
            lines.append(f"  {precision:<5} {r['s_per_frame']:.2f} s/frame  {r['speedup']:.2f}x  {psnr}")
        for precision, note in q["notes"].items():
            lines.append(f"  {precision:<5} {note}")
        lines.append(f"recommended: --preset {q['recommended_preset']}{_enhancer_note(q['recommended_preset'])}")
    lines += ["", "all needed parts are present" if report.healthy else
              "something a run needs is missing: see the MISSING lines"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xtalker doctor", description="What this machine has and can do for XTalker.")
    p.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints"), help="folder with the SadTalker files")
    p.add_argument("--cache_dir", type=Path, default=None, help="where compiled int8 graphs are kept")
    p.add_argument("--quick", action="store_true", help="also render a few frames per precision and recommend a preset")
    p.add_argument("--frames", type=int, default=4, help="frames per precision in the quick test (default 4)")
    p.add_argument("--build_int8", action="store_true", help="in the quick test, build the int8 graph if missing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--verbose", action="store_true", help="show third-party warnings too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from xtalker import logs

    logs.configure(args.verbose)
    report = examine(args.checkpoint_dir, args.cache_dir)
    if args.quick:
        if report.healthy:
            report.quick = quick_test(args.checkpoint_dir, args.cache_dir, max(1, args.frames), args.build_int8)
        else:
            report.checks.append(Check("quick test", False, "skipped: fix the MISSING lines first"))
    if args.json:
        sys.stdout.write(json.dumps({"healthy": report.healthy, "facts": report.facts,
                                     "checks": [asdict(c) for c in report.checks], "quick": report.quick},
                                    indent=1) + "\n")
    else:
        sys.stdout.write(render_text(report) + "\n")
    return 0 if report.healthy else 1
