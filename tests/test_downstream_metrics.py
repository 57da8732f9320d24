"""Downstream metrics and bootstrap intervals against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score, roc_auc_score

from smartformer.downstream.metrics import (
    METRICS,
    auc_score,
    binary_metrics,
    bootstrap_intervals,
    metrics_with_ci,
    paired_difference,
    plot_roc,
)


def test_hand_computed_example():
    y = [0, 0, 1, 1, 1]
    p = [0.1, 0.6, 0.4, 0.8, 0.9]  # calls at 0.5: 0 1 0 1 1
    m = binary_metrics(y, p)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["auc"] == pytest.approx(5 / 6)  # of the 6 positive-negative pairs only (0.4, 0.6) is misordered


def test_ties_count_one_half():
    assert auc_score(np.array([0, 1]), np.array([0.3, 0.3])) == pytest.approx(0.5)
    assert auc_score(np.array([0, 0, 1]), np.array([0.2, 0.5, 0.5])) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=200)
    p = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, size=200), 0, 1), 2)  # rounded: many ties
    m = binary_metrics(y, p)
    called = (p >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, called))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, called))
    assert m["sensitivity"] == pytest.approx(recall_score(y, called, pos_label=1))
    assert m["specificity"] == pytest.approx(recall_score(y, called, pos_label=0))


def test_one_class_has_no_auc():
    m = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)


def test_perfect_classifier_has_degenerate_interval():
    y = np.array([0] * 20 + [1] * 20)
    p = np.where(y == 1, 0.9, 0.1)
    result = metrics_with_ci(y, p, n=200, seed=3)
    for metric in METRICS:
        assert result[metric] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}


def _noisy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    return y, 1 / (1 + np.exp(-(0.6 * (2 * y - 1) + rng.normal(size=n))))


def test_interval_contains_estimate_and_narrows_with_n():
    widths = []
    for n in (40, 400):
        y, p = _noisy(n, seed=n)
        result = metrics_with_ci(y, p, n=300, seed=0)
        for metric in METRICS:
            entry = result[metric]
            assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
        widths.append(result["auc"]["ci_high"] - result["auc"]["ci_low"])
    assert widths[1] < widths[0] / 2  # ~ 1 / sqrt(n): 10x the cases, about a third of the width


def test_bootstrap_is_seeded():
    y, p = _noisy(60, seed=1)
    assert bootstrap_intervals(y, p, n=100, seed=5) == bootstrap_intervals(y, p, n=100, seed=5)
    assert bootstrap_intervals(y, p, n=100, seed=5) != bootstrap_intervals(y, p, n=100, seed=6)


def test_patient_bootstrap_resamples_whole_patients():
    """Each patient holding two copies of one case: the patient bootstrap equals the case bootstrap."""
    y, p = _noisy(50, seed=2)
    cases = bootstrap_intervals(y, p, groups=[str(i) for i in range(50)], n=200, seed=4)
    doubled = bootstrap_intervals(
        np.repeat(y, 2), np.repeat(p, 2), groups=np.repeat([str(i) for i in range(50)], 2), n=200, seed=4
    )
    for metric in METRICS:
        assert doubled[metric] == pytest.approx(cases[metric])
    per_case = bootstrap_intervals(np.repeat(y, 2), np.repeat(p, 2), n=200, seed=4)
    assert per_case["auc"][1] - per_case["auc"][0] < doubled["auc"][1] - doubled["auc"][0]


def test_paired_difference():
    y, noisy = _noisy(80, seed=3)
    same = paired_difference(y, noisy, noisy, n=100, seed=0)
    assert same == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    perfect = np.where(y == 1, 0.9, 0.1)
    better = paired_difference(y, perfect, noisy, groups=np.arange(80) // 2, n=200, seed=0)
    assert better["value"] == pytest.approx(1 - auc_score(y, noisy))
    assert 0 < better["ci_low"] <= better["value"] <= better["ci_high"]
    worse = paired_difference(y, noisy, perfect, groups=np.arange(80) // 2, n=200, seed=0)
    assert worse["value"] == pytest.approx(-better["value"])
    assert (worse["ci_low"], worse["ci_high"]) == pytest.approx((-better["ci_high"], -better["ci_low"]))


def test_no_bootstrap_gives_nan_interval():
    result = metrics_with_ci([0, 1], [0.2, 0.8], n=0)
    assert result["auc"]["value"] == 1.0 and math.isnan(result["auc"]["ci_low"])


def test_roc_png(tmp_path):
    y, p = _noisy(40, seed=0)
    path = plot_roc({"a": (y, p), "b": (y, 1 - p), "one class": (np.ones(3), np.ones(3))}, tmp_path / "roc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
