"""`xtalker batch LIST`: CSV and JSONL lists, one model load, a failed line reported and skipped, a summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_wav

from xtalker.media import iter_video_frames, load_audio, probe
from xtalker.serve.batch import ListError, read_list

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with the portrait, a picture without a face and two short clips (lists refer to them relatively)."""
    folder = tmp_path_factory.mktemp("batch")
    (folder / "face.png").write_bytes(PORTRAIT.read_bytes())
    cv2.imwrite(str(folder / "blank.png"), np.full((200, 200, 3), 90, np.uint8))
    speech = load_audio(SPEECH)
    write_wav(folder / "one.wav", speech[4000 : 4000 + 2 * 640 + 100])
    write_wav(folder / "two.wav", speech[9000 : 9000 + 3 * 640 + 100])
    return folder


def batch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "inference.py"), "batch", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=900, check=False)


def test_csv_list_renders_the_good_lines_and_reports_the_bad(inputs, synthetic_checkpoints, tmp_path):
    listing = inputs / "videos.csv"
    listing.write_text("source_image,driven_audio,output,pose_style,still,seed\n"
                       f"face.png,one.wav,{tmp_path / 'a.mp4'},3,,5\n"
                       "blank.png,one.wav,,,,\n"
                       f"face.png,two.wav,{tmp_path / 'c.mp4'},,yes,\n"
                       f"face.png,missing.wav,{tmp_path / 'd.mp4'},,,\n"
                       f"face.png,two.wav,{tmp_path / 'e.mp4'},7,maybe,\n")
    report = tmp_path / "summary.json"
    result = batch(str(listing), "--checkpoint_dir", str(synthetic_checkpoints), "--batch_size", "1",
                   "--report", str(report), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "a.mp4"), str(tmp_path / "c.mp4")]
    err = result.stderr
    assert "done 2 of 5 videos, 3 failed" in err and "networks loaded once" in err
    assert "line 3 (blank.png, one.wav): no face found in" in err
    assert "line 5 (face.png, missing.wav): driven audio not found:" in err
    assert "line 6 (face.png, two.wav): still: 'maybe' is not a valid bool" in err
    assert "Traceback" not in err
    data = json.loads(report.read_text())
    done = [v for v in data["videos"] if v["status"] == "done"]
    assert [v["line"] for v in done] == [2, 4] and [v["frames"] for v in done] == [2, 3]
    assert done[0]["seed"] == 5 and all(v["loaded"] == [] for v in done)  # loaded once, before the first line
    assert probe(tmp_path / "c.mp4").frame_count == 3
    assert not (tmp_path / "d.mp4").exists() and not (tmp_path / "e.mp4").exists()


def test_jsonl_list_with_command_line_defaults(inputs, synthetic_checkpoints, tmp_path):
    listing = inputs / "videos.jsonl"
    listing.write_text(json.dumps({"source": "face.png", "audio": "one.wav", "output": str(tmp_path / "x.mp4"),
                                   "seed": 9}) + "\n# a comment\n\n"
                       + json.dumps({"source": "face.png", "audio": "one.wav", "output": str(tmp_path / "y.mp4"),
                                     "seed": 9, "expression_scale": 0.0}) + "\n")
    result = batch(str(listing), "--checkpoint_dir", str(synthetic_checkpoints), "--preset", "balanced",
                   "--enhancer", "none", "--pose_style", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "done 2 of 2 videos, 0 failed" in result.stderr
    x, y = (np.stack(list(iter_video_frames(tmp_path / n)[1])) for n in ("x.mp4", "y.mp4"))
    assert x.shape == y.shape == (2, 256, 256, 3) and not np.array_equal(x, y)  # per-line options apply


@pytest.mark.slow  # the CLI's and the API's default-output tests cover the naming
def test_default_outputs_go_to_the_result_dir(inputs, synthetic_checkpoints, tmp_path):
    listing = inputs / "one.csv"
    listing.write_text("source,audio\nface.png,one.wav\n")
    result = batch(str(listing), "--checkpoint_dir", str(synthetic_checkpoints), "--result_dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "out/001_face_one.mp4" and (tmp_path / "out" / "001_face_one.mp4").is_file()


def test_unreadable_lists_exit_2(inputs, tmp_path):
    (tmp_path / "bad.csv").write_text("image_file,speech\nface.png,one.wav\n")
    result = batch(str(tmp_path / "bad.csv"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "source_image" in result.stderr
    result = batch(str(tmp_path / "list.txt"), cwd=tmp_path)
    assert result.returncode == 2 and "list not found" in result.stderr
    result = batch(str(tmp_path / "bad.csv"), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 2 and "--workers" in result.stderr
    (tmp_path / "list.yaml").write_text("x")
    with pytest.raises(ListError, match="a .csv .* or .jsonl file"):
        read_list(tmp_path / "list.yaml")


def test_relative_paths_and_typed_values(inputs):
    listing = inputs / "typed.jsonl"
    listing.write_text('{"source_image": "face.png", "driven_audio": "one.wav", "size": "512", '
                       '"input_yaw": "-10 10", "still": true}\n{"source_image": "face.png"}\n[1]\n')
    first, second, third = read_list(listing)
    assert first.values == {"source_image": inputs / "face.png", "driven_audio": inputs / "one.wav", "size": 512,
                            "input_yaw": [-10.0, 10.0], "still": True} and first.problem is None
    assert second.problem == "no driven_audio" and third.problem == "not a JSON object"
