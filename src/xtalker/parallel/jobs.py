"""Job folders: the files that the prepare, render and merge stages of one run share, and their workers.

A job folder holds job.json (always with "tool": "xtalker", so cleanup never touches anything else),
shards/ (one .npy per render worker), logs/ and workers/ (who renders which shard, to stop only our own
processes even after a PID has been reused).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xtalker import __version__
from xtalker.atomic import read_json, write_json_atomic

log = logging.getLogger(__name__)

TOOL = "xtalker"


def jobs_root() -> Path:
    """$XTALKER_JOBS_DIR, else $XDG_CACHE_HOME/xtalker/jobs, else ~/.cache/xtalker/jobs."""
    if explicit := os.environ.get("XTALKER_JOBS_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xtalker" / "jobs"


def new_job_id() -> str:
    """UTC time then random hex, e.g. "20261122-180102-3f9a1c": sorts by creation, unique across machines."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def job_header() -> dict[str, Any]:
    """The keys every job.json starts with: the marker cleanup relies on, creation time and version."""
    return {"tool": TOOL, "created": time.time(), "version": __version__}


@dataclass(frozen=True)
class Job:
    """One job folder; paths only, nothing is read until asked."""

    path: Path

    @property
    def meta(self) -> Path:
        return self.path / "job.json"

    @property
    def shards_dir(self) -> Path:
        return self.path / "shards"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def workers_dir(self) -> Path:
        return self.path / "workers"

    def shard_path(self, i: int) -> Path:
        return self.shards_dir / f"shard_{i:04d}.npy"

    def log_path(self, i: int) -> Path:
        return self.logs_dir / f"shard_{i:04d}.log"

    def worker_path(self, i: int) -> Path:
        return self.workers_dir / f"shard_{i:04d}.json"

    @classmethod
    def create(cls, path: Path) -> Job:
        """The job at `path` with all its folders (existing ones are kept)."""
        job = cls(Path(path))
        for folder in (job.path, job.shards_dir, job.logs_dir, job.workers_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return job

    @staticmethod
    def is_xtalker_job(path: Path) -> bool:
        """True when `path` is a folder whose job.json says it was made by XTalker."""
        meta = Path(path) / "job.json"
        try:
            data = read_json(meta)
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("tool") == TOOL


@dataclass(frozen=True)
class ProcessIdentity:
    """What tells one process from a later one with the same PID: kernel start time and command line."""

    start_ticks: int
    cmdline: list[str]


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of a running process, None when it is gone (zombies included) or unreadable."""
    proc = Path("/proc") / str(pid)
    try:
        stat = (proc / "stat").read_text(encoding="utf-8", errors="replace")
        raw_cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and ')' itself, so fields are counted after the last ')'
    fields = stat[stat.rfind(")") + 1:].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    cmdline = [part.decode(errors="surrogateescape") for part in raw_cmdline.split(b"\0")]
    if cmdline and cmdline[-1] == "":
        cmdline.pop()
    return ProcessIdentity(start_ticks=int(fields[19]), cmdline=cmdline)


def record_worker(job: Job, shard: int, pid: int | None = None) -> None:
    """Note that process `pid` (default: this one) renders `shard`, with its identity for later checks."""
    pid = os.getpid() if pid is None else pid
    identity = process_identity(pid)
    if identity is None:
        raise ProcessLookupError(f"process {pid} is not running")
    write_json_atomic(job.worker_path(shard), {
        "pid": pid, "shard": shard, "start_ticks": identity.start_ticks, "cmdline": identity.cmdline,
        "recorded": time.time(),
    })


def is_same_process(record: dict[str, Any]) -> bool:
    """True while the recorded process still runs (same PID, start time and command line)."""
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    identity = process_identity(pid)
    return (identity is not None and identity.start_ticks == record.get("start_ticks")
            and identity.cmdline == record.get("cmdline"))


def live_workers(job: Job) -> list[dict[str, Any]]:
    """The recorded workers of `job` that still run; records of exited or replaced processes are ignored."""
    if not job.workers_dir.is_dir():
        return []
    live = []
    for path in sorted(job.workers_dir.glob("shard_*.json")):
        try:
            record = read_json(path)
        except (OSError, ValueError) as e:
            log.debug("unreadable worker record %s: %s", path, e)
            continue
        if isinstance(record, dict) and is_same_process(record):
            live.append(record)
    return live
