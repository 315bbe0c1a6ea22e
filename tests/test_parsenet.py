"""ParseNet: official file layout, loader errors, preprocessing, the inference plan's rewrites, batching, golden parity."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import golden_dir

from xtalker.models.auxfile import AuxWeightsMissing, check_state
from xtalker.models.parsenet import (
    FILE_NAME,
    NUM_CLASSES,
    ParseNet,
    _Conv,
    _up_kernel,
    load_parsenet,
    mask_logits,
    official_layout,
    parse_classes,
    preprocess_bgr_u8,
)
from xtalker.parity.cases_aux import aux_file
from xtalker.parity.cases_parsenet import RUNNERS
from xtalker.parity.core import Case, Context

AUX_MANIFEST = golden_dir().parent / "aux_manifest.json"
PARAMETERS = 21_303_254  # aux spec 4.1


@pytest.fixture(scope="module")
def parsenet_path(aux_checkpoints) -> Path:
    return aux_file(Context(aux_checkpoints), FILE_NAME)


@pytest.fixture(scope="module")
def net(parsenet_path) -> ParseNet:
    return load_parsenet(parsenet_path)


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """Two smooth, different 512 x 512 BGR faces (upscaled noise, so the parse has regions, not speckle)."""
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    return np.stack([cv2.resize(s, (512, 512), interpolation=cv2.INTER_CUBIC) for s in small])


def test_layout_matches_manifest():
    if not AUX_MANIFEST.is_file():
        pytest.skip(f"{AUX_MANIFEST} not present")
    manifest = json.loads(AUX_MANIFEST.read_text())["files"][FILE_NAME]["tensors"]
    assert official_layout() == {k: tuple(v["shape"]) for k, v in manifest.items()}
    assert len(official_layout()) == 238


def test_loader_builds_network(net):
    assert not net.training
    assert sum(p.numel() for p in net.parameters()) == PARAMETERS
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 36


def test_missing_file_and_bad_keys(tmp_path):
    with pytest.raises(AuxWeightsMissing, match=FILE_NAME):
        load_parsenet(tmp_path / FILE_NAME)
    bad = tmp_path / "bad.pth"
    torch.save({"encoder.0.conv2d.weights": torch.zeros(64, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth: .*missing: .*unexpected: encoder\.0\.conv2d\.weights"):
        load_parsenet(bad)
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in official_layout().items()}
        state["out_mask_conv.conv2d.weight"] = torch.empty(18, 64, 3, 3)
    with pytest.raises(ValueError, match=r"wrong shape: out_mask_conv\.conv2d\.weight \(18, 64, 3, 3\)"):
        check_state(state, official_layout(), FILE_NAME, "somefile")


def test_loads_without_batchnorm_counters(parsenet_path, tmp_path, net):
    state = torch.load(str(parsenet_path), map_location="cpu", weights_only=True)
    old = tmp_path / "old.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}, old)
    loaded = load_parsenet(old)
    w = "decoder.3.conv2.norm.norm.running_var"
    assert torch.equal(loaded.state_dict()[w], net.state_dict()[w])
    assert torch.equal(ParseNet.from_official(state).state_dict()[w], state[w])  # counters present: also fine
    with pytest.raises(RuntimeError, match="extra"):
        ParseNet.from_official({**state, "extra": torch.zeros(1)})


def test_preprocess():
    face = np.zeros((1, 512, 512, 3), dtype=np.uint8)
    face[..., 0] = 255  # blue in BGR
    face[..., 2] = 51
    x = preprocess_bgr_u8(face)
    assert x.shape == (1, 3, 512, 512) and x.dtype == torch.float32
    # float32(51) / 255 = 0.2 (float32), then (0.2 - 0.5) / 0.5.
    red = (np.float32(51) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert x[0, :, 0, 0].tolist() == [red, -1.0, 1.0]
    small = np.random.default_rng(0).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    resized = np.stack([cv2.resize(f, (512, 512)) for f in small])
    assert torch.equal(preprocess_bgr_u8(small), preprocess_bgr_u8(resized))
    assert torch.equal(preprocess_bgr_u8(small[..., ::-1])[:, [2, 1, 0]], preprocess_bgr_u8(small))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_plan_conv_equals_reflection_padded_conv(stride, hw):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, dtype=torch.float64, generator=g)
    w, b = torch.randn(3, 4, 3, 3, dtype=torch.float64, generator=g), torch.randn(3, dtype=torch.float64, generator=g)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, b, stride=stride)
    torch.testing.assert_close(_Conv(w, b, torch.float64, stride=stride)(x), expected, atol=1e-12, rtol=0)


def test_plan_up_conv_equals_nearest_then_conv():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, generator=g)
    w, b = torch.randn(3, 4, 3, 3, dtype=torch.float64, generator=g), torch.randn(3, dtype=torch.float64, generator=g)
    expected = F.conv2d(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (1, 1, 1, 1), mode="reflect"), w, b)
    up = _Conv(_up_kernel(w), b, torch.float64, up=True)
    torch.testing.assert_close(up(F.pad(x, (1, 1, 1, 1), mode="replicate")), expected, atol=1e-12, rtol=0)


def _decided(logits: torch.Tensor) -> np.ndarray:
    """Pixels whose top-1 minus top-2 logit is at least 1e-3 (the class of the others may flip)."""
    top2 = logits.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1] >= 1e-3).numpy()


def test_inference_path(net, faces):
    batched = mask_logits(net, faces)
    assert batched.shape == (2, NUM_CLASSES, 512, 512) and batched.dtype == torch.float32
    assert (batched[0] - batched[1]).abs().mean() > 0.1  # the samples are not mixed up
    with torch.inference_mode():
        logits, image = net(preprocess_bgr_u8(faces[:1]))
    assert image.shape == (1, 3, 512, 512)
    # Batch of two through the plan == one face through the op-for-op forward.
    torch.testing.assert_close(batched[:1], logits, atol=1e-4, rtol=0)
    decided = _decided(logits)
    assert np.array_equal(batched[:1].argmax(1).numpy()[decided], logits.argmax(1).numpy()[decided])
    assert len(np.unique(logits.argmax(1))) >= 5
    # The public call on a single face == the argmax of that face's logits in the batch.
    classes = parse_classes(net, faces[1:])
    assert classes.shape == (1, 512, 512) and classes.dtype == np.uint8
    expected = batched[1:].argmax(1).numpy()
    decided = _decided(batched[1:])
    assert np.array_equal(classes[decided], expected[decided])
    bf16 = parse_classes(net, faces[1:], precision="bf16")
    assert np.mean(bf16 != expected) < 0.05  # spec 6.5: about 1.4 % of the labels flip
    assert parse_classes(net, faces[:0]).shape == (0, 512, 512)
    with pytest.raises(ValueError, match="precision"):
        parse_classes(net, faces[:1], precision="fp16")


@pytest.mark.slow  # test_parity runs every golden case
def test_golden_parsenet(golden, aux_checkpoints):
    path = golden / "parsenet_a.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    checks = RUNNERS["parsenet"](Case.open(path), Context(aux_checkpoints))
    assert {c.name for c in checks} >= {
        "logits_crop_rows224_288_cols224_288", "logits_mean_per_class", "out_img_mean_per_channel (forward)",
        "parse_classes_u8",
    }
    failing = [f"{c.name}: {c.error:.3g} > {c.tolerance:.3g}" for c in checks if not c.passed]
    assert not failing, "; ".join(failing)
