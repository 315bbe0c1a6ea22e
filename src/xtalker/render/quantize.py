"""int8 renderer: the generator's per-frame work quantized (static PTQ) and compiled ahead of time, cached on disk.

`quantize_generator` turns a float generator into an `Int8Generator` with the same `encode_source` / `animate`
interface the Renderer uses. `animate` is one AOTInductor-compiled graph: the convolutions chosen by the precision
plan run int8 (Intel Neural Compressor 3.x static quantization, i.e. the PT2E flow with the x86 Inductor quantizer;
torchao's PT2E directly where INC is absent), others bf16 or fp32; keypoint math, grid_sample, softmax and the
instance norms stay float32. `encode_source` (once per video) stays with the float generator.

The compiled package is written to a cache folder under a key made of the generator's tensors, its code, the image
size, the settings and the library versions (never the user's inputs), so only the first process pays for
calibration and compilation; later ones load the package in about a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import fx, nn

from xtalker.atomic import write_atomic

log = logging.getLogger(__name__)

# Bump when the recipe below changes what an artifact contains: older artifacts are then never loaded.
ARTIFACT_FORMAT = 1
PRECISIONS = ("int8", "bf16", "fp32")
INSTALL_HINT = "pip install 'neural-compressor[pt]' (Intel Neural Compressor 3.x; or at least: pip install torchao)"
CONV_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default)
# The wrapper's attribute holding the generator: module paths in the graph start with it.
ROOT = "generator"

# Longest matching module-path prefix wins; "" is the default for every convolution of `animate`. The decoder
# (77% of a frame's multiply-adds) runs int8; the dense-motion hourglass stays bf16 (int8 there needs its 3-D
# convolutions re-laid as 2-D ones: slower and 2 dB worse, measured); `third` and `fourth` stay fp32 as in bf16.
DEFAULT_PLAN: tuple[tuple[str, str], ...] = (
    ("", "bf16"),
    ("third", "fp32"),
    ("fourth", "fp32"),
    ("decoder", "int8"),
)


class QuantizationUnavailableError(RuntimeError):
    """int8 cannot be built here: no quantization library, or no C++ compiler for AOTInductor."""


@dataclass(frozen=True)
class Int8Settings:
    """Everything besides the weights and the image size that changes the compiled artifact.

    `plan`: (module path prefix, precision) rules for the convolutions of `animate`, the longest matching prefix
    wins. `max_batch`: largest driving batch one call takes (larger ones are split). `calibration_tag` names the
    calibration recipe the caller uses (part of the cache key, since calibration shapes the artifact).
    """

    plan: tuple[tuple[str, str], ...] = DEFAULT_PLAN
    max_batch: int = 16
    calibration_tag: str = "unnamed"

    def __post_init__(self) -> None:
        for prefix, precision in self.plan:
            if precision not in PRECISIONS:
                raise ValueError(f"plan entry {prefix!r}: precision must be one of {PRECISIONS}, got {precision!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")

    def precision_of(self, module_path: str) -> str:
        """Precision of a convolution inside the generator submodule `module_path` (dotted, no root prefix)."""
        best, chosen = -1, "fp32"
        for prefix, precision in self.plan:
            if _within(module_path, prefix) and len(prefix) > best:
                best, chosen = len(prefix), precision
        return chosen


@dataclass(frozen=True)
class CalibrationBatch:
    """The inputs of one `generator.animate` call, as the Renderer makes them."""

    features: Any  # the generator's source features (a dataclass of tensors, batch 1 or B)
    kp_source: torch.Tensor  # (1 or B, K, 3)
    kp_driving: torch.Tensor  # (B, K, 3)


Calibration = Sequence[CalibrationBatch] | Callable[[], Sequence[CalibrationBatch]]


def _within(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def default_cache_dir() -> Path:
    """$XTALKER_CACHE_DIR, else $XDG_CACHE_HOME/xtalker/compiled, else ~/.cache/xtalker/compiled."""
    if os.environ.get("XTALKER_CACHE_DIR"):
        return Path(os.environ["XTALKER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xtalker" / "compiled"


def backend() -> str:
    """'inc' when Intel Neural Compressor 3.x imports, else 'torchao'; an error saying what to install otherwise."""
    for name, module in (("inc", "neural_compressor.torch.quantization"), ("torchao", "torchao.quantization.pt2e")):
        try:
            with quiet_libraries():
                importlib.import_module(module)
        except ImportError:
            continue
        return name
    raise QuantizationUnavailableError(f"--precision int8 needs a quantization library, none is importable: {INSTALL_HINT}")


def check_available() -> str:
    """The quantization engine ('inc' or 'torchao') when int8 can be built here; else why not, and what to do."""
    engine = backend()
    check_compiler()
    return engine


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def tensor_digest(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer (~0.3 s for the generator)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def code_digest(module: nn.Module) -> str:
    """sha256 of the source files defining the module's classes: a changed forward invalidates the cache."""
    files = sorted({inspect.getsourcefile(type(m)) or "" for m in module.modules()} - {""})
    h = hashlib.sha256()
    for name in files:
        h.update(Path(name).read_bytes())
    return h.hexdigest()


def cache_key(generator: nn.Module, image_size: int, settings: Int8Settings, engine: str) -> dict[str, Any]:
    """What the artifact depends on. The calibration inputs are not in it: they come from a fixed recipe, named by
    `settings.calibration_tag`, never from the user's clip."""
    return {
        "format": ARTIFACT_FORMAT,
        "weights": tensor_digest(generator),
        "code": code_digest(generator),
        "image_size": image_size,
        "settings": dataclasses.asdict(settings),
        "engine": engine,
        "torch": torch.__version__,
        "neural_compressor": _version("neural-compressor"),
        "torchao": _version("torchao"),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        # Inductor writes the thread count into its OpenMP loops at compile time.
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


class _AnimateGraph(nn.Module):
    """`generator.animate(...)["prediction"]` with flat tensor inputs, all of the same (dynamic) batch."""

    def __init__(self, generator: nn.Module, feature_type: type, field_names: Sequence[str]):
        super().__init__()
        self.generator = generator
        self.feature_type = feature_type
        self.field_names = tuple(field_names)

    def forward(self, kp_source: torch.Tensor, kp_driving: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        fields = dict(zip(self.field_names, features))
        return self.generator.animate(self.feature_type(**fields), kp_source, kp_driving)["prediction"]


def _feature_fields(features: Any) -> tuple[type, list[str]]:
    if not dataclasses.is_dataclass(features):
        raise TypeError(f"source features must be a dataclass of tensors, got {type(features).__name__}")
    names = [f.name for f in dataclasses.fields(features)]
    for name in names:
        if not isinstance(getattr(features, name), torch.Tensor):
            raise TypeError(f"source feature {name!r} is not a tensor")
    return type(features), names


def _flat_inputs(
    features: Any, kp_source: torch.Tensor, kp_driving: torch.Tensor, names: Sequence[str]
) -> tuple[torch.Tensor, ...]:
    """The graph's inputs: one source (batch 1: keypoints and features) and a batch of driving keypoints, dense
    float32 (the compiled code assumes contiguous inputs)."""
    for name in names:
        if getattr(features, name).shape[0] != 1:
            raise ValueError("the int8 generator renders from one source per call (source features of batch 1)")
    if kp_source.shape[0] != 1:
        if not torch.equal(kp_source, kp_source[:1].expand_as(kp_source)):
            raise ValueError("the int8 generator renders from one source per call (equal kp_source rows)")
        kp_source = kp_source[:1]
    sources = (getattr(features, n).float().contiguous() for n in names)
    return (kp_source.float().contiguous(), kp_driving.float().contiguous(), *sources)


def _module_path(node: fx.Node, root: str = ROOT) -> str:
    """Dotted path of the innermost submodule that emitted `node`, without the wrapper's `root` attribute."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    for prefix in (root + ".", "L__self___" + root + "_"):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return "" if path == root else path


def _conv_args(node: fx.Node) -> tuple[fx.Node, fx.Node, Any, list[int], list[int], list[int], int]:
    n = 2 if node.target == torch.ops.aten.conv2d.default else 3
    defaults = [None, [1] * n, [0] * n, [1] * n, 1]
    args = list(node.args) + defaults[len(node.args) - 2 :]
    x, weight, bias, stride, padding, dilation, groups = args
    padding = list(padding) * n if len(padding) == 1 else list(padding)
    return x, weight, bias, list(stride), padding, list(dilation), groups


class PlanRewriter:
    """Applies a precision plan to the convolutions of an exported (functional) graph.

    int8 convolutions are left as `aten.conv2d` for the quantizer; int8 3-D convolutions become one 2-D
    convolution over depth windows (the x86 quantizer has no 3-D pattern); bf16 and fp32 ones become
    `aten.convolution`, which the quantizer does not annotate, bf16 ones with bf16 weights and casts around them.
    New nodes get the metadata the quantizer reads: fake values, and for a new int8 conv2d its source function
    (the quantizer finds convolutions by source); replaced float ones carry no module stack, so that they are
    not taken for a `nn.Conv2d` partition.
    """

    def __init__(self, gm: fx.GraphModule, settings: Int8Settings, root: str = ROOT):
        self.gm = gm
        self.settings = settings
        self.root = root
        self.counts: dict[str, dict[str, int]] = {p: {} for p in PRECISIONS}
        self._constants = 0
        values = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        self.fake_mode = torch._guards.detect_fake_mode(values)

    def run(self) -> fx.GraphModule:
        for node in list(self.gm.graph.nodes):
            if node.op != "call_function" or node.target not in CONV_OPS:
                continue
            path = _module_path(node, self.root)
            precision = self.settings.precision_of(path)
            x, weight, bias, stride, padding, dilation, groups = _conv_args(node)
            plain = all(s == 1 for s in stride) and all(d == 1 for d in dilation) and groups == 1
            if precision == "int8" and node.target == torch.ops.aten.conv3d.default and not plain:
                precision = "bf16"
            self.counts[precision][path] = self.counts[precision].get(path, 0) + 1
            if precision == "int8":
                if node.target == torch.ops.aten.conv3d.default:
                    self._conv3d_as_conv2d(node, x, weight, bias, padding)
                else:
                    _mark_conv2d_source(node)
                continue
            self._float_conv(node, precision, x, weight, bias, stride, padding, dilation, groups)
        self._tidy_conv_partitions()
        self.gm.graph.eliminate_dead_code()
        self.gm.graph.lint()
        self.gm.recompile()
        return self.gm

    def _tidy_conv_partitions(self) -> None:
        """The quantizer takes every node attributed to an `nn.Conv2d` module for one convolution partition;
        functionalization attributes slices of its output to it too. Those are re-attributed to the parent."""
        for node in self.gm.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if node.op != "call_function" or not stack or node.target == torch.ops.aten.conv2d.default:
                continue
            innermost = list(stack.values())[-1][1]
            if innermost is nn.Conv2d or innermost == "torch.nn.modules.conv.Conv2d" or (
                isinstance(innermost, type) and issubclass(innermost, nn.Conv2d)
            ):
                node.meta["nn_module_stack"] = dict(list(stack.items())[:-1])

    def _call(self, op: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """A new node with its fake value, computed from its inputs' fake values."""
        node = self.gm.graph.call_function(op, args, kwargs)
        fake_args, fake_kwargs = torch.utils._pytree.tree_map_only(
            fx.Node, lambda n: n.meta["val"], (args, kwargs)
        )
        with self.fake_mode:
            node.meta["val"] = op(*fake_args, **fake_kwargs)
        return node

    def _constant(self, value: torch.Tensor) -> fx.Node:
        name = f"_plan_constant_{self._constants}"
        self._constants += 1
        self.gm.register_buffer(name, value)
        node = self.gm.graph.get_attr(name)
        node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True)
        return node

    def _weight(self, node: fx.Node) -> torch.Tensor:
        if node.op != "get_attr":
            raise ValueError(f"convolution weight {node} is not a constant of the graph")
        return _fetch(self.gm, node.target)

    def _replace(self, node: fx.Node, out: fx.Node) -> None:
        if "stack_trace" in node.meta:
            out.meta["stack_trace"] = node.meta["stack_trace"]
        node.replace_all_uses_with(out)
        self.gm.graph.erase_node(node)

    def _float_conv(self, node, precision, x, weight, bias, stride, padding, dilation, groups) -> None:
        aten = torch.ops.aten
        with self.gm.graph.inserting_before(node):
            if precision == "bf16":
                w = self._constant(self._weight(weight).to(torch.bfloat16))
                b = None if bias is None else self._constant(self._weight(bias).to(torch.bfloat16))
                x = self._call(aten._to_copy.default, x, dtype=torch.bfloat16)
            else:
                w, b = weight, bias
            out = self._call(
                aten.convolution.default, x, w, b, stride, padding, dilation, False, [0] * len(stride), groups
            )
            if precision == "bf16":
                out = self._call(aten._to_copy.default, out, dtype=torch.float32)
        self._replace(node, out)

    def _conv3d_as_conv2d(self, node, x, weight, bias, padding) -> None:
        """(B, C, D, H, W) * (O, C, kd, kh, kw): each output depth reads kd input depths, stacked as C * kd
        channels of a 2-D image; one conv2d over B * Do such images, then back to (B, O, Do, Ho, Wo)."""
        aten = torch.ops.aten
        w3 = self._weight(weight)
        o, c, kd, kh, kw = w3.shape
        d, h, w = x.meta["val"].shape[2:]
        pd, ph, pw = padding
        do, ho, wo = d + 2 * pd - kd + 1, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
        with self.gm.graph.inserting_before(node):
            padded = self._call(aten.constant_pad_nd.default, x, [0, 0, 0, 0, pd, pd]) if pd else x
            windows = self._call(aten.unfold.default, padded, 2, kd, 1)  # (B, C, Do, H, W, kd)
            stacked = self._call(aten.permute.default, windows, [0, 2, 1, 5, 3, 4])  # (B, Do, C, kd, H, W)
            images = self._call(aten.reshape.default, stacked, [-1, c * kd, h, w])
            kernel = self._constant(w3.reshape(o, c * kd, kh, kw).clone())
            conv = self._call(aten.conv2d.default, images, kernel, bias, [1, 1], [ph, pw])
            _mark_conv2d_source(conv)
            y = self._call(aten.reshape.default, conv, [-1, do, o, ho, wo])
            y = self._call(aten.permute.default, y, [0, 2, 1, 3, 4])
            # Dense like the conv3d it replaces: later views of the graph rely on that layout.
            out = self._call(aten.clone.default, y, memory_format=torch.contiguous_format)
        self._replace(node, out)


def _mark_conv2d_source(node: fx.Node) -> None:
    """Name F.conv2d as the node's source: the quantizer finds the convolutions it quantizes by source, and
    convolutions written as F.conv2d inside other modules, or made here, would otherwise have none."""
    node.meta["source_fn_stack"] = [(node.name, torch.nn.functional.conv2d)]


def _fetch(gm: nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name).detach()


class _QuietLibraries(logging.Filter):
    """Drops the libraries' progress lines and advice unless we log at DEBUG: INC logs through its own stderr
    handler, torchao warns on import about its CUDA kernels, torch about an enum torchao registers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or log.isEnabledFor(logging.DEBUG)


NOISY_LOGGERS = ("neural_compressor", "torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    quiet = _QuietLibraries()
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _dynamic_shapes(names: Sequence[str], min_batch: int, max_batch: int) -> tuple[Any, ...]:
    """Flat, as the exported graphs take their inputs: only the driving batch varies."""
    batch = torch.export.Dim("batch", min=min_batch, max=max(max_batch, min_batch))
    return (None, {0: batch}, *(None for _ in names))


def _nested(shapes: tuple[Any, ...]) -> tuple[Any, ...]:
    """The same for `_AnimateGraph.forward(kp_source, kp_driving, *features)`."""
    return (shapes[0], shapes[1], tuple(shapes[2:]))


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], names: Sequence[str], max_batch: int):
    """torch.export with a dynamic driving batch; (program, smallest batch it serves).

    The batch range starts at 1 unless the generator's code branches on a batch of 1, then at 2 (a single frame
    is then padded to two).
    """
    def export(min_batch: int) -> torch.export.ExportedProgram:
        shapes = _nested(_dynamic_shapes(names, min_batch, max_batch))
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)

    try:
        return export(1), 1
    except torch._dynamo.exc.UserError as err:
        log.debug("batch 1 specializes the graph (%s); exporting for batches of 2 and more", err)
        return export(2), 2


def functional_graph(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """Functional ATen graph, composite ops (conv2d, instance_norm, ...) kept.

    In-place ops (the generator's inplace ReLUs and multiplies) become out-of-place ones: in a non-functional
    graph the quantizer could place the quantize node of a tensor before the op that fills it.
    """
    unlifted = program.run_decompositions({}).module()
    # A plain GraphModule: the unlifted program refuses eval(), which the quantization flows call.
    return fx.GraphModule(unlifted, unlifted.graph)


def _calibrate(model: Callable, batches: Sequence[CalibrationBatch], names: Sequence[str]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(*_flat_inputs(batch.features, batch.kp_source, batch.kp_driving, names))


def quantize_graph(
    gm: fx.GraphModule,
    shapes: Any,
    calibrate: Callable[[nn.Module], None],
    engine: str,
) -> nn.Module:
    """Static PTQ of every `aten.conv2d` left in the graph: observers, `calibrate(prepared model)` (runs it on
    representative inputs), quantize/dequantize pairs. `shapes`: the graph's dynamic shapes, as exported.

    The graph goes in as it is, not exported again: the quantizer finds convolutions through the source
    metadata of the first export, which a second export would replace.
    """
    if engine == "inc":
        from neural_compressor.torch.quantization import (
            StaticQuantConfig,
            convert,
            prepare,
        )

        # What INC's own `export` marks on the graphs it produces; ours is the same kind of graph.
        gm._exported = True
        gm.dynamic_shapes = shapes
        with quiet_libraries():
            model = prepare(gm, StaticQuantConfig())
            calibrate(model)
            return convert(model)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    model = prepare_pt2e(gm, quantizer)
    calibrate(model)
    return convert_pt2e(model)


def compile_package(model: nn.Module, args: tuple[torch.Tensor, ...], shapes: Any, package: Path) -> None:
    """AOTInductor: the quantized graph -> a shared library + constants in one .pt2 file.

    Freezing lets inductor fold the weights' quantize/dequantize into prepacked int8 oneDNN convolutions.
    """
    program = torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
    torch._inductor.aoti_compile_and_package(program, package_path=str(package), inductor_configs={"freezing": True})


def check_compiler() -> None:
    """AOTInductor builds C++: say so before the minutes of calibration rather than after."""
    cxx = torch._inductor.config.cpp.cxx
    compiler = (cxx[-1] if isinstance(cxx, (tuple, list)) else cxx) or "g++"
    if shutil.which(compiler) is None:
        raise QuantizationUnavailableError(
            f"--precision int8 compiles the generator with AOTInductor, which needs a C++ compiler; {compiler!r} "
            "is not on PATH (install g++, e.g. apt-get install g++). Use --precision bf16 or fp32 meanwhile."
        )


@dataclass
class ArtifactInfo:
    """Where the compiled graph came from and what is in it."""

    path: Path
    from_cache: bool
    seconds: float  # loading, or quantizing + compiling
    min_batch: int
    max_batch: int
    fields: tuple[str, ...]
    convolutions: dict[str, dict[str, int]]  # precision -> module path -> count
    timings: dict[str, float]


class Int8Generator(nn.Module):
    """The Renderer's view of a generator (`encode_source`, `animate`) with `animate` compiled.

    `encode_source` runs once per video on the float generator. `animate` returns only 'prediction'.
    """

    precision = "int8"

    def __init__(self, generator: nn.Module, compiled: Callable, info: ArtifactInfo):
        super().__init__()
        self.generator = generator
        self.compiled = compiled
        self.info = info

    def encode_source(self, source_image: torch.Tensor) -> Any:
        return self.generator.encode_source(source_image)

    def animate(self, features: Any, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> dict[str, torch.Tensor]:
        _, names = _feature_fields(features)
        if tuple(names) != self.info.fields:
            raise ValueError(f"source features {names} do not match the compiled graph's {list(self.info.fields)}")
        outs = []
        for start in range(0, kp_driving.shape[0], self.info.max_batch):
            outs.append(self._run(features, kp_source, kp_driving[start : start + self.info.max_batch], names))
        return {"prediction": torch.cat(outs) if len(outs) > 1 else outs[0]}

    def _run(self, features: Any, kp_source: torch.Tensor, kp_driving: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        b = kp_driving.shape[0]
        if b < self.info.min_batch:
            kp_driving = torch.cat([kp_driving, kp_driving[-1:].expand(self.info.min_batch - b, -1, -1)])
        with torch.no_grad():
            out = self.compiled(*_flat_inputs(features, kp_source, kp_driving, names))
        return out[:b]

    def forward(self, source_image: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.animate(self.encode_source(source_image), kp_source, kp_driving)


def _load(path: Path, meta_path: Path, seconds_from: float) -> tuple[Callable, ArtifactInfo] | None:
    try:
        meta = json.loads(meta_path.read_text())
        compiled = torch._inductor.aoti_load_package(str(path))
    except (OSError, ValueError, RuntimeError) as err:
        log.warning("int8 generator: cached artifact %s is unusable (%s); building it again", path, err)
        return None
    info = ArtifactInfo(
        path=path,
        from_cache=True,
        seconds=time.perf_counter() - seconds_from,
        min_batch=meta["min_batch"],
        max_batch=meta["max_batch"],
        fields=tuple(meta["fields"]),
        convolutions=meta["convolutions"],
        timings=meta["timings"],
    )
    return compiled, info


def _artifact_files(cache: Path, key: dict[str, Any]) -> tuple[Path, Path]:
    digest = key_digest(key)
    return cache / f"generator-int8-{digest}.pt2", cache / f"generator-int8-{digest}.json"


def cached_artifact(generator: nn.Module, image_size: int, cache_dir: str | Path | None = None,
                    settings: Int8Settings | None = None) -> Path | None:
    """The compiled graph `quantize_generator` would load for these arguments, or None when it would build one."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path, meta_path = _artifact_files(cache, cache_key(generator, image_size, settings or Int8Settings(), backend()))
    return path if path.is_file() and meta_path.is_file() else None


def quantize_generator(
    generator: nn.Module,
    calibration: Calibration,
    image_size: int,
    cache_dir: str | Path | None = None,
    settings: Int8Settings | None = None,
) -> Int8Generator:
    """The int8 generator for `image_size`, from the cache when it holds one for these weights and settings.

    `calibration`: representative `animate` inputs (see `record_calibration`), or a function returning them,
    called only when the artifact has to be built. Their images must be `image_size` square.
    """
    settings = settings or Int8Settings()
    engine = backend()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    start = time.perf_counter()
    key = cache_key(generator, image_size, settings, engine)
    path, meta_path = _artifact_files(cache, key)
    if path.is_file() and meta_path.is_file():
        loaded = _load(path, meta_path, start)
        if loaded is not None:
            log.info("int8 generator: loaded from cache %s in %.1f s", path, loaded[1].seconds)
            return Int8Generator(generator, *loaded)
    log.warning("int8 generator: no cached graph for this checkpoint, size and settings yet; calibrating, "
                "quantizing and compiling it once (a few minutes), later runs load it from %s", cache)
    check_compiler()
    cache.mkdir(parents=True, exist_ok=True)
    info = _build(generator, calibration, image_size, settings, engine, path)
    write_atomic(meta_path, lambda p: p.write_text(json.dumps(_meta(key, info), indent=1)))
    info.seconds = time.perf_counter() - start
    log.info("int8 generator: built in %.0f s (%s) and cached as %s", info.seconds,
             ", ".join(f"{k} {v:.0f} s" for k, v in info.timings.items()), path)
    return Int8Generator(generator, torch._inductor.aoti_load_package(str(path)), info)


def _meta(key: dict[str, Any], info: ArtifactInfo) -> dict[str, Any]:
    return {
        "key": key,
        "min_batch": info.min_batch,
        "max_batch": info.max_batch,
        "fields": list(info.fields),
        "convolutions": info.convolutions,
        "timings": info.timings,
    }


class Laps:
    """Seconds of consecutive build steps: `lap("export")` closes the step that just ended under that name."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 2)
        self._clock = now


def _build(
    generator: nn.Module,
    calibration: Calibration,
    image_size: int,
    settings: Int8Settings,
    engine: str,
    path: Path,
) -> ArtifactInfo:
    lap = Laps()

    batches = list(calibration() if callable(calibration) else calibration)
    if not batches:
        raise ValueError("int8 calibration needs at least one batch of renderer inputs")
    feature_type, names = _feature_fields(batches[0].features)
    first = batches[0]
    args = _flat_inputs(first.features, first.kp_source, first.kp_driving, names)
    lap("calibration inputs")
    wrapper = _AnimateGraph(generator, feature_type, names).eval()
    with torch.no_grad():
        program, min_batch = _export(wrapper, args, names, settings.max_batch)
        rewriter = PlanRewriter(functional_graph(program), settings)
        gm = rewriter.run()
        lap("export")
        shapes = _dynamic_shapes(names, min_batch, settings.max_batch)
        quantized = quantize_graph(gm, shapes, lambda model: _calibrate(model, batches, names), engine)
        lap("calibrate + quantize")
        write_atomic(path, lambda p: compile_package(quantized, args, shapes, p))
        lap("compile")
    return ArtifactInfo(
        path=path,
        from_cache=False,
        seconds=0.0,
        min_batch=min_batch,
        max_batch=settings.max_batch,
        fields=tuple(names),
        convolutions=rewriter.counts,
        timings=lap.timings,
    )


class _Recorder:
    """Stands in for the Renderer's generator and keeps the inputs of every `animate` call (rendering nothing)."""

    def __init__(self, generator: nn.Module):
        self._generator = generator
        self.batches: list[CalibrationBatch] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._generator, name)

    def animate(self, features: Any, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches.append(CalibrationBatch(features, kp_source, kp_driving))
        return {"prediction": kp_driving.new_zeros(kp_driving.shape[0], 3, 1, 1)}


def record_calibration(
    renderer: Any,
    source_image: torch.Tensor,
    source_semantics: torch.Tensor,
    driving: torch.Tensor,
    batch_size: int = 2,
) -> list[CalibrationBatch]:
    """The generator inputs the real Renderer makes for a (1, 3, S, S) source, its (1, C, 27) semantics and
    (N, C, 27) driving windows, in batches of `batch_size`."""
    recorder = _Recorder(renderer.generator)
    renderer.generator = recorder
    try:
        source = renderer.prepare(source_image, source_semantics)
        for start in range(0, driving.shape[0], batch_size):
            renderer.render(source, driving[start : start + batch_size])
    finally:
        renderer.generator = recorder._generator
    return recorder.batches
