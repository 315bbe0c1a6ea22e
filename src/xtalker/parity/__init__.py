"""Numerical parity with upstream SadTalker on the reference golden cases (see `python -m xtalker.parity -h`)."""
