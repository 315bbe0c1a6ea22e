"""int8 face enhancers for `--precision int8` runs: static PTQ + AOTInductor, cached on disk like the renderer's.

Each network that pays is exported as one graph, its convolutions quantized by the renderer's machinery
(`render.quantize`: Intel Neural Compressor 3.x static quantization over PT2E, torchao where INC is absent),
calibrated on the bundled example portrait (never on the user's frames), compiled ahead of time and written to the
same cache folder as the renderer's graphs (`--cache_dir`), under a key of the network's tensors and code, the
shapes, the settings and the library versions. Later processes load the package instead of building it.

An int8 run uses int8 for a network only where it keeps >= 35 dB PSNR against the fp32 output (uint8 image) and is
faster than bf16 on the CPU (`ENHANCER_INT8`); elsewhere the network runs in bf16. Measured on this machine (Xeon
with AMX, 2 threads, shared with other jobs: absolute seconds are about 3x the quiet machine's, the ratios hold;
synthetic weights of the official layouts; the bundled portrait's aligned face):

- RestoreFormer (decoder int8, encoder + codebook lookup fp32), s/face: fp32 13.0, bf16 8.5 (decoder 4.6), int8
  ~10.4 (decoder alone 10.4, slower than the bf16 decoder: its GroupNorm + SiLU between every pair of convs
  stays float, so every conv pays a quantize and a dequantize pass over 512 px maps); PSNR int8 39.5 dB, bf16
  50.1 dB. Build 168 s, cache load 0.7 s. Stays bf16: int8 costs time.
- RealESRGAN x2plus (whole RRDBNet, dynamic H x W), s per 420 px tile: fp32 29.0, bf16 22.9, int8 12.7; PSNR
  int8 19.0 dB (two RRDBs: 51.7 dB: the error grows over the 69 dense blocks, whose concatenated
  features share one activation scale per conv), bf16 50.1 dB. Build 590 s, cache load 0.1 s. Stays bf16:
  faster, far below the fidelity bar.
- GFPGAN v1.4 (the whole network int8 except the RGB heads; each modulated conv runs its shared, statically
  quantized kernel on the style-scaled input and demodulates the output: the same sums as the per-face kernel),
  s/face: fp32 9.0, bf16 4.5, int8 2.6 (min of 3; 2.6-3.5); PSNR int8 49.4 dB (the mirrored face with other noise
  48.8 dB), bf16 54.8 dB. Build 150 s, cache load 3.6 s. int8: faster and well above the bar.

The RealESRGAN and RestoreFormer graphs stay buildable (flip their `ENHANCER_INT8` entries) for a measurement with
the official weights, whose activations are not the synthetic ones'.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from xtalker.atomic import write_atomic
from xtalker.finish.restore import align_affine, warp_face
from xtalker.render import quantize

log = logging.getLogger(__name__)

# The bundled example portrait (the renderer's calibration picture) and its five face points (eye centres, nose
# tip, mouth corners; read off the picture once), so the enhancers' calibration needs no face detector.
CALIBRATION_PORTRAIT = Path(__file__).resolve().parents[1] / "data" / "calibration" / "portrait.png"
PORTRAIT_POINTS = np.float32([[204, 100], [246, 103], [224.5, 126], [204, 141], [249, 142.5]])
CALIBRATION_TAG = "bundled-portrait-v1"
ROOT = "net"  # the export wrappers' attribute holding the network: module paths in the graph start with it


@dataclass(frozen=True)
class GraphSpec:
    """One enhancer graph to build: `module` (an export wrapper whose `net` attribute is the network) called with
    `example`; `dynamic_shapes` as torch.export takes them; `plan`: the renderer's (module path prefix, precision)
    rules for its convolutions; `calibration`: the inputs it is calibrated on, made only when it is built."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    dynamic_shapes: Any
    shapes: str  # the input shapes the graph serves, for the cache key
    plan: tuple[tuple[str, str], ...]
    calibration: Callable[[], Sequence[tuple[torch.Tensor, ...]]]


@dataclass
class CompiledGraph:
    """A loaded package and where it came from."""

    run: Callable[..., torch.Tensor]
    path: Path
    from_cache: bool
    seconds: float  # loading, or building (export + calibration + compilation) and loading
    convolutions: dict[str, dict[str, int]]  # precision -> module path -> count


def _key(spec: GraphSpec, engine: str) -> dict[str, Any]:
    settings = quantize.Int8Settings(plan=spec.plan, max_batch=1, calibration_tag=CALIBRATION_TAG)
    key = quantize.cache_key(spec.module, 0, settings, engine)
    # The wrapper's code lives here: a changed recipe changes the key too.
    key.update(network=spec.name, shapes=spec.shapes)
    return key


def _files(cache: Path, spec: GraphSpec, key: dict[str, Any]) -> tuple[Path, Path]:
    digest = quantize.key_digest(key)
    return cache / f"{spec.name}-int8-{digest}.pt2", cache / f"{spec.name}-int8-{digest}.json"


def compiled_graph(spec: GraphSpec, cache_dir: str | Path | None = None) -> CompiledGraph:
    """The compiled int8 graph of `spec`, from the cache folder when it holds one, else built and cached."""
    engine = quantize.backend()
    cache = Path(cache_dir) if cache_dir is not None else quantize.default_cache_dir()
    start = time.perf_counter()
    key = _key(spec, engine)
    path, meta_path = _files(cache, spec, key)
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            run = torch._inductor.aoti_load_package(str(path))
        except (OSError, ValueError, RuntimeError) as err:
            log.warning("int8 %s: cached graph %s is unusable (%s); building it again", spec.name, path, err)
        else:
            seconds = time.perf_counter() - start
            log.info("int8 %s: loaded from cache %s in %.1f s", spec.name, path, seconds)
            return CompiledGraph(run, path, True, seconds, meta["convolutions"])
    log.warning("int8 %s: no cached graph for this checkpoint and version yet; calibrating on the bundled portrait, "
                "quantizing and compiling it once (minutes), later runs load it from %s", spec.name, cache)
    quantize.check_compiler()
    cache.mkdir(parents=True, exist_ok=True)
    convolutions, timings = _build(spec, engine, path)
    write_atomic(meta_path, lambda p: p.write_text(json.dumps(
        {"key": key, "convolutions": convolutions, "timings": timings}, indent=1)))
    run = torch._inductor.aoti_load_package(str(path))
    seconds = time.perf_counter() - start
    log.info("int8 %s: built in %.0f s (%s) and cached as %s", spec.name, seconds,
             ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), path)
    return CompiledGraph(run, path, False, seconds, convolutions)


def _build(spec: GraphSpec, engine: str, path: Path) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    lap = quantize.Laps()

    module = spec.module.eval()
    settings = quantize.Int8Settings(plan=spec.plan, max_batch=1, calibration_tag=CALIBRATION_TAG)
    with torch.no_grad():
        program = torch.export.export(module, spec.example, dynamic_shapes=spec.dynamic_shapes, strict=False)
        rewriter = quantize.PlanRewriter(quantize.functional_graph(program), settings, root=ROOT)
        gm = rewriter.run()
        lap("export")
        inputs = list(spec.calibration())

        def calibrate(model: nn.Module) -> None:
            for args in inputs:
                model(*args)

        quantized = quantize.quantize_graph(gm, _flat_shapes(spec.dynamic_shapes), calibrate, engine)
        lap("calibrate + quantize")
        write_atomic(path, lambda p: quantize.compile_package(quantized, spec.example, spec.dynamic_shapes, p))
        lap("compile")
    return rewriter.counts, lap.timings


def _flat_shapes(shapes: Any) -> Any:
    """The exported graph takes its inputs flat and positional: the same dynamic shapes as a tuple."""
    if isinstance(shapes, dict):
        return tuple(shapes.values())
    return shapes


# ---- calibration inputs: the bundled portrait ------------------------------------------------------------


def portrait_bgr() -> np.ndarray:
    image = cv2.imread(str(CALIBRATION_PORTRAIT), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"the bundled calibration portrait {CALIBRATION_PORTRAIT} is missing")
    return image


def portrait_faces() -> np.ndarray:
    """(2, 512, 512, 3) BGR uint8: the portrait's aligned face crop and its mirror image."""
    face = warp_face(portrait_bgr(), align_affine(PORTRAIT_POINTS))
    return np.stack([face, np.ascontiguousarray(face[:, ::-1])])


# ---- RRDBNet (RealESRGAN x2plus) -------------------------------------------------------------------------


class _RRDBGraph(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Tiles narrower than this run in bf16 (the compiled graph's smallest even side; RealESRGANer's tiles are at least
# tile_pad + 1 px wide, only a tiny frame with tiling off is smaller).
RRDB_MIN_SIDE = 16


def rrdbnet_spec(net: nn.Module, max_side: int) -> GraphSpec:
    """One graph for every tile up to `max_side` px (RealESRGANer's tile + 2 * tile_pad): height and width are
    dynamic (even), so the whole-frame tile of any frame size and the smaller edge tiles share it."""
    if max_side < RRDB_MIN_SIDE + 2:
        raise ValueError(f"the int8 RRDBNet graph serves tiles of {RRDB_MIN_SIDE} px and more, not up to {max_side}")
    side = min(64, max_side // 2 * 2)
    half_h = torch.export.Dim("half_h", min=RRDB_MIN_SIDE // 2, max=max_side // 2)
    half_w = torch.export.Dim("half_w", min=RRDB_MIN_SIDE // 2, max=max_side // 2)

    def calibration() -> list[tuple[torch.Tensor, ...]]:
        # Tiles of the portrait: the face, the suit and flag, and the whole picture at tile size.
        image = portrait_bgr()
        parts = [image[40:240, 130:330], image[250:450, 20:220], cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA)]
        side = max_side // 2 * 2  # the graph's largest tile
        return [(_rgb_unit(p[:side, :side]),) for p in parts]

    return GraphSpec(
        name="realesrgan-x2plus",
        module=_RRDBGraph(net),
        # Unequal sides: equal example sides would tie the two dimensions together.
        example=(torch.zeros(1, 3, side, side - 2),),
        dynamic_shapes={"x": {2: 2 * half_h, 3: 2 * half_w}},
        shapes=f"1x3xHxW, even H and W in [{RRDB_MIN_SIDE}, {max_side}]",
        plan=(("", "int8"),),
        calibration=calibration,
    )


def _rgb_unit(bgr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) BGR uint8 -> (1, 3, H, W) RGB float32 in [0, 1], as RealESRGANer feeds its network."""
    x = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).to(torch.float32) / 255.0
    return x.permute(2, 0, 1).unsqueeze(0).contiguous()


class Int8RRDBNet:
    """`RRDBNet.run(x, precision)` for RealESRGANer's tiles: the compiled int8 graph where the tile fits it, the
    network in bf16 otherwise."""

    precision = "int8"

    def __init__(self, net: nn.Module, graph: CompiledGraph, max_side: int):
        self.net, self.graph, self.max_side = net, graph, max_side

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if not (RRDB_MIN_SIDE <= min(h, w) and max(h, w) <= self.max_side):
            return self.net.run(x, "bf16")
        with torch.inference_mode():
            return self.graph.run(x.float().contiguous())


# ---- RestoreFormer's decoder -----------------------------------------------------------------------------


class _RestoreFormerDecoderGraph(nn.Module):
    """`post_quant_conv` + decoder: (z_q, F16a, F16b) of one face -> its (1, 3, 512, 512) image."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z_q: torch.Tensor, f16a: torch.Tensor, f16b: torch.Tensor) -> torch.Tensor:
        return self.net.decoder(self.net.post_quant_conv(z_q), f16a, f16b)


def _restoreformer_codes(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 encoder and codebook lookup of one face: the decoder's inputs."""
    features, z = net.encode(x)
    return net.quantize_codes(z).z_q, features.f16a.contiguous(), features.f16b.contiguous()


def restoreformer_spec(net: nn.Module) -> GraphSpec:
    from xtalker.models.gfpgan import preprocess_bgr_u8
    from xtalker.models.restoreformer import CH, CH_MULT, Z_CHANNELS

    top, low = CH * CH_MULT[-1], 512 >> (len(CH_MULT) - 1)

    def calibration() -> list[tuple[torch.Tensor, ...]]:
        with torch.inference_mode():
            faces = preprocess_bgr_u8(portrait_faces())
            return [_restoreformer_codes(net, faces[i : i + 1]) for i in range(len(faces))]

    return GraphSpec(
        name="restoreformer-decoder",
        module=_RestoreFormerDecoderGraph(net),
        example=(torch.zeros(1, Z_CHANNELS, low, low), torch.zeros(1, top, low, low), torch.zeros(1, top, low, low)),
        dynamic_shapes=None,
        shapes=f"z_q 1x{Z_CHANNELS}x{low}x{low}, F16a/F16b 1x{top}x{low}x{low}",
        plan=(("", "int8"),),
        calibration=calibration,
    )


class Int8RestoreFormer:
    """`FastRestoreFormer.restore` with the decoder compiled int8; the encoder and the codebook lookup stay the
    network's float32 modules (the codes never depend on the precision)."""

    precision = "int8"

    def __init__(self, net: nn.Module, graph: CompiledGraph):
        self.net, self.graph = net, graph

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 512, 512) RGB in [-1, 1] -> (B, 3, 512, 512) float32 image, faces one at a time."""
        from xtalker.models.restoreformer import _check_input

        _check_input(x)
        with torch.inference_mode():
            faces = [self.graph.run(*_restoreformer_codes(self.net, x[i : i + 1].float())) for i in range(x.shape[0])]
            return torch.cat(faces) if faces else x.new_zeros(x.shape, dtype=torch.float32)


# ---- GFPGAN v1.4 -----------------------------------------------------------------------------------------


class _SharedWeightConv(nn.Module):
    """A modulated conv of one face as a conv with the shared (static, so quantizable) kernel: the style scales
    the input channels and the demodulation the output channels (the same sums as the per-face kernel)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        conv = layer.modulated_conv
        weight = conv.weight.detach()[0]
        self.register_buffer("weight", weight.clone())
        self.register_buffer("modulation_t", conv.modulation.weight.detach().t().contiguous())
        self.register_buffer("modulation_b", conv.modulation.bias.detach().clone())
        self.register_buffer("norms_t", weight.pow(2).sum([2, 3]).t().contiguous())
        self.register_buffer("bias", layer.bias.detach().reshape(1, -1, 1, 1).clone())
        self.demodulate, self.upsample, self.padding = conv.demodulate, conv.upsample, conv.padding

    def forward(self, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        from xtalker.models.gfpgan import DEMOD_EPS, STYLE_GAIN, _resample

        # matmul, not a linear: the quantizer leaves matmuls float, and the styles must stay exact.
        style = torch.matmul(latent, self.modulation_t) + self.modulation_b  # (1, in)
        x = x * style.view(1, -1, 1, 1)
        if self.upsample:
            x = _resample(x, 2)
        y = torch.nn.functional.conv2d(x, self.weight, None, 1, self.padding)
        if self.demodulate:
            demod = torch.rsqrt(torch.matmul(style.square(), self.norms_t) + DEMOD_EPS) * STYLE_GAIN
            y = y * demod.view(1, -1, 1, 1)
        return y + self.bias


class _GFPGANGraph(nn.Module):
    """GFPGANv1Clean.forward for one face, its modulated convs as `_SharedWeightConv`s: (x, 15 noise maps) ->
    (1, 3, 512, 512)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        decoder = net.stylegan_decoder
        self.style_convs = nn.ModuleList(_SharedWeightConv(c) for c in (decoder.style_conv1, *decoder.style_convs))
        self.noise_strengths = [c.weight.detach() for c in (decoder.style_conv1, *decoder.style_convs)]
        self.to_rgbs = nn.ModuleList(_SharedWeightConv(t) for t in (decoder.to_rgb1, *decoder.to_rgbs))
        self.register_buffer("final_t", net.final_linear.weight.detach().t().contiguous())
        self.register_buffer("final_b", net.final_linear.bias.detach().clone())

    def forward(self, x: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        from xtalker.models.gfpgan import LRELU_SLOPE, NUM_LATENTS, STYLE_DIM, _resample

        net = self.net
        feat, skips = net.down(x)
        latents = (torch.matmul(feat.flatten(1), self.final_t) + self.final_b).view(NUM_LATENTS, 1, STYLE_DIM)

        def style_conv(k: int, h: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
            y = self.style_convs[k](h, latent) + self.noise_strengths[k] * noise[k]
            return torch.nn.functional.leaky_relu(y, LRELU_SLOPE)

        h = style_conv(0, net.stylegan_decoder.constant_input.weight, latents[0])
        rgb = self.to_rgbs[0](h, latents[1])
        for j, block in enumerate(net.conv_body_up):
            feat = block(feat + skips[-1 - j])
            scale, shift = net.condition_scale[j](feat), net.condition_shift[j](feat)
            i = 1 + 2 * j
            h = style_conv(i, h, latents[i])
            same, sft = h.split(h.shape[1] // 2, dim=1)
            h = torch.cat([same, sft * scale + shift], dim=1)
            h = style_conv(i + 1, h, latents[i + 1])
            rgb = self.to_rgbs[j + 1](h, latents[i + 2]) + _resample(rgb, 2)
        return rgb


def gfpgan_spec(net: nn.Module) -> GraphSpec:
    from xtalker.models.gfpgan import NOISE_SIZES, draw_noise, preprocess_bgr_u8

    def calibration() -> list[tuple[torch.Tensor, ...]]:
        faces = preprocess_bgr_u8(portrait_faces())
        generator = torch.Generator().manual_seed(0)
        return [(faces[i : i + 1], *draw_noise(1, generator)) for i in range(len(faces))]

    return GraphSpec(
        name="gfpgan-v1.4",
        module=_GFPGANGraph(net),
        example=(torch.zeros(1, 3, 512, 512), *(torch.zeros(1, 1, r, r) for r in NOISE_SIZES)),
        dynamic_shapes=None,
        shapes="1x3x512x512 and the 15 noise maps",
        # The RGB heads (3 output channels, a sliver of the work) stay float32: their sum is the image.
        plan=(("", "int8"), ("to_rgbs", "fp32")),
        calibration=calibration,
    )


class Int8GFPGAN:
    """`FastGFPGAN.restore(x, noise)` through the compiled int8 graph, faces one at a time."""

    precision = "int8"

    def __init__(self, graph: CompiledGraph):
        self.graph = graph

    def restore(self, x: torch.Tensor, noise: Sequence[torch.Tensor]) -> torch.Tensor:
        from xtalker.models.gfpgan import _check_input

        _check_input(x)
        with torch.inference_mode():
            faces = [self.graph.run(x[i : i + 1].float().contiguous(), *(n[i : i + 1].float().contiguous() for n in noise))
                     for i in range(x.shape[0])]
            return torch.cat(faces) if faces else x.new_zeros(x.shape)


# ---- which precision an int8 run gives each enhancer network -------------------------------------------

# Measured (module docstring): int8 where it keeps >= 35 dB against fp32 and beats bf16 here, else bf16.
ENHANCER_INT8 = {"gfpgan": True, "restoreformer": False, "realesrgan": False}
# RealESRGANer with tiling off sees whole frames: the graph then serves frames up to this side.
WHOLE_FRAME_MAX_SIDE = 1024


def enhancer_precision(network: str, precision: str, device: str = "cpu") -> str:
    """The precision enhancer `network` (a key of ENHANCER_INT8) runs in for the run precision: fp32 for fp32,
    int8 for int8 on the CPU where it pays (and can be built here), bf16 otherwise."""
    if precision == "fp32":
        return "fp32"
    if precision != "int8" or not ENHANCER_INT8[network] or torch.device(device).type != "cpu":
        return "bf16"
    try:
        quantize.check_available()
    except quantize.QuantizationUnavailableError as err:
        log.warning("int8 %s: %s; running it in bf16", network, err)
        return "bf16"
    return "int8"


def _kept(net: nn.Module, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """Built once per network and key, kept on the network like its other plans (`models.plans`)."""
    plans = net.__dict__.setdefault("_plans", {})
    if key not in plans:
        plans[key] = build()
    return plans[key]


def _cache_name(cache_dir: str | Path | None) -> str:
    return str(Path(cache_dir) if cache_dir is not None else quantize.default_cache_dir())


def int8_rrdbnet(net: nn.Module, max_side: int, cache_dir: str | Path | None = None) -> Int8RRDBNet:
    """The int8 RRDBNet for RealESRGANer tiles of at most `max_side` px."""
    key = ("int8", _cache_name(cache_dir), max_side)
    return _kept(net, key, lambda: Int8RRDBNet(net, compiled_graph(rrdbnet_spec(net, max_side), cache_dir), max_side))


def int8_restoreformer(net: nn.Module, cache_dir: str | Path | None = None) -> Int8RestoreFormer:
    key = ("int8", _cache_name(cache_dir))
    return _kept(net, key, lambda: Int8RestoreFormer(net, compiled_graph(restoreformer_spec(net), cache_dir)))


def int8_gfpgan(net: nn.Module, cache_dir: str | Path | None = None) -> Int8GFPGAN:
    key = ("int8", _cache_name(cache_dir))
    return _kept(net, key, lambda: Int8GFPGAN(compiled_graph(gfpgan_spec(net), cache_dir)))
