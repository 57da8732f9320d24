"""``smartformer finetune``: full fine-tuning of encoders on a labelled CSV, cross-validated like ``probe``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from smartformer.commands.probe import TREATMENT_RESPONSE_HELP, add_evaluation_arguments, evaluate

if TYPE_CHECKING:
    from smartformer.commands.probe import Study
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
            "class-balanced loss. Outputs as probe. "
            + TREATMENT_RESPONSE_HELP
        ),
    )
    add_evaluation_arguments(p, batch_size=4)
    p.add_argument("--epochs", type=int, default=20, help="maximum epochs per fold (default: 20)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the head (default: 1e-4)")
    p.add_argument("--layer-decay", type=float, default=0.75,
                   help="layer-wise lr decay per layer towards the input, in (0, 1] (default: 0.75)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    p.add_argument("--patience", type=int, default=5,
                   help="epochs without a better validation loss before stopping (default: 5)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each training fold's patients held out for early stopping (default: 0.2)")
    p.add_argument("--flip-prob", type=float, default=0.5,
                   help="probability of flipping a training crop along each axis (default: 0.5)")
    p.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> "FinetuneSettings":
    """The :class:`~smartformer.downstream.finetune.FinetuneSettings` of the command line."""
    from smartformer.downstream.finetune import FinetuneSettings
    from smartformer.errors import SmartformerError

    if not 0 <= args.val_fraction < 1 or not 0 <= args.flip_prob <= 1:
        raise SmartformerError("--val-fraction must be in [0, 1) and --flip-prob in [0, 1]")
    return FinetuneSettings(epochs=args.epochs, lr=args.lr, layer_decay=args.layer_decay,
                            weight_decay=args.weight_decay, patience=args.patience, batch_size=args.batch_size,
                            features=args.features, flip_prob=args.flip_prob, seed=args.seed)


def finetune_checkpoint(study: "Study", spec: str, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A fresh copy of the checkpoint fine-tuned per fold and fraction, then scored on the test fold."""
    import numpy as np

    from smartformer.commands.probe import test_indices, training_indices
    from smartformer.downstream.features import load_encoder, pick_device
    from smartformer.downstream.finetune import finetune, predict_probabilities
    from smartformer.downstream.splits import validation_split

    args, table = study.args, study.table
    settings, device = settings_from(args), pick_device(args.device)
    rows, details = [], []
    for fold in range(args.folds):
        test = test_indices(study, fold)
        for fraction, subset in training_indices(study, fold).items():
            train, val = (validation_split(subset, table.labels, table.patients, args.val_fraction, args.seed, fold)
                          if args.val_fraction > 0 else (subset, subset[:0]))
            result = finetune(load_encoder(spec, args.seed), study.crops, table.labels, train, val, settings,
                              device, fold=fold, progress=not args.no_progress)
            probs = predict_probabilities(result.model, study.crops, test, args.batch_size, device)
            rows += [{"index": int(i), "fold": fold, "fraction": fraction, "probability": float(p)}
                     for i, p in zip(test, probs)]
            details.append({"fold": fold, "fraction": fraction, "n_train": len(train), "n_val": len(val),
                            "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                            "history": result.history})
    return rows, details


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)  # refuse bad values before any work
    return evaluate(args, "finetune", finetune_checkpoint,
                    {**vars(settings), "val_fraction": args.val_fraction})
