"""Legacy per-network checkpoints (`--old_version`, and upstream's fallback when a folder has no *.safetensors).

The synthetic legacy set is a re-keying of the synthetic packed 256 file (rule sadtalker-synth-v1-legacy), so it
must give the same networks and the same video bit for bit; wrong, truncated, renamed or incomplete legacy files
must give one clear error naming the file and what is wrong.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_wav

from xtalker import checkpoints
from xtalker.checkpoints import (
    CheckpointError,
    expected_tensors,
    find_checkpoints,
    legacy_expected,
    legacy_file_names,
    legacy_source,
    load_network,
    read_legacy,
    read_packed,
)
from xtalker.config import InferenceConfig
from xtalker.media import load_audio
from xtalker.pipeline import Setting, generate

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO.parent / "shared" / "reference" / "legacy_manifest.json"
PORTRAIT = REPO / "examples" / "source_image" / "astronaut.png"
SPEECH = REPO / "examples" / "driven_audio" / "hello.wav"
PACKED = "SadTalker_V0.0.2_256.safetensors"
EXP, POSE, RENDER, RECON = legacy_file_names()
NETWORKS = ("audio2exp", "audio2pose", "generator", "kp_extractor", "face_3drecon")


@pytest.fixture(scope="module")
def legacy_checkpoints(synthetic_checkpoints) -> Path:
    """The verified synthetic legacy set plus the mapping files, no *.safetensors (written on first use, ~20 s)."""
    from xtalker.synthetic import ensure_legacy

    return ensure_legacy(synthetic_checkpoints / "legacy", synthetic_checkpoints)


@pytest.fixture(scope="module")
def mixed_checkpoints(synthetic_checkpoints, legacy_checkpoints, tmp_path_factory) -> Path:
    """Packed, legacy and mapping files in one folder: the packed file is used unless old_version is set."""
    folder = tmp_path_factory.mktemp("mixed")
    for name in [PACKED, *legacy_file_names(), checkpoints.mapping_file_name(70), checkpoints.mapping_file_name(73)]:
        source = synthetic_checkpoints / name if name == PACKED else legacy_checkpoints / name
        (folder / name).symlink_to(source.resolve())
    return folder


def _touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()
    return folder


MAPPINGS = ("mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar")


# --- layout -------------------------------------------------------------------------------------------------------

def test_legacy_layout_matches_reference_manifest():
    if not MANIFEST.is_file():
        pytest.skip(f"{MANIFEST} not present")
    files = json.loads(MANIFEST.read_text())["files"]
    assert legacy_file_names() == [n for n, e in files.items() if "top_level_tensor_groups" in e]
    for name in legacy_file_names():
        entry = files[name]
        ours = legacy_expected(name)
        assert list(ours) == list(entry["top_level_tensor_groups"])
        for top, group in entry["top_level_tensor_groups"].items():
            assert {k: [list(s), d] for k, (s, d) in ours[top].items()} == {
                k: [v["shape"], v["dtype"]] for k, v in group["tensors"].items()}
            for key, spec in group["tensors"].items():
                if spec["packed_key"] is not None:
                    network = legacy_source_of(name, top)
                    assert spec["packed_key"] == f"{network}.{key}"
        assert ("epoch" in entry["top_level_required"]) == checkpoints.legacy_layout()["files"][name]["epoch_required"]
        assert checkpoints.legacy_layout()["files"][name]["digest"] == entry["synthetic_content_digest"]
    assert sum(len(t) for t in legacy_expected(RENDER).values()) == 863
    assert len(legacy_expected(RENDER)["he_estimator"]) == 402


def legacy_source_of(name: str, top: str) -> str:
    return next(n for n in NETWORKS if legacy_source(n) == (name, top))


# --- finding the files ----------------------------------------------------------------------------------------------

def test_old_version_picks_the_legacy_files(tmp_path):
    folder = _touch(tmp_path / "all", PACKED, "SadTalker_V0.0.2_512.safetensors", *legacy_file_names(), *MAPPINGS)
    packed = find_checkpoints(folder, 256, "crop")
    assert not packed.legacy and packed.file("audio2exp").name == PACKED
    legacy = find_checkpoints(folder, 256, "crop", old_version=True)
    assert legacy.legacy and legacy.coeff_nc == 70 and legacy.mapping.name == MAPPINGS[0]
    assert {n: legacy.file(n).name for n in NETWORKS} == {
        "audio2exp": EXP, "audio2pose": POSE, "generator": RENDER, "kp_extractor": RENDER, "face_3drecon": RECON}
    assert legacy.packed.name == RENDER
    full = find_checkpoints(folder, 256, "extfull", old_version=True)
    assert full.legacy and full.mapping.name == MAPPINGS[1] and full.coeff_nc == 73


def test_folder_without_safetensors_falls_back_with_one_log_line(tmp_path, caplog):
    folder = _touch(tmp_path / "old", *legacy_file_names(), *MAPPINGS)
    with caplog.at_level(logging.WARNING, logger="xtalker.checkpoints"):
        for _ in range(3):
            paths = find_checkpoints(folder, 256, "crop")
            assert paths.legacy and paths.file("audio2pose").name == POSE
    lines = [r.getMessage() for r in caplog.records if r.name == "xtalker.checkpoints"]
    assert len(lines) == 1 and "no *.safetensors" in lines[0] and "legacy" in lines[0]


def test_legacy_at_512_uses_the_256_renderer_and_says_so(tmp_path, caplog):
    folder = _touch(tmp_path / "old512", *legacy_file_names(), *MAPPINGS)
    with caplog.at_level(logging.WARNING, logger="xtalker.checkpoints"):
        paths = find_checkpoints(folder, 512, "crop", old_version=True)
    assert paths.legacy and paths.size == 512 and paths.file("generator").name == RENDER
    assert any("--size 512" in r.getMessage() and RENDER in r.getMessage() for r in caplog.records)


def test_missing_legacy_file_is_named(tmp_path):
    folder = _touch(tmp_path / "partial", PACKED, EXP, POSE, RECON, *MAPPINGS)
    with pytest.raises(CheckpointError) as e:
        find_checkpoints(folder, 256, "crop", old_version=True)
    msg = str(e.value)
    assert RENDER in msg and "--old_version" in msg and "download_models.sh --legacy" in msg
    assert EXP not in msg.split(" in ")[0]
    # fallback folder (no safetensors) missing a file: named too, with the packed alternative
    folder = _touch(tmp_path / "fallback", EXP, *MAPPINGS)
    with pytest.raises(CheckpointError, match=f"{POSE}.*no \\*.safetensors.*{PACKED}"):
        find_checkpoints(folder, 256, "crop")
    # nothing at all: the packed file is what is asked for, as before
    with pytest.raises(CheckpointError, match=PACKED):
        find_checkpoints(_touch(tmp_path / "empty"), 256, "crop")
    with pytest.raises(CheckpointError, match="256 and 512"):
        find_checkpoints(folder, 384, old_version=True)


def test_cli_old_version_missing_file_is_one_error_line(tmp_path, synthetic_checkpoints):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in (PACKED, *MAPPINGS):
        (folder / name).symlink_to((synthetic_checkpoints / name).resolve())
    audio = write_wav(tmp_path / "a.wav", load_audio(SPEECH)[4000:4000 + 2 * 640])
    proc = subprocess.run([sys.executable, str(REPO / "inference.py"), "--driven_audio", str(audio), "--source_image",
                           str(PORTRAIT), "--checkpoint_dir", str(folder), "--old_version", "--result_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: missing legacy checkpoint file(s)") and all(n in line for n in legacy_file_names())
    assert "not supported" not in proc.stderr and "Traceback" not in proc.stderr


# --- the synthetic set ---------------------------------------------------------------------------------------------

def test_synthetic_legacy_set_is_a_rekeying_of_the_packed_file(legacy_checkpoints, synthetic_checkpoints):
    from xtalker.synthetic.legacy import _marker, expected_digest

    for name in legacy_file_names():  # written and verified against the manifest digests
        assert _marker(legacy_checkpoints, name).read_text() == expected_digest(name)
    assert not list(legacy_checkpoints.glob("*.safetensors"))
    packed = synthetic_checkpoints / PACKED
    for network in NETWORKS:
        legacy = read_legacy(legacy_checkpoints / legacy_source(network)[0], network)
        ref = read_packed(packed, network)
        assert legacy.keys() == ref.keys()
        assert all(torch.equal(legacy[k], ref[k]) for k in ref), network
    raw = torch.load(legacy_checkpoints / RENDER, map_location="cpu", weights_only=True, mmap=True)
    assert raw["epoch"] == 189 and len(raw["he_estimator"]) == 402
    assert torch.load(legacy_checkpoints / EXP, weights_only=True, mmap=True)["epoch"] == 300


def test_every_network_builds_from_the_legacy_files(legacy_checkpoints):
    paths = find_checkpoints(legacy_checkpoints, 256, "crop")
    for network in NETWORKS:
        model = load_network(network, paths.file(network))
        assert not model.training


# --- bad files -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exp_state(synthetic_checkpoints) -> dict[str, torch.Tensor]:
    return read_packed(synthetic_checkpoints / PACKED, "audio2exp")


def test_extra_top_level_entries_are_ignored(tmp_path, exp_state):
    path = tmp_path / EXP
    torch.save({"model": exp_state, "epoch": 300, "optimizer": {"state": {}, "lr": 1e-4}}, path)
    assert read_legacy(path, "audio2exp").keys() == expected_tensors("audio2exp").keys()


def test_missing_epoch_is_an_error_where_upstream_reads_it(tmp_path, exp_state, legacy_checkpoints):
    path = tmp_path / EXP
    torch.save({"model": exp_state}, path)
    with pytest.raises(CheckpointError, match=f"{EXP} has no 'epoch' entry.*it is not the legacy {EXP}"):
        read_legacy(path, "audio2exp")
    # epoch_20.pth has none and needs none
    assert "epoch" not in torch.load(legacy_checkpoints / RECON, weights_only=True, mmap=True)
    read_legacy(legacy_checkpoints / RECON, "face_3drecon")


def test_truncated_legacy_file(tmp_path, exp_state):
    path = tmp_path / EXP
    torch.save({"model": exp_state, "epoch": 300}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"(?s){EXP} is not a readable torch checkpoint.*truncated"):
        load_network("audio2exp", path)


def test_renamed_legacy_file_is_recognised(tmp_path, legacy_checkpoints, synthetic_checkpoints):
    renamed = tmp_path / EXP
    renamed.symlink_to(legacy_checkpoints / RECON)
    with pytest.raises(CheckpointError, match=f"no 'model', 'epoch' entries \\(found: net_recon\\).*looks like {RECON}"):
        load_network("audio2exp", renamed)
    wrong_kind = tmp_path / "pose_as_exp" / EXP
    wrong_kind.parent.mkdir()
    wrong_kind.symlink_to(legacy_checkpoints / POSE)
    with pytest.raises(CheckpointError, match=f"\\[model\\] does not have the official layout: missing keys.*looks like {POSE}"):
        load_network("audio2exp", wrong_kind)
    packed = tmp_path / RENDER
    packed.symlink_to(synthetic_checkpoints / PACKED)
    with pytest.raises(CheckpointError, match="is a safetensors file, not a torch pickle"):
        load_network("generator", packed)


def test_renderer_file_needs_a_complete_he_estimator(tmp_path, legacy_checkpoints):
    raw = torch.load(legacy_checkpoints / RENDER, map_location="cpu", weights_only=True, mmap=True)
    he = dict(raw["he_estimator"])
    he.pop("conv1.weight")
    he["fc_extra.weight"] = torch.zeros(3)
    path = tmp_path / RENDER
    torch.save({**raw, "he_estimator": he}, path)
    with pytest.raises(CheckpointError, match=r"\[he_estimator\].*missing keys: conv1.weight.*unexpected keys: fc_extra.weight"):
        load_network("kp_extractor", path)


class _Payload:
    """A pickle that would run code when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_legacy_pickle_with_code_is_refused(tmp_path, exp_state):
    marker = tmp_path / "executed"
    path = tmp_path / EXP
    torch.save({"model": exp_state, "epoch": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="not a plain-weights pickle"):
        read_legacy(path, "audio2exp")
    assert not marker.exists()


# --- every entry point ----------------------------------------------------------------------------------------------

def test_flag_reaches_config_workers_and_jobs(tmp_path):
    from xtalker.cli import build_parser, config_from_args
    from xtalker.parallel.stages import settings_of, worker_argv

    argv = ["--driven_audio", "a.wav", "--source_image", "b.png", "--old_version", "--workers", "2"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config.old_version is True
    assert "--old_version" in worker_argv(argv)
    settings = settings_of(config)
    assert settings["old_version"] is True
    rebuilt = InferenceConfig(driven_audio=Path("-"), source_image=Path("-"), **json.loads(json.dumps(settings)))
    assert rebuilt.old_version is True


def test_slot_script_passes_the_flag_to_every_stage(tmp_path):
    from xtalker.parallel.script import render_script
    from xtalker.parallel.slots import CoreSlot

    text = render_script([CoreSlot((0,), 0), CoreSlot((1,), 0)], ["--driven_audio", "a.wav", "--source_image", "b.png",
                         "--old_version"], tmp_path / "job", sys.executable, REPO / "inference.py", tmp_path)
    lines = text.splitlines()
    assert any(line.startswith("ARGS=(") and "--old_version" in line for line in lines)
    stages = [line for line in lines if "--stage" in line]
    assert len(stages) >= 3 and all('"${ARGS[@]}"' in line for line in stages)  # prepare, each render, merge


def test_api_option_and_setting(legacy_checkpoints, mixed_checkpoints):
    from xtalker.api import OPTIONS

    assert "old_version" in OPTIONS
    base = dict(driven_audio=Path("-"), source_image=Path("-"))
    assert not Setting.of(InferenceConfig(**base, checkpoint_dir=mixed_checkpoints)).paths.legacy
    assert Setting.of(InferenceConfig(**base, checkpoint_dir=mixed_checkpoints, old_version=True)).paths.legacy
    assert Setting.of(InferenceConfig(**base, checkpoint_dir=legacy_checkpoints)).paths.legacy  # fallback


def test_flyte_passes_the_flag(synthetic_checkpoints, legacy_checkpoints, tmp_path, local_flyte):
    pytest.importorskip("flytekit", reason="the flyte extra is not installed")
    from xtalker.parallel import flyte

    audio = write_wav(tmp_path / "a.wav", load_audio(SPEECH)[4000:4000 + 2 * 640])
    with pytest.raises(Exception, match="missing legacy checkpoint file"):  # checked in `settings`, before any work
        flyte.talking_head(source_image=str(PORTRAIT), driven_audio=str(audio), checkpoint_dir=str(synthetic_checkpoints),
                           old_version=True, seed=5, threads=1, shards=1)
    settings = flyte.settings(checkpoint_dir=str(legacy_checkpoints), size=256, preprocess="crop", still=False,
                              pose_style=0, expression_scale=1.0, precision="bf16", batch_size=1, enhancer=None,
                              enhance_align="source", blend="seamless", landmarks="auto", seed=5, threads=1,
                              old_version=True, facerender="facevid2vid")
    assert json.loads(settings)["old_version"] is True
    assert flyte._config(settings).old_version is True  # what prepare, render and merge run with


# --- same video ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_speech(tmp_path_factory) -> Path:
    """One video frame of speech (each video here costs ~18 s on 2 cores, mostly loading and the render)."""
    return write_wav(tmp_path_factory.mktemp("speech") / "speech.wav", load_audio(SPEECH)[4000:4000 + 640 + 100])


def test_legacy_set_makes_the_same_video_bit_for_bit(tmp_path, synthetic_checkpoints, mixed_checkpoints, short_speech):
    """The packed file, and the legacy set chosen by the API option on a folder holding both: the same bytes.

    (The fallback folder picks the same files, test_api_option_and_setting; the networks' tensors are equal,
    test_synthetic_legacy_set_is_a_rekeying_of_the_packed_file.)"""
    from xtalker import XTalker

    options = dict(seed=5, precision="bf16", batch_size=1)
    config = InferenceConfig(driven_audio=short_speech, source_image=PORTRAIT, checkpoint_dir=synthetic_checkpoints,
                             output=tmp_path / "packed.mp4", **options)
    packed = generate(config).output.read_bytes()
    xt = XTalker(mixed_checkpoints, warm=False, old_version=True, **options)
    video = xt.generate(PORTRAIT, short_speech, tmp_path / "legacy.mp4")
    from xtalker.warm import HEADS

    heads = [head for (kind, _), head in xt.networks._kept.items() if kind == HEADS]
    assert [h.paths.legacy for h in heads] == [True]  # the networks came from the legacy files
    assert video.frames == 1 and video.output.read_bytes() == packed
