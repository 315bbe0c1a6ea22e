"""Write a bash script that renders one video with N workers, each pinned to its own core slot.

`python generate_distributed_infer.py --slot N [--script PATH] [--job DIR] <inference.py flags>` writes
run_distributed_infer_N.sh. The script runs the prepare stage once, N render workers in parallel (one frame
range each), then the merge stage. Running it again resumes: the stages skip work already done and
workers whose shard exists are not started.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from xtalker.atomic import write_atomic
from xtalker.parallel.jobs import jobs_root, new_job_id
from xtalker.parallel.slots import CoreSlot, SlotError, pin_prefix, plan_slots


class UsageError(Exception):
    """A bad command line; reported as one `error:` line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _q(value: str | Path) -> str:
    return shlex.quote(str(value))


def _stage(stage: str, extra: str = "") -> str:
    return f'"$PY" "$INFER" "${{ARGS[@]}}" --job "$JOB" --stage {stage}{extra}'


# Before any worker starts: a signal or the first failure stops this script's own workers (by PID; TERM,
# then KILL after 5 s), so that a rerun never races a leftover worker over the same shard.
_HELPERS = r"""
declare -A SHARD_OF=()  # worker pid -> shard
declare -A LOG_OF=()  # shard -> log file

stop_workers() {
  local pid alive tries
  for pid in "${!SHARD_OF[@]}"; do kill "$pid" 2>/dev/null; done
  for (( tries = 0; tries < 50; tries++ )); do
    alive=0
    for pid in "${!SHARD_OF[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.1
  done
  for pid in "${!SHARD_OF[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  wait 2>/dev/null
}
trap 'stop_workers; exit 130' INT
trap 'stop_workers; exit 143' TERM HUP

finished() {  # pid status
  local shard=${SHARD_OF[$1]}
  unset "SHARD_OF[$1]"
  if (( $2 != 0 )); then
    stop_workers
    echo "error: shard $shard failed (exit $2); log: ${LOG_OF[$shard]}; run this script again to resume" >&2
    exit 1
  fi
}
"""

# `wait -n -p` (bash >= 5.1) wakes up at the first exit; older bash polls every second instead.
_WAIT = r"""
HAVE_WAIT_P=0
if (( BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1) )); then HAVE_WAIT_P=1; fi
while (( ${#SHARD_OF[@]} > 0 )); do
  done_pid=
  status=0
  if (( HAVE_WAIT_P )); then
    wait -n -p done_pid "${!SHARD_OF[@]}"
    status=$?
  fi
  if [[ -n ${done_pid-} ]]; then
    finished "$done_pid" "$status"
    continue
  fi
  for pid in "${!SHARD_OF[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"
      finished "$pid" "$?"
    fi
  done
  if (( ${#SHARD_OF[@]} > 0 )); then sleep 1; fi
done
trap - INT TERM HUP
"""


def render_script(slots: list[CoreSlot], inference_args: list[str], job_dir: Path, python: str,
                  inference_py: Path, workdir: Path) -> str:
    """The text of the script (see `write_script`)."""
    n = len(slots)
    args = " ".join(_q(a) for a in inference_args)
    lines = [
        "#!/usr/bin/env bash",
        f"# XTalker: one video rendered by {n} worker(s) on disjoint CPU slots; written by generate_distributed_infer.py.",
        "# Run it again after a failure or an interruption to resume: finished shards are kept.",
        "set -uo pipefail",
        "",
        f"PY={_q(python)}",
        f"INFER={_q(inference_py)}",
        f"JOB={_q(job_dir)}",
        f"ARGS=({args})",
        "# relative paths in ARGS mean what they meant where the script was generated",
        f"cd {_q(workdir)} || exit 1",
        "",
        f"{_stage('prepare')} || exit $?",
        'mkdir -p -- "$JOB/logs" "$JOB/shards" || exit 1',
        "",
        _HELPERS.strip("\n"),
        "",
    ]
    for i, slot in enumerate(slots):
        name = f"shard_{i:04d}"
        pin = " ".join(_q(p) for p in pin_prefix(slot))
        lines += [
            f'LOG_OF[{i}]="$JOB/logs/{name}.log"',
            f'if [[ -e "$JOB/shards/{name}.npy" ]]; then',
            f'  echo "shard {i} already rendered; skipping" >&2',
            "else",
            f"  {pin} {_stage('render', f' --shard {i} --shards {n} --threads {slot.threads}')} "
            f'> "${{LOG_OF[{i}]}}" 2>&1 &',
            f"  SHARD_OF[$!]={i}",
            "fi",
        ]
    lines += [_WAIT.rstrip("\n"), "", _stage("merge", f" --shards {n}"), "exit $?", ""]
    return "\n".join(lines)


def write_script(slots: list[CoreSlot], inference_args: list[str], script: Path, job_dir: Path, python: str,
                 inference_py: Path, workdir: Path) -> Path:
    """Write the distributed run script to `script` (executable); returns its path.

    `python`, `inference_py`, `job_dir` and `workdir` should be absolute: the script may run from anywhere.
    """
    text = render_script(slots, inference_args, job_dir, python, inference_py, workdir)

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o755)

    write_atomic(script, write)
    return script


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="generate_distributed_infer.py", allow_abbrev=False,
                description="Write run_distributed_infer_N.sh: one video rendered by N workers pinned to disjoint "
                            "CPU cores. Every other flag is passed to inference.py unchanged.")
    p.add_argument("--slot", type=int, required=True, metavar="N", help="number of workers (core slots)")
    p.add_argument("--script", type=Path, default=None,
                   help="where to write the script (default: ./run_distributed_infer_N.sh)")
    p.add_argument("--job", type=Path, default=None,
                   help="job folder for the intermediate files (default: a new folder under the jobs root)")
    return p


def main(inference_py: Path, argv: list[str] | None = None) -> int:
    """Command line of generate_distributed_infer.py; `inference_py` is the script the workers run."""
    try:
        args, inference_args = build_parser().parse_known_args(argv)
        slots = plan_slots(args.slot)
        for slot in slots:
            pin_prefix(slot)
    except (UsageError, SlotError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    workdir = Path.cwd()
    script = (args.script or Path(f"run_distributed_infer_{args.slot}.sh")).absolute()
    job_dir = (args.job or jobs_root() / new_job_id()).absolute()
    try:
        write_script(slots, inference_args, script, job_dir, os.path.abspath(sys.executable),
                     inference_py.resolve(), workdir)
    except OSError as e:
        sys.stderr.write(f"error: cannot write {script}: {e.strerror or e}\n")
        return 1
    sys.stdout.write(f"{script}\n")
    return 0
