"""XTalker: a fast, CPU-first, checkpoint-compatible reimplementation of SadTalker.

`from xtalker import XTalker` is the Python API (xtalker.api); importing the package alone loads nothing heavy.
"""

__version__ = "0.1.0"

__all__ = ["USER_ERRORS", "Video", "XTalker", "__version__"]


def __getattr__(name: str):
    if name in ("XTalker", "Video", "USER_ERRORS"):
        from xtalker import api

        return getattr(api, name)
    raise AttributeError(f"module 'xtalker' has no attribute {name!r}")
