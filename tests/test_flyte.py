"""Flyte workflows (the `flyte` extra), offline: local execution against the CLI, cache keyed on content, a failing
shard, and what the serialized workflow carries to a cluster."""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_wav

from xtalker.media import iter_video_frames, load_audio

flytekit = pytest.importorskip("flytekit", reason="the flyte extra is not installed (pip install -e '.[flyte]')")
from flytekit.configuration import Image, ImageConfig, SerializationSettings  # noqa: E402
from flytekit.models.task import Resources as ResourceSpec  # noqa: E402
from flytekit.tools.translator import get_serializable  # noqa: E402

from xtalker.parallel import flyte  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"
FRAMES = 4
OPTIONS = {"seed": 5, "batch_size": 1, "threads": 1, "shards": 2, "precision": "bf16"}  # bf16: 3x faster here


def frames(path: Path) -> np.ndarray:
    return np.stack(list(iter_video_frames(path)[1]))


def cli_video(ckpt: Path, image: Path, audio: Path, out: Path, threads: int = 1) -> np.ndarray:
    subprocess.run([sys.executable, str(REPO / "inference.py"), "--source_image", str(image),
                    "--driven_audio", str(audio), "--checkpoint_dir", str(ckpt), "--seed", "5", "--batch_size", "1",
                    "--precision", "bf16", "--threads", str(threads), "--output", str(out)], check=True, capture_output=True)
    return frames(out)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("clips")
    speech = load_audio(SPEECH)
    return [write_wav(folder / f"clip{i}.wav", np.asarray(speech[i * 4000 : i * 4000 + FRAMES * 640 + 200], np.float32))
            for i in range(2)]


def made(tmp: Path, stage: str) -> int:
    """How many times a stage ran (each run makes its own work folder)."""
    return len(list(tmp.glob(f"xtalker-{stage}-*")))


def test_pyflyte_run_matches_the_cli_then_reuses_prepare(synthetic_checkpoints, clips, tmp_path):
    """The README's command, offline in a fresh HOME: equal frames to `inference.py --threads 1`; a rerun (here
    with fewer shards, which do not change the video) takes prepare from the cache."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    command = [str(Path(sys.executable).parent / "pyflyte"), "run", str(REPO / "src/xtalker/parallel/flyte.py"),
               "talking_head", "--source_image", str(PORTRAIT), "--driven_audio", str(clips[0]),
               "--checkpoint_dir", str(synthetic_checkpoints), "--seed", "5", "--batch_size", "1", "--threads", "1",
               "--precision", "bf16"]

    def run(shards: int) -> Path:
        result = subprocess.run([*command, "--shards", str(shards)], env=env, capture_output=True, text=True,
                                cwd=tmp_path, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return Path(result.stdout.strip().splitlines()[-1])

    expected = cli_video(synthetic_checkpoints, PORTRAIT, clips[0], tmp_path / "cli.mp4")
    assert np.array_equal(frames(run(2)), expected)
    assert made(tmp_path / "tmp", "prepare") == 1 and made(tmp_path / "tmp", "render-*") == 2
    assert np.array_equal(frames(run(1)), expected)
    assert made(tmp_path / "tmp", "prepare") == 1 and made(tmp_path / "tmp", "render-*") == 3  # prepare: cache hit


def test_fingerprint_follows_content_not_paths(clips, tmp_path, local_flyte):
    """prepare is cached on this key alone: a file rewritten at the same path is another key, a copy elsewhere
    the same one."""
    audio = tmp_path / "speech.wav"
    shutil.copy(clips[0], audio)

    def key(path: Path, settings: str = '{"seed": 1}') -> str:
        return flyte.fingerprint(source_image=str(PORTRAIT), driven_audio=str(path), settings=settings)

    first = key(audio)
    assert key(clips[0]) == first and key(audio, '{"seed": 2}') != first
    shutil.copy(clips[1], audio)
    assert key(audio) != first


@pytest.mark.slow  # the same tasks as the single-video workflow tested through pyflyte run, mapped
def test_batch_renders_every_pair_in_one_map(synthetic_checkpoints, clips, local_flyte, tmp_path):
    videos = flyte.talking_heads(source_images=[str(PORTRAIT)] * 2, driven_audios=[str(c) for c in clips],
                                 checkpoint_dir=str(synthetic_checkpoints), **{**OPTIONS, "threads": 2, "shards": 1})
    assert len(videos) == 2 and made(local_flyte, "render-*") == 2
    for i, (video, clip) in enumerate(zip(videos, clips)):
        expected = cli_video(synthetic_checkpoints, PORTRAIT, clip, tmp_path / f"cli{i}.mp4", threads=2)
        assert np.array_equal(frames(Path(video.path)), expected)


def test_a_failing_shard_fails_the_run_without_output(synthetic_checkpoints, clips, local_flyte, monkeypatch):
    def broken(config, job, shard, shards):
        raise RuntimeError(f"shard {shard} broke")

    monkeypatch.setattr(flyte, "stage_render", broken)
    with pytest.raises(Exception, match="shard 0 broke"):
        flyte.talking_head(source_image=str(PORTRAIT), driven_audio=str(clips[0]),
                           checkpoint_dir=str(synthetic_checkpoints), **OPTIONS)
    assert made(local_flyte, "merge") == 0


def test_bad_settings_fail_before_any_work(synthetic_checkpoints, clips, local_flyte):
    with pytest.raises(Exception, match="--pose_style must be in 0..45, got 99"):
        flyte.talking_head(source_image=str(PORTRAIT), driven_audio=str(clips[0]),
                           checkpoint_dir=str(synthetic_checkpoints), pose_style=99, **OPTIONS)
    with pytest.raises(Exception, match="SadTalker_V0.0.2_512.safetensors"):
        flyte.talking_head(source_image=str(PORTRAIT), driven_audio=str(clips[0]), checkpoint_dir=str(local_flyte),
                           size=512, **OPTIONS)
    with pytest.raises(Exception, match="epoch_00190_iteration_000400000_checkpoint.pt"):
        flyte.talking_head(source_image=str(PORTRAIT), driven_audio=str(clips[0]), checkpoint_dir=str(local_flyte),
                           facerender="pirender", **OPTIONS)
    assert made(local_flyte, "prepare") == 0


def task_name(entity: str) -> str:
    """`render` for xtalker.parallel.flyte.render and for its map, ...map_render_<hash>-arraynode."""
    return re.sub(r"^map_(.*)_[0-9a-f]+-arraynode$", r"\1", entity.split(".")[-1])


def test_serialized_workflows_carry_resources_cache_retries_and_maps():
    settings = SerializationSettings(image_config=ImageConfig(default_image=Image(name="default", fqn="xtalker",
                                                                                  tag="test")))
    entities = collections.OrderedDict()
    get_serializable(entities, settings, flyte.talking_heads)
    tasks = {task_name(e.template.id.name): e.template for e in entities.values() if hasattr(e, "template")
             and hasattr(e.template, "container")}

    render = tasks["render"]
    resources = render.container.resources
    assert {r.name: r.value for r in resources.requests} == {r.name: r.value for r in resources.limits}
    cpu, memory = ResourceSpec.ResourceName.CPU, ResourceSpec.ResourceName.MEMORY
    assert {(r.name, r.value) for r in resources.requests} == {(cpu, str(flyte.THREADS)), (memory, flyte.MEMORY)}
    assert render.metadata.retries.retries == flyte.RETRIES

    prepare = tasks["prepare"]
    assert prepare.metadata.discoverable and prepare.metadata.discovery_version == flyte.CACHE.get_version(None)
    assert set(prepare.metadata.cache_ignore_input_vars) == {"source_image", "driven_audio"}
    assert not tasks["fingerprint"].metadata.discoverable

    maps = [n.array_node.to_flyte_idl() for n in entities[flyte.talking_heads].template.nodes if n.array_node]
    mapped = {task_name(n.node.task_node.reference_id.name) for n in maps}
    assert mapped == {"fingerprint", "prepare", "render", "merge"}  # one map each, over every video's items
    assert all(n.min_success_ratio == 1.0 for n in maps)
