"""The distributed run script: syntax, exact arguments of every stage, pinning, fail-fast, resume, and the
generator's command line. A fake python records what each stage was called with, so no model runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xtalker.parallel import available_cpus
from xtalker.parallel import script as distributed
from xtalker.parallel import slots as slots_module
from xtalker.parallel.jobs import process_identity
from xtalker.parallel.script import render_script, write_script
from xtalker.parallel.slots import CoreSlot, plan_slots

REPO = Path(__file__).resolve().parents[1]
USER_ARGS = ["--driven_audio", "my audio.wav", "--source_image", "face's pic $HOME `x`.png", "--input_yaw", "-10", "5",
             "--still", "--result_dir", "out dir"]

FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys, time
argv = sys.argv[1:]
entry = {{"argv": argv, "cpus": sorted(os.sched_getaffinity(0)), "cwd": os.getcwd(), "pid": os.getpid()}}
fd = os.open(os.environ["FAKE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.write(fd, (json.dumps(entry) + "\\n").encode())
os.close(fd)
if "render" in argv:
    shard = argv[argv.index("--shard") + 1]
    if shard == os.environ.get("FAKE_FAIL"):
        time.sleep(0.3)
        sys.exit(3)
    if shard == os.environ.get("FAKE_SLOW"):
        time.sleep(30)
"""


@pytest.fixture(autouse=True)
def taskset_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin with taskset whatever is installed, so that the script runs here and its text is predictable."""
    monkeypatch.setattr(slots_module.shutil, "which", lambda name: "/usr/bin/taskset" if name == "taskset" else None)


def real_slots(n: int) -> list[CoreSlot]:
    """`n` one-CPU slots on CPUs this process may use (shared round-robin when there are fewer)."""
    cpus = available_cpus()
    return [CoreSlot((cpus[i % len(cpus)],), 0) for i in range(n)]


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.python = tmp_path / "bin" / "fake-python"
        self.python.parent.mkdir()
        self.python.write_text(FAKE_PYTHON)
        self.python.chmod(0o755)
        self.infer = tmp_path / "xtalker checkout" / "inference.py"
        self.workdir = tmp_path / "work dir"
        self.workdir.mkdir()
        self.job = tmp_path / "jobs" / "my job"
        self.script = tmp_path / "scripts dir" / "run.sh"
        self.script.parent.mkdir()
        self.log = tmp_path / "calls.jsonl"

    def write(self, slots: list[CoreSlot], args: list[str] = USER_ARGS) -> Path:
        return write_script(slots, args, self.script, self.job, str(self.python), self.infer, self.workdir)

    def run(self, **env: str) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "FAKE_LOG": str(self.log), **env}
        # from an unrelated directory: the script must not depend on where it is started
        return subprocess.run(["bash", str(self.script)], cwd=self.root, env=full_env, capture_output=True,
                              text=True, timeout=60)

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stage_args(self, stage: str, *extra: str) -> list[str]:
        return [str(self.infer), *USER_ARGS, "--job", str(self.job), "--stage", stage, *extra]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_script_for_n_slots(tmp_path: Path, n: int) -> None:
    cpus = list(range(16))
    slots = plan_slots(n, cpus=cpus, sockets={c: c // 8 for c in cpus})
    assert [s.threads for s in slots] == {1: [8], 2: [8, 8], 4: [4, 4, 4, 4]}[n]  # one socket at most
    setup = Setup(tmp_path)
    path = setup.write(slots)
    assert path == setup.script
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -uo pipefail" in text
    for i, slot in enumerate(slots):
        assert (f'taskset -c {slot.cpu_list} "$PY" "$INFER" "${{ARGS[@]}}" --job "$JOB" --stage render '
                f'--shard {i} --shards {n} --threads {slot.threads} > "${{LOG_OF[{i}]}}" 2>&1 &') in text
    assert f"--shard {n} " not in text
    assert [p.name for p in setup.script.parent.iterdir()] == ["run.sh"]  # no temp left beside it


def test_numactl_pinning_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    text = render_script([CoreSlot((0, 1, 2, 3), 0), CoreSlot((8, 9), 1)], [], tmp_path, "/py", tmp_path / "i.py", tmp_path)
    assert 'numactl -C 0-3 "$PY"' in text and 'numactl -C 8-9 "$PY"' in text and "--threads 4" in text


def test_run_passes_arguments_verbatim_and_pins(tmp_path: Path) -> None:
    slots = real_slots(2)
    setup = Setup(tmp_path)
    setup.write(slots)
    result = setup.run()
    assert result.returncode == 0, result.stderr
    calls = setup.calls()
    assert [c["argv"] for c in calls[:1]] == [setup.stage_args("prepare")]
    assert calls[-1]["argv"] == setup.stage_args("merge", "--shards", "2")
    renders = sorted(calls[1:-1], key=lambda c: c["argv"])
    assert [c["argv"] for c in renders] == [
        setup.stage_args("render", "--shard", str(i), "--shards", "2", "--threads", "1") for i in range(2)]
    assert [c["cpus"] for c in renders] == [list(s.cpus) for s in slots]
    assert all(c["cwd"] == str(setup.workdir) for c in calls)
    assert (setup.job / "logs" / "shard_0001.log").is_file()


def test_failing_worker_stops_the_others_and_skips_merge(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.write(real_slots(3))
    began = time.monotonic()
    result = setup.run(FAKE_FAIL="1", FAKE_SLOW="0")
    assert time.monotonic() - began < 10  # did not wait for the 30 s worker
    assert result.returncode == 1
    log = setup.job / "logs" / "shard_0001.log"
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: shard 1 failed (exit 3); log: {log}; run this script again to resume")
    stages = [c["argv"][c["argv"].index("--stage") + 1] for c in setup.calls()]
    assert "merge" not in stages and stages.count("render") == 3
    slow = next(c for c in setup.calls() if c["argv"][-5:-4] == ["0"] and "render" in c["argv"])
    assert process_identity(slow["pid"]) is None


def test_polling_fallback_for_old_bash(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.write(real_slots(2))
    text = setup.script.read_text()
    assert "then HAVE_WAIT_P=1; fi" in text
    setup.script.write_text(text.replace("then HAVE_WAIT_P=1; fi", "then HAVE_WAIT_P=0; fi"))
    result = setup.run(FAKE_FAIL="1", FAKE_SLOW="0")
    assert result.returncode == 1 and "error: shard 1 failed (exit 3)" in result.stderr
    setup.log.unlink()
    result = setup.run()
    assert result.returncode == 0, result.stderr
    assert setup.calls()[-1]["argv"] == setup.stage_args("merge", "--shards", "2")


def test_rerun_skips_rendered_shards(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.write(real_slots(2))
    (setup.job / "shards").mkdir(parents=True)
    (setup.job / "shards" / "shard_0000.npy").write_bytes(b"")
    result = setup.run()
    assert result.returncode == 0, result.stderr
    renders = [c["argv"] for c in setup.calls() if "render" in c["argv"]]
    assert renders == [setup.stage_args("render", "--shard", "1", "--shards", "2", "--threads", "1")]
    assert "shard 0 already rendered" in result.stderr


def test_generator_writes_script_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XTALKER_JOBS_DIR", str(tmp_path / "jobs root"))
    assert distributed.main(REPO / "inference.py", ["--slot", "1", "--driven_audio", "a b.wav", "--still"]) == 0
    script = tmp_path / "run_distributed_infer_1.sh"
    assert capsys.readouterr().out == f"{script}\n"
    text = script.read_text()
    assert "ARGS=(--driven_audio 'a b.wav' --still)" in text
    assert f"JOB='{tmp_path / 'jobs root'}/" in text and f"INFER={REPO / 'inference.py'}" in text
    assert f"cd {tmp_path}" in text and f"PY={sys.executable}" in text
    assert not (tmp_path / "jobs root").exists()  # the job folder is made by the prepare stage

    job = tmp_path / "explicit job"
    assert distributed.main(REPO / "inference.py", ["--slot", "1", "--job", "explicit job", "--script", "x.sh"]) == 0
    assert f"JOB='{job}'" in (tmp_path / "x.sh").read_text()


def test_generator_refuses_too_many_slots(tmp_path: Path) -> None:
    n = len(available_cpus()) + 1
    result = subprocess.run([sys.executable, str(REPO / "generate_distributed_infer.py"), "--slot", str(n),
                             "--driven_audio", "a.wav"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: --slot {n}: this process may use only") and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    result = subprocess.run([sys.executable, str(REPO / "generate_distributed_infer.py"), "--driven_audio", "a.wav"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
