"""``smartformer data phantom``: write synthetic chest/upper-abdomen CT cases with labels."""

from __future__ import annotations

import argparse
from pathlib import Path

from smartformer.data.phantom import (
    ANISOTROPIC_SPACING,
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    LABELS,
    same_extent_shape,
    write_phantoms,
)


def _grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> str:
    """``144 x 112 x 112 voxels of 2.5 x 2.5 x 2.5 mm``."""
    return f"{' x '.join(map(str, shape))} voxels of {' x '.join(f'{s:g}' for s in spacing)} mm"


_DESCRIPTION = f"""\
Write synthetic chest and upper-abdomen CT volumes (Hounsfield units) with organ labels and
1-3 lung/liver nodules or tumours per case, for trying the pipeline without real data.

Each case is a folder DIR/case_000, DIR/case_001, ... holding
  ct.nii.gz      int16 HU, RAS affine, world origin at the volume centre
  labels.nii.gz  uint8 label map: {", ".join(f"{value} {name}" for value, name in LABELS.items())}
  labels.json    label names, shape, spacing, seeds and, per lesion, its organ, centre (voxel
                 and mm), radius (mm) and mean HU

The same --seed gives the same cases (identical arrays); case i uses a seed derived from
(--seed, i), so sets made with different seeds share no case. The default grid is
{_grid(DEFAULT_SHAPE, DEFAULT_SPACING)}, about a second per case on one core."""

_EPILOG = """\
examples:
  smartformer data phantom --out data/phantoms -n 8 --seed 0
  smartformer data phantom --out data/aniso -n 2 --seed 1 --anisotropic
  smartformer data phantom --out data/small -n 4 --seed 2 --shape 72 56 56 --spacing 5 5 5"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``phantom`` to the ``smartformer data`` subcommands."""
    parser = subparsers.add_parser(
        "phantom",
        help="write synthetic CT phantoms with organ and lesion labels",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder to write the case folders into (created if missing)",
    )
    parser.add_argument(
        "-n", "--num-cases", type=int, default=1, metavar="N", help="number of cases to write (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the set, a whole number >= 0 (default: %(default)s)"
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=list(DEFAULT_SHAPE),
        metavar=("X", "Y", "Z"),
        help="voxels along x, y, z (default: %(default)s)",
    )
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=list(DEFAULT_SPACING),
        metavar=("SX", "SY", "SZ"),
        help="voxel size in mm (default: %(default)s)",
    )
    grid.add_argument(
        "--anisotropic",
        action="store_true",
        help="same field of view as --shape at the default spacing, resampled to "
        f"{' x '.join(f'{s:g}' for s in ANISOTROPIC_SPACING)} mm voxels (fine pixels, "
        "thick slices); about 10x the voxels and time of the default",
    )
    parser.add_argument(
        "--lesions", type=int, default=None, metavar="K", help="lesions per case (default: 1-3 at random)"
    )
    parser.add_argument(
        "--contrast",
        choices=("auto", "on", "off"),
        default="auto",
        help="contrast-enhanced cases: at random, all or none (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the files of case folders that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the phantoms the parsed arguments ask for and say where they are."""
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    if args.anisotropic:
        shape, spacing = same_extent_shape(shape, DEFAULT_SPACING, ANISOTROPIC_SPACING), ANISOTROPIC_SPACING
    contrast = {"auto": None, "on": True, "off": False}[args.contrast]
    cases = write_phantoms(
        args.out,
        args.num_cases,
        args.seed,
        shape=shape,
        spacing=spacing,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        n_lesions=args.lesions,
        contrast=contrast,
    )
    folders = cases[0].name + (f" .. {cases[-1].name}" if len(cases) > 1 else "")
    print(
        f"wrote {len(cases)} phantom case{'s' if len(cases) != 1 else ''} ({_grid(shape, spacing)}) "
        f"to {args.out}/{folders}"
    )
    return 0
