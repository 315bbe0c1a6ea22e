"""Parallel rendering: shard ranges, job stages, --workers and the generated script against one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_wav

from xtalker import cli
from xtalker.atomic import read_json
from xtalker.media import iter_video_frames, load_audio, probe
from xtalker.parallel import Job
from xtalker.parallel.jobs import jobs_root
from xtalker.parallel.stages import shard_ranges, worker_argv

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"
FRAMES = 4


@pytest.mark.parametrize("frames, shards, batch", [(10, 2, 2), (11, 3, 2), (3, 4, 1), (51, 2, 4), (1, 2, 2)])
def test_shards_cover_the_clip_on_batch_boundaries(frames, shards, batch):
    ranges = shard_ranges(frames, shards, batch)
    assert len(ranges) == shards and ranges[0][0] == 0 and ranges[-1][1] == frames
    assert all(a == b_prev for (a, _), (_, b_prev) in zip(ranges[1:], ranges))
    assert all(a % batch == 0 or a == frames for a, _ in ranges)
    sizes = [-(-(b - a) // batch) for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_worker_argv_drops_what_each_worker_gets_its_own():
    argv = ["--driven_audio", "a b.wav", "--workers", "2", "--threads=4", "--size", "256", "--job", "J", "--still"]
    assert worker_argv(argv) == ["--driven_audio", "a b.wav", "--size", "256", "--still"]


def write_clip(folder: Path, frames: int) -> Path:
    samples = load_audio(SPEECH)[4000 : 4000 + frames * 640 + 200]
    return write_wav(folder / f"speech of {frames} frames.wav", samples)  # spaces: paths are quoted everywhere


@pytest.fixture(scope="module")
def speech_clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("audio"), FRAMES)


def flags(ckpt: Path, audio: Path, out: Path) -> list[str]:
    return ["--driven_audio", str(audio), "--source_image", str(PORTRAIT), "--checkpoint_dir", str(ckpt),
            "--output", str(out), "--seed", "7", "--batch_size", "1"]


@pytest.fixture(scope="module")
def single(synthetic_checkpoints, speech_clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "one.mp4"
    assert cli.main(flags(synthetic_checkpoints, speech_clip, out)) == 0
    return out


def frames_of(path: Path) -> np.ndarray:
    return np.stack(list(iter_video_frames(path)[1]))


def same_video(a: Path, b: Path) -> None:
    """Equal frame count and near-equal pictures: workers run 1 thread each, and oneDNN's sums over threads
    reorder (1 level on <0.01% of rendered values, measured); H.264 then decides some blocks differently."""
    fa, fb = frames_of(a).astype(np.float64), frames_of(b).astype(np.float64)
    assert fa.shape == fb.shape and fa.shape[0] == FRAMES
    mse = np.mean((fa - fb) ** 2)
    assert mse == 0 or 10 * np.log10(255**2 / mse) > 40


def render_job(args: list[str], job: Path, shards: int, threads: int, prepared: Path | None = None) -> np.ndarray:
    """Prepare (or copy the `prepared` job folder: the same inputs) and render every shard as the workers do, in
    separate processes."""
    base = [sys.executable, "-m", "xtalker.cli", *args, "--job", str(job)]
    if prepared is not None:
        shutil.copytree(prepared, job, ignore=shutil.ignore_patterns("shard_*"))
    stages = [] if prepared is not None else [["--stage", "prepare"]]
    stages += [["--stage", "render", "--shard", str(i), "--shards", str(shards), "--threads", str(threads)]
               for i in range(shards)]
    for extra in stages:
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    return np.concatenate([np.load(Job(job).shard_path(i)) for i in range(shards)])


# Shards equal to one process: test_workers_give_the_single_process_video and the GFPGAN workers test show it end to end.
@pytest.mark.slow
def test_shards_render_exactly_what_one_process_renders(synthetic_checkpoints, tmp_path):
    args = flags(synthetic_checkpoints, write_clip(tmp_path, 2), tmp_path / "unused.mp4")
    whole = render_job(args, tmp_path / "one", 1, threads=1)
    split = render_job(args, tmp_path / "two", 2, threads=1, prepared=tmp_path / "one")
    assert whole.shape == (2, 256, 256, 3) and np.array_equal(whole, split)
    two_threads = render_job(args, tmp_path / "threads", 1, threads=2, prepared=tmp_path / "one")
    diff = np.abs(two_threads.astype(int) - whole)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_workers_give_the_single_process_video(single, synthetic_checkpoints, speech_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("XTALKER_JOBS_DIR", str(tmp_path / "jobs"))
    out = tmp_path / "two.mp4"
    assert cli.main([*flags(synthetic_checkpoints, speech_clip, out), "--workers", "2"]) == 0
    same_video(out, single)
    assert not any((tmp_path / "jobs").iterdir())  # the job folder is gone after a successful run


def test_generated_script_gives_the_single_process_video(single, synthetic_checkpoints, speech_clip, tmp_path):
    out, job = tmp_path / "script.mp4", tmp_path / "job dir"
    gen = subprocess.run(
        [sys.executable, str(REPO / "generate_distributed_infer.py"), "--slot", "2", "--job", str(job),
         *flags(synthetic_checkpoints, speech_clip, out)],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )
    assert gen.returncode == 0, gen.stderr
    script = tmp_path / "run_distributed_infer_2.sh"
    run = subprocess.run(["bash", str(script)], cwd="/", capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    same_video(out, single)
    assert read_json(Job(job).meta)["done"] is True
    written = out.read_bytes()
    again = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert again.returncode == 0 and out.read_bytes() == written


def test_killed_worker_fails_the_job_then_a_rerun_resumes_and_gc_cleans(
    single, synthetic_checkpoints, speech_clip, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("XTALKER_JOBS_DIR", str(tmp_path / "jobs"))
    job, out = tmp_path / "jobs" / "killed", tmp_path / "resumed.mp4"
    argv = [*flags(synthetic_checkpoints, speech_clip, out), "--workers", "2", "--job", str(job)]

    def kill_shard_1() -> None:
        record = Job(job).worker_path(1)
        deadline = time.monotonic() + 120
        while not record.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_shard_1)
    killer.start()
    code = cli.main(argv)
    killer.join()
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert err.startswith("error: worker for shard 1 failed") and str(Job(job).log_path(1)) in err
    assert not Job(job).shard_path(1).exists() and Job(job).meta.is_file()

    assert cli.main(argv) == 0  # resumes: prepare and finished shards are not redone
    same_video(out, single)

    leftover = Job.create(tmp_path / "jobs" / "stale")
    (leftover.path / "job.json").write_text(json.dumps({"tool": "xtalker", "created": 0, "done": True}))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gc = subprocess.run([str(REPO / "gc.sh"), "--all", "--jobs-dir", str(jobs_root())], capture_output=True,
                            text=True, check=False)
        assert gc.returncode == 0, gc.stderr
        assert not leftover.path.exists() and sleeper.poll() is None
    finally:
        sleeper.kill()


def test_stages_refuse_a_job_of_other_settings(single, synthetic_checkpoints, speech_clip, tmp_path, capsys):
    job = tmp_path / "job"
    base = flags(synthetic_checkpoints, speech_clip, tmp_path / "x.mp4")
    assert cli.main([*base, "--job", str(job), "--stage", "prepare"]) == 0
    code = cli.main([*base, "--still", "--job", str(job), "--stage", "render", "--shard", "0", "--shards", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "prepared with other settings (still)" in err
    code = cli.main([*base, "--job", str(job), "--stage", "merge", "--shards", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "shard(s) 0 of 1 are not rendered" in err and not (tmp_path / "x.mp4").exists()


def test_input_files_count_by_content_not_path(synthetic_checkpoints, speech_clip, tmp_path, capsys):
    """Render accepts the inputs at other paths (as on other machines); prepare refuses a rewritten input."""
    audio = tmp_path / "speech.wav"
    shutil.copy(speech_clip, audio)
    job = tmp_path / "job"
    base = flags(synthetic_checkpoints, audio, tmp_path / "x.mp4")
    assert cli.main([*base, "--job", str(job), "--stage", "prepare"]) == 0
    elsewhere = [tmp_path / "moved.wav" if a == str(audio) else a for a in base]
    shutil.move(audio, elsewhere[1])
    assert cli.main([*map(str, elsewhere), "--job", str(job), "--stage", "render", "--shard", "0", "--shards", "1"]) == 0
    write_wav(audio, np.zeros(16000, np.float32))  # another clip at the original path
    assert cli.main([*base, "--job", str(job), "--stage", "prepare"]) == 1
    assert "prepared from other input files (driven_audio)" in capsys.readouterr().err


def test_gfpgan_runs_in_the_workers_and_the_merge_pastes(enhancer_checkpoints, tmp_path):
    out = tmp_path / "enhanced.mp4"
    args = [*flags(enhancer_checkpoints, write_clip(tmp_path, 2), out), "--enhancer", "gfpgan", "--precision", "bf16"]
    whole = render_job(args, tmp_path / "one", 1, threads=1)
    split = render_job(args, tmp_path / "two", 2, threads=1)
    # the shards hold the enhanced crops (twice the aspect-restored render); noise is seeded per frame
    assert whole.shape[0] == 2 and whole.shape[2:] == (512, 3) and np.array_equal(whole, split)
    merge = [*args, "--job", str(tmp_path / "two"), "--stage", "merge", "--shards", "2"]
    assert cli.main(merge) == 0
    info = probe(out)
    assert (info.width, info.frame_count) == (512, 2)


def test_restoreformer_and_background_run_in_the_workers(enhancer_checkpoints, pirender_checkpoint, tmp_path):
    """Full mode: the workers restore the faces on RealESRGAN's face-box canvas; the merge pastes them into the
    picture, which it upscales once with RealESRGAN (the renderer is PIRender: the cheapest)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for path in {p.name: p for p in (*enhancer_checkpoints.iterdir(), pirender_checkpoint)}.values():
        (ckpt / path.name).symlink_to(path.resolve())
    out = tmp_path / "restored.mp4"
    args = [*flags(ckpt, write_clip(tmp_path, 2), out), "--facerender", "pirender", "--no-compile", "--precision",
            "bf16", "--preprocess", "full", "--still", "--blend", "feather", "--enhancer", "RestoreFormer",
            "--background_enhancer", "realesrgan"]
    # (shards equal to one process are shown with GFPGAN above; this checks the restorers' split and merge)
    split = render_job(args, tmp_path / "two", 2, threads=1)
    assert split.shape[0] == 2 and split.shape[2] > 256  # the workers stored restored crops at twice their size
    assert cli.main([*args, "--job", str(tmp_path / "two"), "--stage", "merge", "--shards", "2"]) == 0
    info = probe(out)
    assert (info.width, info.height, info.frame_count) == (1024, 1024, 2)
