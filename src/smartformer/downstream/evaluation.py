"""Cross-validated evaluation of checkpoints on a labelled case CSV: what ``probe`` and ``finetune`` share.

:func:`evaluate` checks the input, builds the crops once, splits the cases (patient-level,
stratified, seeded: every checkpoint sees the same folds), runs a classifier per checkpoint, label
fraction and fold (:func:`~smartformer.downstream.probe.probe_checkpoint`,
:func:`~smartformer.downstream.finetune.finetune_checkpoint`), and writes folds.csv,
predictions.csv, metrics.json, roc.png and comparison.csv / comparison.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smartformer.downstream.cases import CaseTable, CropOptions, build_crops, read_cases
from smartformer.downstream.features import FEATURE_KINDS
from smartformer.downstream.metrics import (
    METRICS,
    binary_metrics,
    metrics_with_ci,
    paired_difference,
    plot_roc,
)
from smartformer.downstream.splits import assign_folds, check_fractions, holdout_cases, subsample
from smartformer.errors import InputError, SmartformerError
from smartformer.models.hub import checkpoint_names, resolve_checkpoint

__all__ = [
    "HOLDOUT",
    "CheckpointRunner",
    "Evaluation",
    "EvaluationSettings",
    "Study",
    "evaluate",
    "test_indices",
    "training_indices",
]

#: The fold of the held-out test set's cases (``holdout``) in ``Study.folds`` and folds.csv.
HOLDOUT = -1


@dataclass
class EvaluationSettings:
    """What an evaluation runs on and how (the options ``probe`` and ``finetune`` share).

    ``checkpoints`` are checkpoint arguments in any form :mod:`smartformer.models.hub` reads; a
    ``random:PRESET`` among several is the baseline the others are compared with. ``fractions`` are
    the label fractions of each training fold; ``holdout`` the share of patients held out as a test
    set beside the CV; ``bootstrap`` the resamples of the 95% intervals; ``seed`` seeds folds,
    fractions, ``random:`` weights, training and bootstrap.
    """

    csv: Path
    checkpoints: list[str]
    out: Path
    crop: CropOptions = field(default_factory=CropOptions)
    features: str = "both"
    folds: int = 5
    fractions: list[float] = field(default_factory=lambda: [1.0])
    holdout: float = 0.0
    bootstrap: int = 1000
    batch_size: int = 8
    device: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise SmartformerError(f"bootstrap resamples must be 0 or more, got {self.bootstrap}")
        if self.batch_size < 1:
            raise SmartformerError(f"batch size must be at least 1, got {self.batch_size}")
        if self.features not in FEATURE_KINDS:
            raise SmartformerError(f"features {self.features!r}: choose one of {', '.join(FEATURE_KINDS)}")
        if not self.checkpoints:
            raise SmartformerError("no checkpoint to evaluate")
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise InputError(self.out, "exists and is not a directory")


@dataclass
class Study:
    """What one evaluation works on: the cases, their crops and the paired splits."""

    table: CaseTable
    crops: np.ndarray
    folds: np.ndarray
    fractions: list[float]
    settings: EvaluationSettings


@dataclass
class Evaluation:
    """What :func:`evaluate` wrote: metrics.json's content and comparison.md's table."""

    report: dict[str, Any]
    markdown: str


#: ``run_checkpoint(study, spec, name) -> (prediction rows, per-fold details)``; a prediction row has
#: case index ``index``, ``fold``, ``fraction`` and ``probability``; a detail has ``fold``, ``fraction``
#: and anything the method wants recorded in metrics.json (chosen C, best epoch, ...).
CheckpointRunner = Callable[[Study, str, str], "tuple[list[dict[str, Any]], list[dict[str, Any]]]"]


def evaluate(
    settings: EvaluationSettings, task: str, run_checkpoint: CheckpointRunner, method_settings: dict[str, Any]
) -> Evaluation:
    """Check everything, then run ``run_checkpoint`` per checkpoint and write the outputs to ``settings.out``.

    No output is written before the CSV, the images, the crops, the checkpoints and the splits have
    all been checked. ``method_settings`` are recorded in metrics.json as ``settings``.
    """
    s = settings
    fractions = check_fractions(s.fractions)
    names = checkpoint_names(list(s.checkpoints))
    table = read_cases(s.csv)
    held = holdout_cases(table.labels, table.patients, s.holdout, s.seed)
    folds = np.full(len(table.labels), HOLDOUT, dtype=np.int64)  # the CV folds of the rest
    folds[~held] = assign_folds(table.labels[~held], table.patients[~held], s.folds, s.seed)
    crops = build_crops(table, s.crop, progress=s.progress)
    study = Study(table=table, crops=crops, folds=folds, fractions=fractions, settings=s)
    rows: list[dict[str, Any]] = []
    details: dict[str, list[dict[str, Any]]] = {}
    for spec, name in zip(s.checkpoints, names):
        predicted, details[name] = run_checkpoint(study, spec, name)
        for row in predicted:
            case = table.cases[row["index"]]
            rows.append(
                {
                    "case": case.case,
                    "patient": case.patient,
                    "fold": row["fold"],
                    "fraction": row["fraction"],
                    "checkpoint": name,
                    "label": case.label,
                    "probability": row["probability"],
                    "set": "holdout" if held[row["index"]] else "cv",
                }
            )
    every = pd.DataFrame(
        rows, columns=["case", "patient", "fold", "fraction", "checkpoint", "label", "probability", "set"]
    )
    predictions = every[every["set"] == "cv"]
    s.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"case": table.ids, "patient": table.patients, "label": table.labels, "fold": folds}).to_csv(
        s.out / "folds.csv", index=False
    )
    (every if held.any() else predictions.drop(columns="set")).to_csv(s.out / "predictions.csv", index=False)
    results = summarize(predictions, details, s.bootstrap, s.seed)
    if held.any():
        summarize_holdout(every[every["set"] == "holdout"], results, s.bootstrap, s.seed)
    baseline = next((n for n, spec in zip(names, s.checkpoints) if resolve_checkpoint(spec).kind == "random"), None)
    if baseline is not None and len(names) > 1:
        compare_to_baseline(predictions, results, baseline, s.bootstrap, s.seed)
    report = {
        "task": task,
        "csv": str(s.csv),
        "classes": table.class_mapping(),
        "cases": len(table.cases),
        "patients": len(set(table.patients.tolist())),
        "located_cases": sum(c.located for c in table.cases),
        "folds": s.folds,
        "holdout_cases": int(held.sum()),
        "fractions": fractions,
        "seed": s.seed,
        "bootstrap": s.bootstrap,
        "features": s.features,
        "crop_options": s.crop.to_dict(),
        "settings": method_settings,
        "checkpoints": dict(zip(names, map(str, s.checkpoints))),
        "baseline": baseline,
        "results": results,
    }
    (s.out / "metrics.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    write_roc(predictions, s.out / "roc.png", task)
    return Evaluation(report=report, markdown=write_comparison(results, s.out))


def summarize(
    predictions: pd.DataFrame, details: dict[str, list[dict[str, Any]]], n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Per checkpoint and fraction: out-of-fold metrics with bootstrap CIs, and per-fold metrics + details."""
    results: dict[str, dict[str, Any]] = {}
    for (name, fraction), group in predictions.groupby(["checkpoint", "fraction"], sort=False):
        per_fold = []
        for fold, part in group.groupby("fold"):
            extra = [d for d in details.get(name, []) if d["fold"] == fold and d["fraction"] == fraction]
            per_fold.append(
                {
                    "fold": int(fold),
                    "n_test": len(part),
                    **(extra[0] if extra else {}),
                    **binary_metrics(part["label"].to_numpy(), part["probability"].to_numpy()),
                }
            )
        results.setdefault(name, {})[f"{fraction:g}"] = {
            "n": len(group),
            "overall": metrics_with_ci(
                group["label"].to_numpy(),
                group["probability"].to_numpy(),
                group["patient"].to_numpy(),
                n=n_boot,
                seed=seed,
            ),
            "per_fold": per_fold,
        }
    return results


def summarize_holdout(held: pd.DataFrame, results: dict[str, dict[str, Any]], n_boot: int, seed: int) -> None:
    """Add ``holdout`` to each checkpoint and fraction of ``results``: the metrics of the held-out cases'
    probabilities averaged over the folds' models, and each fold model's own."""
    for (name, fraction), group in held.groupby(["checkpoint", "fraction"], sort=False):
        mean = group.groupby(["case", "patient", "label"], sort=False)["probability"].mean().reset_index()
        results[name][f"{fraction:g}"]["holdout"] = {
            "n": len(mean),
            "overall": metrics_with_ci(
                mean["label"].to_numpy(),
                mean["probability"].to_numpy(),
                mean["patient"].to_numpy(),
                n=n_boot,
                seed=seed,
            ),
            "per_fold": [
                {"fold": int(fold), **binary_metrics(part["label"].to_numpy(), part["probability"].to_numpy())}
                for fold, part in group.groupby("fold")
            ],
        }


def compare_to_baseline(
    predictions: pd.DataFrame, results: dict[str, dict[str, Any]], baseline: str, n_boot: int, seed: int
) -> None:
    """Add ``auc_vs_baseline`` (AUC minus the baseline's on the same cases, paired bootstrap CI) to ``results``."""
    table = predictions.pivot_table(
        index=["fraction", "case", "patient", "label"], columns="checkpoint", values="probability"
    ).reset_index()
    for name, by_fraction in results.items():
        if name == baseline:
            continue
        for fraction, entry in by_fraction.items():
            rows = table[table["fraction"].map(lambda f: f"{f:g}") == fraction]
            entry["auc_vs_baseline"] = paired_difference(
                rows["label"].to_numpy(),
                rows[name].to_numpy(),
                rows[baseline].to_numpy(),
                rows["patient"].to_numpy(),
                n=n_boot,
                seed=seed,
            )


def write_roc(predictions: pd.DataFrame, path: Path, task: str) -> Path:
    """roc.png: one out-of-fold ROC curve per checkpoint and fraction."""
    several = predictions["fraction"].nunique() > 1
    curves = {
        (f"{name} @ {fraction:g}" if several else name): (g["label"].to_numpy(), g["probability"].to_numpy())
        for (name, fraction), g in predictions.groupby(["checkpoint", "fraction"], sort=False)
    }
    return plot_roc(curves, path, title=f"{task}: out-of-fold ROC")


def write_comparison(results: dict[str, dict[str, Any]], out: Path) -> str:
    """comparison.csv (values and CI bounds) and comparison.md (value [low, high]); returns the markdown.

    One row per checkpoint and fraction; with a ``random:`` baseline among several checkpoints, a last
    column gives each one's AUC minus the baseline's on the same cases (paired bootstrap CI).
    """

    def cell(entry: dict[str, float]) -> str:
        return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"

    paired = any("auc_vs_baseline" in e for by_fraction in results.values() for e in by_fraction.values())
    columns = [*METRICS, *(["auc_vs_baseline"] if paired else [])]
    rows, md = [], ["| checkpoint | fraction | n | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for name, by_fraction in results.items():
        for fraction, entry in by_fraction.items():
            values = {
                **entry["overall"],
                **({"auc_vs_baseline": entry["auc_vs_baseline"]} if "auc_vs_baseline" in entry else {}),
            }
            row: dict[str, Any] = {"checkpoint": name, "fraction": float(fraction), "n": entry["n"]}
            for metric in columns:
                value = values.get(metric, {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")})
                row.update(
                    {metric: value["value"], f"{metric}_low": value["ci_low"], f"{metric}_high": value["ci_high"]}
                )
            rows.append(row)
            md.append(
                "| "
                + " | ".join(
                    [
                        name,
                        fraction,
                        str(entry["n"]),
                        *(cell(values[m]) if m in values else "baseline" for m in columns),
                    ]
                )
                + " |"
            )
    pd.DataFrame(rows).to_csv(out / "comparison.csv", index=False)
    text = "\n".join(md) + "\n"
    (out / "comparison.md").write_text(text)
    return text


def test_indices(study: Study, fold: int) -> np.ndarray:
    """The cases a fold's model predicts: its test fold, and the held-out test set (``holdout``)."""
    return np.flatnonzero((study.folds == fold) | (study.folds == HOLDOUT))


def training_indices(study: Study, fold: int) -> dict[float, np.ndarray]:
    """Training cases of a fold at each label fraction (nested, patient-level, stratified)."""
    train = np.flatnonzero((study.folds != fold) & (study.folds != HOLDOUT))
    return {
        f: subsample(train, study.table.labels, study.table.patients, f, study.settings.seed, fold)
        for f in study.fractions
    }
