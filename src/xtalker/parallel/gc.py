"""Remove XTalker job folders: `python -m xtalker.parallel.gc [--all] [--older-than HOURS] [--dry-run] [--jobs-dir DIR]`.

Only folders directly under the jobs root whose job.json marks them as XTalker jobs are considered; links
are never followed. By default a job goes once it has no live worker and is finished or older than 24 h;
--older-than H selects by age alone (finished or not); --all takes every job and first stops its workers,
only the processes recorded for it and only while they are still those same processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from xtalker.atomic import read_json
from xtalker.parallel.jobs import Job, is_same_process, jobs_root, live_workers

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE_H = 24.0
TERM_GRACE_S = 5.0
KILL_GRACE_S = 2.0
POLL_S = 0.05


class UsageError(Exception):
    """A bad command line; reported as one `error:` line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gc.sh", allow_abbrev=False,
                description="Remove finished or stale XTalker job folders (and stop their recorded workers).")
    p.add_argument("--all", action="store_true", help="remove every job, stopping its live workers first")
    p.add_argument("--older-than", type=float, default=None, metavar="HOURS",
                   help=f"remove jobs older than this, finished or not (default: finished ones, or older than {DEFAULT_MAX_AGE_H:g} h)")
    p.add_argument("--dry-run", action="store_true", help="only print what would be stopped and removed")
    p.add_argument("--jobs-dir", type=Path, default=None,
                   help="jobs root (default: $XTALKER_JOBS_DIR, else $XDG_CACHE_HOME/xtalker/jobs, else ~/.cache/xtalker/jobs)")
    return p


@dataclass(frozen=True)
class JobInfo:
    job: Job
    age_h: float
    done: bool
    workers: list[dict[str, Any]]


def find_jobs(root: Path) -> list[Job]:
    """XTalker jobs directly under `root`; links (which could lead outside it) and other entries are skipped."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    return [Job(Path(e.path)) for e in entries
            if e.is_dir(follow_symlinks=False) and Job.is_xtalker_job(Path(e.path))]


def describe_job(job: Job, now: float) -> JobInfo:
    meta = read_json(job.meta)
    created = meta.get("created")
    if not isinstance(created, (int, float)):
        created = job.meta.stat().st_mtime
    return JobInfo(job=job, age_h=(now - created) / 3600.0, done=meta.get("done") is True, workers=live_workers(job))


def selected(info: JobInfo, everything: bool, older_than_h: float | None) -> bool:
    if everything:
        return True
    if info.workers:  # somebody is still rendering it: only --all interrupts a run
        return False
    if older_than_h is not None:
        return info.age_h >= older_than_h
    return info.done or info.age_h >= DEFAULT_MAX_AGE_H


def stop_workers(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SIGTERM, up to TERM_GRACE_S for a clean exit, then SIGKILL; returns the workers still running after all."""
    _signal_all(workers, signal.SIGTERM)
    remaining = _wait_gone(workers, TERM_GRACE_S)
    if remaining:
        _signal_all(remaining, signal.SIGKILL)
        remaining = _wait_gone(remaining, KILL_GRACE_S)
    return remaining


def _signal_all(workers: list[dict[str, Any]], sig: signal.Signals) -> None:
    for record in workers:
        # checked again right before each signal: the process may have exited and its PID been reused
        if not is_same_process(record):
            continue
        try:
            os.kill(record["pid"], sig)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            log.warning("cannot signal worker %s: %s", record["pid"], e)


def _wait_gone(workers: list[dict[str, Any]], timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = [r for r in workers if is_same_process(r)]
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(POLL_S)


def collect(root: Path, everything: bool, older_than_h: float | None, dry_run: bool,
            say: Callable[[str], None]) -> None:
    """Stop and remove the selected jobs under `root`, telling `say` one line per action."""
    now = time.time()
    for job in find_jobs(root):
        try:
            info = describe_job(job, now)
        except (OSError, ValueError, AttributeError) as e:  # vanished or rewritten meanwhile
            log.warning("skipping %s: %s", job.path, e)
            continue
        if not selected(info, everything, older_than_h):
            continue
        if dry_run:
            for record in info.workers:
                say(f"would stop worker pid {record['pid']} (shard {record.get('shard')}) of {job.path}")
            say(f"would remove {job.path}")
            continue
        left = stop_workers(info.workers) if info.workers else []
        for record in info.workers:
            if record not in left:
                say(f"stopped worker pid {record['pid']} (shard {record.get('shard')}) of {job.path}")
        if left:
            pids = ", ".join(str(r["pid"]) for r in left)
            sys.stderr.write(f"warning: workers {pids} of {job.path} did not stop; job kept\n")
            continue
        try:
            shutil.rmtree(job.path)
        except OSError as e:
            sys.stderr.write(f"warning: could not remove {job.path}: {e}\n")
            continue
        say(f"removed {job.path}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.older_than is not None and not args.older_than >= 0:
            raise UsageError(f"--older-than {args.older_than:g}: must be a number of hours >= 0")
        if args.all and args.older_than is not None:
            raise UsageError("--all and --older-than exclude each other")
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    root = args.jobs_dir if args.jobs_dir is not None else jobs_root()

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    collect(root, args.all, args.older_than, args.dry_run, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
