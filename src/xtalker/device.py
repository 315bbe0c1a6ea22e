"""Where the networks run: `--device auto|cpu|cuda[:N]`.

`auto` takes the first CUDA GPU when this torch sees one, else the CPU. A GPU that is asked for and not there is
an error naming what torch sees, never a silent fall-back. Precisions are device-bound: int8 is a CPU path (its
graph is compiled for x86), fp16 a GPU one (about 100x slower than fp32 on this kind of CPU).
"""

from __future__ import annotations

import re

from xtalker.config import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
CPU_ONLY = {"int8"}
GPU_ONLY = {"fp16"}


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str) -> str:
    """`auto` / `cpu` / `cuda` / `cuda:N` -> the torch device string to use ("cpu", "cuda:0", ...)."""
    if not DEVICE_PATTERN.match(name or ""):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    count = cuda_count()
    if name == "auto":
        return "cuda:0" if count else "cpu"
    if name == "cpu":
        return "cpu"
    index = int(name.partition(":")[2] or 0)
    if count == 0:
        import torch

        raise ConfigError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu "
                          "(or auto), or install a CUDA build of torch on a machine with an NVIDIA GPU")
    if index >= count:
        raise ConfigError(f"--device {name}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    return f"cuda:{index}"


def check_precision_on(precision: str, device: str) -> None:
    """One clear line when `precision` cannot run on `device` (a resolved device string)."""
    if device == "cpu" and precision in GPU_ONLY:
        raise ConfigError(f"--precision {precision} runs on CUDA GPUs only (on a CPU it is about 100x slower than "
                          "fp32); use --precision bf16 on the CPU")
    if device != "cpu" and precision in CPU_ONLY:
        raise ConfigError(f"--precision {precision} is a CPU path (an x86 compiled graph); on {device} use "
                          "--precision fp16 or bf16")
