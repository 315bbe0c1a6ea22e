"""XTalker: a fast, CPU-first, checkpoint-compatible reimplementation of SadTalker."""

__version__ = "0.1.0"
