"""``smartformer segment``: fine-tune MONAI SwinUNETR from a SMART encoder, and segment new CTs.

``segment train`` builds SwinUNETR around the checkpoint's encoder (loaded strictly into
``swinViT``) and trains it on image/label-map pairs; ``segment predict`` writes label maps on each
input CT's own grid. The work is done by :mod:`smartformer.downstream.segmentation`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smartformer.commands._options import (
    add_checkpoint_argument,
    add_device_argument,
    add_inference_arguments,
    one_or_three,
)
from smartformer.errors import InputError, SmartformerError
from smartformer.wording import plural


def register(sub: argparse._SubParsersAction) -> None:
    seg = sub.add_parser(
        "segment",
        help="fine-tune MONAI SwinUNETR from a pretrained encoder; segment CTs",
        description="Segmentation with MONAI SwinUNETR whose Swin encoder starts from a SMART checkpoint.",
    )
    seg_sub = seg.add_subparsers(dest="segment_command", metavar="SUBCOMMAND")
    seg.set_defaults(func=lambda args: _help(seg))
    _add_train(seg_sub)
    _add_predict(seg_sub)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune SwinUNETR on image/label-map pairs",
        description=(
            "Build MONAI SwinUNETR with the checkpoint encoder's feature size, depths, heads and window, "
            "load the encoder into its swinViT (strictly: every tensor), and train it on image/label-map "
            "pairs: random positive/negative ROI crops (--roi), flips, intensity jitter, DiceCE loss, AdamW. "
            "Cases are split by patient into training and validation (seeded); validation runs a "
            "sliding window over whole volumes at step 0, every --val-every steps and at the end, "
            "with the Dice of each class. OUT gets best.safetensors + segmentation.json (the best "
            "mean validation Dice so far; what 'segment predict' reads), metrics.jsonl and settings.json."
        ),
    )
    add_checkpoint_argument(p)
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a CSV with image and label (or mask) columns (optional case, patient; relative paths "
        "resolve against the CSV's folder) or a folder of case folders such as "
        "CASE/ct.nii.gz + CASE/labels.nii.gz (see smartformer.data.cases)",
    )
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--labels",
        type=int,
        nargs="+",
        metavar="ID",
        help="label ids to segment, become classes 1..K; every other id is background "
        "(default: every non-zero id in the training label maps)",
    )
    which.add_argument("--num-classes", type=int, metavar="K", help="segment label ids 1..K")
    p.add_argument("--image-name", default=None, help="image file in each case folder (default: ct.*, image.*, img.*)")
    p.add_argument(
        "--label-name",
        default=None,
        help="label map file in each case folder (default: labels.*, label.*, seg.*, segmentation.*, "
        "else a lesion mask tumor.*, lesion.*, mask.* ...)",
    )
    add_inference_arguments(p)  # --spacing, --window, --roi (training crops too), --overlap (kept for predict)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=None, help="training steps (default: 1000)")
    length.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the training cases, one crop per case each (instead of --max-steps)",
    )
    p.add_argument("--val-every", type=int, default=100, help="validate every N steps (default: 100)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of patients held out for validation (default: 0.2, at least one)",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, cosine decay (default: 1e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay (default: 1e-5)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up (default: 0)")
    p.add_argument("--batch-size", type=int, default=2, help="crops per step (default: 2)")
    p.add_argument(
        "--freeze-encoder-steps",
        type=int,
        default=0,
        metavar="N",
        help="train only the decoder for the first N steps (default: 0)",
    )
    p.add_argument(
        "--flip-axes",
        type=int,
        nargs="*",
        default=[1, 2],
        metavar="AXIS",
        help="random flips along these RAS axes (0 = left-right, swaps left/right organs; default: 1 2)",
    )
    p.add_argument("--flip-prob", type=float, default=0.1, help="probability of each flip (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split, crops, decoder initialisation (default: 0)")
    p.add_argument("--log-every", type=int, default=10, help="loss line in metrics.jsonl every N steps")
    add_device_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment CTs with a trained model (label maps on each CT's grid)",
        description=(
            "Segment each --image with the best model of a 'segment train' run: sliding-window "
            "inference on the model's grid, argmax, and the label map brought back (nearest neighbour) "
            "onto the input's exact grid, with the original label ids. Writes OUT/NAME_seg.nii.gz "
            "(uint8, same shape and affine as the input, so it overlays in 3D Slicer)."
        ),
    )
    p.add_argument("--model", required=True, type=Path, help="a 'segment train' run folder")
    p.add_argument(
        "--image",
        required=True,
        type=Path,
        action="append",
        help="a CT: NIfTI, NRRD, MetaImage file or DICOM series folder (repeat for several)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) (default: the run's)")
    add_device_argument(p)
    p.set_defaults(func=run_predict)


def _check_out(out: Path, overwrite: bool) -> None:
    from smartformer.downstream.segmentation import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE

    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    held = [name for name in (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE) if (out / name).exists()]
    if held and not overwrite:
        raise InputError(out, f"already holds a run ({', '.join(held)}); pass --overwrite or choose another --out")


def run_train(args: argparse.Namespace) -> int:
    import math

    from smartformer.data.cases import find_cases
    from smartformer.downstream.segmentation import SegmentationSettings, split_cases, train_segmentation

    if args.num_classes is not None and args.num_classes < 1:
        raise SmartformerError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.epochs is not None and args.epochs < 1:
        raise SmartformerError(f"--epochs must be at least 1, got {args.epochs}")
    label_ids = (
        args.labels
        if args.labels is not None
        else (list(range(1, args.num_classes + 1)) if args.num_classes is not None else None)
    )
    base = dict(
        label_ids=label_ids,
        spacing=one_or_three(args.spacing, "spacing"),
        window=args.window,
        roi=one_or_three(args.roi, "roi"),
        val_every=args.val_every,
        val_fraction=args.val_fraction,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        freeze_encoder_steps=args.freeze_encoder_steps,
        flip_axes=tuple(args.flip_axes),
        flip_prob=args.flip_prob,
        overlap=args.overlap,
        seed=args.seed,
        log_every=args.log_every,
    )
    SegmentationSettings(**base)  # refuse bad values before reading anything
    _check_out(args.out, args.overwrite)
    cases = find_cases(args.data, image_name=args.image_name, mask_name=args.label_name, prefer="labels")
    train, val = split_cases(cases, args.val_fraction, args.seed)
    steps = (
        args.max_steps
        if args.max_steps is not None
        else (args.epochs * math.ceil(len(train) / args.batch_size) if args.epochs is not None else 1000)
    )
    settings = SegmentationSettings(**base, max_steps=steps)
    print(f"{plural(len(cases), 'case')}: {len(train)} training, {len(val)} validation; {plural(steps, 'step')}")
    result = train_segmentation(
        args.checkpoint, train, val, args.out, settings, device=args.device, progress=not args.no_progress
    )
    dice = ", ".join(f"{k}: {v:.3f}" for k, v in result.best_dice.items())
    print(f"best mean validation Dice {result.best_mean_dice:.3f} at step {result.best_step} ({dice})")
    print(f"  model   {args.out / 'best.safetensors'}")
    print(f"  metrics {args.out / 'metrics.jsonl'}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from smartformer.data.io import read_ct, validate_volume
    from smartformer.data.naming import output_names
    from smartformer.downstream.features import pick_device
    from smartformer.downstream.segmentation import load_segmenter, predict_labels, write_labels

    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        raise SmartformerError("--overlap must be in [0, 1)")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(args.out, "exists and is not a folder")
    device = pick_device(args.device)
    net, config = load_segmenter(args.model, device)
    for image in args.image:  # header checks of every input before any output
        validate_volume(image)
    names = output_names(args.image)
    for image, name in zip(args.image, names):
        ct = read_ct(image)
        prediction = predict_labels(net, config, ct, overlap=args.overlap, device=device)
        path = write_labels(prediction, args.out / f"{name}_seg.nii.gz")
        volumes = ", ".join(f"{i}: {ml:.1f} ml" for i, ml in prediction.volumes_ml().items())
        print(f"{path}  ({volumes})")
    sys.stdout.flush()
    return 0
