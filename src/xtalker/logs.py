"""What a run prints: XTalker's own log lines, and third-party chatter only with --verbose.

torch, torchao and Intel Neural Compressor log warnings and raise `FutureWarning`s of their own (missing Triton,
CUDA kernels that cannot load on a CPU box, pytree deprecations) that say nothing about the user's run. Every
entry point (CLI, batch, UI, doctor) calls `configure` once.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

FORMAT = "%(levelname)s %(name)s: %(message)s"
# Libraries that attach handlers of their own, so a filter on the root handler does not reach them.
OWN_HANDLERS = ("torch", "torchao", "neural_compressor", "flytekit", "gradio", "httpx", "uvicorn")


class _OursOnly(logging.Filter):
    """Pass XTalker's records, and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "xtalker" or record.levelno >= logging.ERROR


def configure(verbose: bool = False) -> None:
    """Log XTalker's warnings (everything with `verbose`) to stderr; silence other libraries unless `verbose`."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if verbose:
        return
    import torch  # noqa: F401  (importing torch resets the level of its loggers: set them after)

    for handler in root.handlers:
        if not any(isinstance(f, _OursOnly) for f in handler.filters):
            handler.addFilter(_OursOnly())
    for name in OWN_HANDLERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"xtalker(\.|$)")


@contextmanager
def native_quiet() -> Iterator[None]:
    """Silence what native code writes to stderr in this block (TFLite's "Created XNNPACK delegate" line), unless
    logging is at DEBUG (--verbose)."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
