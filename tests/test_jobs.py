"""Job folders, atomic writes, worker identity and the cleanup command (which must never touch others' files
or processes)."""

from __future__ import annotations

import calendar
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from xtalker import __version__
from xtalker.atomic import read_json, write_atomic, write_json_atomic
from xtalker.parallel import Job, gc
from xtalker.parallel.jobs import job_header, jobs_root, live_workers, new_job_id, process_identity, record_worker

REPO = Path(__file__).resolve().parents[1]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Sleeping processes started by a test; whatever is left is killed afterwards."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start(processes: list[subprocess.Popen]) -> subprocess.Popen:
    """A sleeper whose /proc entry shows its command line (right after the fork it can still be empty)."""
    proc = subprocess.Popen(SLEEPER)
    processes.append(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        identity = process_identity(proc.pid)
        if identity is not None and identity.cmdline == SLEEPER:
            break
        time.sleep(0.01)
    return proc


def make_job(root: Path, name: str, age_h: float = 0.0, done: bool = False) -> Job:
    job = Job.create(root / name)
    write_json_atomic(job.meta, {**job_header(), "created": time.time() - age_h * 3600, "done": done})
    return job


def run_gc(root: Path, *flags: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = gc.main([*flags, "--jobs-dir", str(root)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_jobs_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XTALKER_JOBS_DIR", str(tmp_path / "j"))
    assert jobs_root() == tmp_path / "j"
    monkeypatch.delenv("XTALKER_JOBS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert jobs_root() == tmp_path / "c" / "xtalker" / "jobs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert jobs_root() == Path.home() / ".cache" / "xtalker" / "jobs"


def test_job_ids_sort_by_time_and_are_unique() -> None:
    before = time.time()
    ids = [new_job_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", i) for i in ids)
    assert [i[:15] for i in ids] == sorted(i[:15] for i in ids)
    stamp = calendar.timegm(time.strptime(ids[0][:15], "%Y%m%d-%H%M%S"))  # UTC
    # a window, not an order: the wall clock of a VM can be stepped back between two reads (seen in CI)
    assert abs(stamp - before) < 60


def test_job_layout(tmp_path: Path) -> None:
    job = Job.create(tmp_path / "a b")
    assert Job.create(tmp_path / "a b") == job  # idempotent
    assert job.shard_path(3) == tmp_path / "a b" / "shards" / "shard_0003.npy"
    assert job.log_path(3) == tmp_path / "a b" / "logs" / "shard_0003.log"
    assert job.worker_path(3) == tmp_path / "a b" / "workers" / "shard_0003.json"
    assert all(d.is_dir() for d in (job.shards_dir, job.logs_dir, job.workers_dir))
    assert not Job.is_xtalker_job(job.path)  # no job.json yet
    write_json_atomic(job.meta, {**job_header(), "frames": 10})
    assert Job.is_xtalker_job(job.path)
    meta = read_json(job.meta)
    assert meta["tool"] == "xtalker" and meta["version"] == __version__ and abs(meta["created"] - time.time()) < 60
    write_json_atomic(job.meta, {"tool": "other"})
    assert not Job.is_xtalker_job(job.path)
    job.meta.write_text("{not json")
    assert not Job.is_xtalker_job(job.path)


def test_atomic_write_keeps_suffix_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "shard_0000.npy"
    write_atomic(target, lambda tmp: np.save(tmp, np.arange(4)))  # np.save would append .npy to a bare temp name
    assert np.array_equal(np.load(target), np.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_0000.npy"]

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, failing)
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "x.json", {"a": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_0000.npy"]  # old file intact, no temp left
    assert np.array_equal(np.load(target), np.arange(4))


def test_process_identity(tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    me = process_identity(os.getpid())
    assert me is not None and me.start_ticks > 0 and me.cmdline
    proc = start(processes)
    other = process_identity(proc.pid)
    assert other is not None and other.cmdline == SLEEPER
    proc.kill()
    proc.wait()
    assert process_identity(proc.pid) is None


def test_identity_survives_odd_command_names(tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    # the command name in /proc/PID/stat is the executable's name, which may hold spaces and ')'
    odd = tmp_path / "we ird) (x"
    odd.symlink_to(sys.executable)
    proc = subprocess.Popen([str(odd), "-c", "import time; time.sleep(60)"])
    processes.append(proc)
    identity = process_identity(proc.pid)
    reference = process_identity(os.getpid())
    assert identity is not None and reference is not None
    # both started after boot and the child after us: ticks read from the right field
    assert identity.start_ticks >= reference.start_ticks
    assert identity.cmdline[0] == str(odd)


def test_record_and_live_workers(tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    job = make_job(tmp_path, "job")
    record_worker(job, 0)
    worker = start(processes)
    record_worker(job, 1, pid=worker.pid)
    rec = read_json(job.worker_path(1))
    assert rec["pid"] == worker.pid and rec["shard"] == 1 and rec["cmdline"] == SLEEPER
    assert [r["shard"] for r in live_workers(job)] == [0, 1]
    worker.kill()
    worker.wait()
    assert [r["shard"] for r in live_workers(job)] == [0]
    with pytest.raises(ProcessLookupError):
        record_worker(job, 2, pid=worker.pid)


def test_gc_all_stops_only_recorded_workers(tmp_path: Path, processes: list[subprocess.Popen],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "jobs"
    job = make_job(root, "20260101-000000-aaaaaa")
    worker, unrelated = start(processes), start(processes)
    record_worker(job, 0, pid=worker.pid)
    (root / "not-a-job").mkdir()
    (root / "not-a-job" / "keep.txt").write_text("x")
    (root / "loose-file.json").write_text(json.dumps({"tool": "xtalker"}))

    code, out, _ = run_gc(root, "--all", "--dry-run", capsys=capsys)
    assert code == 0 and out == [f"would stop worker pid {worker.pid} (shard 0) of {job.path}", f"would remove {job.path}"]
    assert job.path.is_dir() and worker.poll() is None

    code, out, _ = run_gc(root, "--all", capsys=capsys)
    assert code == 0 and out == [f"stopped worker pid {worker.pid} (shard 0) of {job.path}", f"removed {job.path}"]
    assert worker.wait(timeout=5) == -signal.SIGTERM
    assert unrelated.poll() is None
    assert not job.path.exists()
    assert (root / "not-a-job" / "keep.txt").is_file() and (root / "loose-file.json").is_file()


def test_gc_never_kills_a_reused_pid(tmp_path: Path, processes: list[subprocess.Popen],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "jobs"
    job = make_job(root, "job")
    other = start(processes)
    record_worker(job, 0, pid=other.pid)
    rec = read_json(job.worker_path(0))
    write_json_atomic(job.worker_path(0), {**rec, "start_ticks": rec["start_ticks"] + 1})  # an earlier process
    assert live_workers(job) == []
    code, out, _ = run_gc(root, "--all", capsys=capsys)
    assert code == 0 and out == [f"removed {job.path}"]
    time.sleep(0.1)
    assert other.poll() is None


def test_gc_selects_by_age_and_done(tmp_path: Path, processes: list[subprocess.Popen],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "jobs"
    old = make_job(root, "old", age_h=30)
    young = make_job(root, "young", age_h=1)
    done = make_job(root, "done", age_h=0.1, done=True)
    busy = make_job(root, "busy", age_h=48)
    worker = start(processes)
    record_worker(busy, 0, pid=worker.pid)

    code, out, _ = run_gc(root, "--dry-run", capsys=capsys)
    assert code == 0 and out == [f"would remove {done.path}", f"would remove {old.path}"]
    code, out, _ = run_gc(root, "--older-than", "0.5", "--dry-run", capsys=capsys)
    assert out == [f"would remove {old.path}", f"would remove {young.path}"]  # by age only; busy is left alone
    code, out, _ = run_gc(root, capsys=capsys)
    assert out == [f"removed {done.path}", f"removed {old.path}"]
    assert young.path.is_dir() and busy.path.is_dir() and not old.path.exists() and not done.path.exists()
    assert worker.poll() is None


def test_gc_does_not_follow_links_out_of_the_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "jobs"
    root.mkdir()
    outside = make_job(tmp_path, "outside", age_h=100, done=True)
    (root / "link").symlink_to(outside.path, target_is_directory=True)
    code, out, _ = run_gc(root, "--all", capsys=capsys)
    assert code == 0 and out == []
    assert outside.meta.is_file() and (root / "link").is_symlink()


def test_gc_missing_root_and_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_gc(tmp_path / "none", capsys=capsys)[:2] == (0, [])
    for flags in (["--older-than", "abc"], ["--older-than", "-1"], ["--bogus"], ["--all", "--older-than", "2"]):
        code, out, err = run_gc(tmp_path, *flags, capsys=capsys)
        assert code == 2 and out == []
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_gc_sh_runs_from_any_directory(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    job = make_job(root, "finished", done=True)
    result = subprocess.run([str(REPO / "gc.sh"), "--dry-run", "--jobs-dir", str(root)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"would remove {job.path}"]
