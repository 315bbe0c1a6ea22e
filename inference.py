"""XTalker command line, a drop-in for SadTalker's `python inference.py ...` (see README)."""

import sys
from pathlib import Path

try:
    from xtalker.cli import main
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from xtalker.cli import main

if __name__ == "__main__":
    sys.exit(main())
