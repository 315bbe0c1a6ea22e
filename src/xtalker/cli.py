"""`inference.py` / `xtalker`: upstream SadTalker's command line, plus XTalker's own flags.

Parses arguments into an `InferenceConfig`, runs `pipeline.generate`, prints where the video went. Bad input
ends with one `error:` line on stderr and a non-zero exit, never a traceback or a half-written video.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path

from xtalker import __version__
from xtalker.config import FACERENDERS, NUM_POSE_STYLES, PRECISIONS, SIZES, InferenceConfig
from xtalker.finish import ALIGNS, BLENDS, check_background, check_enhancer
from xtalker.preprocess import PREPROCESS_MODES

log = logging.getLogger("xtalker")

# Upstream flags for the 3-D face model fitting and legacy loading; they do not change the output of the
# packed-checkpoint path, so they are accepted for drop-in compatibility and ignored.
IGNORED_UPSTREAM = {
    "--net_recon": str, "--init_path": str, "--use_last_fc": str, "--bfm_folder": str, "--bfm_model": str,
    "--focal": float, "--center": float, "--camera_d": float, "--z_near": float, "--z_far": float,
}
NOT_AVAILABLE = {
    "face3dvis": "--face3dvis (3-D face visualisation) is not available in XTalker; run without it",
}


def batch_size_arg(value: str) -> int | str:
    """`--batch_size N` as an int; anything else (auto, or a mistake) as given, for `InferenceConfig.validate`'s
    one-line error."""
    try:
        return int(value)
    except ValueError:
        return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inference.py",
        description="XTalker: one portrait + speech -> talking-head video (SadTalker-compatible).",
        epilog="commands: `xtalker batch LIST` (many videos, one model load), `xtalker doctor` (what this machine "
               "can do), `xtalker ui` (the web page; also xtalker-ui / python app.py)",
    )
    up = p.add_argument_group("SadTalker flags")
    up.add_argument("--driven_audio", type=Path, default=None, help="speech: wav, mp3, flac, ogg, m4a or a video's audio track")
    up.add_argument("--source_image", type=Path, default=None, help="portrait picture (png/jpg), or a video whose first frame is used")
    up.add_argument("--ref_eyeblink", type=Path, default=None, help="video whose eye blinks (expressions) drive the eyes")
    up.add_argument("--ref_pose", type=Path, default=None, help="video whose head motion is added to the generated pose")
    up.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints"), help="folder with the SadTalker checkpoint files")
    up.add_argument("--result_dir", type=Path, default=Path("results"), help="where <timestamp>.mp4 goes when --output is not given")
    up.add_argument("--pose_style", type=int, default=0, help=f"head-motion style, 0..{NUM_POSE_STYLES - 1}")
    up.add_argument("--batch_size", type=batch_size_arg, default=None,
                    help="frames rendered per network call (default 2), or auto: 2 on a CPU, on CUDA the most that fit "
                         "the free GPU memory (at most 64)")
    up.add_argument("--size", type=int, default=256, choices=SIZES, help="face render size")
    up.add_argument("--facerender", choices=FACERENDERS, default=None,
                    help="face renderer (default facevid2vid): pirender is the lightweight one (about 10x fewer operations "
                         "a frame; needs epoch_00190_iteration_000400000_checkpoint.pt; no head-angle keyframes)")
    up.add_argument("--expression_scale", type=float, default=1.0, help="scale of the speech-driven expression")
    up.add_argument("--input_yaw", nargs="+", type=float, default=None, help="yaw keyframes in degrees (one value: constant)")
    up.add_argument("--input_pitch", nargs="+", type=float, default=None, help="pitch keyframes in degrees")
    up.add_argument("--input_roll", nargs="+", type=float, default=None, help="roll keyframes in degrees")
    up.add_argument("--enhancer", type=str, default=None,
                    help="face enhancer: gfpgan (GFPGAN v1.4, needs GFPGANv1.4.pth), RestoreFormer (needs RestoreFormer.pth; "
                         "both output twice the size unless --enhance_scale 1), lightweight (unsharp mask, no weights), or "
                         "none (also overrides a preset's enhancer and background enhancer)")
    up.add_argument("--background_enhancer", type=str, default=None,
                    help="realesrgan: RealESRGAN x2plus upscales the picture under the restored face (needs "
                         "RealESRGAN_x2plus.pth and --enhancer gfpgan or RestoreFormer; in the full modes the still picture "
                         "is upscaled once per video), or none (overrides a preset's)")
    up.add_argument("--cpu", action="store_true", help="run on the CPU (the same as --device cpu)")
    up.add_argument("--face3dvis", action="store_true", help="not available")
    up.add_argument("--still", action="store_true", help="keep the source head pose (recommended with --preprocess full)")
    up.add_argument("--preprocess", default="crop", choices=PREPROCESS_MODES, help="how the source picture is cropped")
    up.add_argument("--verbose", action="store_true", help="log every stage; show tracebacks of internal errors")
    up.add_argument("--old_version", action="store_true",
                    help="load the legacy per-network checkpoints (auido2exp_00300-model.pth, auido2pose_00140-model.pth, "
                         "facevid2vid_00189-model.pth.tar, epoch_20.pth) instead of SadTalker_V0.0.2_*.safetensors; a "
                         "folder without *.safetensors uses them anyway. --size 512 renders with the 256 renderer's weights"),
    for flag, kind in IGNORED_UPSTREAM.items():
        up.add_argument(flag, type=kind, default=None, help=argparse.SUPPRESS)
    ours = p.add_argument_group("XTalker flags")
    ours.add_argument("--output", type=Path, default=None, help="write the video here (default: <result_dir>/<timestamp>.mp4)")
    ours.add_argument("--seed", type=int, default=None, help="seed for blinks and head motion: same seed, same video")
    ours.add_argument("--landmarks", default="auto", help="face landmark backend: upstream (RetinaFace + AWing FAN, needs their files), mediapipe (offline); "
                           "auto (default) picks upstream when its files are present")
    ours.add_argument("--threads", type=int, default=None, help="CPU threads for the networks (default: all cores)")
    ours.add_argument("--precision", choices=PRECISIONS, default=None,
                      help="renderer precision (default fp32); fp16 on CUDA only, int8 on the CPU only")
    ours.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                      help="render the next batch while the last is finished and encoded (default: on a GPU only)")
    ours.add_argument("--device", default=None,
                      help="auto (default: the first CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    ours.add_argument("--blend", choices=BLENDS, default=None,
                      help="paste-back blend of the full modes: seamless (upstream, Poisson), alpha, feather, gaussian")
    ours.add_argument("--enhance_align", choices=ALIGNS, default="source",
                      help="how --enhancer gfpgan/RestoreFormer finds the face: source (aligned once from the source landmarks; fast) or "
                           "detect (upstream: RetinaFace + ParseNet on every frame; needs detection_Resnet50_Final.pth and "
                           "parsing_parsenet.pth)")
    ours.add_argument("--enhance_scale", type=int, choices=(2, 1), default=2,
                      help="output size of --enhancer gfpgan/RestoreFormer: 2 (upstream: twice the rendered size, 1280x720 -> 2560x1440) or "
                           "1 (the rendered size: the restored face pasted back at it)")
    ours.add_argument("--no-compile", "--no_compile", dest="compile", action="store_false",
                      help="never build or load compiled graphs (int8 needs them; --facerender pirender then runs eagerly: "
                           "no compile time, slower frames; facevid2vid fp32/bf16 are eager anyway)")
    ours.add_argument("--cache_dir", type=Path, default=None,
                      help="where compiled int8 graphs are kept (default: $XTALKER_CACHE_DIR or ~/.cache/xtalker/compiled)")
    ours.add_argument("--backend", choices=("native", "ipex"), default="native", help="native PyTorch/oneDNN, or Intel Extension for PyTorch when importable")
    ours.add_argument("--preset", "--optimization_preset", default=None,
                      help="named settings from configs/presets.yaml (--optimization_preset: the presets fork's name for "
                           "it); explicit flags win")
    ours.add_argument("--list_presets", action="store_true", help="show the presets and exit")
    par = p.add_argument_group("parallel rendering (see also generate_distributed_infer.py)")
    par.add_argument("--workers", type=int, default=None,
                     help="render in N processes pinned to disjoint core slots, then merge into one video")
    par.add_argument("--job", type=Path, default=None,
                     help="job folder of a parallel run (default: a new one under $XTALKER_JOBS_DIR or ~/.cache/xtalker/jobs); "
                          "give an existing one to resume it")
    par.add_argument("--stage", choices=("prepare", "render", "merge"), default=None,
                     help="run one stage of a job (what run_distributed_infer_N.sh calls)")
    par.add_argument("--shard", type=int, default=None, help="with --stage render: which shard (0-based)")
    par.add_argument("--shards", type=int, default=None, help="with --stage render/merge: how many shards")
    ours.add_argument("--stream", action="store_true",
                      help="write a fragmented MP4 that plays while it is rendered, frames out as soon as the audio "
                           "allows; --driven_audio - reads 16 kHz mono s16le PCM from stdin (a live source)")
    ours.add_argument("--profile", action="store_true", help="print a per-stage timing table")
    ours.add_argument("--report", type=Path, default=None, help="write timings and run facts as JSON here")
    ours.add_argument("--version", action="version", version=f"xtalker {__version__}")
    return p


# Built-in defaults of the settings a preset may set; used when neither a flag nor the preset gives one.
PRESETTABLE_DEFAULTS = {"precision": "fp32", "batch_size": 2, "threads": None, "workers": 1, "blend": "seamless", "enhancer": None,
                        "background_enhancer": None, "device": "auto", "facerender": "facevid2vid"}


def resolve_presettable(args: argparse.Namespace) -> dict[str, object]:
    """Explicit flag > preset > built-in default, for every setting a preset may set."""
    from xtalker.parallel import available_cpus
    from xtalker.presets import AUTO, auto_workers, get_preset, without_none

    preset = get_preset(args.preset).settings if args.preset else {}
    chosen = {
        name: getattr(args, name) if getattr(args, name) is not None else preset.get(name, default)
        for name, default in PRESETTABLE_DEFAULTS.items()
    }
    if chosen["workers"] == AUTO:
        chosen["workers"] = auto_workers(len(available_cpus()))
    # --enhancer none: no enhancer (nor the preset's background enhancer), whatever the preset says
    return without_none(chosen, {name for name in PRESETTABLE_DEFAULTS if getattr(args, name) is not None})


def config_from_args(args: argparse.Namespace) -> InferenceConfig:
    chosen = resolve_presettable(args)
    return InferenceConfig(
        driven_audio=args.driven_audio,
        source_image=args.source_image,
        result_dir=args.result_dir,
        output=args.output,
        checkpoint_dir=args.checkpoint_dir,
        old_version=args.old_version,
        size=args.size,
        facerender=chosen["facerender"],
        preprocess=args.preprocess,
        still=args.still,
        pose_style=args.pose_style,
        batch_size=chosen["batch_size"],
        precision=chosen["precision"],
        device="cpu" if args.cpu else chosen["device"],
        overlap=args.overlap,
        expression_scale=args.expression_scale,
        input_yaw=args.input_yaw,
        input_pitch=args.input_pitch,
        input_roll=args.input_roll,
        ref_eyeblink=args.ref_eyeblink,
        ref_pose=args.ref_pose,
        landmarks=args.landmarks,
        backend=args.backend,
        compile=args.compile,
        cache_dir=args.cache_dir,
        seed=args.seed,
        threads=chosen["threads"],
        workers=chosen["workers"],
        blend=chosen["blend"],
        enhancer=chosen["enhancer"],
        enhance_align=args.enhance_align,
        enhance_scale=args.enhance_scale,
        background_enhancer=chosen["background_enhancer"],
        profile=args.profile,
        report=args.report,
    )


def ipex_unavailable() -> str | None:
    """Why --backend ipex cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("intel_extension_for_pytorch") is None:
        return ("--backend ipex: intel_extension_for_pytorch is not installed (no release installs next to torch 2.13); "
                "the native path already uses oneDNN with bf16 (--precision bf16), which is what IPEX would add on this CPU")
    return None


def preset_note(error: Exception, args: argparse.Namespace, config: InferenceConfig) -> str:
    """A missing file that a preset asked for (its renderer's, its enhancer's): say so, and how to keep the rest of
    the preset."""
    from xtalker.finish.enhance import REALESRGAN_FILE, EnhancerWeightsMissing
    from xtalker.models.pirender import FILE_NAME

    message = str(error)
    if args.preset and args.facerender is None and config.facerender == "pirender" and FILE_NAME in message:
        return (f"{message}; preset {args.preset} renders with --facerender pirender: add --facerender facevid2vid to "
                "use its other settings without that file")
    if args.preset and isinstance(error, EnhancerWeightsMissing):
        if args.background_enhancer is None and config.background_enhancer and REALESRGAN_FILE in message:
            return (f"{message}; preset {args.preset} uses --background_enhancer {config.background_enhancer}: add "
                    "--background_enhancer none to use its other settings without it")
        if args.enhancer is None:
            return (f"{message}; preset {args.preset} uses --enhancer {config.enhancer}: add --enhancer none to use its "
                    "other settings without it")
    return message


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"error: {message}\n")
    return code


def write_report(path: Path, result, config: InferenceConfig) -> None:
    import torch

    from xtalker.atomic import write_json_atomic
    from xtalker.config import FPS

    data = {
        "xtalker": __version__,
        "output": str(result.output),
        "frames": result.frames,
        "duration_s": result.frames / FPS,
        "size_wh": list(result.size_wh),
        "seed": result.seed,
        "landmarks": result.landmarks,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()},
        "profile": result.profile.as_dict(),
        "int8": None if result.int8 is None else {
            "from_cache": result.int8.from_cache, "seconds": round(result.int8.seconds, 2), "artifact": str(result.int8.path),
            "build_timings_s": result.int8.timings,
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
    }
    write_json_atomic(path, data)


def _run(config: InferenceConfig, args: argparse.Namespace, argv: list[str]):
    """One process (the default), N workers (--workers), or one stage of a job (--stage, from the script)."""
    import torch

    from xtalker import parallel
    from xtalker.config import ConfigError
    from xtalker.parallel import Job
    from xtalker.pipeline import generate

    if args.stream:
        if config.workers != 1 or args.stage is not None:
            raise ConfigError("--stream renders in this process as the audio arrives: leave out --workers and --stage")
        from xtalker.stream import stream_audio, stream_to_file

        return stream_to_file(config, stream_audio(config.driven_audio))
    if args.stage is None:
        if config.workers == 1:
            return generate(config)
        return parallel.run_workers(config, argv, config.workers, args.job)
    if config.workers != 1:
        raise ConfigError("--stage runs one stage of a job: leave out --workers")
    if args.job is None:
        raise ConfigError(f"--stage {args.stage} needs --job DIR")
    if config.threads:
        torch.set_num_threads(config.threads)
    job = Job(args.job)
    if args.stage == "prepare":
        parallel.stage_prepare(config, job)
        return None
    if args.shards is None or args.shards < 1:
        raise ConfigError(f"--stage {args.stage} needs --shards N (N >= 1)")
    if args.stage == "render":
        if args.shard is None:
            raise ConfigError("--stage render needs --shard I")
        parallel.stage_render(config, job, args.shard, args.shards)
        return None
    return parallel.stage_merge(config, job, args.shards, config.output)


# `xtalker NAME ...`: the commands beside the drop-in flags (each module has its own `main(argv)`).
SUBCOMMANDS = {"batch": "xtalker.serve.batch", "doctor": "xtalker.serve.doctor", "ui": "xtalker.serve.ui"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    from xtalker import logs

    logs.configure(args.verbose)
    from xtalker.presets import PresetError, describe, load_presets

    if args.list_presets:
        try:
            sys.stdout.write(describe(load_presets()) + "\n")
        except PresetError as e:
            return _fail(str(e))
        return 0
    if args.driven_audio is None or args.source_image is None:
        return _fail("--driven_audio and --source_image are required", 2)
    if str(args.driven_audio) == "-" and not args.stream:
        return _fail("--driven_audio - (PCM from stdin) needs --stream; or give an audio file", 2)
    for name, message in NOT_AVAILABLE.items():
        if getattr(args, name):
            return _fail(message, 2)
    if args.enhancer is not None and args.enhancer.lower() != "none":
        try:
            check_enhancer(args.enhancer)
        except ValueError as e:
            return _fail(str(e), 2)
    if args.backend == "ipex" and (problem := ipex_unavailable()):
        return _fail(problem, 2)
    try:
        config = config_from_args(args)
    except PresetError as e:
        return _fail(str(e), 2)
    try:
        check_background(config.background_enhancer, config.enhancer)
    except ValueError as e:
        return _fail(str(e), 2)

    from xtalker.api import USER_ERRORS
    from xtalker.interrupt import TERMINATED_EXIT, Terminated, sigterm_as_interrupt
    from xtalker.pipeline import check_run
    from xtalker.synthetic import is_synthetic_folder

    try:
        check_run(config, audio_file=not (args.stream and str(config.driven_audio) == "-"))
        if args.stream:
            from xtalker.stream import check_streamable

            check_streamable(config)
        if is_synthetic_folder(config.checkpoint_dir):
            log.warning("SYNTHETIC checkpoints in %s: the video shows meaningless pictures (real cost, fake weights). "
                        "Put the official SadTalker files there for real results.", config.checkpoint_dir)
        with sigterm_as_interrupt():
            result = _run(config, args, argv)
    except USER_ERRORS as e:
        return _fail(preset_note(e, args, config))
    except Terminated:
        return _fail("terminated (SIGTERM); no output was written; finished shards of a job are kept", TERMINATED_EXIT)
    except KeyboardInterrupt:
        return _fail("interrupted; no output was written", 130)
    except Exception as e:  # an internal error still gets one line unless --verbose
        if args.verbose:
            raise
        return _fail(f"internal error ({type(e).__name__}: {e}); run again with --verbose for the traceback")
    if result is None:  # a prepare or render stage: its output is in the job folder
        return 0
    if config.report is not None:
        write_report(config.report, result, config)
    if config.profile:
        sys.stdout.write(result.profile.table() + "\n")
    sys.stdout.write(f"{result.output}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
