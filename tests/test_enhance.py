"""Face enhancers: lightweight sharpening, GFPGAN on source-aligned crops, missing weights, the post-render chain."""

from __future__ import annotations

import numpy as np
import pytest

from xtalker.finish import Finisher, FinishSettings, PasteTarget, check_background, check_enhancer, check_weights
from xtalker.finish.enhance import (
    DetectingEnhancer,
    EnhancerWeightsMissing,
    Restorer,
    Sharpener,
    SourceAlignedEnhancer,
    make_enhancer,
    noise_seed,
    sharpen,
    template_mask,
)
from xtalker.finish.restore import FFHQ_TEMPLATE_512, MASK_BORDER, upscale_background


def test_sharpen_keeps_flat_areas_and_steepens_edges():
    flat = np.full((32, 32, 3), 120, np.uint8)
    assert np.array_equal(sharpen(flat), flat)
    step = np.zeros((32, 32, 3), np.uint8)
    step[:, 16:] = 200
    out = sharpen(step).astype(int)
    assert out[0, 15, 0] == 0 and out[0, 16, 0] > 200  # overshoot on the bright side, clipped on the dark
    assert out[0, 0, 0] == 0 and out[0, 31, 0] == 200


def test_enhancer_names():
    assert make_enhancer(None) is None
    assert isinstance(make_enhancer("Lightweight"), Sharpener)
    assert check_enhancer("GFPGAN") == "gfpgan"
    assert check_enhancer("RestoreFormer") == "restoreformer"
    with pytest.raises(ValueError, match="must be one of gfpgan, RestoreFormer, lightweight or none, got 'codeformer'"):
        check_enhancer("codeformer")
    assert check_background(None, None) is None and check_background("RealESRGAN", "RestoreFormer") == "realesrgan"
    with pytest.raises(ValueError, match="add --enhancer gfpgan or --enhancer RestoreFormer"):
        check_background("realesrgan", "lightweight")
    with pytest.raises(ValueError, match="must be realesrgan, got 'esrgan'"):
        check_background("esrgan", "gfpgan")


def test_missing_weights_name_the_file_the_folders_and_the_download_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_weights("lightweight", "source", tmp_path) == {}
    with pytest.raises(EnhancerWeightsMissing) as err:
        check_weights("gfpgan", "source", tmp_path / "ckpt")
    message = str(err.value)
    assert "GFPGANv1.4.pth" in message and str(tmp_path / "ckpt") in message and "gfpgan/weights" in message
    assert "scripts/download_models.sh" in message and "\n" not in message
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "GFPGANv1.4.pth").write_bytes(b"x")
    assert check_weights("gfpgan", "source", tmp_path / "ckpt")["GFPGANv1.4.pth"] == tmp_path / "ckpt" / "GFPGANv1.4.pth"
    with pytest.raises(EnhancerWeightsMissing, match=r"--enhance_align detect needs detection_Resnet50_Final\.pth"):
        check_weights("gfpgan", "detect", tmp_path / "ckpt")
    # upstream's folder is searched too
    (tmp_path / "gfpgan" / "weights").mkdir(parents=True)
    for name in ("detection_Resnet50_Final.pth", "parsing_parsenet.pth"):
        (tmp_path / "gfpgan" / "weights" / name).write_bytes(b"x")
    assert len(check_weights("gfpgan", "detect", tmp_path / "ckpt")) == 3
    with pytest.raises(EnhancerWeightsMissing, match=r"^--enhancer RestoreFormer needs RestoreFormer\.pth"):
        check_weights("RestoreFormer", "source", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "RestoreFormer.pth").write_bytes(b"x")
    with pytest.raises(EnhancerWeightsMissing, match=r"^--background_enhancer realesrgan needs RealESRGAN_x2plus\.pth"):
        check_weights("RestoreFormer", "detect", tmp_path / "ckpt", "realesrgan")
    assert set(check_weights("RestoreFormer", "source", tmp_path / "ckpt")) == {"RestoreFormer.pth"}


def test_noise_seeds_differ_per_frame_and_face_and_are_stable():
    seeds = {noise_seed(7, f, k) for f in range(20) for k in range(3)}
    assert len(seeds) == 60 and all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(7, 3, 1) == noise_seed(7, 3, 1) != noise_seed(8, 3, 1)


def test_template_mask_covers_the_face_and_leaves_a_zero_frame():
    mask = template_mask()
    assert mask.shape == (512, 512) and mask.min() == 0.0 and mask.max() <= 1.0
    assert not mask[:MASK_BORDER].any() and not mask[:, -MASK_BORDER:].any()
    for x, y in FFHQ_TEMPLATE_512.round().astype(int):  # eyes, nose, mouth corners are fully pasted
        assert mask[y, x] > 0.99
    assert mask[30, 30] == 0.0


@pytest.fixture(scope="module")
def restorer(aux_checkpoints) -> Restorer:
    return Restorer(aux_checkpoints / "GFPGANv1.4.pth", "bf16", seed=5)


def test_restorer_noise_follows_the_frame_not_the_batch(restorer):
    crops = np.random.default_rng(0).integers(0, 256, (2, 512, 512, 3), dtype=np.uint8)
    both = restorer(crops, [(10, 0), (11, 0)])
    assert both.shape == (2, 512, 512, 3) and both.dtype == np.uint8
    alone = restorer(crops[1:], [(11, 0)])
    assert np.abs(both[1].astype(int) - alone[0].astype(int)).max() <= 1
    other_frame = restorer(crops[1:], [(12, 0)])
    assert np.abs(other_frame[0].astype(int) - alone[0].astype(int)).mean() > 1


def test_source_aligned_enhancer_doubles_the_frame_and_keeps_the_background(restorer):
    frame_wh = (256, 240)
    lm5 = (FFHQ_TEMPLATE_512 / 2).astype(np.float32)  # a face exactly where the template puts it, half size
    enhancer = SourceAlignedEnhancer(restorer, lm5, frame_wh)
    assert np.allclose(enhancer.affine, [[2, 0, 0], [0, 2, 0]], atol=1e-6)
    frames = np.random.default_rng(1).integers(0, 256, (2, 240, 256, 3), dtype=np.uint8)
    out = enhancer(frames, first=0)
    assert out.shape == (2, 480, 512, 3)
    background = upscale_background(np.ascontiguousarray(frames[0, :, :, ::-1]), (512, 480))[..., ::-1]
    outside = enhancer.soft_mask == 0
    assert np.array_equal(out[0][outside], background[outside])
    inside = enhancer.soft_mask > 0.99
    assert np.abs(out[0][inside].astype(int) - background[inside].astype(int)).mean() > 10
    with pytest.raises(ValueError, match="alignment is for 256x240"):
        enhancer(frames[:, :200], first=0)


def _finisher(ckpt, part: str, enhancer: str | None, align: str = "source", paste: bool = False) -> Finisher:
    target = PasteTarget(np.zeros((300, 400, 3), np.uint8), (50, 250, 100, 300)) if paste else None
    settings = FinishSettings(enhancer=enhancer, enhance_align=align, checkpoint_dir=ckpt, precision="bf16")
    points = (FFHQ_TEMPLATE_512 / 2).astype(np.float32)
    return Finisher(settings, 256, (200, 200), target, points, seed=1, part=part)


def test_chain_splits_after_the_heavy_enhancer(aux_checkpoints):
    names = {part: [n for n, _ in _finisher(aux_checkpoints, part, "gfpgan", paste=True).stages]
             for part in ("all", "worker", "merge")}
    assert names == {"all": ["render", "paste", "enhance", "paste"], "worker": ["render", "paste", "enhance"],
                     "merge": ["paste"]}
    detect = _finisher(aux_checkpoints, "worker", "gfpgan", align="detect", paste=True)
    assert [n for n, _ in detect.stages] == ["render", "paste", "enhance"]
    assert _finisher(aux_checkpoints, "merge", "gfpgan", align="detect", paste=True).stages == []
    # a light enhancer leaves everything to the merge
    assert _finisher(aux_checkpoints, "worker", "lightweight", paste=True).stages == []
    assert [n for n, _ in _finisher(aux_checkpoints, "merge", "lightweight", paste=True).stages] == [
        "render", "enhance", "paste"]


def test_int8_runs_parse_in_bf16(aux_checkpoints, restorer):
    # ParseNet has no int8 form: an int8 run's detect path parses as bf16 does (it used to crash).
    faces = np.random.default_rng(3).integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    files = (aux_checkpoints / "detection_Resnet50_Final.pth", aux_checkpoints / "parsing_parsenet.pth")
    parsed = {precision: DetectingEnhancer(restorer, *files, precision=precision).parse(faces)
              for precision in ("int8", "bf16")}
    assert parsed["int8"].shape == (1, 512, 512) and np.array_equal(parsed["int8"], parsed["bf16"])
