"""Linear probe: logistic regression on frozen, standardised encoder features.

The classifier is scikit-learn's ``StandardScaler`` + ``LogisticRegression`` (L2, class-balanced
weights, so that a 0.5 threshold suits unbalanced cohorts). The inverse regularisation ``C`` is fixed,
or chosen among :data:`C_GRID` by an inner, patient-level stratified 3-fold CV on the training cases
only (log-loss); the test fold never takes part in that choice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from smartformer.downstream.evaluation import Study, test_indices, training_indices
from smartformer.downstream.features import extract_features, load_encoder, pick_device
from smartformer.downstream.splits import patient_labels

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

#: Candidate values of C for the inner cross-validation (cheap: 4 values x 3 folds).
C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
#: Inner folds; a training set with fewer patients of a class than this uses C = 1.
INNER_FOLDS = 3


def _pipeline(C: float, seed: int) -> Pipeline:
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
    )


def fit_probe(
    features: np.ndarray, labels: np.ndarray, patients: np.ndarray, C: float | None = None, seed: int = 0
) -> tuple[Pipeline, float]:
    """Fit the probe on training features; returns the fitted pipeline and the C it used.

    With ``C=None``, C is chosen by inner CV (see the module docstring), falling back to 1.0 when a
    class has fewer than :data:`INNER_FOLDS` patients.
    """
    if C is None:
        strata = np.asarray(list(patient_labels(labels, patients).values()))
        if min(int((strata == 0).sum()), int((strata == 1).sum())) >= INNER_FOLDS:
            inner = StratifiedGroupKFold(n_splits=INNER_FOLDS, shuffle=True, random_state=seed)
            splits = list(inner.split(features, labels, groups=patients))
            search = GridSearchCV(
                _pipeline(1.0, seed),
                {"logisticregression__C": list(C_GRID)},
                scoring="neg_log_loss",
                cv=splits,
                error_score=np.nan,
            )
            search.fit(features, labels)
            C = float(search.best_params_["logisticregression__C"])
        else:
            C = 1.0
    return _pipeline(C, seed).fit(features, labels), C


def probe_probabilities(
    train_x: np.ndarray,
    train_y: np.ndarray,
    train_patients: np.ndarray,
    test_x: np.ndarray,
    C: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Fit on the training cases and return P(class 1) for the test cases, and the C used."""
    model, used = fit_probe(train_x, train_y, train_patients, C=C, seed=seed)
    return model.predict_proba(test_x)[:, 1], used


def probe_checkpoint(
    study: Study, spec: str, name: str, C: float | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The probe as a :data:`~smartformer.downstream.evaluation.CheckpointRunner`: frozen features of the
    checkpoint ``spec`` once, then a logistic regression per fold and fraction (``C``: see :func:`fit_probe`)."""
    s, table = study.settings, study.table
    features = extract_features(
        load_encoder(spec, s.seed),
        study.crops,
        s.features,
        s.batch_size,
        pick_device(s.device),
        progress=s.progress,
        desc=f"features {name}",
    )
    rows, details = [], []
    for fold in range(s.folds):
        test = test_indices(study, fold)
        for fraction, train in training_indices(study, fold).items():
            probs, used = probe_probabilities(
                features[train], table.labels[train], table.patients[train], features[test], C=C, seed=s.seed
            )
            rows += [
                {"index": int(i), "fold": fold, "fraction": fraction, "probability": float(p)}
                for i, p in zip(test, probs)
            ]
            details.append({"fold": fold, "fraction": fraction, "n_train": len(train), "C": used})
    return rows, details
