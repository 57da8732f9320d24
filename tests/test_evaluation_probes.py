"""The evaluations that compare a pretrained encoder with random weights: token probes, per-case Dice, paired means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smartformer.analysis.clustering import TokenFeatures
from smartformer.downstream.metrics import paired_mean_difference
from smartformer.downstream.segmentation import dice_per_case, validate
from smartformer.downstream.token_probes import organ_probe, position_probe, slab_groups


def _tokens(informative: bool, seed: int = 0) -> TokenFeatures:
    """A 6x6x10 token grid with three organs in stripes along x; features that do or do not know them."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((6, 6, 10), dtype=np.int64)
    labels[:2], labels[2:4], labels[4:] = 3, 7, 9
    labels[0, 0, :] = 0  # background, left out
    labels[5, 5, :] = -1  # padding, left out
    features = rng.normal(size=(6, 6, 10, 8)).astype(np.float32)
    if informative:
        for j, organ in enumerate((3, 7, 9)):
            features[labels == organ, j] += 4.0
    return TokenFeatures(
        features=features, labels=labels, token_affine=np.eye(4), input_affine=np.eye(4), input_shape=(96, 96, 160)
    )


def test_slab_groups_are_contiguous_along_the_axis() -> None:
    groups = slab_groups(np.zeros((2, 3, 10)), 5)
    assert groups.shape == (2, 3, 10)
    assert groups[0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and (groups == groups[:1, :1]).all()
    with pytest.raises(ValueError, match="n_blocks"):
        slab_groups(np.zeros((2, 3, 4)), 5)


def test_organ_probe_reads_organs_from_informative_tokens_only() -> None:
    good = organ_probe(_tokens(informative=True))
    noise = organ_probe(_tokens(informative=False))
    assert good["classes"] == 3 and good["chance"] == pytest.approx(1 / 3)
    assert good["tokens"] == 6 * 6 * 10 - 10 - 10  # background and padding left out
    assert good["balanced_accuracy"] > 0.95 and good["macro_f1"] > 0.95
    assert noise["balanced_accuracy"] < 0.6


def test_position_probe_scores_features_that_encode_position() -> None:
    rng = np.random.default_rng(0)
    positions = rng.uniform(size=(60, 3))
    groups = np.repeat(np.arange(6), 10)
    encoded = np.concatenate([positions @ rng.normal(size=(3, 5)), rng.normal(size=(60, 3)) * 0.01], axis=1)
    assert position_probe(encoded, positions, groups)["r2"] > 0.95
    noise = position_probe(rng.normal(size=(60, 8)), positions, groups)
    assert noise["r2"] < 0.1 and noise["groups"] == 6 and len(noise["r2_per_axis"]) == 3
    with pytest.raises(ValueError, match="2 CTs"):
        position_probe(encoded, positions, np.zeros(60))


def test_paired_mean_difference_closed_form_and_interval() -> None:
    b = np.array([0.2, 0.5, 0.7, 0.1, 0.4])
    same_gain = paired_mean_difference(b + 0.1, b, n=200)
    assert same_gain["value"] == pytest.approx(0.1)
    assert same_gain["ci_low"] == pytest.approx(0.1) and same_gain["ci_high"] == pytest.approx(0.1)
    mixed = paired_mean_difference([0.3, 0.1, np.nan, 0.9], [0.1, 0.3, 0.5, 0.5], n=500)
    assert mixed["cases"] == 3 and mixed["value"] == pytest.approx((0.2 - 0.2 + 0.4) / 3)
    assert mixed["ci_low"] < mixed["value"] < mixed["ci_high"]


class _ThresholdNet(torch.nn.Module):
    """A real (tiny) segmenter: class 1 wherever the image is above 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.5, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_dice_per_case_scores_each_case_and_validate_averages_them() -> None:
    label = torch.zeros(1, 32, 32, 32)
    label[:, 8:16, 8:16, 8:16] = 1
    half = label.clone()
    half[:, 8:12] = 0  # the image shows half the lesion: Dice 2*256 / (256 + 512) = 2/3
    cases = [
        {"image": label.clone(), "label": label},
        {"image": half, "label": label},
        {"image": torch.zeros(1, 32, 32, 32), "label": torch.zeros(1, 32, 32, 32)},
    ]  # no lesion: NaN
    rows = dice_per_case(_ThresholdNet(), cases, [5], roi=(32, 32, 32))
    assert rows[0]["5"] == pytest.approx(1.0) and rows[1]["5"] == pytest.approx(2 / 3)
    assert np.isnan(rows[2]["5"])
    assert validate(_ThresholdNet(), cases, [5], roi=(32, 32, 32))["5"] == pytest.approx((1 + 2 / 3) / 2)
