"""Upstream's web entry point: `python app.py` starts XTalker's web UI (the same as `xtalker-ui`; see README)."""

import sys
from pathlib import Path

try:
    from xtalker.serve.ui import main
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from xtalker.serve.ui import main

if __name__ == "__main__":
    sys.exit(main())
