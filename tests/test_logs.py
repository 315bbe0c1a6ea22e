"""Quiet by default: only XTalker's own log lines; --verbose lets third-party warnings through."""

from __future__ import annotations

import subprocess
import sys

SNIPPET = """
import logging, sys, warnings
from xtalker import logs
logs.configure(verbose=sys.argv[1] == "1")
logging.getLogger("torchao.kernel.intmm").warning("Detected no triton")
logging.getLogger("torch.utils._pytree").warning("LeafSpec is deprecated")
warnings.warn("copyreg is deprecated", FutureWarning)
logging.getLogger("xtalker.pipeline").warning("our own line")
logging.getLogger("xtalker.pipeline").info("our detail")
with logs.native_quiet():
    import os
    os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
"""


def run(verbose: bool) -> str:
    return subprocess.run([sys.executable, "-c", SNIPPET, "1" if verbose else "0"], capture_output=True, text=True,
                          check=True).stderr


def test_default_shows_only_our_lines():
    assert run(False).splitlines() == ["WARNING xtalker.pipeline: our own line"]


def test_verbose_shows_everything():
    err = run(True)
    for text in ("Detected no triton", "LeafSpec", "copyreg", "our own line", "our detail", "XNNPACK"):
        assert text in err
