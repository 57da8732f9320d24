"""Patient-level, label-stratified splits: k-fold cross-validation, label fractions, validation sets.

Everything here is a function of the labels, the patient ids and a seed — never of a model — so every
checkpoint is evaluated on the same folds and the same training subsets, and comparisons between
checkpoints are paired.

A patient's stratum is its most frequent label (ties: the larger label), so a patient with a benign
and a malignant nodule is kept whole and counted once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from smartformer.errors import SmartformerError


def patient_labels(labels: np.ndarray, patients: np.ndarray) -> dict[object, int]:
    """Each patient's stratum: its most frequent label (ties go to the larger label)."""
    strata: dict[object, int] = {}
    for patient in dict.fromkeys(patients.tolist()):
        counts = np.bincount(labels[patients == patient], minlength=2)
        strata[patient] = int(len(counts) - 1 - np.argmax(counts[::-1]))
    return strata


def assign_folds(labels: np.ndarray, patients: np.ndarray, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Test fold (0..n_folds-1) of every case: scikit-learn ``StratifiedGroupKFold``, shuffled with ``seed``.

    No patient is in two folds; each fold's label mix is as close to the whole set's as the patients
    allow.

    Raises:
        SmartformerError: fewer than ``n_folds`` patients with some class (a test fold would lack it),
            or ``n_folds < 2``.
    """
    if n_folds < 2:
        raise SmartformerError(f"cross-validation needs at least 2 folds, got {n_folds}")
    for cls in (0, 1):
        count = len(set(patients[labels == cls].tolist()))
        if count < n_folds:
            raise SmartformerError(
                f"{n_folds} folds need at least {n_folds} patients with class {cls}; there are {count}"
            )
    folds = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups=patients)):
        folds[test] = fold
    return folds


def holdout_cases(labels: np.ndarray, patients: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A held-out test set, as the SMART paper's LIDC protocol keeps one beside its 3-fold CV: a bool
    mask of the cases of ``round(fraction * n)`` patients per class stratum (at least one, at most
    ``n - 1``), drawn from ``seed``. All False for ``fraction`` 0.

    Raises:
        SmartformerError: ``fraction`` outside [0, 1), or a held-out set or remainder without both classes.
    """
    if not 0 <= fraction < 1:
        raise SmartformerError(f"the held-out fraction must be at least 0 and below 1, got {fraction}")
    if fraction == 0:
        return np.zeros(len(labels), dtype=bool)
    order = _patient_order(labels, patients, np.random.default_rng([seed, 3]))
    held = {
        p
        for members in order.values()
        for p in members[: min(len(members) - 1, max(1, round(fraction * len(members))))]
    }
    mask = np.asarray([p in held for p in patients.tolist()], dtype=bool)
    for part, name in ((mask, "held-out test set"), (~mask, "rest")):
        if len(np.unique(labels[part])) < 2:
            raise SmartformerError(
                f"holding out {fraction:g} of the patients leaves the {name} with one class only; change the fraction"
            )
    return mask


def _patient_order(labels: np.ndarray, patients: np.ndarray, rng: np.random.Generator) -> dict[int, list[object]]:
    """Per class, the patients among the given cases in one seeded random order."""
    strata = patient_labels(labels, patients)
    order: dict[int, list[object]] = {0: [], 1: []}
    for patient in sorted(strata, key=str):
        order[strata[patient]].append(patient)
    return {cls: [members[i] for i in rng.permutation(len(members))] for cls, members in order.items()}


def subsample(
    indices: np.ndarray, labels: np.ndarray, patients: np.ndarray, fraction: float, seed: int = 0, fold: int = 0
) -> np.ndarray:
    """The cases of a training fold kept at a label ``fraction`` (patient-level, stratified, nested).

    Per class, the training patients are put in one random order drawn from ``(seed, fold)`` and the
    first ``ceil(fraction * n)`` are kept (at least one per class). The same order serves every
    fraction, so the 10 % subset lies inside the 25 % one, and so on. Returns sorted case indices.
    """
    if not 0 < fraction <= 1:
        raise SmartformerError(f"a label fraction must be in (0, 1], got {fraction}")
    indices = np.asarray(indices)
    if fraction == 1:
        return np.sort(indices)
    order = _patient_order(labels[indices], patients[indices], np.random.default_rng([seed, fold, 1]))
    kept = {p for members in order.values() for p in members[: max(1, math.ceil(fraction * len(members)))]}
    chosen = np.sort(indices[[p in kept for p in patients[indices].tolist()]])
    if len(np.unique(labels[chosen])) < 2:
        raise SmartformerError(
            f"label fraction {fraction:g} leaves only one class in the training cases of fold "
            f"{fold}; use a larger fraction"
        )
    return chosen


def validation_split(
    indices: np.ndarray, labels: np.ndarray, patients: np.ndarray, fraction: float = 0.2, seed: int = 0, fold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation set (for early stopping) out of training cases: ``(train, validation)`` indices.

    Per class (patient stratum), ``round(fraction * n)`` patients (at least one, at most ``n - 1``) go to
    validation, drawn from ``(seed, fold)``. When that leaves either side without a case of each label,
    the validation set is empty (no early stopping).
    """
    indices = np.asarray(indices)
    order = _patient_order(labels[indices], patients[indices], np.random.default_rng([seed, fold, 2]))
    held = {
        p
        for members in order.values()
        for p in members[: min(len(members) - 1, max(1, round(fraction * len(members))))]
    }
    in_val = np.asarray([p in held for p in patients[indices].tolist()], dtype=bool)
    train, val = np.sort(indices[~in_val]), np.sort(indices[in_val])
    if len(np.unique(labels[train])) < 2 or len(np.unique(labels[val])) < 2:
        return np.sort(indices), indices[:0]
    return train, val


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """Distinct fractions in (0, 1], ascending; refuses anything else with one line."""
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise SmartformerError(f"label fractions must be in (0, 1], got {list(fractions)}")
    return sorted(set(float(f) for f in fractions))
