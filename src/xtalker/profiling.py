"""Per-stage wall-clock timing of a run (`--profile`, `--report`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Table order; stages that interleave per batch (render, paste, encode) accumulate over all batches.
STAGES = ("load models", "preprocess", "audio", "audio2coeff", "render", "enhance", "paste", "encode")


@dataclass
class Profiler:
    seconds: dict[str, float] = field(default_factory=dict)
    frames: int = 0
    loaded: list[str] = field(default_factory=list)  # networks this run loaded (none when all were warm)
    batch_size: int | None = None  # frames per renderer call, once the run has chosen it (`--batch_size auto`)
    _start: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return time.perf_counter() - self._start

    def as_dict(self) -> dict[str, object]:
        total = self.total
        stages = {name: round(self.seconds.get(name, 0.0), 4) for name in (*STAGES, *sorted(set(self.seconds) - set(STAGES)))}
        render = self.seconds.get("render", 0.0)
        return {
            "stages_s": stages,
            "total_s": round(total, 4),
            "frames": self.frames,
            "frames_per_s": round(self.frames / total, 4) if total > 0 else 0.0,
            "render_s_per_frame": round(render / self.frames, 4) if self.frames else 0.0,
            "loaded": list(self.loaded),
            "batch_size": self.batch_size,
        }

    def table(self) -> str:
        d = self.as_dict()
        total = float(d["total_s"]) or 1.0
        lines = [f"{'stage':<14}{'seconds':>10}{'share':>8}"]
        for name, sec in d["stages_s"].items():
            lines.append(f"{name:<14}{sec:>10.2f}{100 * sec / total:>7.1f}%")
        lines.append(f"{'total':<14}{total:>10.2f}")
        lines.append(f"networks loaded: {', '.join(self.loaded) or 'none (all warm)'}")
        batch = f" (batch {self.batch_size})" if self.batch_size is not None else ""
        lines.append(f"{d['frames']} frames, {d['frames_per_s']:.3f} frames/s overall, "
                     f"{d['render_s_per_frame']:.3f} s/frame rendering{batch}")
        return "\n".join(lines)
