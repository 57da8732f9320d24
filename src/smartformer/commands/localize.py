"""``smartformer localize``: zero-shot tumour localization of attention maps against tumour masks.

For every (CT, mask) pair and every checkpoint, the mean semantic attention on the CT's grid is
scored with :func:`smartformer.analysis.localization.localization_metrics` (inside the body),
side by side with three baselines: a centre prior, an intensity prior and the same network with
random weights (named ``random_PRESET``, as ``--checkpoint random:PRESET`` is; given such a checkpoint,
it is the random baseline). Writes ``cases.csv`` (one row per case and method), ``summary.json`` (mean, std
and median per method and metric), ``comparison.csv`` / ``comparison.md`` (methods x mean
metrics) and ``montage.png``. The work is :mod:`smartformer.analysis.zero_shot`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smartformer.commands._options import (
    add_checkpoint_argument,
    add_inference_arguments,
    check_inference_arguments,
    inference_kwargs,
)
from smartformer.errors import SmartformerError
from smartformer.wording import plural


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "localize",
        help="zero-shot tumour localization of attention maps vs tumour masks",
        description=(
            "Score the mean semantic attention of one or more checkpoints against tumour masks "
            "(voxel AUROC, pointing game, Dice/IoU at Otsu and at the top-k percent, bounding-box IoU, "
            "enrichment, energy pointing), all inside the body (HU > -500 plus the lesion), next to "
            "a centre prior, an intensity prior and the network with random weights. --data is a CSV "
            "with image and mask columns (mask paths relative to the CSV's folder) or a folder of case "
            "folders, each with ct.* and either tumor.*/mask.*/lesion.* (voxels > 0) or labels.* "
            "(the lesion is --lesion-label, default 11 as in the built-in phantoms)."
        ),
    )
    add_checkpoint_argument(p, many=True)
    p.add_argument("--data", required=True, type=Path, help="CSV (image,mask) or a folder of case folders")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_inference_arguments(p)
    p.add_argument(
        "--lesion-label",
        type=int,
        default=None,
        metavar="ID",
        help="label value of the lesion in label maps (default: 11 for labels.* files, "
        "every voxel > 0 for mask files and CSV masks)",
    )
    p.add_argument(
        "--tolerance-mm",
        type=float,
        default=10.0,
        help="pointing game: distance from the lesion still counted as a hit (default: 10)",
    )
    p.add_argument("--top-k", type=float, default=5.0, help="percent of body voxels for top-k Dice/IoU (default: 5)")
    p.add_argument(
        "--windows",
        type=int,
        default=0,
        help="score N windows per case at random offsets that hold part of the lesion, for "
        "lesion-centred crops such as STS (default: 0, the whole CT)",
    )
    p.add_argument("--window-mm", type=float, default=100.0, help="side of those windows in mm (default: 100)")
    p.add_argument("--max-cases", type=int, default=None, help="only the first N cases")
    p.add_argument(
        "--no-random-baseline",
        action="store_true",
        help="skip the random-weights network (random_PRESET: the first checkpoint's architecture; "
        "a random:PRESET checkpoint replaces it)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and windows (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from smartformer.analysis.zero_shot import ScoringSettings, localization_methods, score_cases, write_localization
    from smartformer.data.cases import find_cases
    from smartformer.models.hub import resolve_checkpoint

    check_inference_arguments(args)
    if args.tolerance_mm < 0 or not 0 < args.top_k <= 100:
        raise SmartformerError("--tolerance-mm must be >= 0 and --top-k in (0, 100]")
    if args.windows < 0 or args.window_mm <= 0 or (args.max_cases is not None and args.max_cases < 1):
        raise SmartformerError("--windows must be >= 0, --window-mm > 0 and --max-cases >= 1")
    names, models, methods = localization_methods(
        args.checkpoint, args.seed, random_weights=not args.no_random_baseline
    )
    cases = find_cases(args.data)[: args.max_cases]
    kwargs = inference_kwargs(args)
    scoring = ScoringSettings(
        tolerance_mm=args.tolerance_mm, top_k_percent=args.top_k, windows=args.windows, window_mm=args.window_mm
    )
    args.out.mkdir(parents=True, exist_ok=True)
    result = score_cases(
        models, methods, cases, args.lesion_label, scoring, kwargs, seed=args.seed, progress=not args.no_progress
    )
    if not result.rows:
        raise SmartformerError(f"{args.data}: every mask was empty on its CT's grid; nothing to score")
    write_localization(
        result,
        args.out,
        checkpoints={name: resolve_checkpoint(spec).source for name, spec in zip(names, args.checkpoint)},
        data=str(args.data),
        settings={
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()},
            "tolerance_mm": args.tolerance_mm,
            "top_k_percent": args.top_k,
            "windows": args.windows,
            "window_mm": args.window_mm,
            "seed": args.seed,
            "region": "body (HU > -500) + lesion",
        },
    )
    print((args.out / "comparison.md").read_text(), end="")
    print(f"{plural(result.cases, 'case')} scored, {len(result.skipped)} skipped; results in {args.out}")
    return 0
