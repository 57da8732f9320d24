"""``smartformer data lesions``: lesion vs. normal-tissue samples from CTs with lesion masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from smartformer.commands._data_builder import add_builder_parser

_DESCRIPTION = """\
Build a lesion-vs-normal-tissue classification table from CT scans with lesion masks, for
`smartformer probe/finetune/features`. Nothing is copied: each row points into the original CT
with a centre in world millimetres (RAS frame of the reader's affine).

DATA is
  a folder of case folders (the folder name is the patient id), each holding a CT named ct.*
    and a mask named tumor.*, lesion.*, mask.*, labels.* ... (e.g. STS_001/ct.nii.gz +
    STS_001/tumor.nii.gz, or phantom case_000/ct.nii.gz + labels.nii.gz with --mask-label 11),
  or a CSV with 'image' and 'mask' columns (paths relative to the CSV's folder or absolute) and
    an optional 'patient' column.

Positives (label 1, kind lesion): the centroid of each connected lesion component (or of the
largest, --largest-only), moved to the nearest lesion voxel if it falls outside the lesion.
Negatives (label 0, kind normal): --negatives-per-case voxels drawn at random from body tissue
(HU > --body-hu) at least --min-distance mm from every lesion voxel, seeded by (--seed, case id).

Writes OUT/lesions.csv with columns image, label, patient, center_x, center_y, center_z, kind,
mask, component, lesion_voxels, distance_mm, hu. The image and mask paths are absolute where
they were given absolute, else relative to OUT, as every reader of the CSV resolves them."""

_EPILOG = """\
examples:
  smartformer data lesions --data ../shared/data/sts --out data/sts_lesions
  smartformer data lesions --data data/phantoms --mask-label 11 --out data/phantom_lesions
  smartformer data lesions --data cases.csv --out data/lesions --negatives-per-case 8 --min-distance 40"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lesions`` to the ``smartformer data`` subcommands."""
    parser = add_builder_parser(
        subparsers,
        "lesions",
        "lesion vs. normal-tissue samples (centres in mm) from CTs with lesion masks",
        _DESCRIPTION,
        _EPILOG,
        "lesions.csv",
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="CSV_OR_DIR",
        help="folder of case folders, or CSV with 'image' and 'mask' columns",
    )
    parser.add_argument(
        "--negatives-per-case",
        type=int,
        default=4,
        metavar="N",
        help="normal-tissue samples per case (default: %(default)s)",
    )
    parser.add_argument(
        "--min-distance",
        dest="min_distance_mm",
        type=float,
        default=30.0,
        metavar="MM",
        help="least distance of a negative from any lesion voxel, mm (default: %(default)s)",
    )
    parser.add_argument(
        "--body-hu",
        type=float,
        default=-500.0,
        metavar="HU",
        help="negatives lie in voxels above this HU (default: %(default)s)",
    )
    parser.add_argument(
        "--mask-label",
        type=int,
        default=None,
        metavar="V",
        help="lesion value in a multi-label mask (phantoms: 11); default: any non-zero voxel of a binary mask",
    )
    parser.add_argument(
        "--largest-only", action="store_true", help="one positive per case, at the largest lesion component"
    )
    parser.add_argument(
        "--min-lesion-voxels",
        type=int,
        default=10,
        metavar="N",
        help="ignore lesion components smaller than this (default: %(default)s)",
    )
    parser.add_argument(
        "--image-name", default=None, metavar="FILE", help="file name of the CT in each case folder (default: ct.*)"
    )
    parser.add_argument(
        "--mask-name",
        default=None,
        metavar="FILE",
        help="file name of the mask in each case folder (default: tumor.*, labels.* ...)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the table and print the counts."""
    from smartformer.data.builders.lesions import SamplingOptions, build_lesion_set, summarize

    options = SamplingOptions(
        negatives_per_case=args.negatives_per_case,
        min_distance_mm=args.min_distance_mm,
        body_hu=args.body_hu,
        mask_label=args.mask_label,
        largest_only=args.largest_only,
        min_lesion_voxels=args.min_lesion_voxels,
        seed=args.seed,
    )
    path, results = build_lesion_set(
        args.data,
        args.out,
        options,
        image_name=args.image_name,
        mask_name=args.mask_name,
        progress=not args.no_progress,
    )
    for line in summarize(results, args.negatives_per_case):
        print(line)
    print(f"wrote {path}")
    return 0
