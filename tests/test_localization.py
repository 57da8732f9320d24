"""Localization metrics on synthetic maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from smartformer.analysis import localization as L


def _scene(shape=(40, 40, 30)):
    """A body (40 HU) inside air, a lesion ball off-centre, and the CT."""
    ct = np.full(shape, -1000.0)
    ct[4:-4, 4:-4, 3:-3] = 40.0
    idx = np.indices(shape)
    lesion = ((idx[0] - 28) ** 2 + (idx[1] - 12) ** 2 + (idx[2] - 10) ** 2) <= 16
    return ct, lesion


def test_smoothed_mask_scores_near_perfect():
    ct, lesion = _scene()
    score = ndimage.gaussian_filter(lesion.astype(float), 1.0)
    m = L.localization_metrics(score, lesion, ct, spacing=(2.0, 2.0, 2.0))
    assert m["auroc"] > 0.99
    assert m["pointing"] == 1.0
    assert m["dice_topk"] > 0.0 and m["dice_otsu"] > 0.7
    assert m["bbox_iou"] > 0.4  # the Otsu component includes some of the blur's halo
    assert m["enrichment"] > 10
    assert m["energy"] > 0.5
    assert set(m) == set(L.METRICS)


def test_the_mask_itself_is_perfect():
    ct, lesion = _scene()
    m = L.localization_metrics(lesion.astype(float), lesion, ct, spacing=(1.0, 1.0, 1.0))
    assert m["auroc"] == 1.0 and m["pointing"] == 1.0
    assert m["dice_otsu"] == 1.0 and m["iou_otsu"] == 1.0 and m["bbox_iou"] == 1.0 and m["energy"] == 1.0


def test_uniform_map_scores_chance():
    ct, lesion = _scene()
    m = L.localization_metrics(np.ones(ct.shape), lesion, ct, spacing=(1.0, 1.0, 1.0))
    assert m["auroc"] == pytest.approx(0.5)
    assert m["enrichment"] == pytest.approx(1.0)
    assert m["dice_otsu"] == 0.0 and m["bbox_iou"] == 0.0


def test_metrics_ignore_air_outside_the_body():
    """A map bright everywhere in air but flat in the body is no better than chance inside the body."""
    ct, lesion = _scene()
    score = np.where(ct > -500, 0.0, 1.0)
    assert L.auroc(score, lesion, L.body_region(ct, lesion)) == pytest.approx(0.5)
    assert L.auroc(score, lesion) < 0.5  # over the whole field of view it would be rated (worse than) chance


def test_pointing_game_tolerance_in_mm():
    lesion = np.zeros((30, 10, 10), bool)
    lesion[5, 5, 5] = True
    score = np.zeros(lesion.shape)
    score[8, 5, 5] = 1.0  # 3 voxels away along x
    assert L.pointing_game(score, lesion, spacing=(2.0, 1.0, 1.0), tolerance_mm=6.0)
    assert not L.pointing_game(score, lesion, spacing=(2.0, 1.0, 1.0), tolerance_mm=5.0)
    assert not L.pointing_game(score, lesion, spacing=(3.0, 1.0, 1.0), tolerance_mm=6.0)
    region = np.ones(lesion.shape, bool)
    region[8, 5, 5] = False  # the peak is outside the body: the next best voxel counts
    score[5, 5, 5] = 0.5
    assert L.pointing_game(score, lesion, spacing=(2.0, 1.0, 1.0), tolerance_mm=0.0, region=region)


def test_otsu_splits_a_bimodal_array():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.0, 1.0, 5000), rng.normal(10.0, 1.0, 5000)])
    assert L.otsu_threshold(values) == pytest.approx(5.0, abs=0.3)
    two = np.array([1.0] * 50 + [3.0] * 30)
    t = L.otsu_threshold(two)
    assert 1.0 < t < 3.0
    assert t == pytest.approx(2.0, abs=0.02)  # midpoint of the empty gap
    assert L.otsu_threshold(np.full(7, 4.0)) == 4.0


def test_dice_iou_and_top_k():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[:4] = True  # 400 voxels
    b[2:6] = True  # 400 voxels, 200 shared
    assert L.dice_iou(a, b) == pytest.approx((0.5, 200 / 600))
    score = np.arange(1000, dtype=float).reshape(10, 10, 10)
    top = L.top_k_mask(score, 10.0)
    assert top.sum() == 100 and top[9].all()


def test_bbox_iou_of_known_boxes():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:5, 3:7, 1:2] = True
    assert L.bounding_box(mask) == ((2, 3, 1), (5, 7, 2))
    assert L.bounding_box(np.zeros((3, 3, 3), bool)) is None
    box_a = ((0, 0, 0), (2, 2, 2))  # volume 8
    box_b = ((1, 1, 1), (3, 3, 3))  # volume 8, overlap 1
    assert L.bbox_iou(box_a, box_b) == pytest.approx(1 / 15)
    assert L.bbox_iou(box_a, box_a) == 1.0
    assert L.bbox_iou(box_a, ((5, 5, 5), (6, 6, 6))) == 0.0
    assert L.bbox_iou(None, box_a) == 0.0


def test_energy_and_enrichment():
    ct, lesion = _scene()
    region = L.body_region(ct, lesion)
    score = np.where(lesion, 3.0, 1.0)
    assert L.enrichment(score, lesion, region) == pytest.approx(
        3.0 / ((3 * lesion.sum() + (region.sum() - lesion.sum())) / region.sum())
    )
    assert L.energy_pointing(score, lesion, region) == pytest.approx(1.0)  # minimum shifted to 0


def test_baselines():
    centre = L.centre_prior((21, 11, 5), (1.0, 2.0, 3.0))
    assert np.unravel_index(np.argmax(centre), centre.shape) == (10, 5, 2)
    assert centre.max() == pytest.approx(1.0)
    prior = L.intensity_prior(np.array([40.0, -1000.0, 1000.0]))
    assert prior[0] == pytest.approx(1.0) and prior[1] < 1e-6 and prior[2] < 1e-6


def test_lesion_windows_hold_lesion_at_random_offsets():
    _, lesion = _scene()
    boxes = L.lesion_windows(lesion, (16, 16, 16), 20, np.random.default_rng(0))
    assert len(boxes) == 20
    offsets = set()
    for box in boxes:
        assert lesion[box].any()
        assert tuple(s.stop - s.start for s in box) == (16, 16, 16)
        offsets.add(tuple(s.start for s in box))
    assert len(offsets) > 5
