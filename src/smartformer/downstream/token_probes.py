"""Frozen-feature probes that can tell a pretrained encoder from random weights at CPU scale.

Two questions a linear read-out answers about what an encoder learnt without labels:

* :func:`organ_probe`: which organ is under each semantic-stage token? Multinomial logistic
  regression on the tokens of an organ-labelled CT, scored out of fold with *spatially blocked*
  folds (contiguous slabs along the S/I axis), so that a token is never predicted from its
  immediate neighbours, which would reward mere smoothness;
* :func:`position_probe`: where in its body does a crop lie? Ridge regression from the crop's
  features to its centre's relative position in the body's bounding box, scored on CTs left out
  (grouped folds), so the probe cannot memorise one scan.

Both use scikit-learn and return plain dicts of floats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import balanced_accuracy_score, f1_score, r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

if TYPE_CHECKING:
    from smartformer.analysis.clustering import TokenFeatures

__all__ = ["organ_probe", "position_probe", "slab_groups"]


def slab_groups(labels_grid: np.ndarray, n_blocks: int, axis: int = 2) -> np.ndarray:
    """Group id (0..n_blocks-1) of every token of a (d, h, w) grid: contiguous slabs along ``axis``."""
    size = labels_grid.shape[axis]
    if not 2 <= n_blocks <= size:
        raise ValueError(f"n_blocks must be in [2, {size}] for a grid of {size} along axis {axis}, got {n_blocks}")
    slab = np.minimum(np.arange(size) * n_blocks // size, n_blocks - 1)
    shape = [1, 1, 1]
    shape[axis] = size
    return np.broadcast_to(slab.reshape(shape), labels_grid.shape).copy()


def organ_probe(
    tokens: TokenFeatures, n_blocks: int = 4, min_tokens: int = 5, C: float = 1.0, seed: int = 0, axis: int = 2
) -> dict[str, Any]:
    """Out-of-fold organ identity from frozen tokens, with spatially blocked folds.

    Args:
        tokens: :func:`~smartformer.analysis.clustering.token_features` of a CT with its organ map.
        n_blocks: slabs along ``axis`` of the token grid (RAS: 2 = S/I); each is held out once.
        min_tokens: organs with fewer labelled tokens are left out (too few to learn or score).
            At stride 16 and 2 mm a token covers 32 mm, so small organs own few tokens.
        C: inverse L2 regularisation of the logistic regression (standardised features).

    Returns:
        ``balanced_accuracy`` and ``macro_f1`` over the tokens of the kept organs, ``tokens``,
        ``classes`` and ``chance`` (the balanced accuracy of a constant guess: 1 / classes).
    """
    kept = tokens.kept()
    groups = slab_groups(tokens.labels, n_blocks, axis)[kept]
    x, y = tokens.features[kept], tokens.labels[kept]
    ids, counts = np.unique(y, return_counts=True)
    common = np.isin(y, ids[counts >= min_tokens])
    x, y, groups = x[common], y[common], groups[common]
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"organ probe: fewer than 2 organs with >= {min_tokens} tokens")
    predicted = np.empty_like(y)
    for block in np.unique(groups):
        test = groups == block
        train = ~test
        if len(np.unique(y[train])) < 2:  # the rest of the CT holds one organ only: guess it
            predicted[test] = y[train][0] if train.any() else classes[0]
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
        predicted[test] = model.fit(x[train], y[train]).predict(x[test])
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "macro_f1": float(f1_score(y, predicted, average="macro")),
        "tokens": int(len(y)),
        "classes": int(len(classes)),
        "chance": 1.0 / len(classes),
    }


def position_probe(
    features: np.ndarray,
    positions: np.ndarray,
    groups: np.ndarray,
    alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0),
) -> dict[str, Any]:
    """Out-of-group R^2 of the relative crop position (N, 3) from crop features (N, C).

    Leave-one-group-out (one CT per group): standardised features, ``RidgeCV`` over ``alphas``
    fitted on the other CTs only. R^2 is computed per axis on the pooled out-of-group predictions
    (1 = exact, 0 = no better than the mean position, negative = worse) and averaged.
    """
    features, positions, groups = np.asarray(features), np.asarray(positions, dtype=np.float64), np.asarray(groups)
    if len(np.unique(groups)) < 2:
        raise ValueError("position probe: need crops of at least 2 CTs (one is held out at a time)")
    predicted = np.zeros_like(positions)
    for group in np.unique(groups):
        test = groups == group
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
        predicted[test] = model.fit(features[~test], positions[~test]).predict(features[test])
    per_axis = [float(r2_score(positions[:, a], predicted[:, a])) for a in range(positions.shape[1])]
    return {
        "r2": float(np.mean(per_axis)),
        "r2_per_axis": per_axis,
        "crops": int(len(positions)),
        "groups": int(len(np.unique(groups))),
    }
