"""``smartformer data organmnist3d``: MedMNIST OrganMNIST3D .npz to NIfTI volumes + a CSV."""

from __future__ import annotations

import argparse

from smartformer.commands.data_nodulemnist3d import register_medmnist

_DESCRIPTION = """\
Turn a local MedMNIST OrganMNIST3D file (organmnist3d.npz with 28^3 crops, or
organmnist3d_64.npz with 64^3 crops; keys train/val/test _images and _labels, labels 0-10) into
one NIfTI per organ crop and a table, as `data nodulemnist3d` does: the set of the SMART paper's
organ clustering (1,743 crops, 11 organs; they report intra- and inter-cluster distances of the
pretrained features, which `smartformer cluster` prints for token features).

Writes
  OUT/images/<split>_<index>.nii.gz  int16, 1 mm voxels, world origin at the volume centre
  OUT/organmnist3d.csv               image, label (0-10), patient (= the sample id), split, index
  OUT/labels.json                    label id -> organ (liver, kidney-right, kidney-left,
                                     femur-right, femur-left, bladder, heart, lung-right,
                                     lung-left, spleen, pancreas)

The files store 0..255 without their original HU window: values are mapped linearly onto
--hu-range (default -1000..400 HU); absolute HU values are approximate."""

_EPILOG = """\
examples:
  smartformer data organmnist3d --npz ~/.medmnist/organmnist3d_64.npz --out data/organmnist3d_64"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``organmnist3d`` to the ``smartformer data`` subcommands."""
    register_medmnist(
        subparsers,
        "organmnist3d",
        "MedMNIST OrganMNIST3D .npz to NIfTI crops + labels CSV",
        _DESCRIPTION,
        _EPILOG,
        "images/, organmnist3d.csv and labels.json",
        run,
    )


def run(args: argparse.Namespace) -> int:
    """Convert the file and print the counts per split and organ."""
    from smartformer.data.builders.nodulemnist3d import ORGAN_CLASSES, build_medmnist3d

    path, labels = build_medmnist3d(
        args.npz, args.out, args.hu_range, progress=not args.no_progress, name="organmnist3d", classes=ORGAN_CLASSES
    )
    for split, values in labels.items():
        counts = ", ".join(f"{organ} {int((values == i).sum())}" for i, organ in enumerate(ORGAN_CLASSES))
        print(f"{split}: {len(values)} crops ({counts})")
    print(f"wrote {path}")
    return 0
