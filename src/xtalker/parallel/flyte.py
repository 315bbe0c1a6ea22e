"""Flyte workflows over the parallel stages: one video, or a batch of many, spread over pods.

    pyflyte run src/xtalker/parallel/flyte.py talking_head --source_image face.png --driven_audio speech.wav \\
        --checkpoint_dir /checkpoints --shards 4 --threads 4

Graph: `settings` (the flags, checked once) -> `fingerprint` (content digests of the inputs + settings + XTalker
version; never cached) -> `prepare` (cached on the fingerprint alone, not on file paths) -> `render` mapped over
every shard (retried, pinned resources) -> `merge` (one mp4 per video). `talking_heads` runs many pairs in one flat
graph: the shards of all videos are one map, so a cluster renders them all at once.

The tasks call the same stage functions as `--workers` and the slot script (`xtalker.parallel.stages`). Each task
works in a folder of its own and never writes into an input folder: locally, Flyte hands tasks the producer's
folder itself, and a cached output changed in place would poison later runs. The int8 graph is compiled once, in
prepare, into the pod's compiled cache (`$XTALKER_CACHE_DIR`: a shared volume or the image lets later videos load
it), and copied into the job folder that every render task receives. Checkpoints are read from `checkpoint_dir`, a path
every pod can read (baked into the image or mounted), never uploaded.

Pod size is fixed when the workflow is registered (Flyte resources are static): `XTALKER_FLYTE_THREADS` CPUs
(requests = limits) and `XTALKER_FLYTE_MEMORY` per render task; the `threads` input sets torch's thread count in
every task (prepare included, so the video equals `inference.py --threads N`).

Needs the `flyte` extra (`pip install -e ".[flyte]"`); nothing else in XTalker imports flytekit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from flytekit import Cache, Resources, map_task, task, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from xtalker import __version__
from xtalker.checkpoints import find_checkpoints
from xtalker.config import InferenceConfig
from xtalker.finish import check_weights
from xtalker.interrupt import sigterm_as_interrupt
from xtalker.parallel.jobs import Job
from xtalker.parallel.stages import file_digest, settings_of, stage_merge, stage_prepare, stage_render
from xtalker.render.quantize import default_cache_dir

log = logging.getLogger(__name__)

THREADS = int(os.environ.get("XTALKER_FLYTE_THREADS", "4"))
MEMORY = os.environ.get("XTALKER_FLYTE_MEMORY", "6Gi")  # 512 renders peak at 4.5 GB (README)
RETRIES = 2
# Cached prepare outputs are valid for one XTalker version; the version is part of the fingerprint too.
CACHE = Cache(version=f"xtalker-{__version__}-1", ignored_inputs=("source_image", "driven_audio"))
RENDER_RESOURCES = Resources(cpu=str(THREADS), mem=MEMORY)


def _config(settings: str, **paths: Path) -> InferenceConfig:
    """The run's config from `settings` JSON. Input files a task does not read get a placeholder: render and merge
    use what prepare stored, wherever the files are."""
    values = json.loads(settings)
    values["checkpoint_dir"] = Path(values["checkpoint_dir"])
    return dataclasses.replace(InferenceConfig(driven_audio=Path("-"), source_image=Path("-"), **values), **paths)


@contextmanager
def _task_run(config: InferenceConfig) -> Iterator[None]:
    # Set explicitly: a pod's CPU affinity can show every core of the node.
    torch.set_num_threads(config.threads)
    with sigterm_as_interrupt():
        yield


def _workdir(prefix: str) -> Path:
    # Local map items share one working folder: every task makes a uniquely named one.
    return Path(tempfile.mkdtemp(prefix=f"xtalker-{prefix}-"))


def _job_copy(job: FlyteDirectory, prefix: str) -> tuple[Job, Path]:
    """A job folder of this task's own that reads the prepared inputs of `job` (linked, never written); with the
    folder it works in."""
    source = Path(job.download())
    work = _workdir(prefix)
    local = Job.create(work / source.name)
    shutil.copy2(source / "job.json", local.meta)
    (local.path / "inputs.npz").symlink_to(source / "inputs.npz")
    if (source / "compiled").is_dir():
        # Linked file by file: a rebuild (another CPU) writes a new file here, never into the input folder.
        (local.path / "compiled").mkdir()
        for graph in (source / "compiled").iterdir():
            (local.path / "compiled" / graph.name).symlink_to(graph)
    return local, work


@task
def settings(
    checkpoint_dir: str,
    size: int,
    preprocess: str,
    still: bool,
    pose_style: int,
    expression_scale: float,
    precision: str,
    batch_size: int,
    enhancer: Optional[str],
    enhance_align: str,
    blend: str,
    landmarks: str,
    seed: Optional[int],
    threads: int,
    old_version: bool,
    facerender: str,
    enhance_scale: int = 2,
    background_enhancer: Optional[str] = None,
) -> str:
    """The run's settings as JSON, checked as the CLI checks them; a missing seed becomes a fresh one (reported)."""
    config = InferenceConfig(
        driven_audio=Path("-"), source_image=Path("-"), checkpoint_dir=Path(checkpoint_dir), size=size,
        preprocess=preprocess, still=still, pose_style=pose_style, expression_scale=expression_scale,
        precision=precision, batch_size=batch_size, enhancer=enhancer, enhance_align=enhance_align, blend=blend,
        landmarks=landmarks, threads=threads, old_version=old_version, facerender=facerender,
        enhance_scale=enhance_scale, background_enhancer=background_enhancer,
        seed=seed if seed is not None else random.SystemRandom().randrange(2**31),
    )
    config.validate()
    find_checkpoints(config.checkpoint_dir, config.size, config.preprocess, config.old_version, config.facerender)
    check_weights(config.enhancer, config.enhance_align, config.checkpoint_dir, config.background_enhancer)
    values = {**settings_of(config), "seed": config.seed, "threads": threads}
    log.info("settings: %s", values)
    return json.dumps(values, sort_keys=True)


@task
def fingerprint(source_image: FlyteFile, driven_audio: FlyteFile, settings: str) -> str:
    """What makes a video: the inputs' contents, the settings (seed included) and XTalker's version."""
    parts = {
        "source_image": file_digest(Path(source_image.download())),
        "driven_audio": file_digest(Path(driven_audio.download())),
        "settings": settings,
        "xtalker": __version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@task(cache=CACHE)
def prepare(key: str, settings: str, source_image: FlyteFile, driven_audio: FlyteFile) -> FlyteDirectory:
    """Crop, 3DMM coefficients, driving coefficients, the renderer's source work: once per key. int8: the graph is
    loaded from (or built once into) the pod's compiled cache, and a copy goes into the job folder."""
    work = _workdir("prepare")
    job = Job(work / f"job-{key[:16]}")
    config = _config(settings, source_image=Path(source_image.download()), driven_audio=Path(driven_audio.download()),
                     cache_dir=default_cache_dir())
    with _task_run(config):
        graph = stage_prepare(config, job)
    if graph is not None:  # only this graph travels to the render tasks, not the whole cache
        (job.path / "compiled").mkdir()
        for path in (graph, graph.with_suffix(".json")):
            shutil.copy2(path, job.path / "compiled" / path.name)
    return FlyteDirectory(str(job.path))


class Shards(NamedTuple):
    job: list[FlyteDirectory]
    shard: list[int]
    shards: list[int]
    settings: list[str]


@task
def plan(jobs: list[FlyteDirectory], shards: int, settings: str) -> Shards:
    """Every shard of every video, one map item each."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    items = [(job, i) for job in jobs for i in range(shards)]
    return Shards([j for j, _ in items], [i for _, i in items], [shards] * len(items), [settings] * len(items))


@task(retries=RETRIES, requests=RENDER_RESOURCES, limits=RENDER_RESOURCES)
def render(job: FlyteDirectory, shard: int, shards: int, settings: str) -> FlyteFile:
    """One shard's frames (through the workers' share of the finish chain) as a .npy file."""
    local, _ = _job_copy(job, f"render-{shard}")
    config = _config(settings, cache_dir=local.path / "compiled")
    with _task_run(config):
        stage_render(config, local, shard, shards)
    return FlyteFile(str(local.shard_path(shard)))


@task
def group(rendered: list[FlyteFile], shards: int) -> list[list[FlyteFile]]:
    """The flat map's outputs back into one list of shards per video."""
    return [rendered[i : i + shards] for i in range(0, len(rendered), shards)]


@task
def merge(job: FlyteDirectory, shards: list[FlyteFile], settings: str) -> FlyteFile:
    """The shards, in order, through the rest of the finish chain into one H.264 + AAC mp4."""
    local, work = _job_copy(job, "merge")
    for i, shard in enumerate(shards):
        local.shard_path(i).parent.mkdir(parents=True, exist_ok=True)
        local.shard_path(i).symlink_to(Path(shard.download()))
    output = work / f"talking_head-{local.path.name.removeprefix('job-')}.mp4"
    config = _config(settings, output=output)
    with _task_run(config):
        stage_merge(config, local, len(shards), output)
    return FlyteFile(str(output))


class Pairs(NamedTuple):
    source_image: list[FlyteFile]
    driven_audio: list[FlyteFile]
    settings: list[str]


@task
def pair(source_images: list[FlyteFile], driven_audios: list[FlyteFile], settings: str) -> Pairs:
    """The batch's pairs, checked: as many pictures as clips."""
    if len(source_images) != len(driven_audios) or not source_images:
        raise ValueError(f"talking_heads needs as many source_images as driven_audios (at least one), got "
                         f"{len(source_images)} and {len(driven_audios)}")
    return Pairs(source_images, driven_audios, [settings] * len(source_images))


render_all = map_task(render, min_success_ratio=1.0)


@workflow
def talking_head(
    source_image: FlyteFile,
    driven_audio: FlyteFile,
    checkpoint_dir: str = "checkpoints",
    size: int = 256,
    preprocess: str = "crop",
    still: bool = False,
    pose_style: int = 0,
    expression_scale: float = 1.0,
    precision: str = "fp32",
    batch_size: int = 2,
    enhancer: Optional[str] = None,
    enhance_align: str = "source",
    blend: str = "seamless",
    landmarks: str = "auto",
    seed: Optional[int] = None,
    shards: int = 2,
    threads: int = THREADS,
    old_version: bool = False,
    facerender: str = "facevid2vid",
    enhance_scale: int = 2,
    background_enhancer: Optional[str] = None,
) -> FlyteFile:
    """One portrait + one speech clip -> one talking-head mp4, rendered in `shards` parallel tasks."""
    s = settings(checkpoint_dir=checkpoint_dir, size=size, preprocess=preprocess, still=still, pose_style=pose_style,
                 expression_scale=expression_scale, precision=precision, batch_size=batch_size, enhancer=enhancer,
                 enhance_align=enhance_align, blend=blend, landmarks=landmarks, seed=seed, threads=threads,
                 old_version=old_version, facerender=facerender, enhance_scale=enhance_scale,
                 background_enhancer=background_enhancer)
    key = fingerprint(source_image=source_image, driven_audio=driven_audio, settings=s)
    job = prepare(key=key, settings=s, source_image=source_image, driven_audio=driven_audio)
    p = plan(jobs=[job], shards=shards, settings=s)
    rendered = render_all(job=p.job, shard=p.shard, shards=p.shards, settings=p.settings)
    return merge(job=job, shards=rendered, settings=s)


@workflow
def talking_heads(
    source_images: list[FlyteFile],
    driven_audios: list[FlyteFile],
    checkpoint_dir: str = "checkpoints",
    size: int = 256,
    preprocess: str = "crop",
    still: bool = False,
    pose_style: int = 0,
    expression_scale: float = 1.0,
    precision: str = "fp32",
    batch_size: int = 2,
    enhancer: Optional[str] = None,
    enhance_align: str = "source",
    blend: str = "seamless",
    landmarks: str = "auto",
    seed: Optional[int] = None,
    shards: int = 2,
    threads: int = THREADS,
    old_version: bool = False,
    facerender: str = "facevid2vid",
    enhance_scale: int = 2,
    background_enhancer: Optional[str] = None,
) -> list[FlyteFile]:
    """Pairs (source_images[i], driven_audios[i]) -> one mp4 each; all shards of all videos in one map."""
    s = settings(checkpoint_dir=checkpoint_dir, size=size, preprocess=preprocess, still=still, pose_style=pose_style,
                 expression_scale=expression_scale, precision=precision, batch_size=batch_size, enhancer=enhancer,
                 enhance_align=enhance_align, blend=blend, landmarks=landmarks, seed=seed, threads=threads,
                 old_version=old_version, facerender=facerender, enhance_scale=enhance_scale,
                 background_enhancer=background_enhancer)
    pairs = pair(source_images=source_images, driven_audios=driven_audios, settings=s)
    keys = map_task(fingerprint)(source_image=pairs.source_image, driven_audio=pairs.driven_audio,
                                 settings=pairs.settings)
    jobs = map_task(prepare)(key=keys, settings=pairs.settings, source_image=pairs.source_image,
                             driven_audio=pairs.driven_audio)
    p = plan(jobs=jobs, shards=shards, settings=s)
    rendered = render_all(job=p.job, shard=p.shard, shards=p.shards, settings=p.settings)
    return map_task(merge)(job=jobs, shards=group(rendered=rendered, shards=shards), settings=pairs.settings)


