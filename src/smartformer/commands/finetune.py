"""``smartformer finetune``: full fine-tuning of encoders on a labelled CSV, cross-validated like ``probe``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from smartformer.commands._options import TREATMENT_RESPONSE_HELP, add_evaluation_arguments, evaluation_settings

if TYPE_CHECKING:
    from smartformer.downstream.finetune import FinetuneSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune encoders + a linear head: cross-validated lesion (or scan) classification",
        description=(
            "Fine-tune each checkpoint with a linear head on the [CLS] and/or pooled features, per fold and "
            "label fraction, on the same patient-level stratified folds as probe. AdamW with layer-wise "
            "learning-rate decay: layers are numbered 0 (patch embedding), 1..L (the Swin blocks in order; "
            "a stage's patch merging shares its last block's number), L+1 (semantic attention), L+2 "
            "(the head), and layer i learns at lr * layer_decay^(L+2-i). Early stopping on the loss of a "
            "validation split carved from the training fold (stratified, patient-level), random flips, "
            "class-balanced loss. Outputs as probe. " + TREATMENT_RESPONSE_HELP
        ),
    )
    add_evaluation_arguments(p, batch_size=4)
    p.add_argument("--epochs", type=int, default=20, help="maximum epochs per fold (default: 20)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the head (default: 1e-4)")
    p.add_argument(
        "--layer-decay",
        type=float,
        default=0.75,
        help="layer-wise lr decay per layer towards the input, in (0, 1] (default: 0.75)",
    )
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    p.add_argument(
        "--patience", type=int, default=5, help="epochs without a better validation loss before stopping (default: 5)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of each training fold's patients held out for early stopping (default: 0.2)",
    )
    p.add_argument(
        "--flip-prob",
        type=float,
        default=0.5,
        help="probability of flipping a training crop along each axis (default: 0.5)",
    )
    p.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> FinetuneSettings:
    """The :class:`~smartformer.downstream.finetune.FinetuneSettings` of the command line."""
    from smartformer.downstream.finetune import FinetuneSettings
    from smartformer.errors import SmartformerError

    if not 0 <= args.val_fraction < 1 or not 0 <= args.flip_prob <= 1:
        raise SmartformerError("--val-fraction must be in [0, 1) and --flip-prob in [0, 1]")
    return FinetuneSettings(
        epochs=args.epochs,
        lr=args.lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        patience=args.patience,
        batch_size=args.batch_size,
        features=args.features,
        flip_prob=args.flip_prob,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from functools import partial

    from smartformer.commands.probe import print_evaluation
    from smartformer.downstream.evaluation import evaluate
    from smartformer.downstream.finetune import finetune_checkpoint

    settings = settings_from(args)  # refuse bad values before any work
    evaluation = evaluate(
        evaluation_settings(args),
        "finetune",
        partial(finetune_checkpoint, settings=settings, val_fraction=args.val_fraction),
        {**vars(settings), "val_fraction": args.val_fraction},
    )
    print_evaluation(evaluation, args.out)
    return 0
