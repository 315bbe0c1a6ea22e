"""GFPGAN v1.4: official file layout, synthetic weights by rule, clear loader errors, batching, golden parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import golden_dir

from xtalker.models.gfpgan import (
    NOISE_SIZES,
    GFPGANv1Clean,
    check_state,
    draw_noise,
    load_gfpgan,
    official_layout,
    postprocess_to_bgr_u8,
    preprocess_bgr_u8,
)
from xtalker.parity.cases_aux import RUNNERS
from xtalker.parity.core import Case, Context
from xtalker.synthetic import content_digest
from xtalker.synthetic_aux import aux_layout

USED_PARAMETERS = 84_339_239  # aux spec 3.1: 86,444,252 minus style MLP and toRGB heads
AUX_MANIFEST = golden_dir().parent / "aux_manifest.json"


@pytest.fixture(scope="module")
def gfpgan_path(aux_checkpoints) -> Path:
    return aux_checkpoints / "GFPGANv1.4.pth"


@pytest.fixture(scope="module")
def net(gfpgan_path) -> GFPGANv1Clean:
    return load_gfpgan(gfpgan_path)


def test_layout_matches_manifest():
    if not AUX_MANIFEST.is_file():
        pytest.skip(f"{AUX_MANIFEST} not present")
    manifest = json.loads(AUX_MANIFEST.read_text())["files"]["GFPGANv1.4.pth"]["tensors"]["params_ema"]
    assert official_layout() == {k: tuple(v["shape"]) for k, v in manifest.items()}
    assert len(official_layout()) == 285


def test_synthetic_file_follows_rule(gfpgan_path):
    top = torch.load(str(gfpgan_path), map_location="cpu", weights_only=True)
    assert list(top) == ["params_ema"]
    assert content_digest(top["params_ema"], "params_ema/") == aux_layout()["GFPGANv1.4.pth"]["digest"]


def test_loader_builds_used_network(net):
    assert not net.training
    assert sum(p.numel() for p in net.parameters()) == USED_PARAMETERS
    assert not any(k.startswith(("toRGB.", "stylegan_decoder.style_mlp.", "stylegan_decoder.noises.")) for k in net.state_dict())


def test_wrong_keys_give_clear_error(tmp_path):
    bad = tmp_path / "not_gfpgan.pth"
    torch.save({"params": {"conv_body_first.weights": torch.zeros(32, 3, 1, 1)}}, bad)
    with pytest.raises(ValueError, match=r"not_gfpgan\.pth \[params\].*missing: .*unexpected: conv_body_first\.weights"):
        load_gfpgan(bad)
    flat = tmp_path / "flat.pth"
    torch.save({"conv_body_first.weight": torch.zeros(32, 3, 1, 1)}, flat)
    with pytest.raises(ValueError, match=r"flat\.pth: no 'params_ema' or 'params' state dict"):
        load_gfpgan(flat)


def test_wrong_shape_is_named():
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in official_layout().items()}
        state["final_linear.weight"] = torch.empty(8192, 2048)
    with pytest.raises(ValueError, match=r"somefile: .*wrong shape: final_linear\.weight \(8192, 2048\) != \(8192, 4096\)"):
        check_state(state, "somefile")


def test_pre_and_post_processing():
    crop = torch.zeros(1, 512, 512, 3, dtype=torch.uint8)
    crop[..., 0] = 255  # blue in BGR
    x = preprocess_bgr_u8(crop)
    assert x.shape == (1, 3, 512, 512) and x.dtype == torch.float32
    assert torch.equal(x[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    image = torch.tensor([-2.0, 0.0, 1.0]).view(1, 3, 1, 1)  # R clamped to 0; G = 127.5 rounds half to even
    assert postprocess_to_bgr_u8(image).tolist() == [[[[255, 128, 0]]]]


def test_batch_with_generator_equals_single_run(net):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 512, 512) * 2 - 1
    noise = draw_noise(2, torch.Generator().manual_seed(3))
    assert [tuple(n.shape) for n in noise] == [(2, 1, r, r) for r in NOISE_SIZES]
    with torch.inference_mode():
        # Noise drawn inside the forward from the generator = the same maps passed explicitly.
        batched = net(x, generator=torch.Generator().manual_seed(3))
        single = net(x[1:], [n[1:] for n in noise])
    assert batched.shape == (2, 3, 512, 512)
    torch.testing.assert_close(batched[1:], single, atol=1e-5, rtol=0)
    assert (batched[0] - batched[1]).abs().mean() > 1e-2  # the samples are not mixed up


def test_golden_gfpgan_v14(golden, synthetic_checkpoints):
    path = golden / "gfpgan_v14_a.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with torch.inference_mode():
        checks = RUNNERS["gfpgan_v14"](Case.open(path), Context(synthetic_checkpoints))
    assert {c.name for c in checks} >= {"image", "style_code", "condition_scale0", "restored_face_bgr_u8"}
    failing = [f"{c.name}: {c.error:.3g} > {c.tolerance:.3g}" for c in checks if not c.passed]
    assert not failing, "; ".join(failing)
