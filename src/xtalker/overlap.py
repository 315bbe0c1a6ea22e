"""Render the next batch while this one is finished and encoded: a producer thread behind a small queue.

`ahead(batches, depth)` runs the `batches` iterator (the renderer: torch releases the GIL) in a thread and
yields its items in order, at most `depth` ahead of the consumer, so memory stays bounded and the output is the
same bytes as the serial loop's. An exception in the producer is raised in the consumer; a consumer that stops
early (an error, a cancel) stops the producer at its next item.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """`items`, produced by a background thread up to `depth` ahead."""
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Failed(e))

    worker = threading.Thread(target=produce, name="xtalker-render-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()
