"""Options several commands share, defined once: the checkpoint argument, how a CT is fed to the
network (``--spacing``, ``--window``, ``--roi``, ``--overlap``, ``--normalize``), lesion crops
(``--crop``), where the work runs (``--batch-size``, ``--device``, ``--seed``, ``--no-progress``) and
the evaluation options of ``probe`` and ``finetune``.

Each ``add_*`` registers options on a parser; each ``check_*`` / ``*_options`` turns their values
into the library's, refusing bad ones in one line that names the option.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartformer.errors import SmartformerError
from smartformer.models.sizes import SIZE_MULTIPLE, is_input_size

if TYPE_CHECKING:
    from smartformer.downstream.cases import CropOptions
    from smartformer.downstream.evaluation import EvaluationSettings

#: The help of ``--data`` of the commands that read a labelled case CSV (features, probe, finetune).
CSV_HELP = (
    "CSV with one row per case: image (CT file or DICOM folder, relative to the CSV's folder), label, "
    "optionally center_x,center_y,center_z (lesion centre, world RAS mm as read_ct's affine gives) or "
    "mask (a file whose voxels > 0 locate the lesion), patient (default: one per row) and case (id); "
    "other columns are ignored"
)
#: The closing sentence of probe's and finetune's descriptions.
TREATMENT_RESPONSE_HELP = (
    "Treatment response (a label per scan) is the same machinery: give a CSV without a lesion location "
    "and every case is encoded as a whole-scan crop (the body, scaled to fit --crop)."
)
#: The help of every command's ``--checkpoint`` (see :mod:`smartformer.models.hub` for the forms).
CHECKPOINT_HELP = (
    "a pretraining run directory (its teacher/), a save_pretrained directory, a training checkpoint "
    "(checkpoints/last.pt, step_N.pt), a weights file (.safetensors; without config.json beside it, bare "
    "Swin encoder weights), smart-tiny-ct (the pretrained model shipped with smartformer), or "
    "random:PRESET[@SEED] (e.g. random:tiny: that preset with random weights, seeded by SEED, else by "
    "--seed where the command has one, else 0: the untrained baseline)"
)


def add_checkpoint_argument(p: argparse.ArgumentParser, many: bool = False) -> None:
    """``--checkpoint``: one checkpoint argument, or with ``many`` several to compare."""
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+" if many else None,
        metavar="CHECKPOINT",
        help=CHECKPOINT_HELP + ("; several are compared side by side" if many else ""),
    )


def add_spacing_window(p: argparse.ArgumentParser, what: str = "voxel size the network sees") -> None:
    """``--spacing`` and ``--window``: the grid and HU window a CT is resampled and scaled to."""
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        default=[2.0],
        metavar="MM",
        help=f"{what}, 1 or 3 values in mm (default: 2)",
    )
    p.add_argument(
        "--window",
        default="wide",
        help="HU window: a preset (wide, lung, abdomen) or --window=LOW,HIGH in HU (default: wide)",
    )


def add_roi(p: argparse.ArgumentParser, what: str = "sliding-window size", option: str = "roi") -> None:
    """``--roi``: the window the network reads at once (``option``: the same size in voxels under
    another name, as ``--crop``)."""
    p.add_argument(
        f"--{option}",
        type=int,
        nargs="+",
        default=[64],
        metavar="VOXELS",
        help=f"{what}, 1 or 3 values, multiples of {SIZE_MULTIPLE} (default: 64)",
    )


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """``--spacing``, ``--window``, ``--roi``, ``--overlap``, ``--normalize``, ``--mode``: how a CT is fed to the
    network."""
    add_spacing_window(p)
    add_roi(p)
    p.add_argument(
        "--overlap",
        type=float,
        default=0.25,
        help="overlap of neighbouring windows, in [0, 1) (default: 0.25, as MONAI; 0.5 blends "
        "more smoothly for about 3x the time)",
    )
    p.add_argument(
        "--normalize",
        choices=["uniform", "max"],
        default="uniform",
        help="how windows are made comparable before blending: relative to a uniform map "
        "(default), or to each window's peak (before issue 17; shows the windows as blocks)",
    )
    p.add_argument(
        "--mode",
        choices=["auto", "whole", "sliding"],
        default="auto",
        help="whole: the backbone runs once over the whole CT and the semantic attention on each ROI "
        "window of its tokens (faster); sliding: the whole network on each ROI window (MONAI's sliding "
        "window); auto (default): whole for Swin models on CTs that fit its memory, else sliding",
    )


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def add_crop_arguments(p: argparse.ArgumentParser, batch_size: int = 8) -> None:
    """``--crop``, ``--spacing``, ``--window``, ``--batch-size``, ``--device``, ``--seed``, ``--no-progress``."""
    add_roi(p, "crop size around the lesion", option="crop")
    add_spacing_window(p, "voxel size of the crop")
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"crops per forward pass or training step (default: {batch_size})",
    )
    add_device_argument(p)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of folds, label fractions, random:* weights, training and bootstrap (default: 0)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def one_or_three(values: list, option: str) -> tuple:
    """1 or 3 values as a triple; else one line naming ``--option``."""
    if len(values) not in (1, 3):
        raise SmartformerError(f"--{option} takes 1 or 3 values")
    return tuple(values) * 3 if len(values) == 1 else tuple(values)


def check_spacing_window(args: argparse.Namespace) -> None:
    """Refuse bad ``--spacing``/``--window`` values with one line."""
    from smartformer.data.transforms import parse_window

    parse_window(args.window)
    if len(args.spacing) not in (1, 3) or any(s <= 0 for s in args.spacing):
        raise SmartformerError("--spacing takes 1 or 3 positive values (mm)")


def check_sizes(values: list[int], option: str) -> None:
    """Refuse ``--roi``/``--crop`` values that are not 1 or 3 multiples of the backbone's
    :data:`~smartformer.models.sizes.SIZE_MULTIPLE`."""

    if len(values) not in (1, 3) or not is_input_size(values):
        raise SmartformerError(f"--{option} takes 1 or 3 values, each a positive multiple of {SIZE_MULTIPLE}")


def check_inference_arguments(args: argparse.Namespace) -> None:
    """Refuse bad ``--spacing``/``--window``/``--roi``/``--overlap`` values with one line."""
    check_spacing_window(args)
    check_sizes(args.roi, "roi")
    if not 0.0 <= args.overlap < 1.0:
        raise SmartformerError("--overlap must be in [0, 1)")


def inference_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`~smartformer.analysis.attention.attention_volume` from the CLI options."""
    return {
        "spacing": args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing),
        "window": args.window,
        "roi": args.roi[0] if len(args.roi) == 1 else tuple(args.roi),
        "overlap": args.overlap,
        "normalize": args.normalize,
        "mode": args.mode,
    }


def crop_options(args: argparse.Namespace) -> CropOptions:
    """The crop options of the command line; one-line errors for bad values."""
    from smartformer.data.transforms import parse_window
    from smartformer.downstream.cases import CropOptions

    check_sizes(args.crop, "crop")
    check_spacing_window(args)
    if args.batch_size < 1:
        raise SmartformerError("--batch-size must be at least 1")
    size, spacing = one_or_three(args.crop, "crop"), one_or_three(args.spacing, "spacing")
    return CropOptions(size=size, spacing=spacing, window=parse_window(args.window))  # type: ignore[arg-type]


def add_evaluation_arguments(p: argparse.ArgumentParser, batch_size: int = 8) -> None:
    """Options shared by probe and finetune: data, checkpoints, splits, metrics and crops."""
    p.add_argument("--data", "--csv", dest="csv", required=True, type=Path, help=CSV_HELP)
    add_checkpoint_argument(p, many=True)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--features",
        choices=("cls", "pooled", "both"),
        default="both",
        help="classifier input: [CLS], mean of the tokens, or both concatenated (default: both)",
    )
    p.add_argument("--folds", type=int, default=5, help="patient-level stratified CV folds (default: 5)")
    p.add_argument(
        "--fraction",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="F",
        help="label fractions of each training fold, e.g. 0.1 0.25 0.5 1.0 (patient-level, "
        "stratified, nested, seeded; the test fold is never subsampled; default: 1.0)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        metavar="F",
        help="patients (this fraction, stratified, seeded) held out as a test set beside the CV, as "
        "the SMART paper's LIDC protocol: every fold's model predicts it and metrics.json gives "
        "'holdout', the metrics of the fold-averaged probabilities (default: 0, none)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples (patients, or cases without patient ids) for 95%% CIs (default: 1000)",
    )
    add_crop_arguments(p, batch_size)


def evaluation_settings(args: argparse.Namespace) -> EvaluationSettings:
    """The :class:`~smartformer.downstream.evaluation.EvaluationSettings` of the command line."""
    from smartformer.downstream.evaluation import EvaluationSettings

    if args.bootstrap < 0:
        raise SmartformerError("--bootstrap must be 0 or more")
    if args.out.exists() and not args.out.is_dir():
        raise SmartformerError(f"--out {args.out}: exists and is not a directory")
    return EvaluationSettings(
        csv=args.csv,
        checkpoints=list(args.checkpoint),
        out=args.out,
        crop=crop_options(args),
        features=args.features,
        folds=args.folds,
        fractions=list(args.fraction),
        holdout=args.holdout,
        bootstrap=args.bootstrap,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
    )
