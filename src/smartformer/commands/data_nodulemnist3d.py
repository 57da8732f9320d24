"""``smartformer data nodulemnist3d``: MedMNIST NoduleMNIST3D .npz to NIfTI volumes + a CSV."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from smartformer.commands._data_builder import add_builder_parser

_DESCRIPTION = """\
Turn a local MedMNIST NoduleMNIST3D file (nodulemnist3d.npz with 28^3 crops, or
nodulemnist3d_64.npz with 64^3 crops; keys train/val/test _images and _labels) into one NIfTI
per nodule and a table for `smartformer probe/finetune/features`.

Writes
  OUT/images/<split>_<index>.nii.gz  int16, 1 mm voxels, world origin at the volume centre
  OUT/nodulemnist3d.csv              image (relative to OUT), label (0 benign, 1 malignant),
                                     patient (= the sample id: MedMNIST has no patient ids),
                                     split (train/val/test, the official split), index

The files store 0..255 without their original HU window: values are mapped linearly onto
--hu-range (default -1000..400 HU, a lung window) so that HU windows downstream act on
plausible numbers; absolute HU values are approximate. Crops are used whole downstream (no
centre columns)."""

_EPILOG = """\
examples:
  smartformer data nodulemnist3d --npz ~/.medmnist/nodulemnist3d_64.npz --out data/nodulemnist3d_64
  smartformer data nodulemnist3d --npz nodulemnist3d.npz --out data/nm3d --hu-range -1024 600"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nodulemnist3d`` to the ``smartformer data`` subcommands."""
    register_medmnist(
        subparsers,
        "nodulemnist3d",
        "MedMNIST NoduleMNIST3D .npz to NIfTI crops + labels CSV",
        _DESCRIPTION,
        _EPILOG,
        "images/ and nodulemnist3d.csv",
        run,
    )


def register_medmnist(
    subparsers: argparse._SubParsersAction,
    name: str,
    summary: str,
    description: str,
    epilog: str,
    writes: str,
    func: Any,
) -> None:
    """A ``data <name>`` builder of a MedMNIST 3D ``.npz`` (``--npz``, ``--hu-range``)."""
    parser = add_builder_parser(subparsers, name, summary, description, epilog, writes)
    parser.add_argument("--npz", required=True, type=Path, metavar="FILE", help=f"the local {name}*.npz file")
    parser.add_argument(
        "--hu-range",
        type=float,
        nargs=2,
        default=[-1000.0, 400.0],
        metavar=("LOW", "HIGH"),
        help="HU that 0 and 255 map to (default: %(default)s)",
    )
    parser.set_defaults(func=func)


def run(args: argparse.Namespace) -> int:
    """Convert the file and print the counts per split."""
    from smartformer.data.builders.nodulemnist3d import build_nodulemnist3d

    path, labels = build_nodulemnist3d(args.npz, args.out, args.hu_range, progress=not args.no_progress)
    for split, values in labels.items():
        n_malignant = int((values == 1).sum())
        print(f"{split}: {len(values)} nodules ({n_malignant} malignant, {len(values) - n_malignant} benign)")
    print(f"wrote {path}")
    return 0
