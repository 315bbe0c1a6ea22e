"""Core slots: disjoint groups of CPU cores, one per render worker, never spanning two sockets.

Workers pinned to their own cores do not fight over caches and memory bandwidth the way N free-floating
processes do, and a slot inside one socket keeps its memory traffic local.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path


class SlotError(Exception):
    """The requested slots cannot be made on this machine; the message is one line for the user."""


@dataclass(frozen=True)
class CoreSlot:
    cpus: tuple[int, ...]
    socket: int

    @property
    def threads(self) -> int:
        return len(self.cpus)

    @property
    def cpu_list(self) -> str:
        return compact_cpu_list(self.cpus)


def compact_cpu_list(cpus: tuple[int, ...] | list[int]) -> str:
    """The kernel's list form, as taskset and numactl take it: [0, 1, 2, 3, 8, 9] -> "0-3,8-9"."""
    parts: list[str] = []
    ordered = sorted(cpus)
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            first, last = ordered[start], ordered[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)


def available_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return sorted(os.sched_getaffinity(0))


def cpu_sockets(cpus: list[int]) -> dict[int, int]:
    """Socket (physical package) of each CPU; 0 where the kernel does not say."""
    sockets = {}
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id")
        try:
            sockets[cpu] = int(path.read_text().strip())
        except (OSError, ValueError):
            sockets[cpu] = 0
    return sockets


def plan_slots(n: int, cpus: list[int] | None = None, sockets: dict[int, int] | None = None) -> list[CoreSlot]:
    """`n` disjoint slots of consecutive CPUs, sizes as even as possible, none across sockets."""
    cpus = sorted(available_cpus() if cpus is None else cpus)
    sockets = cpu_sockets(cpus) if sockets is None else sockets
    if n < 1:
        raise SlotError(f"--slot {n}: use at least 1 slot")
    if n > len(cpus):
        raise SlotError(f"--slot {n}: this process may use only {len(cpus)} CPU cores ({compact_cpu_list(cpus)}); "
                        f"use --slot {len(cpus)} or fewer")
    by_socket: dict[int, list[int]] = {}
    for cpu in cpus:
        by_socket.setdefault(sockets.get(cpu, 0), []).append(cpu)
    slots = [slot for socket, count in _slots_per_socket(n, by_socket).items()
             for slot in _split(by_socket[socket], count, socket)]
    return sorted(slots, key=lambda s: s.cpus[0])


def _slots_per_socket(n: int, by_socket: dict[int, list[int]]) -> dict[int, int]:
    """How many of the `n` slots each socket gets.

    With fewer slots than sockets the largest sockets get one each. Otherwise every socket starts with one and
    each further slot goes to the socket whose slots are currently the largest, which keeps the counts
    proportional to the sockets' sizes and the slot sizes as even as they can be.
    """
    largest_first = sorted(by_socket, key=lambda s: (-len(by_socket[s]), s))
    if n < len(largest_first):
        return {socket: 1 for socket in largest_first[:n]}
    counts = {socket: 1 for socket in largest_first}
    for _ in range(n - len(counts)):
        open_sockets = [s for s in largest_first if counts[s] < len(by_socket[s])]
        best = max(open_sockets, key=lambda s: (len(by_socket[s]) / counts[s], -s))
        counts[best] += 1
    return counts


def _split(cpus: list[int], count: int, socket: int) -> list[CoreSlot]:
    """`count` consecutive runs of `cpus`, the first ones one CPU larger when they do not divide evenly."""
    size, extra = divmod(len(cpus), count)
    slots, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        slots.append(CoreSlot(cpus=tuple(cpus[start:end]), socket=socket))
        start = end
    return slots


def pin_prefix(slot: CoreSlot) -> list[str]:
    """The command prefix that runs a program on `slot`'s CPUs only: numactl when installed, else taskset."""
    if shutil.which("numactl"):
        return ["numactl", "-C", slot.cpu_list]
    if shutil.which("taskset"):
        return ["taskset", "-c", slot.cpu_list]
    raise SlotError("cannot pin workers to CPU cores: install util-linux (taskset) or numactl")
