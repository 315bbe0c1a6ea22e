"""Write run_distributed_infer_N.sh, which renders one video with N workers on disjoint CPU cores (see README)."""

import sys
from pathlib import Path

try:
    from xtalker.parallel.script import main
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from xtalker.parallel.script import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).resolve().parent / "inference.py"))
