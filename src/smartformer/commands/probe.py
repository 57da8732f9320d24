"""``smartformer probe``: linear probe of frozen encoders on a labelled CSV, cross-validated.

The work is :func:`smartformer.downstream.evaluation.evaluate`; the options ``finetune`` shares are in
:mod:`smartformer.commands._options`, and the printed summary (:func:`print_evaluation`) is shared too.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from smartformer.commands._options import TREATMENT_RESPONSE_HELP, add_evaluation_arguments, evaluation_settings
from smartformer.errors import SmartformerError
from smartformer.wording import plural

if TYPE_CHECKING:
    from smartformer.downstream.evaluation import Evaluation


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
            "baseline's on the same cases, paired bootstrap CI). " + TREATMENT_RESPONSE_HELP
        ),
    )
    add_evaluation_arguments(p)
    p.add_argument(
        "--C",
        type=float,
        default=None,
        help="inverse L2 strength of the logistic regression (default: chosen by inner CV among 0.01, 0.1, 1, 10)",
    )
    p.set_defaults(func=run)


def print_evaluation(evaluation: Evaluation, out: Path) -> None:
    """The comparison table, the held-out test set's AUCs and a one-line summary."""
    report = evaluation.report
    print(evaluation.markdown, end="")
    for name, by_fraction in report["results"].items():
        for fraction, entry in by_fraction.items():
            if "holdout" in entry:
                print(
                    f"held-out test set, {name} @ {fraction}: AUC {entry['holdout']['overall']['auc']['value']:.3f} "
                    f"({plural(entry['holdout']['n'], 'case')}, probabilities averaged over the folds' models)"
                )
    print(
        f"{report['task']}: {plural(report['cases'], 'case')}, {plural(report['folds'], 'fold')}, "
        f"{plural(len(report['checkpoints']), 'checkpoint')}; results in {out}"
    )


def run(args: argparse.Namespace) -> int:
    from functools import partial

    from smartformer.downstream.evaluation import evaluate
    from smartformer.downstream.probe import probe_checkpoint

    if args.C is not None and args.C <= 0:
        raise SmartformerError("--C must be positive")
    settings = evaluation_settings(args)
    evaluation = evaluate(
        settings, "probe", partial(probe_checkpoint, C=args.C), {"C": args.C if args.C is not None else "inner CV"}
    )
    print_evaluation(evaluation, args.out)
    return 0
