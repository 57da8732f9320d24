"""``smartformer features``: frozen [CLS] and pooled features of every case of a CSV, to CSV or Parquet."""

from __future__ import annotations

import argparse
from pathlib import Path

from smartformer.commands._options import CSV_HELP, add_checkpoint_argument, add_crop_arguments, crop_options
from smartformer.errors import InputError, SmartformerError
from smartformer.wording import plural


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="frozen [CLS] and pooled features of CT crops, to CSV or Parquet",
        description=(
            "Encode a crop around each case's lesion (or the whole scan, when the CSV gives no location) "
            "with one checkpoint and write one row per case: case, the CSV's label and patient columns "
            "when present, then cls_0.. and/or pooled_0.. (the semantic [CLS] and the mean of the "
            "tokens). --out ending in .csv writes CSV, in .parquet writes Parquet (needs pyarrow)."
        ),
    )
    p.add_argument(
        "--data",
        "--csv",
        dest="csv",
        required=True,
        type=Path,
        help=CSV_HELP.replace(", label,", ", label (optional),"),
    )
    add_checkpoint_argument(p)
    p.add_argument("--out", required=True, type=Path, help="output table, .csv or .parquet")
    p.add_argument(
        "--features", choices=("cls", "pooled", "both"), default="both", help="which features to write (default: both)"
    )
    p.add_argument(
        "--distances",
        action="store_true",
        help="also score the features by their labels as the SMART paper scores OrganMNIST3D: intra- "
        "and inter-cluster Euclidean distances (mean +- sd) and the centroid separation, printed "
        "and written to OUT with the suffix .distances.json (needs a label column)",
    )
    add_crop_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from smartformer.downstream.cases import build_crops, read_cases
    from smartformer.downstream.features import (
        extract_features,
        feature_table,
        load_encoder,
        pick_device,
        write_distances,
        write_feature_table,
    )
    from smartformer.models.hub import checkpoint_names

    suffix = args.out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise SmartformerError(f"--out {args.out}: name a .csv or .parquet file")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise SmartformerError("Parquet output needs pyarrow: pip install 'smartformer[parquet]'") from None
    if args.out.is_dir():
        raise InputError(args.out, "is a directory; name a .csv or .parquet file")
    options = crop_options(args)
    device = pick_device(args.device)
    (name,) = checkpoint_names([args.checkpoint])
    table = read_cases(args.csv, require_labels=False)
    if args.distances and "label" not in table.columns:
        raise InputError(args.csv, "has no label column, which --distances needs")
    model = load_encoder(args.checkpoint, seed=args.seed)
    crops = build_crops(table, options, progress=not args.no_progress)
    features = extract_features(model, crops, args.features, args.batch_size, device, progress=not args.no_progress)
    frame = feature_table(table, features, args.features, model.embed_dim)
    write_feature_table(frame, args.out)
    print(
        f"{plural(len(frame), 'case')} x {plural(features.shape[1], 'feature')} of {name} ({args.features}) "
        f"-> {args.out}"
    )
    if args.distances:
        path = args.out.with_suffix(".distances.json")
        result = write_distances(frame, frame["label"].astype(str).to_numpy(), path)
        for kind, entry in result.items():
            intra, inter = entry["intra_distance"], entry["inter_distance"]
            print(
                f"  {kind}: intra-cluster {intra['mean']:.2f} +- {intra['sd']:.2f}, inter-cluster "
                f"{inter['mean']:.2f} +- {inter['sd']:.2f}, centroid separation {entry['centroid_separation']:.2f} "
                f"({len(entry['labels'])} labels)"
            )
        print(f"  distances -> {path}")
    return 0
