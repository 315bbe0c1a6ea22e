"""Source preprocessing: crop geometry (incl. the shrink path), 5-point alignment, face recon batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xtalker.models.face_3drecon import ReconNet, split_coeff
from xtalker.preprocess.align import (
    LM3D_STD_5,
    align_face,
    five_points,
    flip_y,
    from_aligned,
    pos_fit,
    recon_input,
    source_coefficients,
    to_aligned,
)
from xtalker.preprocess.crop import apply_crop, crop_geometry, crop_source


def face_landmarks(cx: float, cy: float, eye_dist: float, angle_deg: float = 0.0) -> np.ndarray:
    """A plausible 68-point face (x right, y down): unit layout with eyes 1 apart, rotated and scaled."""
    t = np.linspace(-1.0, 1.0, 17)
    jaw = np.stack([1.1 * t, 0.2 + 1.0 * (1 - t**2) ** 0.5], axis=1)
    brows = np.stack([np.r_[np.linspace(-0.85, -0.15, 5), np.linspace(0.15, 0.85, 5)], np.full(10, -0.35)], axis=1)
    nose = np.r_[np.stack([np.zeros(4), np.linspace(-0.1, 0.45, 4)], axis=1),
                 np.stack([np.linspace(-0.2, 0.2, 5), np.full(5, 0.55)], axis=1)]
    ring = np.array([[-0.25, 0.0], [-0.1, -0.07], [0.1, -0.07], [0.25, 0.0], [0.1, 0.07], [-0.1, 0.07]])
    eyes = np.r_[ring + [-0.5, 0.0], ring + [0.5, 0.0]]
    a12 = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    a8 = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    outer = np.stack([-0.4 * np.cos(a12), 0.95 + 0.15 * np.sin(a12)], axis=1)  # 48 and 54 are the corners
    inner = np.stack([-0.3 * np.cos(a8), 0.95 + 0.07 * np.sin(a8)], axis=1)
    unit = np.r_[jaw, brows, nose, eyes, outer, inner]
    assert unit.shape == (68, 2)
    r = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    return unit @ rot.T * eye_dist + [cx, cy]


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- crop


def test_shrink_path_equals_geometry_on_the_shrunk_image():
    # Eyes 600 px apart -> face quad 2400 px -> shrink 2; 4001x3001 rounds half to even -> 2000x1500.
    lm = face_landmarks(2100.0, 1400.0, 600.0, angle_deg=7.0)
    big = crop_geometry(lm, (4001, 3001))
    assert big.shrink == 2
    assert big.rsize == (2000, 1500)
    # Halving is exact in binary, so the shrink path must give the very numbers of the small image.
    small = crop_geometry(lm / 2, (2000, 1500))
    assert small.shrink == 1
    assert (big.rsize, big.crop, big.quad) == (small.rsize, small.crop, small.quad)


def test_shrink_path_crop_and_paste_box_are_consistent():
    lm = face_landmarks(1500.0, 1300.0, 600.0)
    image = np.zeros((2600, 3000, 3), np.uint8)
    result = crop_source(image, lm, "crop", pic_size=256)
    geo = result.geometry
    assert geo is not None and geo.shrink == 2 and geo.rsize == (1500, 1300)
    clx, cly, crx, cry = geo.crop
    assert 0 <= clx < crx <= geo.rsize[0] and 0 <= cly < cry <= geo.rsize[1]
    oy1, oy2, ox1, ox2 = result.info.paste_box()
    assert clx <= ox1 < ox2 <= crx and cly <= oy1 < oy2 <= cry
    assert result.cropped.shape == (oy2 - oy1, ox2 - ox1, 3)
    assert result.info.size == (ox2 - ox1, oy2 - oy1)
    assert result.image.shape == (256, 256, 3)


def test_shrink_path_resizes_the_image_bilinearly_to_rsize():
    lm = face_landmarks(1500.0, 1300.0, 600.0)
    image = np.zeros((2600, 3000, 3), np.uint8)
    image[1290:1310, 1400:1600] = 200  # a bar through the face centre; survives the 2x shrink
    geo = crop_geometry(lm, (3000, 2600))
    cropped = apply_crop(image, geo)
    clx, cly, _, _ = geo.crop
    lx, ly, _, _ = geo.quad_int
    rows = np.nonzero(cropped[..., 0].max(axis=1) > 100)[0] + cly + ly
    assert rows.min() >= 1290 // 2 - 1 and rows.max() <= 1310 // 2 + 1


def test_extended_crop_contains_the_tight_crop():
    lm = face_landmarks(330.0, 260.0, 90.0, angle_deg=-12.0)
    image = noise_image(560, 720)
    tight = crop_source(image, lm, "crop", pic_size=512)
    ext = crop_source(image, lm, "extcrop", pic_size=512)
    assert tight.info == ext.info
    lx, ly, _, _ = ext.geometry.quad_int
    h, w = tight.cropped.shape[:2]
    assert ext.cropped.shape[0] > h and ext.cropped.shape[1] > w
    np.testing.assert_array_equal(ext.cropped[ly:ly + h, lx:lx + w], tight.cropped)
    assert tight.image.shape == ext.image.shape == (512, 512, 3)
    oy1, oy2, ox1, ox2 = ext.info.paste_box(extended=True)
    clx, cly, crx, cry = ext.geometry.crop
    assert (oy1, oy2, ox1, ox2) == (cly, cry, clx, crx)


def test_bottom_edge_is_clipped_with_the_width():
    # A face low in a tall, narrow image: upstream clips ry with the width, not the height.
    lm = face_landmarks(100.0, 450.0, 60.0)
    geo = crop_geometry(lm, (200, 700))
    clx, cly, crx, cry = geo.crop
    assert cry - cly > 260  # the quad bottom lies well below row 200 of the crop ...
    assert geo.quad[3] == 200.0  # ... but is clipped to the image width
    cropped = apply_crop(noise_image(700, 200), geo)
    assert cropped.shape[0] == 200 - geo.quad_int[1]


def test_resize_mode_keeps_the_whole_image():
    image = noise_image(300, 400)
    result = crop_source(image, None, "resize", pic_size=256)
    assert result.geometry is None
    assert result.info.size == (400, 300)
    assert result.info.paste_box() == (0, 300, 0, 400)
    assert result.image.shape == (256, 256, 3)


def test_unknown_mode_and_missing_landmarks_are_clear_errors():
    image = noise_image(64, 64)
    with pytest.raises(ValueError, match="unknown preprocess mode"):
        crop_source(image, None, "zoom")
    with pytest.raises(ValueError, match="needs 68 face landmarks"):
        crop_source(image, None, "crop")


# ----------------------------------------------------------------------------------------- alignment


def test_pos_recovers_a_known_similarity_transform():
    lm3d = LM3D_STD_5.astype(np.float64)
    s, t = 83.5, np.array([121.25, 97.75])
    a, b = np.deg2rad(10.0), np.deg2rad(-20.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    proj = s * (rz @ ry)[:2]
    lm5p = lm3d @ proj.T + t
    t_fit, s_fit = pos_fit(lm5p, lm3d)
    np.testing.assert_allclose(t_fit, t, rtol=0, atol=1e-10)
    assert s_fit == pytest.approx(s, rel=1e-12)


def test_five_points_and_flip():
    lm = face_landmarks(128.0, 120.0, 50.0)
    flipped = flip_y(lm, 256)
    assert flipped.dtype == np.float32
    np.testing.assert_allclose(flipped[:, 1], 255 - lm[:, 1], atol=1e-4)
    p5 = five_points(flipped)
    np.testing.assert_array_equal(p5[2], flipped[30])
    np.testing.assert_allclose(p5[0], (flipped[36] + flipped[39]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(p5[3:], flipped[[48, 54]])


def test_alignment_of_landmarks_round_trips():
    lm = face_landmarks(170.0, 110.0, 48.0, angle_deg=5.0)
    al = align_face(noise_image(220, 300), lm)
    assert al.image.shape == (224, 224, 3) and al.image.dtype == np.uint8
    np.testing.assert_allclose(to_aligned(al.lm68_flipped, al.trans_params), al.lm68_aligned, rtol=0, atol=1e-12)
    back = from_aligned(al.lm68_aligned, al.trans_params)
    np.testing.assert_allclose(back, al.lm68_flipped, rtol=0, atol=1e-9)


def test_aligned_landmark_lands_on_its_pixel():
    # A bright spot at the nose tip must appear where the aligned nose landmark says (y up in the crop).
    lm = face_landmarks(150.0, 100.0, 55.0)
    image = np.zeros((220, 300, 3), np.uint8)
    x, y = np.rint(lm[30]).astype(int)
    image[y - 2:y + 3, x - 2:x + 3] = 255
    lm[30] = [x, y]
    al = align_face(image, lm)
    rows, cols = np.nonzero(al.image[..., 0] > 128)
    ax, ay = al.lm68_aligned[30]
    assert abs(cols.mean() - ax) < 1.5
    assert abs(rows.mean() - (223 - ay)) < 1.5


def test_face_near_the_corner_is_zero_filled_outside_the_image():
    # The 224 window around a face in the top-left corner reaches past the image; PIL pads with zeros.
    lm = face_landmarks(30.0, 25.0, 40.0)
    al = align_face(np.full((300, 300, 3), 200, np.uint8), lm)
    assert al.image.shape == (224, 224, 3)
    assert (al.image[:20, :20] == 0).all()
    assert (al.image[-20:, -20:] == 200).all()


def test_recon_input_divides_in_float64():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = recon_input([u8, u8[::-1]])
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    np.testing.assert_array_equal(x[0, 1].numpy(), (u8[..., 1] / 255.0).astype(np.float32))


# --------------------------------------------------------------------------------------- recon net


@pytest.fixture(scope="module")
def recon_net(synthetic_checkpoints) -> ReconNet:
    from xtalker.checkpoints import load_network

    return load_network("face_3drecon", synthetic_checkpoints / "SadTalker_V0.0.2_256.safetensors")


def test_recon_net_batch_of_two_equals_single_runs(recon_net):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 160, 160, generator=gen)  # any size works (global pooling); smaller is faster
    with torch.inference_mode():
        both = recon_net(x)
        singles = torch.cat([recon_net(x[:1]), recon_net(x[1:])])
    assert both.shape == (2, 257)
    torch.testing.assert_close(both, singles, rtol=0, atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-3)
    parts = split_coeff(both)
    assert [parts[k].shape[1] for k in ("id", "exp", "tex", "angle", "gamma", "trans")] == [80, 64, 80, 3, 27, 3]


def test_source_coefficients_for_images_of_different_sizes(recon_net):
    images = [noise_image(256, 256, 1), noise_image(220, 300, 2)]
    lms = [face_landmarks(128.0, 120.0, 50.0), face_landmarks(150.0, 100.0, 45.0, angle_deg=8.0)]
    res = source_coefficients(recon_net, images, lms)
    assert res.coeff_3dmm.shape == (2, 73) and res.coeff_3dmm.dtype == np.float32
    np.testing.assert_array_equal(res.coeff_3dmm[:, :64], res.full_3dmm[:, 80:144])
    np.testing.assert_array_equal(res.coeff_3dmm[:, 64:67], res.full_3dmm[:, 224:227])
    np.testing.assert_array_equal(res.coeff_3dmm[:, 67:70], res.full_3dmm[:, 254:257])
    for i, al in enumerate(res.alignments):
        np.testing.assert_array_equal(res.coeff_3dmm[i, 70:], al.trans_params[2:].astype(np.float32))
    one = source_coefficients(recon_net, images[1:], lms[1:])
    np.testing.assert_allclose(one.coeff_3dmm[0], res.coeff_3dmm[1], rtol=0, atol=1e-5)
