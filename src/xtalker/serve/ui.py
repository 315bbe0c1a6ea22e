"""`xtalker-ui` / `python app.py`: a Gradio page over one warm `XTalker`, and its `/generate` HTTP API.

Picture (upload or webcam) + speech (upload or microphone) + the CLI's per-video settings -> the video, the seed
used and the per-stage timings; or, with Stream, one-second pieces played while the rest renders (`/stream`). One render at a time (a bounded queue shows each waiting request its place), a
progress bar in frames, a cancel button, the bundled example one click away, bad input shown as its one-line
message. Serves on 127.0.0.1 unless told otherwise; makes no network calls (analytics and hub telemetry off).
Needs the `ui` extra (`pip install -e ".[ui]"`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

# Before gradio is imported: nothing of this page may reach the network.
OFFLINE = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
PACKAGED_EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "calibration"
NO_PRESET = "(none)"
DEFAULT = "(preset's)"


class Cancelled(Exception):
    """The page's Cancel button stopped this render."""


def _examples() -> list[list[str]]:
    """The demo portrait + clip (from a checkout, else the copies packaged for int8 calibration)."""
    pairs = [(EXAMPLES / "source_image" / "astronaut.png", EXAMPLES / "driven_audio" / "hello.wav"),
             (PACKAGED_EXAMPLES / "portrait.png", PACKAGED_EXAMPLES / "speech.wav")]
    return [[str(p), str(a)] for p, a in pairs if p.is_file() and a.is_file()][:1]


def timings_markdown(video) -> str:
    """The per-stage timings of a result as a small Markdown table."""
    stages = {k: v for k, v in video.profile["stages_s"].items() if v > 0}
    rows = "\n".join(f"| {name} | {sec:.2f} |" for name, sec in stages.items())
    loaded = ", ".join(video.loaded) or "none (all warm)"
    return (f"| stage | seconds |\n| --- | ---: |\n{rows}\n| **total** | **{video.seconds:.2f}** |\n\n"
            f"{video.frames} frames, {video.profile['render_s_per_frame']:.2f} s/frame rendering; "
            f"networks loaded: {loaded}")


class Page:
    """The page's behaviour, apart from its layout: one XTalker, per-session cancel flags, an output folder."""

    def __init__(self, xt, output_dir: Path):
        self.xt = xt
        self.output_dir = output_dir
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _flag(self, session: str) -> threading.Event:
        with self._lock:
            return self._cancel.setdefault(session, threading.Event())

    def cancel(self, session: str) -> None:
        self._flag(session).set()

    @staticmethod
    def _options(source_image: str | None, driven_audio: str | None, preset: str, size: int, preprocess: str,
                 still: bool, pose_style: int, expression_scale: float, enhancer: str, blend: str,
                 seed: float | None, batch_size: float | None, facerender: str | None = DEFAULT,
                 enhance_scale: int | None = 2, background_enhancer: str | None = DEFAULT) -> dict[str, Any]:
        """The page's fields as XTalker options; bad input raises a `ValueError` subclass with the message to show."""
        from xtalker.config import ConfigError

        if not source_image:
            raise ConfigError("no source image: upload a portrait (or take one with the webcam)")
        if not driven_audio:
            raise ConfigError("no driven audio: upload a speech clip (or record one with the microphone)")
        options: dict[str, Any] = {"size": int(size), "preprocess": preprocess, "still": bool(still),
                                   "pose_style": int(pose_style), "expression_scale": float(expression_scale)}
        if enhancer and enhancer != DEFAULT:  # "none" too: it turns off the preset's enhancer
            options["enhancer"] = enhancer
        if background_enhancer and background_enhancer != DEFAULT:
            options["background_enhancer"] = background_enhancer
        if blend and blend != DEFAULT:
            options["blend"] = blend
        if seed is not None and int(seed) >= 0:
            options["seed"] = int(seed)
        if batch_size is not None and int(batch_size) > 0:
            options["batch_size"] = int(batch_size)
        if facerender and facerender != DEFAULT:
            options["facerender"] = facerender
        if enhance_scale is not None:
            options["enhance_scale"] = int(enhance_scale)
        options["preset"] = None if preset in (NO_PRESET, "", None) else preset
        return options

    def _watch(self, session: str, progress):
        """A progress callback that reports frames and stops the run once this session pressed Cancel."""
        flag = self._flag(session)
        flag.clear()

        def on_frames(done: int, total: int) -> None:
            if flag.is_set():
                raise Cancelled("cancelled")
            if progress is not None:
                progress((done, total), desc="rendering", unit="frames")

        return on_frames

    def generate(self, source_image: str | None, driven_audio: str | None, preset: str, size: int, preprocess: str,
                 still: bool, pose_style: int, expression_scale: float, enhancer: str, blend: str,
                 seed: float | None = -1, batch_size: float | None = 0, facerender: str | None = DEFAULT,
                 enhance_scale: int | None = 2, background_enhancer: str | None = DEFAULT, session: str = "",
                 progress=None) -> tuple[str, int, str]:
        """The page's Generate: (video path, seed used, timings). Raises `ValueError` subclasses with the message
        to show for bad input."""
        options = self._options(source_image, driven_audio, preset, size, preprocess, still, pose_style,
                                expression_scale, enhancer, blend, seed, batch_size, facerender, enhance_scale,
                                background_enhancer)
        output = self.output_dir / f"xtalker-{uuid.uuid4().hex[:12]}.mp4"
        video = self.xt.generate(source_image, driven_audio, output, progress=self._watch(session, progress), **options)
        return str(video.output), video.seed, timings_markdown(video)

    def stream(self, source_image: str | None, driven_audio: str | None, preset: str, size: int, preprocess: str,
               still: bool, pose_style: int, expression_scale: float, enhancer: str, blend: str,
               seed: float | None = -1, batch_size: float | None = 0, facerender: str | None = DEFAULT,
               enhance_scale: int | None = 2, background_enhancer: str | None = DEFAULT, session: str = "",
               progress=None) -> Iterator[tuple[str, int, str]]:
        """The page's Stream: one-second mp4 segments as soon as they are rendered, each as (segment path, seed,
        status line); the speech is fed to the renderer as a live source would deliver it."""
        from xtalker.media import load_audio
        from xtalker.stream import file_chunks, segments

        options = self._options(source_image, driven_audio, preset, size, preprocess, still, pose_style,
                                expression_scale, enhancer, blend, seed, batch_size, facerender, enhance_scale,
                                background_enhancer)
        wav = load_audio(driven_audio)
        total = len(wav) // 640
        live = self.xt.stream(source_image, file_chunks(wav), **options)
        on_frames = self._watch(session, progress)

        def watched() -> Iterator:
            for frames in live:
                on_frames(live.frames, total)
                yield frames

        folder = Path(tempfile.mkdtemp(prefix="stream-", dir=self.output_dir))
        for path in segments(watched(), wav, folder):
            yield (str(path), live.seed,
                   f"{live.frames}/{total} frames; first frame after {live.first_frame_s:.2f} s")


def build(xt, output_dir: Path, max_queue: int = 8):
    """The Gradio Blocks page over `xt`."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    import gradio as gr

    from xtalker.api import USER_ERRORS
    from xtalker.config import FACERENDERS, NUM_POSE_STYLES, SIZES, ConfigError
    from xtalker.finish import BLENDS
    from xtalker.preprocess import PREPROCESS_MODES
    from xtalker.presets import load_presets

    page = Page(xt, output_dir)
    presets = [NO_PRESET, *load_presets()]

    @contextlib.contextmanager
    def shown_as_messages():
        """Errors as one message on the page and one log line, never a traceback; the log also gets a line when a
        render starts and ends, so the operator (and the tests) see that renders never overlap."""
        log.info("render started")
        started = time.monotonic()
        try:
            yield
        except Cancelled:
            log.warning("request cancelled")
            raise gr.Error("Cancelled: no video was written.", print_exception=False) from None
        except USER_ERRORS as e:
            log.warning("request refused: %s", e)
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # the server's log keeps the traceback
            log.exception("generate failed")
            raise gr.Error(f"internal error ({type(e).__name__}: {e}); see the server's log",
                           print_exception=False) from None
        finally:
            log.info("render ended after %.1f s", time.monotonic() - started)

    def generate(source_image, driven_audio, preset, size, preprocess, still, pose_style, expression_scale,
                 enhancer, blend, seed, batch_size, facerender, enhance_scale, background_enhancer, request: gr.Request,
                 progress=gr.Progress()):
        session = getattr(request, "session_hash", None) or ""
        with shown_as_messages():
            return page.generate(source_image, driven_audio, preset, size, preprocess, still, pose_style,
                                 expression_scale, enhancer, blend, seed, batch_size, facerender, enhance_scale,
                                 background_enhancer, session, progress)

    def stream(source_image, driven_audio, preset, size, preprocess, still, pose_style, expression_scale,
               enhancer, blend, seed, batch_size, facerender, enhance_scale, background_enhancer, request: gr.Request,
               progress=gr.Progress()):
        session = getattr(request, "session_hash", None) or ""
        with shown_as_messages():
            if missing := [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]:
                raise ConfigError(f"Stream needs {' and '.join(missing)} on the server's PATH (Gradio's streaming video "
                                  "runs them): install FFmpeg (apt-get install ffmpeg), or use Generate")
            yield from page.stream(source_image, driven_audio, preset, size, preprocess, still, pose_style,
                                   expression_scale, enhancer, blend, seed, batch_size, facerender, enhance_scale,
                                   background_enhancer, session, progress)

    def cancel(request: gr.Request):
        page.cancel(getattr(request, "session_hash", None) or "")

    with gr.Blocks(title="XTalker") as demo:
        gr.Markdown("# XTalker\nOne portrait + speech -> a talking-head video (SadTalker's networks, on this CPU).")
        if xt.synthetic:
            gr.Markdown("**SYNTHETIC checkpoints in use**: the videos show meaningless pictures (real cost, fake "
                        "weights). Put the official SadTalker files in the checkpoint folder for real results.",
                        elem_id="synthetic-banner")
        with gr.Row():
            with gr.Column():
                source_image = gr.Image(label="source image", type="filepath", sources=["upload", "webcam"],
                                        elem_id="source_image")
                driven_audio = gr.Audio(label="driven audio", type="filepath", sources=["upload", "microphone"],
                                        elem_id="driven_audio")
                preset = gr.Dropdown(presets, value=xt.preset or NO_PRESET, label="preset", elem_id="preset")
                with gr.Row():
                    size = gr.Radio(list(SIZES), value=256, label="size")
                    preprocess = gr.Dropdown(list(PREPROCESS_MODES), value="crop", label="preprocess")
                with gr.Row():
                    still = gr.Checkbox(value=False, label="still (keep the source pose)")
                    enhancer = gr.Dropdown([DEFAULT, "none", "lightweight", "gfpgan", "RestoreFormer"], value=DEFAULT,
                                           label="face enhancer", elem_id="enhancer")
                    background_enhancer = gr.Dropdown([DEFAULT, "none", "realesrgan"], value=DEFAULT,
                                                      label="background (realesrgan: under a restored face)",
                                                      elem_id="background_enhancer")
                    blend = gr.Dropdown([DEFAULT, *BLENDS], value=DEFAULT, label="blend (full modes)")
                    enhance_scale = gr.Radio([2, 1], value=2, label="enhancer output (x the rendered size)",
                                             elem_id="enhance_scale")
                pose_style = gr.Slider(0, NUM_POSE_STYLES - 1, value=0, step=1, label="pose style")
                expression_scale = gr.Slider(0.0, 3.0, value=1.0, step=0.1, label="expression scale")
                with gr.Row():
                    seed = gr.Number(value=-1, precision=0, label="seed (-1: random)", elem_id="seed")
                    batch_size = gr.Number(value=0, precision=0, minimum=0, label="batch size (0: the preset's)")
                    facerender = gr.Dropdown([DEFAULT, *FACERENDERS], value=DEFAULT, elem_id="facerender",
                                             label="renderer (pirender: the lightweight one)")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    live_run = gr.Button("Stream (watch while it renders)", elem_id="stream")
                    stop = gr.Button("Cancel", elem_id="cancel")
            with gr.Column():
                video = gr.Video(label="video", elem_id="video")
                live = gr.Video(label="live (one-second pieces as they are rendered)", streaming=True, autoplay=True,
                                elem_id="live")
                used_seed = gr.Number(label="seed used", precision=0, interactive=False, elem_id="used_seed")
                timings = gr.Markdown(elem_id="timings")
        gr.Examples(_examples(), inputs=[source_image, driven_audio], label="example (click to load)")
        fields = [source_image, driven_audio, preset, size, preprocess, still, pose_style, expression_scale, enhancer,
                  blend, seed, batch_size, facerender, enhance_scale, background_enhancer]
        event = run.click(generate, fields, [video, used_seed, timings], api_name="generate", concurrency_limit=1,
                          concurrency_id="render")
        streamed = live_run.click(stream, fields, [live, used_seed, timings], api_name="stream",
                                   concurrency_limit=1, concurrency_id="render")
        stop.click(cancel, None, None, cancels=[event, streamed], queue=False, api_name=False)
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    return demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xtalker-ui", description="XTalker's web page (Gradio) with warm networks.")
    p.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints"), help="folder with the SadTalker files")
    p.add_argument("--preset", default=None, help="the preset chosen when the page opens (configs/presets.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--max_queue", type=int, default=8, help="requests waiting at most; more are refused")
    p.add_argument("--device", default=None, help="auto (default: a CUDA GPU when torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the networks (default: all cores)")
    p.add_argument("--cache_dir", type=Path, default=None, help="where compiled int8 graphs are kept")
    p.add_argument("--verbose", action="store_true", help="log everything, third-party warnings included")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    from xtalker import logs

    logs.configure(args.verbose)
    if not args.verbose:  # one line per render in the server's log
        log.setLevel(logging.INFO)
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        sys.stderr.write('error: the web UI needs the ui extra: pip install -e ".[ui]"\n')
        return 1
    from xtalker.api import USER_ERRORS, XTalker

    options = {k: v for k, v in (("threads", args.threads), ("cache_dir", args.cache_dir), ("device", args.device))
               if v is not None}
    try:
        xt = XTalker(args.checkpoint_dir, preset=args.preset, **options)
    except USER_ERRORS as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    output_dir = Path(tempfile.mkdtemp(prefix="xtalker-ui-"))
    demo = build(xt, output_dir, args.max_queue)
    try:
        _, url, share_url = demo.launch(server_name=args.host, server_port=args.port, share=args.share, quiet=True,
                                        ssr_mode=False, footer_links=["api"], prevent_thread_lock=True)
    except OSError as e:
        sys.stderr.write(f"error: cannot serve on {args.host}:{args.port} ({e}); pass another --port\n")
        return 1
    sys.stdout.write(f"XTalker UI on {url}" + (f" and {share_url}" if share_url else "") + " (Ctrl-C stops it)\n")
    sys.stdout.flush()
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0
