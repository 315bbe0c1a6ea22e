"""Loader behaviour on good and bad checkpoint files: one clear error naming the file and the offending keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xtalker import checkpoints
from xtalker.checkpoints import (
    CheckpointError,
    expected_tensors,
    find_checkpoints,
    load_network,
    read_mapping,
    read_packed,
)
from xtalker.synthetic.sadtalker import synthesize

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "reference" / "checkpoint_manifest.json"


def _packed_subset(network: str) -> dict[str, torch.Tensor]:
    """Synthetic tensors of one network with their full packed-file keys (a small stand-in for the 691 MiB file)."""
    spec = {network + "." + k: tuple(v) for k, v in expected_tensors(network).items()}
    return dict(synthesize("SadTalker_V0.0.2_256.safetensors", "", spec))


@pytest.fixture(scope="module")
def audio2exp_tensors() -> dict[str, torch.Tensor]:
    return _packed_subset("audio2exp")


@pytest.fixture(scope="module")
def mapping70() -> dict[str, torch.Tensor]:
    spec = {k: tuple(v) for k, v in expected_tensors("mapping", 70).items()}
    return dict(synthesize("mapping_00229-model.pth.tar", "mapping/", spec))


def test_layout_matches_reference_manifest():
    if not MANIFEST.is_file():
        pytest.skip(f"{MANIFEST} not present")
    manifest = json.loads(MANIFEST.read_text())["files"]
    packed = manifest["SadTalker_V0.0.2_256.safetensors"]["tensors"]
    total = sum(len(expected_tensors(n)) for n in ("kp_extractor", "generator", "audio2exp", "audio2pose", "face_3drecon"))
    assert total == len(packed) == 1305
    for net in ("generator", "audio2pose"):
        for key, (shape, dtype) in expected_tensors(net).items():
            assert packed[f"{net}.{key}"] == {"shape": shape, "dtype": dtype}
    assert expected_tensors("mapping", 73)["first.0.weight"][0] == [1024, 73, 7]


def test_packed_component_loads_with_prefix_stripped(tmp_path, audio2exp_tensors):
    path = tmp_path / "SadTalker_V0.0.2_256.safetensors"
    save_file(audio2exp_tensors, str(path))
    state = read_packed(path, "audio2exp")
    assert set(state) == set(expected_tensors("audio2exp"))
    assert torch.equal(state["mapping1.weight"], audio2exp_tensors["audio2exp.mapping1.weight"])


def test_unused_pose_tensors_are_checked_then_dropped(tmp_path):
    tensors = _packed_subset("audio2pose")
    path = tmp_path / "pose.safetensors"
    save_file(tensors, str(path))
    state = read_packed(path, "audio2pose")
    assert not any(k.startswith(("netG.encoder.", "netD_motion.")) for k in state)
    assert "netG.decoder.classbias" in state and "audio_encoder.audio_encoder.0.conv_block.0.weight" in state
    # an unused tensor of the wrong shape is still an error: the file is not the official one
    bad = dict(tensors)
    key = next(k for k in bad if k.startswith("audio2pose.netD_motion.") and k.endswith("weight"))
    bad[key] = torch.zeros(3)
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match="netD_motion"):
        read_packed(path, "audio2pose")


def test_missing_key_is_named(tmp_path, audio2exp_tensors):
    bad = dict(audio2exp_tensors)
    del bad["audio2exp.audio_encoder.3.conv_block.1.running_var"]
    path = tmp_path / "SadTalker_V0.0.2_256.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointError) as e:
        read_packed(path, "audio2exp")
    msg = str(e.value)
    assert str(path) in msg and "missing keys: audio_encoder.3.conv_block.1.running_var" in msg


def test_unexpected_key_is_named(tmp_path, audio2exp_tensors):
    bad = dict(audio2exp_tensors, **{"audio2exp.extra_head.weight": torch.zeros(2, 2)})
    path = tmp_path / "x.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match="unexpected keys: extra_head.weight"):
        read_packed(path, "audio2exp")


def test_wrong_shape_is_named(tmp_path, audio2exp_tensors):
    bad = dict(audio2exp_tensors)
    bad["audio2exp.mapping1.weight"] = torch.zeros(64, 576)
    path = tmp_path / "x.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match=r"mapping1.weight is \(64, 576\).*expected \(64, 577\)"):
        read_packed(path, "audio2exp")


def test_wrong_dtype_is_named(tmp_path, audio2exp_tensors):
    bad = dict(audio2exp_tensors)
    bad["audio2exp.mapping1.bias"] = bad["audio2exp.mapping1.bias"].double()
    path = tmp_path / "x.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match="mapping1.bias .*float64"):
        read_packed(path, "audio2exp")


def test_truncated_safetensors(tmp_path, audio2exp_tensors):
    path = tmp_path / "SadTalker_V0.0.2_256.safetensors"
    save_file(audio2exp_tensors, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_packed(path, "audio2exp")


def test_file_of_another_kind(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"model.layer.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"holds no 'generator\.\*' tensors"):
        read_packed(path, "generator")


def test_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(CheckpointError) as e:
        read_packed(tmp_path / "SadTalker_V0.0.2_256.safetensors", "generator")
    assert "not found" in str(e.value) and "download_models.sh" in str(e.value)


def test_mapping_reads_only_the_mapping_entry(tmp_path, mapping70):
    path = tmp_path / "mapping_00229-model.pth.tar"
    torch.save({"mapping": mapping70, "epoch": 229, "optimizer_mapping": {"state": {}, "lr": 1e-4}}, path)
    state = read_mapping(path)
    assert set(state) == set(mapping70)
    assert read_mapping(path, coeff_nc=70)["first.0.weight"].shape == (1024, 70, 7)


def test_mapping_with_wrong_channel_count(tmp_path, mapping70):
    path = tmp_path / "mapping_00109-model.pth.tar"
    torch.save({"mapping": mapping70, "epoch": 109}, path)
    with pytest.raises(CheckpointError, match=r"first.0.weight is \(1024, 70, 7\).*expected \(1024, 73, 7\)"):
        read_mapping(path, coeff_nc=73)


def test_mapping_without_mapping_entry(tmp_path, mapping70):
    path = tmp_path / "m.pth.tar"
    torch.save({"state_dict": mapping70}, path)
    with pytest.raises(CheckpointError, match="no 'mapping' entry.*state_dict"):
        read_mapping(path)


class _Payload:
    """A pickle that would run code when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused_and_not_executed(tmp_path, mapping70):
    marker = tmp_path / "executed"
    path = tmp_path / "mapping_00229-model.pth.tar"
    torch.save({"mapping": mapping70, "epoch": 229, "extra": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a plain-weights pickle"):
        read_mapping(path)
    assert not marker.exists()


def test_truncated_pickle(tmp_path, mapping70):
    path = tmp_path / "mapping_00229-model.pth.tar"
    torch.save({"mapping": mapping70, "epoch": 229}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        read_mapping(path)


def test_find_checkpoints_picks_files_like_upstream(tmp_path):
    for name in ("SadTalker_V0.0.2_256.safetensors", "SadTalker_V0.0.2_512.safetensors", "mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar"):
        (tmp_path / name).touch()
    crop = find_checkpoints(tmp_path, 256, "crop")
    assert crop.packed.name == "SadTalker_V0.0.2_256.safetensors" and crop.mapping.name == "mapping_00229-model.pth.tar"
    assert crop.coeff_nc == 70
    full = find_checkpoints(tmp_path, 512, "extfull")
    assert full.packed.name == "SadTalker_V0.0.2_512.safetensors" and full.mapping.name == "mapping_00109-model.pth.tar"
    assert full.coeff_nc == 73
    assert find_checkpoints(tmp_path, 256, "resize").coeff_nc == 70


def test_find_checkpoints_lists_what_is_missing(tmp_path):
    (tmp_path / "SadTalker_V0.0.2_256.safetensors").touch()
    with pytest.raises(CheckpointError) as e:
        find_checkpoints(tmp_path, 256, "full")
    msg = str(e.value)
    assert "mapping_00109-model.pth.tar" in msg and "SadTalker_V0.0.2_256" not in msg.split(" in ")[0]
    assert str(tmp_path.resolve()) in msg
    with pytest.raises(CheckpointError, match="256 and 512"):
        find_checkpoints(tmp_path, 384)


def test_every_network_builds_from_the_synthetic_files(synthetic_checkpoints):
    packed = synthetic_checkpoints / checkpoints.packed_file_name(256)
    for network in ("kp_extractor", "generator", "audio2exp", "audio2pose", "face_3drecon"):
        model = load_network(network, packed)
        assert not model.training
        assert all(not p.requires_grad for p in model.parameters())
    mapping = load_network("mapping", synthetic_checkpoints / checkpoints.mapping_file_name(73))
    assert mapping.first[0].weight.shape == (1024, 73, 7)
