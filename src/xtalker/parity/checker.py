"""Parity checker: run every golden case in a folder against XTalker and report PASS / FAIL / SKIP.

    python -m xtalker.parity DIR [--checkpoint_dir C] [-k SUBSTRING] [-v]

The kind of each case comes from the prefix of its metadata `case` field, never from the file name; sizes,
flags and weights are read from the metadata too. Without --checkpoint_dir the synthetic checkpoints the
cases need are written to a cache folder (rule sadtalker-synth-v1) the first time they are needed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

import torch

from xtalker.checkpoints import CheckpointError
from xtalker.parity.core import Case, CaseResult, CaseRunner, Context
from xtalker.synthetic import default_cache_dir

log = logging.getLogger(__name__)

RUNNER_MODULES = (
    "xtalker.parity.cases_audio",
    "xtalker.parity.cases_preprocess",
    "xtalker.parity.cases_renderer",
    "xtalker.parity.cases_generator",
    "xtalker.parity.cases_aux",
    "xtalker.parity.cases_retinaface",
    "xtalker.parity.cases_parsenet",
    "xtalker.parity.cases_awing",
    "xtalker.parity.cases_pirender",
    "xtalker.parity.cases_restorers",
)


def runners() -> dict[str, CaseRunner]:
    """Every implemented case kind -> its runner, gathered from the per-stage case modules."""
    table: dict[str, CaseRunner] = {}
    for module in RUNNER_MODULES:
        table.update(importlib.import_module(module).RUNNERS)
    return table


def kind_of(case_id: str, table: dict[str, CaseRunner]) -> str | None:
    """The longest registered kind that prefixes the case id (so "make_animation512_b" -> "make_animation")."""
    matches = [k for k in table if case_id.startswith(k)]
    return max(matches, key=len) if matches else None


def run_case(path: Path, ctx: Context, table: dict[str, CaseRunner]) -> CaseResult:
    try:
        case = Case.open(path)
    except Exception as e:  # an unreadable file is a failed case, not a crash of the whole run
        return CaseResult(path.stem, "?", "FAIL", message=f"unreadable case: {e}")
    kind = kind_of(case.kind_id, table)
    if kind is None:
        label = case.kind_id or "no 'case' field"
        return CaseResult(case.name, label, "SKIP", message="kind not implemented yet")
    try:
        with torch.inference_mode():
            checks = table[kind](case, ctx)
    except CheckpointError as e:
        return CaseResult(case.name, kind, "FAIL", message=str(e))
    except Exception as e:  # report and go on with the other cases
        log.debug("case %s raised", case.name, exc_info=True)
        return CaseResult(case.name, kind, "FAIL", message=f"{type(e).__name__}: {e}")
    if not checks:
        return CaseResult(case.name, kind, "FAIL", message="runner compared nothing")
    status = "PASS" if all(c.passed for c in checks) else "FAIL"
    return CaseResult(case.name, kind, status, checks=checks)


def format_result(r: CaseResult, seconds: float | None = None) -> str:
    timing = f" ({seconds:.1f} s)" if seconds is not None else ""
    if r.status == "SKIP":
        return f"{r.name}: SKIP ({r.message}: {r.kind}){timing}"
    worst = r.worst
    if worst is None:
        return f"{r.name}: {r.status} ({r.message}){timing}"
    failing = [c for c in r.checks if not c.passed]
    shown = failing[0] if failing else worst
    note = f" {shown.detail}" if shown.detail else ""
    return (
        f"{r.name}: {r.status} worst {shown.name} {shown.error:.3g} vs tolerance {shown.tolerance:.3g}{note}"
        f" [{len(r.checks)} checks]{timing}"
    )


def summary_line(results: list[CaseResult]) -> str:
    passed = sum(r.status == "PASS" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    skipped = sum(r.status == "SKIP" for r in results)
    return f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xtalker.parity", description="Check XTalker against golden cases.")
    parser.add_argument("golden_dir", type=Path, help="folder of *.safetensors golden cases")
    parser.add_argument("--checkpoint_dir", type=Path, default=None, help="folder with the checkpoint files the cases were made with (default: synthetic ones in a cache folder)")
    parser.add_argument("-k", dest="select", default=None, help="only cases whose file name contains this text")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every comparison of every case")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    if not args.golden_dir.is_dir():
        sys.stderr.write(f"error: golden folder {args.golden_dir} does not exist\n")
        return 2
    paths = sorted(p for p in args.golden_dir.glob("*.safetensors") if not args.select or args.select in p.name)
    if not paths:
        sys.stderr.write(f"error: no *.safetensors cases in {args.golden_dir}\n")
        return 2
    if args.checkpoint_dir is not None:
        ctx = Context(args.checkpoint_dir)
    else:
        ctx = Context(default_cache_dir(), synthesize_missing=True)
    table = runners()
    results = []
    for path in paths:
        start = time.perf_counter()
        result = run_case(path, ctx, table)
        results.append(result)
        sys.stdout.write(format_result(result, time.perf_counter() - start) + "\n")
        if args.verbose:
            for c in result.checks:
                sys.stdout.write(f"    {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.error:.3g} (tolerance {c.tolerance:.3g}) {c.detail}\n")
        sys.stdout.flush()
    sys.stdout.write(summary_line(results) + "\n")
    return 1 if any(r.status == "FAIL" for r in results) else 0
