"""Networks kept loaded between runs: what lets the Python API, `xtalker batch` and the web UI load each model once.

Loaders ask `shared(kind, key, load)` for a network; inside `Networks.active()` the answer comes from that
cache when it holds `key`, else `load()` runs and the result is kept. The record of what was loaded lets a run's
profile show it (`loaded`: empty when everything was warm). The SadTalker networks of a setting take about 1 GB,
so only the most recent `max_heads` settings are kept; enhancer networks are kept by file and device (a cpu and
a cuda copy of one file are two entries; their precision plans live on the network).
"""

from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
HEADS = "sadtalker"  # the kind of a TalkingHead: every SadTalker network of one setting

_ACTIVE: contextvars.ContextVar[Networks | None] = contextvars.ContextVar("xtalker_networks", default=None)


class Networks:
    """A cache of loaded networks, keyed by kind and what they were loaded from."""

    def __init__(self, max_heads: int = 2):
        self.max_heads = max_heads
        self._kept: OrderedDict[tuple[str, Hashable], Any] = OrderedDict()
        self._lock = threading.RLock()
        self.loaded: list[str] = []  # kinds loaded since the last `take_loaded`, in order

    def get(self, kind: str, key: Hashable, load: Callable[[], T]) -> T:
        with self._lock:
            entry = (kind, key)
            if entry in self._kept:
                self._kept.move_to_end(entry)
                return self._kept[entry]
            if kind == HEADS:  # make room before loading: two settings' networks at once is the memory bound
                heads = [k for k in self._kept if k[0] == HEADS]
                for old in heads[: max(0, len(heads) - self.max_heads + 1)]:
                    del self._kept[old]
            value = load()
            self._kept[entry] = value
            self.loaded.append(kind)
            return value

    def take_loaded(self) -> list[str]:
        """What was loaded since the last call (and forget it)."""
        with self._lock:
            loaded, self.loaded = self.loaded, []
            return loaded

    def kinds(self) -> list[str]:
        with self._lock:
            return [kind for kind, _ in self._kept]

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()

    @contextmanager
    def active(self) -> Iterator[Networks]:
        """Loaders called in this block (this thread or task) use this cache."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def file_key(path: Path) -> tuple[str, int, int]:
    """A file as a cache key: replaced weights at the same path are another key."""
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size


def network_key(path: Path, device: str) -> tuple[str, int, int, str]:
    """A network loaded from `path` onto `device` (resolved: "cpu", "cuda:N") as a cache key."""
    return (*file_key(path), str(device))


def shared(kind: str, key: Hashable, load: Callable[[], T]) -> T:
    """The active cache's network for (kind, key), loaded once; without an active cache, just `load()`."""
    networks = _ACTIVE.get()
    if networks is None:
        return load()
    return networks.get(kind, key, load)
