"""Attention PNGs: slices through the mask (or the body), the map inside the body, a visible contour."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from smartformer.analysis.overlay import body_mask, save_overlay_png, slice_centre


def _ct_with_hot_air(shape=(48, 40, 32)):
    """A body box in air, a small lesion off-centre, and a map whose global maximum lies in the air."""
    image = np.full(shape, -1000.0)
    image[8:40, 6:34, 4:28] = 40.0
    mask = np.zeros(shape, dtype=bool)
    mask[28:33, 10:15, 18:23] = True
    heat = np.full(shape, 0.2)
    heat[1, 1, 1] = 5.0  # the air corner the shipped model likes
    heat[mask] = 0.8
    return image, heat, mask


def test_slices_go_through_the_mask_centroid_else_the_body_centre():
    image, heat, mask = _ct_with_hot_air()
    assert slice_centre(image, mask) == (30, 12, 20)
    assert slice_centre(image) == (24, 20, 16)  # the body's centre, not the map's maximum in air
    assert slice_centre(image, np.zeros_like(mask)) == (24, 20, 16)


def test_body_of_a_windowed_volume_uses_otsu():
    image, _, _ = _ct_with_hot_air()
    windowed = np.clip((image + 1000.0) / 2000.0, 0, 1)
    np.testing.assert_array_equal(body_mask(windowed), body_mask(image))


def test_png_shows_the_mask_contour_and_no_map_in_the_air(tmp_path):
    image, heat, mask = _ct_with_hot_air()
    rgb = mpimg.imread(save_overlay_png(image, heat, tmp_path / "a.png", title="t", mask=mask))[..., :3]
    lime = (rgb[..., 1] > 0.8) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)
    assert lime.sum() > 20, "the mask contour is drawn"
    # the top-left corner of the axial panel is air: grey (the CT), not a colour of the map
    height, width = rgb.shape[:2]
    axial = rgb[int(0.3 * height) : int(0.75 * height), int(0.02 * width) : int(0.3 * width)]
    dark = axial[axial.max(axis=-1) < 0.15]
    assert len(dark) > 1000 and (np.ptp(dark, axis=-1) < 0.03).mean() > 0.95


@pytest.mark.usefixtures("one_thread")
def test_uniform_normalisation_means_one_per_window():
    """Each window's map is relative to a uniform map: a single window averages 1 (no per-window stretch)."""
    from monai.data import MetaTensor

    from smartformer.analysis.attention import attention_volume
    from smartformer.models.smartformer import SMARTFormer

    torch.manual_seed(0)
    model = SMARTFormer.from_preset("tiny")
    volume = MetaTensor(torch.rand(1, 32, 32, 32) * 1000 - 500, affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))
    result = attention_volume(model, volume, spacing=2.0, roi=32)
    assert result.mean.mean() == pytest.approx(1.0, rel=0.05)
    stretched = attention_volume(model, volume, spacing=2.0, roi=32, normalize="max")
    assert stretched.mean.max() == pytest.approx(1.0, rel=0.05)


def test_orientation_letters_only_where_the_orientation_is_known(tmp_path):
    """Letters with an affine (or when asked); none for arrays of unknown orientation (flipped training views)."""
    image, heat, mask = _ct_with_hot_air()
    plain = mpimg.imread(save_overlay_png(image, heat, tmp_path / "plain.png"))
    lettered = mpimg.imread(save_overlay_png(image, heat, tmp_path / "ras.png", affine=np.eye(4)))

    def yellow(rgb):
        return int(((rgb[..., 0] > 0.8) & (rgb[..., 1] > 0.8) & (rgb[..., 2] < 0.3)).sum())

    assert yellow(lettered) > 50 and yellow(plain) < yellow(lettered) / 5


def test_slice_positions_are_world_mm_with_an_affine():
    """With an affine the titles give the slice's world position (as a viewer shows it), for any storage order."""
    from smartformer.analysis.overlay import ras_affine, slice_titles, to_ras

    image, _, mask = _ct_with_hot_air()
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])
    lps[:3, 3] = (100.0, 50.0, -10.0)
    stored = (30, 12, 20)  # the mask's centroid in stored voxels
    x, y, z = (lps @ np.array([*stored, 1.0]))[:3]  # 40, 26, 50 mm
    ras_mask, _ = to_ras(mask, lps)
    centre = slice_centre(image, ras_mask)
    assert slice_titles(centre, ras_affine(lps, mask.shape)) == [
        f"axial (S {z:.1f} mm)",
        f"coronal (A {y:.1f} mm)",
        f"sagittal (R {x:.1f} mm)",
    ]
    assert slice_titles(centre) == [f"axial (z={centre[2]})", f"coronal (y={centre[1]})", f"sagittal (x={centre[0]})"]
