"""Optional restorers (RestoreFormer, RealESRGAN x2plus + RealESRGANer): official layouts, synthetic weights by rule,
clear loader errors, golden parity of the four case kinds, bf16 bars, RealESRGANer's tiling arithmetic."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import golden_dir

from xtalker.checkpoints import CheckpointError
from xtalker.finish.background import BackgroundUpsampler
from xtalker.finish.enhance import DetectedFaces, enhance_detected
from xtalker.models import restoreformer as rf_model
from xtalker.models import rrdbnet as rr_model
from xtalker.models.gfpgan import postprocess_to_bgr_u8, preprocess_bgr_u8
from xtalker.models.restorerfile import RestorerWeightsError, RestorerWeightsMissing, restorers_layout
from xtalker.parity.cases_restorers import RUNNERS
from xtalker.parity.core import Case, Context
from xtalker.synthetic import restorers as synthetic

MANIFEST = golden_dir().parent / "restorers_manifest.json"
KINDS = tuple(RUNNERS)


def _golden_cases() -> list[Path]:
    """Golden cases of the restorer kinds, found by their metadata (not their file names)."""
    if not golden_dir().is_dir():
        return []
    cases = []
    for path in sorted(golden_dir().glob("*.safetensors")):
        try:
            kind = Case.open(path).meta.get("case_kind")
        except ValueError:
            continue
        if kind in KINDS:
            cases.append(path)
    return cases


CASES = _golden_cases()


def _case_of_kind(kind: str) -> Case:
    found = [Case.open(p) for p in CASES if Case.open(p).meta.get("case_kind") == kind]
    if not found:
        pytest.skip(f"no golden {kind} case in {golden_dir()}")
    return found[0]


def _psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, peak: float) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return 10 * math.log10(peak**2 / np.mean((a - b) ** 2))


@pytest.fixture(scope="module")
def rf_path(restorer_checkpoints) -> Path:
    return restorer_checkpoints / rf_model.FILE_NAME


@pytest.fixture(scope="module")
def rr_path(restorer_checkpoints) -> Path:
    return restorer_checkpoints / rr_model.FILE_NAME


@pytest.fixture(scope="module")
def rrdb(rr_path) -> rr_model.RRDBNet:
    return rr_model.load_rrdbnet(rr_path)


@pytest.fixture(scope="module")
def restoreformer(rf_path) -> rf_model.RestoreFormer:
    return rf_model.load_restoreformer(rf_path)


# ---- layouts and synthetic weights ---------------------------------------------------------------


def test_layouts_match_reference_manifest():
    if not MANIFEST.is_file():
        pytest.skip(f"{MANIFEST} not present")
    files = json.loads(MANIFEST.read_text())["files"]
    assert set(files) == set(restorers_layout()) == set(synthetic.FILES)
    for name, entry in files.items():
        ours = restorers_layout()[name]
        assert ours["digest"] == entry["synthetic_content_digest"] and ours["rule"] == entry["synthetic_rule_version"]
        expected = {k: [v["shape"], v["dtype"]] for k, v in entry["tensors"]["params_ema"].items()}
        assert ours["tensors"] == expected
        assert sum(math.prod(s) for s, _ in ours["tensors"].values()) == entry["trainable_parameters"]


def test_networks_build_exactly_the_used_layout():
    with torch.device("meta"):
        built_rf = {k: tuple(v.shape) for k, v in rf_model.RestoreFormer().state_dict().items()}
        built_rr = {k: tuple(v.shape) for k, v in rr_model.RRDBNet().state_dict().items()}
    layout = rf_model.official_layout()
    assert len(layout) == 405 and len(rf_model.UNUSED_KEYS) == 6
    assert built_rf == {k: s for k, s in layout.items() if k not in rf_model.UNUSED_KEYS}
    assert built_rr == rr_model.official_layout() and len(built_rr) == 702


@pytest.mark.parametrize("name", synthetic.FILES)
def test_synthetic_files_follow_the_rule(restorer_checkpoints, name):
    path = restorer_checkpoints / name
    top = torch.load(str(path), map_location="cpu", weights_only=True)
    assert list(top) == ["params_ema"]
    assert synthetic.read_back_digest(path, name) == restorers_layout()[name]["digest"]
    if MANIFEST.is_file():  # the reference writer's container, byte for byte (same size)
        assert path.stat().st_size == json.loads(MANIFEST.read_text())["files"][name]["synthetic_file_bytes"]


def test_synthetic_rule_ranges(restoreformer, rrdb):
    last = rrdb.conv_last
    assert bool(((last.bias >= 0.4) & (last.bias <= 0.6)).all())
    assert float(last.weight.abs().max()) <= 0.7 * math.sqrt(3 / (64 * 9))
    assert float(rrdb.conv_body.weight.abs().max()) <= 0.02 * math.sqrt(3 / (64 * 9))
    codebook = restoreformer.quantize.embedding.weight
    assert codebook.shape == (1024, 256) and float(codebook.abs().max()) <= math.sqrt(3 / 256)
    gamma = restoreformer.decoder.norm_out.weight
    assert bool(((gamma >= 0.8) & (gamma <= 1.2)).all())


def test_params_fallback_file_loads(tmp_path):
    path = tmp_path / rr_model.FILE_NAME
    synthetic.write_restorer(path, rr_model.FILE_NAME, top_key="params")
    assert list(torch.load(str(path), map_location="cpu", weights_only=True)) == ["params"]
    assert synthetic.read_back_digest(path, rr_model.FILE_NAME) == restorers_layout()[rr_model.FILE_NAME]["digest"]
    assert len(rr_model.read_rrdbnet_state(path)) == 702


def test_ensure_keeps_an_existing_file(tmp_path):
    (tmp_path / rf_model.FILE_NAME).write_bytes(b"user file")
    assert synthetic.ensure_restorer(tmp_path, rf_model.FILE_NAME).read_bytes() == b"user file"


# ---- loader errors -------------------------------------------------------------------------------


def _error(load, path) -> str:
    with pytest.raises(RestorerWeightsError) as info:
        load(path)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    with pytest.raises(RestorerWeightsMissing, match=r"RestoreFormer\.pth not found"):
        rf_model.load_restoreformer(tmp_path / "RestoreFormer.pth")


def test_truncated_file(tmp_path, rr_path):
    path = tmp_path / rr_model.FILE_NAME
    path.write_bytes(rr_path.read_bytes()[: 20 * 2**20])
    assert "truncated" in _error(rr_model.load_rrdbnet, path)


def test_renamed_keys_are_named(tmp_path, rrdb):
    state = OrderedDict((k.replace("conv_hr.", "conv_hr2."), v) for k, v in rrdb.state_dict().items())
    path = tmp_path / "renamed.pth"
    torch.save({"params_ema": state}, path)
    message = _error(rr_model.load_rrdbnet, path)
    assert "[params_ema]" in message and "missing: conv_hr.bias, conv_hr.weight" in message
    assert "unexpected: conv_hr2.bias, conv_hr2.weight" in message


def test_wrong_kind_files_say_what_they_look_like(tmp_path, rr_path, rrdb):
    assert "it looks like RealESRGAN_x2plus.pth" in _error(rf_model.load_restoreformer, rr_path)
    x4 = dict(rrdb.state_dict())
    x4["conv_first.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "x4.pth"
    torch.save({"params_ema": x4}, path)
    message = _error(rr_model.load_rrdbnet, path)
    assert "wrong shape: conv_first.weight (64, 3, 3, 3) != (64, 12, 3, 3)" in message
    assert "scale 4 (RealESRGAN_x4plus.pth)" in message
    flat = tmp_path / "flat.pth"
    torch.save({"conv_first.weight": torch.zeros(64, 12, 3, 3)}, flat)
    assert "no 'params_ema' or 'params' state dict" in _error(rr_model.load_rrdbnet, flat)


# ---- golden parity -------------------------------------------------------------------------------


@pytest.mark.slow  # test_parity runs every golden case
@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_case(path, restorer_checkpoints):
    case = Case.open(path)
    with torch.inference_mode():
        checks = RUNNERS[case.meta["case_kind"]](case, Context(restorer_checkpoints))
    assert checks
    failing = [f"{c.name}: {c.error:.3g} > {c.tolerance:.3g} {c.detail}" for c in checks if not c.passed]
    assert not failing, "; ".join(failing)


def test_visible_golden_kinds_present():
    if not CASES:
        pytest.skip(f"reference golden folder {golden_dir()} not present")
    assert {Case.open(p).meta["case_kind"] for p in CASES} == set(KINDS)


# ---- bf16 ----------------------------------------------------------------------------------------


def test_restoreformer_bf16_keeps_codes_and_psnr(restoreformer):
    case = _case_of_kind("restoreformer")
    crop = case.tensor("input.cropped_face_bgr_u8")
    x = preprocess_bgr_u8(crop.reshape(-1, *crop.shape[-3:]))
    reference = case.tensor("out.image").reshape(x.shape)  # the fp32 golden image
    bf16 = restoreformer.restore(x, "bf16")
    assert bf16.dtype == torch.float32 and bf16.shape == x.shape
    # Decoder-only bf16: 51.5 dB measured (upstream: 51.7 dB); all-bf16 autocast gives ~35 dB (codes change).
    scaled = lambda y: (y.clamp(-1, 1) + 1) / 2  # noqa: E731
    assert _psnr(scaled(bf16), scaled(reference), 1.0) > 49.0
    faces = postprocess_to_bgr_u8(bf16).numpy()
    assert _psnr(faces, postprocess_to_bgr_u8(reference).numpy(), 255.0) > 47.0  # 50.2 dB measured


def test_rrdbnet_bf16_psnr(rrdb):
    case = _case_of_kind("rrdbnet_x2plus")
    u8 = case.tensor("input.image_rgb_u8")
    x = (u8.reshape(-1, *u8.shape[-3:]).float() / torch.tensor(255.0)).permute(0, 3, 1, 2).contiguous()
    out = rrdb.run(x, "bf16")
    assert out.dtype == torch.float32
    expected = case.tensor("out.output").reshape(out.shape)
    assert _psnr(out.clamp(0, 1), expected.clamp(0, 1), 1.0) > 50.0  # 53.1 dB measured (upstream: 53.0)


def test_tiled_bf16_psnr(rrdb):
    case = _case_of_kind("realesrganer_tile")
    m = case.meta
    up = rr_model.RealESRGANer(rrdb, m["tile"], m["tile_pad"], m["pre_pad"], precision="bf16")
    image = up.enhance(case.array("input.image_bgr_u8"), m["outscale"]).image
    assert _psnr(image, case.array("out.output_bgr_u8"), 255.0) > 47.0  # 49.9 dB measured (upstream: 50.0)


# ---- RealESRGANer arithmetic ---------------------------------------------------------------------


def test_tile_boxes_of_a_512_frame_at_sadtalker_settings():
    tiles = rr_model.tiles(512, 512, 400, 10)
    inputs = [(t.py1 - t.py0, t.px1 - t.px0) for t in tiles]
    assert inputs == [(410, 410), (410, 122), (122, 410), (122, 122)]  # restorers spec 4.3
    assert [t.crop[0] for t in tiles] == [0, 0, 20, 20] and [t.crop[2] for t in tiles] == [0, 20, 0, 20]
    assert [t.output_box for t in tiles][-1] == (800, 1024, 800, 1024)
    assert rr_model.tiles(256, 256, 400, 10)[0].row() == rr_model.tiles(256, 256, 0, 10)[0].row()


@pytest.fixture(scope="module")
def small_frame() -> np.ndarray:
    g = torch.Generator().manual_seed(3)
    img = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(27, 37), mode="bicubic", align_corners=False)
    return (img.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # odd size on purpose


def test_tiling_agrees_with_one_forward(rrdb, small_frame):
    whole = rr_model.RealESRGANer(rrdb, tile=0, tile_pad=0, pre_pad=0).enhance(small_frame)
    assert whole.image.shape == (54, 74, 3) and len(whole.tiles) == 1  # mod pad cut again
    # A tile_pad covering the whole (mod-padded) frame gives every tile the full image: bit-identical.
    covering = rr_model.RealESRGANer(rrdb, tile=12, tile_pad=40, pre_pad=0).enhance(small_frame)
    assert len(covering.tiles) == 12 and np.array_equal(covering.float_bgr, whole.float_bgr)
    # Smaller tile pads change the result more (each tile's convs zero-pad at its edge): measured max abs 0.009
    # with pad 8, 0.16 with pad 4 on these 12 px tiles.
    diffs = [np.abs(rr_model.RealESRGANer(rrdb, tile=12, tile_pad=p, pre_pad=0).enhance(small_frame).float_bgr
                    - whole.float_bgr) for p in (8, 4)]
    assert 0 < diffs[0].max() < 0.02 and diffs[0].mean() < 1e-3
    assert diffs[1].mean() > 5 * diffs[0].mean()
    # pre_pad is cut again too; an odd tile size cannot be unshuffled (upstream asserts).
    assert rr_model.RealESRGANer(rrdb, tile=0, tile_pad=0, pre_pad=3).enhance(small_frame).image.shape == (54, 74, 3)
    with pytest.raises(ValueError, match="even H and W"):
        rr_model.RealESRGANer(rrdb, tile=11, tile_pad=2, pre_pad=0).enhance(small_frame)


def test_background_upsampler_without_faces_is_the_realesrgan_image(rrdb, small_frame):
    background = BackgroundUpsampler(net=rrdb, tile=0)
    faces = DetectedFaces(np.zeros((0, 5, 2), np.float32), np.zeros((0, 5), np.float32))
    out = enhance_detected(small_frame, faces, lambda c: c, lambda c: c, 2, background=background)
    assert np.array_equal(out, background.upsample(small_frame))
    half = enhance_detected(small_frame, faces, lambda c: c, lambda c: c, 1, background=background)
    assert half.shape == small_frame.shape  # upscale 1: the x2 output resized back (LANCZOS4)


# ---- RestoreFormer pieces ------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_phase_upsample_conv_equals_nearest_then_conv(channels_last):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, 9, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    direct = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    kernels = rf_model._phase_kernels(w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        kernels = kernels.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(rf_model._upsample_conv(x, kernels, b.repeat(4)), direct, atol=1e-12, rtol=0)


def test_quantizer_takes_the_first_of_equal_codes():
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    fake = SimpleNamespace(quantize=SimpleNamespace(embedding=SimpleNamespace(weight=codes)))
    z = torch.tensor([[0.1, 0.9], [0.8, -0.1]]).t().reshape(1, 2, 1, 2)  # positions (0.1, 0.9), (0.8, -0.1)
    q = rf_model.RestoreFormer.quantize_codes(fake, z)
    assert q.indices.tolist() == [[1, 0]] and q.gap[0, 0] == 0  # rows 1 and 2 tie: the first wins
    torch.testing.assert_close(q.z_q, codes[[1, 0]].t().reshape(1, 2, 1, 2))


def test_restore_rejects_bad_calls(restoreformer):
    with pytest.raises(ValueError, match=r"expects \(B, 3, 512, 512\) images, got \(1, 3, 256, 256\)"):
        restoreformer.restore(torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        restoreformer.restore(torch.zeros(1, 3, 512, 512), "fp16")
    assert rf_model.restore_bgr_u8(restoreformer, np.zeros((0, 512, 512, 3), np.uint8)).shape == (0, 512, 512, 3)
