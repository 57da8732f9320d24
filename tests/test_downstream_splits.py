"""Patient-level stratified folds, label fractions and validation splits."""

from __future__ import annotations

import numpy as np
import pytest

from smartformer.downstream.splits import assign_folds, check_fractions, subsample, validation_split
from smartformer.errors import SmartformerError


def cohort(n_patients: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """1-3 lesions per patient, a third of the patients malignant (every lesion of a patient shares its label)."""
    rng = np.random.default_rng(seed)
    labels, patients = [], []
    for i in range(n_patients):
        k = int(rng.integers(1, 4))
        labels += [int(i % 3 == 0)] * k
        patients += [f"P{i:03d}"] * k
    return np.asarray(labels), np.asarray(patients, dtype=object)


def test_no_patient_in_two_folds_and_every_case_in_one():
    labels, patients = cohort()
    folds = assign_folds(labels, patients, n_folds=5, seed=0)
    assert set(folds.tolist()) == set(range(5))
    for patient in set(patients):
        assert len(set(folds[patients == patient].tolist())) == 1


def test_folds_are_stratified():
    labels, patients = cohort(60)
    folds = assign_folds(labels, patients, n_folds=5, seed=1)
    overall = labels.mean()
    for k in range(5):
        assert abs(labels[folds == k].mean() - overall) < 0.15


def test_folds_depend_only_on_labels_patients_and_seed():
    labels, patients = cohort()
    first = assign_folds(labels, patients, 5, seed=3)
    assert np.array_equal(first, assign_folds(labels.copy(), patients.copy(), 5, seed=3))
    assert not np.array_equal(first, assign_folds(labels, patients, 5, seed=4))


def test_too_few_patients_of_a_class():
    labels = np.array([0, 0, 0, 0, 1, 1])
    patients = np.array(["a", "b", "c", "d", "e", "f"], dtype=object)
    with pytest.raises(SmartformerError, match="at least 3 patients with class 1; there are 2"):
        assign_folds(labels, patients, 3)


def test_fractions_are_nested_patient_level_stratified_and_seeded():
    labels, patients = cohort(80)
    train = np.flatnonzero(assign_folds(labels, patients, 5, seed=0) != 0)
    subsets = {f: subsample(train, labels, patients, f, seed=2, fold=0) for f in (0.1, 0.25, 0.5, 1.0)}
    assert np.array_equal(subsets[1.0], train)
    previous: set[int] = set()
    for f in (0.1, 0.25, 0.5, 1.0):
        chosen = set(subsets[f].tolist())
        assert previous <= chosen  # nested
        previous = chosen
        kept_patients = set(patients[subsets[f]])
        assert all(set(np.flatnonzero(patients == p).tolist()) <= chosen for p in kept_patients)  # whole patients
        malignant = len(set(patients[subsets[f]][labels[subsets[f]] == 1]))
        all_malignant = len(set(patients[train][labels[train] == 1]))
        assert malignant == max(1, int(np.ceil(f * all_malignant)))  # stratified by patient label
    assert np.array_equal(subsets[0.25], subsample(train, labels, patients, 0.25, seed=2, fold=0))
    assert not np.array_equal(subsets[0.25], subsample(train, labels, patients, 0.25, seed=3, fold=0))


def test_validation_split_is_patient_level_and_keeps_both_classes():
    labels, patients = cohort(30)
    cases = np.arange(len(labels))
    train, val = validation_split(cases, labels, patients, 0.2, seed=0, fold=1)
    assert np.array_equal(np.sort(np.concatenate([train, val])), cases)
    assert not set(patients[train]) & set(patients[val])
    assert set(labels[train]) == set(labels[val]) == {0, 1}
    n_malignant = len(set(patients[labels == 1]))
    assert len(set(patients[val][labels[val] == 1])) == round(0.2 * n_malignant)


def test_validation_split_empty_when_a_class_has_one_patient():
    labels = np.array([0, 0, 0, 1])
    patients = np.array(["a", "b", "c", "d"], dtype=object)
    train, val = validation_split(np.arange(4), labels, patients)
    assert len(val) == 0 and np.array_equal(train, np.arange(4))


def test_check_fractions():
    assert check_fractions([1.0, 0.1, 0.5, 0.1]) == [0.1, 0.5, 1.0]
    for bad in ([0.0], [1.5], []):
        with pytest.raises(SmartformerError, match="label fractions must be in"):
            check_fractions(bad)
