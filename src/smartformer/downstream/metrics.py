"""Binary classification metrics with bootstrap confidence intervals, and ROC curves.

Metrics read a probability of class 1 per case; hard calls use ``probability >= threshold`` (0.5,
which the class-balanced classifiers of the probe and fine-tuning are calibrated around):

* accuracy, balanced accuracy (mean of sensitivity and specificity),
* AUC (area under the ROC curve; the Mann-Whitney statistic, ties counted one half),
* sensitivity (true positive rate) and specificity (true negative rate).

Confidence intervals are percentile bootstrap intervals: cases — or whole patients, when patient ids
are given, so that correlated lesions of one patient move together — are resampled with replacement
``n`` times from a seeded generator. A resample missing a class has no AUC (or no sensitivity /
specificity) and is skipped for that metric only. :func:`paired_difference` compares two models on the
same cases (the folds are shared, so predictions are paired) with the same resamples for both.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import rankdata
from sklearn.metrics import roc_curve

from smartformer.analysis.overlay import save_figure

METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity")


def auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for 0/1 ``labels`` via mid-ranks; NaN when a class is missing."""
    labels = np.asarray(labels)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(
    labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """The :data:`METRICS` of one set of predictions (NaN where undefined, e.g. AUC with one class)."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} must be equal 1-D shapes")
    called = p >= threshold
    pos, neg = y == 1, y == 0
    sensitivity = float(called[pos].mean()) if pos.any() else float("nan")
    specificity = float((~called[neg]).mean()) if neg.any() else float("nan")
    return {
        "accuracy": float((called == pos).mean()) if len(y) else float("nan"),
        "balanced_accuracy": float(np.mean([sensitivity, specificity])),
        "auc": auc_score(y, p),
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def bootstrap_intervals(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    groups: Sequence[object] | np.ndarray | None = None,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    threshold: float = 0.5,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric: ``{metric: (low, high)}`` (NaN with ``n = 0``).

    ``groups`` (e.g. patient ids) makes the resampling unit the group instead of the case.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    draws: dict[str, list[float]] = {m: [] for m in METRICS}
    for index in resamples(len(y), groups, n, seed):
        for metric, value in binary_metrics(y[index], p[index], threshold).items():
            draws[metric].append(value)
    return {metric: percentile_interval(values, level) for metric, values in draws.items()}


def resamples(n_cases: int, groups: Sequence[object] | np.ndarray | None, n: int, seed: int) -> Iterator[np.ndarray]:
    """``n`` bootstrap resamples of case indices: whole groups (or single cases) drawn with replacement."""
    if n <= 0 or n_cases == 0:
        return
    _, unit = np.unique(
        np.asarray(groups if groups is not None else np.arange(n_cases), dtype=object).astype(str), return_inverse=True
    )
    members = [np.flatnonzero(unit == u) for u in range(unit.max() + 1)]
    rng = np.random.default_rng(seed)
    for _ in range(n):
        picked = rng.integers(0, len(members), size=len(members))
        yield np.concatenate([members[u] for u in picked])


def percentile_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of the finite ``values`` (NaN, NaN when there are none)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


def paired_difference(
    labels: Sequence[int] | np.ndarray,
    probabilities_a: Sequence[float] | np.ndarray,
    probabilities_b: Sequence[float] | np.ndarray,
    groups: Sequence[object] | np.ndarray | None = None,
    n: int = 1000,
    seed: int = 0,
    metric: str = "auc",
    level: float = 0.95,
) -> dict[str, float]:
    """``metric(a) - metric(b)`` of two models on the same cases, with a paired bootstrap interval.

    Both models are scored on the same resample each time, so the interval reflects the difference
    between the models, not the spread of the cases; an interval above 0 means ``a`` is better.
    """
    y = np.asarray(labels, dtype=np.int64)
    a, b = np.asarray(probabilities_a, dtype=np.float64), np.asarray(probabilities_b, dtype=np.float64)
    value = binary_metrics(y, a)[metric] - binary_metrics(y, b)[metric]
    draws = [
        binary_metrics(y[i], a[i])[metric] - binary_metrics(y[i], b[i])[metric]
        for i in resamples(len(y), groups, n, seed)
    ]
    low, high = percentile_interval(draws, level)
    return {"value": value, "ci_low": low, "ci_high": high}


def paired_mean_difference(
    values_a: Sequence[float] | np.ndarray,
    values_b: Sequence[float] | np.ndarray,
    groups: Sequence[object] | np.ndarray | None = None,
    n: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Mean of ``a - b`` over paired per-case scores (e.g. Dice per patient), with a paired bootstrap interval.

    Cases (or whole ``groups``) are resampled with replacement and the mean difference recomputed;
    cases where either score is NaN are left out. An interval above 0 means ``a`` is better.
    """
    diff = np.asarray(values_a, dtype=np.float64) - np.asarray(values_b, dtype=np.float64)
    finite = np.isfinite(diff)
    diff = diff[finite]
    kept_groups = None if groups is None else np.asarray(groups, dtype=object)[finite]
    if not diff.size:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "cases": 0}
    draws = [float(diff[i].mean()) for i in resamples(len(diff), kept_groups, n, seed)]
    low, high = percentile_interval(draws, level)
    return {"value": float(diff.mean()), "ci_low": low, "ci_high": high, "cases": int(diff.size)}


def metrics_with_ci(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    groups: Sequence[object] | np.ndarray | None = None,
    n: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "ci_low", "ci_high"}}``: the point estimate and its bootstrap interval."""
    point = binary_metrics(labels, probabilities)
    ci = bootstrap_intervals(labels, probabilities, groups, n=n, seed=seed)
    return {m: {"value": point[m], "ci_low": ci[m][0], "ci_high": ci[m][1]} for m in METRICS}


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of the ROC curve, from (0, 0) to (1, 1)."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC") -> Path:
    """Draw one ROC curve per entry ``name -> (labels, probabilities)`` (AUC in the legend) to a PNG."""
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    for name, (y, p) in curves.items():
        y, p = np.asarray(y), np.asarray(p)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr = roc_points(y, p)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {auc_score(y, p):.3f})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, path, dpi=100)
