"""One run split over processes: prepare once, render contiguous frame shards in workers, merge into one video.

The stages communicate through a job folder (`xtalker.parallel.jobs`): `prepare` stores what every worker needs
(driving coefficients, the renderer's source work, the audio, the paste target) in `inputs.npz` and the run's
facts in `job.json`; each `render` worker writes its frames to `shards/shard_NNNN.npy` (atomically: a shard
file exists only when complete, so a rerun skips it); `merge` streams the shards in order through aspect
restore / paste-back into the one encode. `run_workers` (`inference.py --workers N`) does all three, the
workers pinned to disjoint core slots; `generate_distributed_infer.py` writes the same as a shell script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from xtalker.atomic import read_json, write_atomic, write_json_atomic
from xtalker.config import AUTO_BATCH, InferenceConfig
from xtalker.device import auto_batch_size, resolve_device
from xtalker.finish import PasteTarget
from xtalker.parallel.jobs import Job, job_header, jobs_root, new_job_id, record_worker
from xtalker.parallel.slots import pin_prefix, plan_slots
from xtalker.pipeline import (
    PreparedRun,
    RunResult,
    TalkingHead,
    finisher,
    load_head,
    load_speech,
    prepare_run,
    render_frames,
    run_seed,
    write_video,
)
from xtalker.profiling import Profiler
from xtalker.render import DrivingSequence

log = logging.getLogger(__name__)

STAGES = ("prepare", "render", "merge")
# Settings that do not change the video; anything else differing between stages means another run.
# (blend and enhancer shape what heavy enhancers leave in the shards, so they count.)
NOT_RENDERING = {"output", "result_dir", "report", "profile", "threads", "workers", "cache_dir", "seed", "overlap"}
# Input files count by content, not path: prepare reads them once, render and merge use what it stored (so they run
# where the files are not, e.g. on other machines), and a file rewritten at the same path makes another run.
INPUT_FILES = ("driven_audio", "source_image", "ref_eyeblink", "ref_pose")
ANGLES = ("yaw", "pitch", "roll")


class JobError(RuntimeError):
    """A job folder is missing, incomplete, or belongs to other settings; a worker failed."""


def shard_ranges(num_frames: int, shards: int, batch_size: int) -> list[tuple[int, int]]:
    """`shards` contiguous frame ranges covering the clip, each starting at a multiple of `batch_size` (so the
    frames share batches exactly as in one process), their batch counts differing by at most one."""
    batches = -(-num_frames // batch_size)
    bounds = [round(i * batches / shards) * batch_size for i in range(shards + 1)]
    return [(min(a, num_frames), min(b, num_frames)) for a, b in zip(bounds, bounds[1:])]


def settings_of(config: InferenceConfig) -> dict:
    """The settings that shape the video, JSON-ready (checked by every stage against the job's)."""
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in dataclasses.asdict(config).items()
        if k not in NOT_RENDERING and k not in INPUT_FILES
    }


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def input_digests(config: InferenceConfig) -> dict[str, str | None]:
    """SHA-256 of each input file of the run (None where the flag is not given)."""
    return {k: None if (p := getattr(config, k)) is None else file_digest(p) for k in INPUT_FILES}


def _inputs_path(job: Job) -> Path:
    return job.path / "inputs.npz"


def save_run(job: Job, run: PreparedRun, config: InferenceConfig, head: TalkingHead) -> None:
    """inputs.npz, then job.json marked prepared: a job.json without the mark means an unfinished prepare."""
    arrays = {"wav": run.wav, "coeffs": run.sequence.coeffs, **head.renderer.source_arrays(run.source)}
    arrays.update({name: a for name in ANGLES if (a := getattr(run.sequence, name)) is not None})
    if run.paste is not None:
        arrays["paste_background"] = run.paste.background
    arrays["face_points"] = run.face_points
    write_atomic(_inputs_path(job), lambda tmp: np.savez(tmp, **arrays))
    write_json_atomic(job.meta, {
        **job_header(),
        "prepared": True,
        "settings": settings_of(config),
        "inputs": input_digests(config),
        "num_frames": run.num_frames,
        "seed": run.seed,
        "landmarks": head.landmarks.name,
        "radius": run.sequence.radius,
        "image_size": run.image_size,
        "crop_size_wh": list(run.crop_size_wh),
        "paste_box": None if run.paste is None else list(run.paste.box),
    })


def load_run(job: Job, config: InferenceConfig, head: TalkingHead | None = None) -> tuple[PreparedRun, dict]:
    """The prepared run of `job`; its renderer source on `head` (None: no source, for a merge)."""
    meta = _prepared_meta(job, config)
    with np.load(_inputs_path(job)) as data:
        arrays = {k: data[k] for k in data.files}
    source = None if head is None else head.renderer.load_source(arrays)
    sequence = DrivingSequence(arrays["coeffs"], *(arrays.get(name) for name in ANGLES), radius=meta["radius"])
    paste = None
    if meta["paste_box"] is not None:
        paste = PasteTarget(arrays["paste_background"], tuple(meta["paste_box"]))
    run = PreparedRun(meta["num_frames"], meta["seed"], arrays["wav"], sequence, source, meta["image_size"],
                      tuple(meta["crop_size_wh"]), paste, arrays["face_points"])
    return run, meta


def _is_prepared(job: Job) -> bool:
    return job.meta.is_file() and bool(read_json(job.meta).get("prepared"))


def _prepared_meta(job: Job, config: InferenceConfig) -> dict:
    if not _is_prepared(job):
        raise JobError(f"job {job.path} is not prepared: run the prepare stage (or the whole script) first")
    meta, settings = read_json(job.meta), settings_of(config)
    if meta["settings"] != settings:
        changed = sorted(k for k in set(meta["settings"]) | set(settings) if meta["settings"].get(k) != settings.get(k))
        raise JobError(f"job {job.path} was prepared with other settings ({', '.join(changed)}); "
                       "use the same flags for every stage, or a new job folder")
    return meta


def on_cpu(config: InferenceConfig) -> InferenceConfig:
    """Jobs split a video over CPU cores: there `--device auto` means the CPU, and a GPU asked for is refused;
    `--batch_size auto` is the CPU's batch (the same in every stage, so the shards line up)."""
    if config.device != "auto" and resolve_device(config.device) != "cpu":
        raise JobError(f"--device {config.device}: parallel jobs (--workers, the slot script, Flyte) render on CPU "
                       "cores; a GPU renders a whole video in one process: leave out --workers")
    batch_size = config.batch_size
    if batch_size == AUTO_BATCH:
        batch_size = auto_batch_size("cpu", config.size, config.precision)
    if (config.device, config.batch_size) == ("cpu", batch_size):
        return config
    return dataclasses.replace(config, device="cpu", batch_size=batch_size)


def stage_prepare(config: InferenceConfig, job: Job) -> Path | None:
    """Compute the run's inputs once (skipped when the job is already prepared with these settings).

    For int8 this also builds the compiled graph into the cache, so that the workers only load it, and returns
    the graph's file (None otherwise, and when the job was already prepared).
    """
    config = on_cpu(config)
    Job.create(job.path)
    if _is_prepared(job):
        recorded, current = _prepared_meta(job, config).get("inputs") or {}, input_digests(config)
        if recorded != current:
            changed = [k for k in INPUT_FILES if recorded.get(k) != current[k]]
            raise JobError(f"job {job.path} was prepared from other input files ({', '.join(changed)}); "
                           "use a new job folder for new inputs")
        log.info("job %s: already prepared", job.path)
        return None
    prof = Profiler()
    wav = load_speech(config, prof)
    head = load_head(config, prof)
    save_run(job, prepare_run(config, head, wav, run_seed(config), prof), config, head)
    log.info("job %s: prepared (%s)", job.path, prof.as_dict()["stages_s"])
    return head.int8.path if head.int8 is not None else None


def stage_render(config: InferenceConfig, job: Job, shard: int, shards: int) -> None:
    """Render shard `shard` of `shards` into its .npy file (nothing to do when the file exists)."""
    config = on_cpu(config)
    if not 0 <= shard < shards:
        raise JobError(f"--shard must be in 0..{shards - 1}, got {shard}")
    path = job.shard_path(shard)
    if path.is_file():
        log.info("job %s: shard %d already rendered", job.path, shard)
        return
    _prepared_meta(job, config)  # a job prepared with other settings fails before any network is loaded
    record_worker(job, shard)
    prof = Profiler()
    head = load_head(config, prof)
    run, _ = load_run(job, config, head)
    start, stop = shard_ranges(run.num_frames, shards, config.batch_size)[shard]
    finish = finisher(run, config, "worker")

    def write(tmp: Path) -> None:
        frames = None  # the frame shape is known once the first batch has been through the workers' stages
        at = start
        for batch in render_frames(head, run, start, stop, config.batch_size, prof):
            batch = finish(batch, at, prof)
            if frames is None:
                frames = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(stop - start, *batch.shape[1:]))
            frames[at - start : at - start + len(batch)] = batch
            at += len(batch)
        if frames is None:  # more shards than batches: an empty shard
            np.save(tmp, np.empty((0, 0, 0, 3), np.uint8))
            return
        frames.flush()
        del frames

    write_atomic(path, write)
    log.info("job %s: shard %d (frames %d-%d) rendered: %s", job.path, shard, start, stop - 1, prof.as_dict()["stages_s"])


def _shard_batches(job: Job, shards: int, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(shards):
        frames = np.load(job.shard_path(i), mmap_mode="r")
        for at in range(0, len(frames), batch_size):
            yield np.array(frames[at : at + batch_size])


def stage_merge(config: InferenceConfig, job: Job, shards: int, output: Path, prof: Profiler | None = None) -> RunResult:
    """Stream every shard, in order, into the one video at `output`; marks the job done."""
    config = on_cpu(config)
    prof = prof or Profiler()
    run, meta = load_run(job, config)
    missing = [i for i in range(shards) if not job.shard_path(i).is_file()]
    if missing:
        raise JobError(f"job {job.path}: shard(s) {', '.join(map(str, missing))} of {shards} are not rendered; "
                       "run their workers (or the script) again: finished shards are kept")
    counts = [np.load(job.shard_path(i), mmap_mode="r").shape[0] for i in range(shards)]
    if sum(counts) != run.num_frames:
        raise JobError(f"job {job.path}: the shards hold {sum(counts)} frames, the run has {run.num_frames}; "
                       f"were they rendered with another --shards count than {shards}?")
    size_wh = write_video(run, _shard_batches(job, shards, config.batch_size), output, prof,
                          finisher(run, config, "merge"))
    prof.frames, prof.batch_size = run.num_frames, config.batch_size
    write_json_atomic(job.meta, {**meta, "done": True, "output": str(output)})
    return RunResult(output=output, frames=run.num_frames, size_wh=size_wh, seed=run.seed, landmarks=meta["landmarks"],
                     profile=prof, batch_size=config.batch_size)


def worker_argv(argv: Sequence[str], drop: Sequence[str] = ("--workers", "--threads", "--job", "--stage", "--shard", "--shards")) -> list[str]:
    """The user's flags without those the orchestration sets per process (both `--flag V` and `--flag=V`)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in drop:
            skip = "=" not in token
            continue
        out.append(token)
    return out


def run_workers(config: InferenceConfig, argv: Sequence[str], workers: int, job_dir: Path | None = None) -> RunResult:
    """`--workers N`: prepare here, N pinned worker processes, merge here. On success the job folder is removed;
    on failure it stays, and the same command with `--job DIR` resumes it."""
    config = on_cpu(config)
    slots = plan_slots(workers)
    job = Job.create(job_dir or jobs_root() / new_job_id())
    prof = Profiler()
    with prof.stage("prepare (job)"):
        stage_prepare(config, job)
    base = [sys.executable, "-m", "xtalker.cli", *worker_argv(argv), "--job", str(job.path), "--stage", "render",
            "--shards", str(workers)]
    with prof.stage("render (workers)"), contextlib.ExitStack() as logs:
        procs: dict[int, subprocess.Popen] = {}
        for i, slot in enumerate(slots):
            if job.shard_path(i).is_file():
                continue
            cmd = [*pin_prefix(slot), *base, "--shard", str(i), "--threads", str(slot.threads)]
            out = logs.enter_context(open(job.log_path(i), "w"))
            procs[i] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            log.info("worker %d on cpus %s: pid %d", i, slot.cpu_list, procs[i].pid)
        _wait_all(procs, job)
    result = stage_merge(config, job, workers, config.output, prof)
    shutil.rmtree(job.path)
    return result


def _stop(procs: Iterable[subprocess.Popen]) -> None:
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait()


def _wait_all(procs: dict[int, subprocess.Popen], job: Job) -> None:
    """Wait for every worker; on the first failure stop the others (ours only) and say which shard failed. Stopped
    itself (Ctrl-C, SIGTERM), it stops its workers too: each removes its unfinished shard, finished ones stay."""
    pending = dict(procs)
    try:
        while pending:
            for i, proc in list(pending.items()):
                code = proc.poll()
                if code is None:
                    continue
                del pending[i]
                if code != 0:
                    _stop(pending.values())
                    pending.clear()
                    raise JobError(f"worker for shard {i} failed (exit {code}); log: {job.log_path(i)}; finished "
                                   f"shards are kept in {job.path}: add --job {job.path} to the same command to resume")
            time.sleep(0.2)
    except BaseException:
        _stop(pending.values())
        raise
