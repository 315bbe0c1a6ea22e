"""Write synthetic SadTalker checkpoints in the official formats (rule sadtalker-synth-v1).

    python scripts/make_synthetic_checkpoints.py OUT_DIR [--verify] [--aux]

Writes SadTalker_V0.0.2_256.safetensors, SadTalker_V0.0.2_512.safetensors, mapping_00229-model.pth.tar and
mapping_00109-model.pth.tar (about 1.5 GB, 15 s). With --verify each file is read back and its content digest
compared with the one recorded for the official layout; the exit status is non-zero on any mismatch.
With --aux it also writes the face enhancer's and upstream landmark backend's files (GFPGANv1.4.pth,
detection_Resnet50_Final.pth, alignment_WFLW_4HG.pth, parsing_parsenet.pth; rule sadtalker-synth-v1-aux, 640 MB,
digests always checked). A folder holding the detector and FAN files makes `--landmarks auto` pick the upstream
backend, whose synthetic weights put random boxes and points on a picture: keep them apart unless that is wanted.
With --pirender it also writes epoch_00190_iteration_000400000_checkpoint.pt, the weights of the PIRender renderer
(rule sadtalker-synth-v1-pirender, 90 MB, 3 s).
With --legacy it also writes the legacy per-network files of --old_version (auido2exp_00300-model.pth,
auido2pose_00140-model.pth, facevid2vid_00189-model.pth.tar, epoch_20.pth; rule sadtalker-synth-v1-legacy: the
packed 256 file's tensors re-keyed, plus the unused head-pose estimator; 0.85 GB, about 20 s, digests always
checked). Beside the safetensors files they are used with --old_version only.
With --restorers it also writes the optional restorers' files RestoreFormer.pth and RealESRGAN_x2plus.pth
(`--enhancer RestoreFormer`, `--background_enhancer realesrgan`; rule sadtalker-synth-v1-restorers, 358 MB, about
5 s; byte-identical to the reference writer's).
"""

from __future__ import annotations

import argparse
import logging
import sys

from xtalker.synthetic.auxiliary import write_all_aux
from xtalker.synthetic.legacy import write_legacy
from xtalker.synthetic.pirender import write_all_pirender
from xtalker.synthetic.restorers import write_all_restorers
from xtalker.synthetic.sadtalker import write_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the four files into (created if missing)")
    parser.add_argument("--verify", action="store_true", help="re-read every file and check its content digest")
    parser.add_argument("--aux", action="store_true", help="also write the four aux files (enhancer, upstream landmarks)")
    parser.add_argument("--pirender", action="store_true", help="also write the PIRender renderer's file")
    parser.add_argument("--legacy", action="store_true", help="also write the legacy per-network files (--old_version)")
    parser.add_argument("--restorers", action="store_true",
                        help="also write the optional restorers' files (RestoreFormer, RealESRGAN x2plus)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        results = write_all(args.out_dir, verify=args.verify)
        if args.aux:
            results.update(write_all_aux(args.out_dir))
        if args.pirender:
            results.update(write_all_pirender(args.out_dir, verify=args.verify))
        if args.legacy:
            results.update(write_legacy(args.out_dir, verify=True))
        if args.restorers:
            results.update(write_all_restorers(args.out_dir, verify=args.verify))
    except OSError as e:
        sys.stderr.write(f"error: cannot write to {args.out_dir}: {e.strerror or e}\n")
        return 1
    for name, ok in results.items():
        state = "written" if ok is None else ("digest OK" if ok else "DIGEST MISMATCH")
        sys.stdout.write(f"{name}: {state}\n")
    return 0 if all(ok is not False for ok in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
