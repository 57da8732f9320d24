"""``smartformer probe``: linear probe of frozen encoders on a labelled CSV, cross-validated.

Also home of what ``finetune`` shares with it: the evaluation options (:func:`add_evaluation_arguments`)
and :func:`evaluate`, which checks the input, builds the crops once, splits the cases, runs a
classifier per checkpoint, fraction and fold, and writes folds.csv, predictions.csv, metrics.json,
roc.png and comparison.csv / comparison.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartformer.commands.features import CHECKPOINT_HELP, CSV_HELP, add_crop_arguments
from smartformer.errors import SmartformerError
from smartformer.wording import plural

if TYPE_CHECKING:
    import numpy as np

    from smartformer.downstream.cases import CaseTable

TREATMENT_RESPONSE_HELP = (
    "Treatment response (a label per scan) is the same machinery: give a CSV without a lesion location "
    "and every case is encoded as a whole-scan crop (the body, scaled to fit --crop)."
)


#: The fold of the held-out test set's cases (``--holdout``) in ``Study.folds`` and folds.csv.
HOLDOUT = -1


@dataclass
class Study:
    """What one evaluation works on: the cases, their crops and the paired splits."""

    table: "CaseTable"
    crops: "np.ndarray"
    folds: "np.ndarray"
    fractions: list[float]
    args: argparse.Namespace


#: ``run_checkpoint(study, spec, name) -> (prediction rows, per-fold details)``; a prediction row has
#: case index ``index``, ``fold``, ``fraction`` and ``probability``; a detail has ``fold``, ``fraction``
#: and anything the method wants recorded in metrics.json (chosen C, best epoch, ...).
CheckpointRunner = Callable[[Study, str, str], "tuple[list[dict[str, Any]], list[dict[str, Any]]]"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="linear probe of frozen encoders: cross-validated lesion (or scan) classification",
        description=(
            "Encode a crop around each lesion with each checkpoint (frozen), standardise the [CLS] and/or "
            "pooled features and fit a class-balanced logistic regression (C by inner patient-level CV on "
            "the training fold, or --C). Patient-level stratified k-fold CV; the folds and label-fraction "
            "subsets depend only on the CSV and --seed, so checkpoints are compared on the same splits. "
            "Writes folds.csv, predictions.csv, metrics.json (accuracy, balanced accuracy, AUC, "
            "sensitivity, specificity with bootstrap 95% intervals), roc.png and comparison.csv/.md "
            "(with a random:PRESET baseline among several checkpoints, also each one's AUC minus the "
            "baseline's on the same cases, paired bootstrap CI). "
            + TREATMENT_RESPONSE_HELP
        ),
    )
    add_evaluation_arguments(p)
    p.add_argument("--C", type=float, default=None,
                   help="inverse L2 strength of the logistic regression (default: chosen by inner CV "
                        "among 0.01, 0.1, 1, 10)")
    p.set_defaults(func=run)


def add_evaluation_arguments(p: argparse.ArgumentParser, batch_size: int = 8) -> None:
    """Options shared by probe and finetune: data, checkpoints, splits, metrics and crops."""
    p.add_argument("--data", "--csv", dest="csv", required=True, type=Path, help=CSV_HELP)
    p.add_argument("--checkpoint", required=True, nargs="+", help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--features", choices=("cls", "pooled", "both"), default="both",
                   help="classifier input: [CLS], mean of the tokens, or both concatenated (default: both)")
    p.add_argument("--folds", type=int, default=5, help="patient-level stratified CV folds (default: 5)")
    p.add_argument("--fraction", type=float, nargs="+", default=[1.0], metavar="F",
                   help="label fractions of each training fold, e.g. 0.1 0.25 0.5 1.0 (patient-level, "
                        "stratified, nested, seeded; the test fold is never subsampled; default: 1.0)")
    p.add_argument("--holdout", type=float, default=0.0, metavar="F",
                   help="patients (this fraction, stratified, seeded) held out as a test set beside the CV, as "
                        "the SMART paper's LIDC protocol: every fold's model predicts it and metrics.json gives "
                        "'holdout', the metrics of the fold-averaged probabilities (default: 0, none)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples (patients, or cases without patient ids) for 95%% CIs (default: 1000)")
    add_crop_arguments(p, batch_size)


def evaluate(args: argparse.Namespace, task: str, run_checkpoint: CheckpointRunner,
             settings: dict[str, Any]) -> int:
    """Check everything, then run ``run_checkpoint`` per checkpoint and write the outputs to ``args.out``.

    No output is written before the CSV, the images, the crops and the splits have all been checked.
    """
    import json

    import numpy as np
    import pandas as pd

    from smartformer.commands.features import crop_options
    from smartformer.downstream.cases import build_crops, read_cases
    from smartformer.downstream.features import RANDOM_PREFIX, checkpoint_names
    from smartformer.downstream.splits import assign_folds, check_fractions, holdout_cases

    if args.bootstrap < 0:
        raise SmartformerError("--bootstrap must be 0 or more")
    if args.out.exists() and not args.out.is_dir():
        raise SmartformerError(f"--out {args.out}: exists and is not a directory")
    options = crop_options(args)
    fractions = check_fractions(args.fraction)
    names = checkpoint_names(list(args.checkpoint))
    table = read_cases(args.csv)
    held = holdout_cases(table.labels, table.patients, args.holdout, args.seed)
    folds = np.full(len(table.labels), HOLDOUT, dtype=np.int64)  # the CV folds of the rest
    folds[~held] = assign_folds(table.labels[~held], table.patients[~held], args.folds, args.seed)
    crops = build_crops(table, options, progress=not args.no_progress)
    study = Study(table=table, crops=crops, folds=folds, fractions=fractions, args=args)
    rows: list[dict[str, Any]] = []
    details: dict[str, list[dict[str, Any]]] = {}
    for spec, name in zip(args.checkpoint, names):
        predicted, details[name] = run_checkpoint(study, spec, name)
        for row in predicted:
            case = table.cases[row["index"]]
            rows.append({"case": case.case, "patient": case.patient, "fold": row["fold"], "fraction": row["fraction"],
                         "checkpoint": name, "label": case.label, "probability": row["probability"],
                         "set": "holdout" if held[row["index"]] else "cv"})
    every = pd.DataFrame(rows, columns=["case", "patient", "fold", "fraction", "checkpoint", "label",
                                        "probability", "set"])
    predictions = every[every["set"] == "cv"]
    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"case": table.ids, "patient": table.patients, "label": table.labels,
                  "fold": folds}).to_csv(args.out / "folds.csv", index=False)
    (every if held.any() else predictions.drop(columns="set")).to_csv(args.out / "predictions.csv", index=False)
    results = summarize(predictions, details, args.bootstrap, args.seed)
    if held.any():
        summarize_holdout(every[every["set"] == "holdout"], results, args.bootstrap, args.seed)
    baseline = next((n for n, spec in zip(names, args.checkpoint) if spec.startswith(RANDOM_PREFIX)), None)
    if baseline is not None and len(names) > 1:
        compare_to_baseline(predictions, results, baseline, args.bootstrap, args.seed)
    report = {
        "task": task,
        "csv": str(args.csv),
        "classes": table.class_mapping(),
        "cases": len(table.cases),
        "patients": len(set(table.patients.tolist())),
        "located_cases": sum(c.located for c in table.cases),
        "folds": args.folds,
        "holdout_cases": int(held.sum()),
        "fractions": fractions,
        "seed": args.seed,
        "bootstrap": args.bootstrap,
        "features": args.features,
        "crop_options": options.to_dict(),
        "settings": settings,
        "checkpoints": dict(zip(names, map(str, args.checkpoint))),
        "baseline": baseline,
        "results": results,
    }
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    write_roc(predictions, args.out / "roc.png", task)
    markdown = write_comparison(results, args.out)
    print(markdown, end="")
    for name, by_fraction in results.items():
        for fraction, entry in by_fraction.items():
            if "holdout" in entry:
                print(f"held-out test set, {name} @ {fraction}: AUC {entry['holdout']['overall']['auc']['value']:.3f} "
                      f"({plural(entry['holdout']['n'], 'case')}, probabilities averaged over the folds' models)")
    print(f"{task}: {plural(len(table.cases), 'case')}, {plural(args.folds, 'fold')}, "
          f"{plural(len(names), 'checkpoint')}; results in {args.out}")
    return 0


def summarize(predictions: Any, details: dict[str, list[dict[str, Any]]], n_boot: int,
              seed: int) -> dict[str, dict[str, Any]]:
    """Per checkpoint and fraction: out-of-fold metrics with bootstrap CIs, and per-fold metrics + details."""
    from smartformer.downstream.metrics import binary_metrics, metrics_with_ci

    results: dict[str, dict[str, Any]] = {}
    for (name, fraction), group in predictions.groupby(["checkpoint", "fraction"], sort=False):
        per_fold = []
        for fold, part in group.groupby("fold"):
            extra = [d for d in details.get(name, []) if d["fold"] == fold and d["fraction"] == fraction]
            per_fold.append({"fold": int(fold), "n_test": len(part), **(extra[0] if extra else {}),
                             **binary_metrics(part["label"].to_numpy(), part["probability"].to_numpy())})
        results.setdefault(name, {})[f"{fraction:g}"] = {
            "n": len(group),
            "overall": metrics_with_ci(group["label"].to_numpy(), group["probability"].to_numpy(),
                                       group["patient"].to_numpy(), n=n_boot, seed=seed),
            "per_fold": per_fold,
        }
    return results


def summarize_holdout(held: Any, results: dict[str, dict[str, Any]], n_boot: int, seed: int) -> None:
    """Add ``holdout`` to each checkpoint and fraction of ``results``: the metrics of the held-out cases'
    probabilities averaged over the folds' models, and each fold model's own."""
    from smartformer.downstream.metrics import binary_metrics, metrics_with_ci

    for (name, fraction), group in held.groupby(["checkpoint", "fraction"], sort=False):
        mean = group.groupby(["case", "patient", "label"], sort=False)["probability"].mean().reset_index()
        results[name][f"{fraction:g}"]["holdout"] = {
            "n": len(mean),
            "overall": metrics_with_ci(mean["label"].to_numpy(), mean["probability"].to_numpy(),
                                       mean["patient"].to_numpy(), n=n_boot, seed=seed),
            "per_fold": [{"fold": int(fold), **binary_metrics(part["label"].to_numpy(), part["probability"].to_numpy())}
                         for fold, part in group.groupby("fold")],
        }


def compare_to_baseline(predictions: Any, results: dict[str, dict[str, Any]], baseline: str, n_boot: int,
                        seed: int) -> None:
    """Add ``auc_vs_baseline`` (AUC minus the baseline's on the same cases, paired bootstrap CI) to ``results``."""
    from smartformer.downstream.metrics import paired_difference

    table = predictions.pivot_table(index=["fraction", "case", "patient", "label"], columns="checkpoint",
                                    values="probability").reset_index()
    for name, by_fraction in results.items():
        if name == baseline:
            continue
        for fraction, entry in by_fraction.items():
            rows = table[table["fraction"].map(lambda f: f"{f:g}") == fraction]
            entry["auc_vs_baseline"] = paired_difference(rows["label"].to_numpy(), rows[name].to_numpy(),
                                                         rows[baseline].to_numpy(), rows["patient"].to_numpy(),
                                                         n=n_boot, seed=seed)


def write_roc(predictions: Any, path: Path, task: str) -> Path:
    """roc.png: one out-of-fold ROC curve per checkpoint and fraction."""
    from smartformer.downstream.metrics import plot_roc

    several = predictions["fraction"].nunique() > 1
    curves = {(f"{name} @ {fraction:g}" if several else name): (g["label"].to_numpy(), g["probability"].to_numpy())
              for (name, fraction), g in predictions.groupby(["checkpoint", "fraction"], sort=False)}
    return plot_roc(curves, path, title=f"{task}: out-of-fold ROC")


def write_comparison(results: dict[str, dict[str, Any]], out: Path) -> str:
    """comparison.csv (values and CI bounds) and comparison.md (value [low, high]); returns the markdown.

    One row per checkpoint and fraction; with a ``random:`` baseline among several checkpoints, a last
    column gives each one's AUC minus the baseline's on the same cases (paired bootstrap CI).
    """
    import pandas as pd

    from smartformer.downstream.metrics import METRICS

    def cell(entry: dict[str, float]) -> str:
        return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"

    paired = any("auc_vs_baseline" in e for by_fraction in results.values() for e in by_fraction.values())
    columns = [*METRICS, *(["auc_vs_baseline"] if paired else [])]
    rows, md = [], ["| checkpoint | fraction | n | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for name, by_fraction in results.items():
        for fraction, entry in by_fraction.items():
            values = {**entry["overall"], **({"auc_vs_baseline": entry["auc_vs_baseline"]}
                                             if "auc_vs_baseline" in entry else {})}
            row: dict[str, Any] = {"checkpoint": name, "fraction": float(fraction), "n": entry["n"]}
            for metric in columns:
                value = values.get(metric, {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")})
                row.update({metric: value["value"], f"{metric}_low": value["ci_low"], f"{metric}_high": value["ci_high"]})
            rows.append(row)
            md.append("| " + " | ".join([name, fraction, str(entry["n"]),
                                         *(cell(values[m]) if m in values else "baseline" for m in columns)]) + " |")
    pd.DataFrame(rows).to_csv(out / "comparison.csv", index=False)
    text = "\n".join(md) + "\n"
    (out / "comparison.md").write_text(text)
    return text


def test_indices(study: Study, fold: int) -> "np.ndarray":
    """The cases a fold's model predicts: its test fold, and the held-out test set (``--holdout``)."""
    import numpy as np

    return np.flatnonzero((study.folds == fold) | (study.folds == HOLDOUT))


def training_indices(study: Study, fold: int) -> dict[float, "np.ndarray"]:
    """Training cases of a fold at each label fraction (nested, patient-level, stratified)."""
    import numpy as np

    from smartformer.downstream.splits import subsample

    train = np.flatnonzero((study.folds != fold) & (study.folds != HOLDOUT))
    return {f: subsample(train, study.table.labels, study.table.patients, f, study.args.seed, fold)
            for f in study.fractions}


def probe_checkpoint(study: Study, spec: str, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Frozen features once, then a logistic regression per fold and fraction."""
    import numpy as np

    from smartformer.downstream.features import extract_features, load_encoder, pick_device
    from smartformer.downstream.probe import probe_probabilities

    args, table = study.args, study.table
    features = extract_features(load_encoder(spec, args.seed), study.crops, args.features, args.batch_size,
                                pick_device(args.device), progress=not args.no_progress, desc=f"features {name}")
    rows, details = [], []
    for fold in range(args.folds):
        test = test_indices(study, fold)
        for fraction, train in training_indices(study, fold).items():
            probs, C = probe_probabilities(features[train], table.labels[train], table.patients[train],
                                           features[test], C=args.C, seed=args.seed)
            rows += [{"index": int(i), "fold": fold, "fraction": fraction, "probability": float(p)}
                     for i, p in zip(test, probs)]
            details.append({"fold": fold, "fraction": fraction, "n_train": len(train), "C": C})
    return rows, details


def run(args: argparse.Namespace) -> int:
    if args.C is not None and args.C <= 0:
        raise SmartformerError("--C must be positive")
    return evaluate(args, "probe", probe_checkpoint, {"C": args.C if args.C is not None else "inner CV"})
