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


# `--batch_size auto`. On the CPU: CPU_AUTO_BATCH, the default batch (measured there; a preset's number is not
# consulted: an explicit `auto` wins over the preset like any flag). On CUDA: the largest batch whose renderer
# activations fit the GPU's free memory with HEADROOM kept free, at most MAX_AUTO_BATCH.
CPU_AUTO_BATCH = 2
MAX_AUTO_BATCH = 64
HEADROOM = 0.2  # of the free memory, kept for the enhancer (it runs beside the renderer), cuDNN and fragmentation
# Peak activation memory of one renderer call per frame of the batch, MiB, by (size, precision). NOT MEASURED ON A
# GPU: traced on the CPU build by running `Renderer.render` on the meta device (shapes only) at batches 1, 2 and 4
# and counting live tensor storages; it grows exactly linearly (256: fp32 313 MiB, bf16/fp16 163 MiB a frame;
# 512: 4x). FRAME_OVERHEAD covers what the trace cannot see (cuDNN workspaces, the caching allocator's rounding).
# Replace these with the GPU check's measured `torch.cuda.max_memory_allocated` per frame.
FRAME_MIB = {
    (256, "fp32"): 313, (256, "bf16"): 163, (256, "fp16"): 163,
    (512, "fp32"): 1251, (512, "bf16"): 651, (512, "fp16"): 651,
}
FRAME_OVERHEAD = 1.25


def free_memory(device: str) -> int:
    """Bytes a new allocation on CUDA `device` can get: free on the GPU plus what torch's cache holds unused."""
    import torch

    index = torch.device(device)
    free, _total = torch.cuda.mem_get_info(index)
    return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))


def auto_batch_size(device: str, size: int, precision: str) -> int:
    """What `--batch_size auto` means on `device` (resolved: "cpu" or "cuda:N") for a run at `size`, `precision`."""
    if device == "cpu":
        return CPU_AUTO_BATCH
    per_frame = FRAME_MIB.get((size, precision), FRAME_MIB[(size, "fp32")]) * 2**20 * FRAME_OVERHEAD
    fits = int(free_memory(device) * (1 - HEADROOM) // per_frame)
    return max(1, min(MAX_AUTO_BATCH, fits))
