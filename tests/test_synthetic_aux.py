"""Synthetic aux weights: every file follows rule sadtalker-synth-v1-aux (digests of the reference manifest)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import golden_dir

from xtalker.synthetic import ensure_aux
from xtalker.synthetic.auxiliary import aux_layout, digest_group
from xtalker.synthetic.sadtalker import content_digest

AUX_MANIFEST = golden_dir().parent / "aux_manifest.json"


def test_layout_matches_reference_manifest():
    if not AUX_MANIFEST.is_file():
        pytest.skip(f"{AUX_MANIFEST} not present")
    files = json.loads(AUX_MANIFEST.read_text())["files"]
    assert set(files) == set(aux_layout())
    for name, entry in files.items():
        assert aux_layout()[name]["digest"] == entry["synthetic_content_digest"]
        assert len(aux_layout()[name]["tensors"]) == entry["tensor_count"]


@pytest.mark.parametrize("name", sorted(aux_layout()))
def test_written_file_has_official_container_and_digest(aux_checkpoints, name):
    top = torch.load(str(aux_checkpoints / name), map_location="cpu", weights_only=True)
    entry = aux_layout()[name]
    state = top[entry["top_key"]] if entry["top_key"] else top
    if entry["top_key"]:
        assert list(top) == [entry["top_key"]]
    prefix = entry["stored_key_prefix"]
    assert all(k.startswith(prefix) for k in state)
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    assert content_digest(state, digest_group(name)) == entry["digest"]
    counters = [v for k, v in state.items() if k.endswith(".num_batches_tracked")]
    assert all(v.dtype == torch.int64 and v.shape == () and int(v) == 0 for v in counters)


def test_existing_file_is_kept(tmp_path):
    (tmp_path / "parsing_parsenet.pth").write_bytes(b"user file")
    assert ensure_aux(tmp_path, "parsing_parsenet.pth").read_bytes() == b"user file"


def test_write_all_aux_reports_each_digest(tmp_path):
    from xtalker.synthetic.auxiliary import write_all_aux

    assert write_all_aux(tmp_path) == dict.fromkeys(aux_layout(), True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(aux_layout())
