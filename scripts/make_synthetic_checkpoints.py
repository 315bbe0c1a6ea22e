"""Write synthetic SadTalker checkpoints in the official formats (rule sadtalker-synth-v1).

    python scripts/make_synthetic_checkpoints.py OUT_DIR [--verify] [--aux]

Writes SadTalker_V0.0.2_256.safetensors, SadTalker_V0.0.2_512.safetensors, mapping_00229-model.pth.tar and
mapping_00109-model.pth.tar (about 1.5 GB, 15 s). With --verify each file is read back and its content digest
compared with the one recorded for the official layout; the exit status is non-zero on any mismatch.
With --aux it also writes the face enhancer's and upstream landmark backend's files (GFPGANv1.4.pth,
detection_Resnet50_Final.pth, alignment_WFLW_4HG.pth, parsing_parsenet.pth; rule sadtalker-synth-v1-aux, 640 MB,
digests always checked). A folder holding the detector and FAN files makes `--landmarks auto` pick the upstream
backend, whose synthetic weights put random boxes and points on a picture: keep them apart unless that is wanted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from xtalker.synthetic.auxiliary import write_all_aux
from xtalker.synthetic.sadtalker import write_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the four files into (created if missing)")
    parser.add_argument("--verify", action="store_true", help="re-read every file and check its content digest")
    parser.add_argument("--aux", action="store_true", help="also write the four aux files (enhancer, upstream landmarks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        results = write_all(args.out_dir, verify=args.verify)
        if args.aux:
            results.update(write_all_aux(args.out_dir))
    except OSError as e:
        sys.stderr.write(f"error: cannot write to {args.out_dir}: {e.strerror or e}\n")
        return 1
    for name, ok in results.items():
        state = "written" if ok is None else ("digest OK" if ok else "DIGEST MISMATCH")
        sys.stdout.write(f"{name}: {state}\n")
    return 0 if all(ok is not False for ok in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
