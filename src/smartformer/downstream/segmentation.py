"""Organ and tumour segmentation: MONAI ``SwinUNETR`` whose encoder starts from a SMART checkpoint.

The pieces, each usable on its own:

* :func:`build_segmenter`: a ``SwinUNETR`` whose ``swinViT`` has the checkpoint encoder's
  feature size, depths, heads and window, with the encoder weights loaded strictly (every
  ``swinViT`` tensor, nothing left over; :func:`~smartformer.models.convert.to_monai_state_dict`).
* :func:`find_cases` / :func:`split_cases`: image + label map pairs from a CSV (``image``,
  ``label``, optional ``case`` and ``patient`` columns) or from a folder of ``CASE/ct.nii.gz`` +
  ``CASE/labels.nii.gz`` (the phantom layout), and a seeded patient-level train/validation split.
* :func:`load_case`: one pair read, checked (same grid), preprocessed like the pretraining data
  (:func:`~smartformer.data.transforms.preprocess_transforms`: RAS, body crop, spacing, HU window)
  and its label ids remapped to ``1..K`` (everything else background).
* :func:`train_segmentation`: DiceCE loss, AdamW with warm-up + cosine learning rate, random
  positive/negative ROI crops, flips and intensity jitter; sliding-window validation with MONAI's
  ``DiceMetric`` per class; ``best.safetensors`` + ``segmentation.json`` (everything
  :func:`load_segmenter` needs) written atomically whenever the mean validation Dice improves;
  one JSON line per log/validation step in ``metrics.jsonl``.
* :func:`predict_labels`: sliding-window inference and argmax on the model's grid, the label map
  brought back (nearest neighbour) onto the input CT's exact grid, original label ids restored;
  :func:`write_labels` writes it as uint8 NIfTI with the input's affine.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartformer.errors import InputError, SmartformerError
from smartformer.wording import plural

if TYPE_CHECKING:
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.networks.nets import SwinUNETR

    from smartformer.models.smartformer import SMARTFormer
    from smartformer.models.swin3d import Swin3DConfig

__all__ = [
    "SegCase", "SegmentationSettings", "SegmentationConfig", "TrainResult", "LabelPrediction",
    "build_segmenter", "segmenter_from_encoder", "new_swinunetr", "swinunetr_kwargs", "swinunetr_recipe", "find_cases",
    "split_cases", "load_case", "train_segmentation", "load_segmenter", "predict_labels", "write_labels",
    "dice_per_case", "validate",
    "CONFIG_FILE", "WEIGHTS_FILE", "METRICS_FILE",
]

CONFIG_FILE = "segmentation.json"
WEIGHTS_FILE = "best.safetensors"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 1
#: File names inside each case folder of a directory data set (the phantom layout).
DEFAULT_IMAGE_NAME = "ct.nii.gz"
DEFAULT_LABEL_NAME = "labels.nii.gz"


# ----------------------------------------------------------------------------------- the network

#: SwinUNETR constructor arguments that MONAI 1.4 does not take yet, with the values it builds instead.
_FIXED_IN_OLD_MONAI = {"window_size": (7, 7, 7), "patch_size": 2, "mlp_ratio": 4.0, "qkv_bias": True}


def _encoder_args(encoder: "Swin3DConfig") -> dict[str, Any]:
    return {"window_size": tuple(encoder.window_size), "patch_size": encoder.patch_size,
            "mlp_ratio": encoder.mlp_ratio, "qkv_bias": encoder.qkv_bias}


def swinunetr_kwargs(encoder: "Swin3DConfig", num_classes: int,
                     roi: Sequence[int] = (64, 64, 64)) -> dict[str, Any]:
    """``SwinUNETR`` keyword arguments for ``encoder``'s architecture, as far as this MONAI takes them.

    MONAI 1.4 wants ``img_size`` (deprecated; given ``roi``) and has no ``window_size``,
    ``patch_size``, ``mlp_ratio`` or ``qkv_bias`` arguments; :func:`new_swinunetr` then swaps in
    a MONAI ``SwinTransformer`` built with the encoder's values.

    Raises:
        SmartformerError: an encoder width SwinUNETR's decoder cannot take (not a multiple of 12).
    """
    import inspect

    from monai.networks.nets import SwinUNETR

    if encoder.embed_dim % 12:
        raise SmartformerError(f"encoder width {encoder.embed_dim} cannot be a MONAI SwinUNETR "
                               "(its feature_size must be a multiple of 12)")
    params = inspect.signature(SwinUNETR.__init__).parameters
    kwargs: dict[str, Any] = dict(
        in_channels=encoder.in_chans, out_channels=num_classes + 1, feature_size=encoder.embed_dim,
        depths=tuple(encoder.depths), num_heads=tuple(encoder.num_heads),
        dropout_path_rate=encoder.drop_path_rate,
    )
    kwargs.update({k: v for k, v in _encoder_args(encoder).items() if k in params})
    if "img_size" in params:
        kwargs["img_size"] = tuple(int(r) for r in roi)
    return kwargs


def swinunetr_recipe(encoder: "Swin3DConfig", weights: Path) -> tuple[dict[str, Any], str]:
    """How to use exported ``swinViT`` weights: the ``SwinUNETR`` arguments they need, as a JSON-ready
    dict and as the Python lines to type (a default ``SwinUNETR`` has window 7 and refuses them).

    ``out_channels`` is left to the user (the task's classes + background); every other argument is
    what this MONAI's ``SwinUNETR`` takes for ``encoder`` (:func:`swinunetr_kwargs`).
    """
    import monai

    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in swinunetr_kwargs(encoder, 1).items()
              if k != "out_channels"}
    loader = ("safetensors.torch.load_file(WEIGHTS)" if weights.suffix == ".safetensors"
              else "torch.load(WEIGHTS, weights_only=True)")
    load = (f"net.load_state_dict({loader.replace('WEIGHTS', repr(str(weights)))}, strict=False)  "
            "# every swinViT key loads; the decoder stays random")
    arguments = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in kwargs.items())
    imports = "import safetensors.torch" if weights.suffix == ".safetensors" else "import torch"
    text = (f"{imports}\nfrom monai.networks.nets import SwinUNETR\n"
            f"net = SwinUNETR({arguments}, out_channels=N_CLASSES + 1)\n{load}")
    recipe = {"class": "monai.networks.nets.SwinUNETR", "kwargs": kwargs,
              "out_channels": "your classes + 1 (background)", "weights": weights.name,
              "load": load, "monai_version": monai.__version__}
    return recipe, text


def new_swinunetr(encoder: "Swin3DConfig", num_classes: int, roi: Sequence[int] = (64, 64, 64)) -> "SwinUNETR":
    """A randomly initialised ``SwinUNETR`` whose ``swinViT`` has exactly ``encoder``'s architecture."""
    import warnings

    from monai.networks.nets import SwinUNETR
    from monai.networks.nets.swin_unetr import SwinTransformer

    kwargs = swinunetr_kwargs(encoder, num_classes, roi)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.4's img_size deprecation notice
        net = SwinUNETR(**kwargs)
    wanted = _encoder_args(encoder)
    if any(name not in kwargs and value != _FIXED_IN_OLD_MONAI[name] for name, value in wanted.items()):
        # Older MONAI: same SwinTransformer class and arguments as SwinUNETR builds, the encoder's values.
        net.swinViT = SwinTransformer(
            in_chans=encoder.in_chans, embed_dim=encoder.embed_dim, window_size=wanted["window_size"],
            patch_size=(encoder.patch_size,) * 3, depths=tuple(encoder.depths), num_heads=tuple(encoder.num_heads),
            mlp_ratio=encoder.mlp_ratio, qkv_bias=encoder.qkv_bias, drop_path_rate=encoder.drop_path_rate,
            spatial_dims=3, downsample="merging", use_v2=False)
    return net


def build_segmenter(checkpoint: str | Path, num_classes: int, roi: Sequence[int] = (64, 64, 64),
                    seed: int = 0) -> tuple["SwinUNETR", "Swin3DConfig"]:
    """A ``SwinUNETR`` for ``num_classes`` foreground classes whose encoder is ``checkpoint``'s.

    ``checkpoint`` is a save_pretrained directory, a pretraining run directory (its ``teacher/``) or
    ``random:PRESET`` (that preset's architecture, random weights drawn from ``seed``: the baseline).
    The encoder's weights go into ``net.swinViT`` with ``strict=True``; the decoder is initialised
    from ``seed``. Returns the network and the encoder's configuration.

    Raises:
        InputError: a path that is no checkpoint (e.g. a folder without weights).
        SmartformerError: an architecture ``SwinUNETR`` cannot take, or weights that do not fit it.
    """
    from smartformer.downstream.features import load_encoder

    encoder_model = load_encoder(str(checkpoint), seed=seed)
    return segmenter_from_encoder(encoder_model, num_classes, roi, seed, source=str(checkpoint)), \
        encoder_model.config.backbone


def segmenter_from_encoder(encoder_model: "SMARTFormer", num_classes: int, roi: Sequence[int] = (64, 64, 64),
                           seed: int = 0, source: str = "encoder") -> "SwinUNETR":
    """:func:`build_segmenter` for a network already loaded (``source`` names it in errors)."""
    import torch

    from smartformer.models.convert import MONAI_PREFIX, to_monai_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = new_swinunetr(encoder_model.config.backbone, num_classes, roi)
    state = {k[len(MONAI_PREFIX):]: v for k, v in to_monai_state_dict(encoder_model.backbone.state_dict()).items()}
    try:
        net.swinViT.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise SmartformerError(f"{source}: the encoder does not load into SwinUNETR.swinViT ({first})") from None
    return net


# ------------------------------------------------------------------------------------- the data

@dataclass(frozen=True)
class SegCase:
    """One image + label map pair; ``patient`` groups cases for the split (default: the case)."""

    case: str
    image: Path
    label: Path
    patient: str


def find_cases(data: str | Path, image_name: str = DEFAULT_IMAGE_NAME,
               label_name: str = DEFAULT_LABEL_NAME) -> list[SegCase]:
    """The image/label pairs of a CSV or a case folder, with every file checked to exist.

    A CSV needs ``image`` and ``label`` columns (paths; relative ones resolve against the CSV's
    folder) and may have ``case`` (id, default: the image's folder and name) and ``patient`` (for
    the split). A folder holds one sub-folder per case with ``image_name`` and ``label_name``.

    Raises:
        InputError: naming the CSV or folder (and row) for missing columns, empty cells, missing
            files or repeated case ids; a folder with no case.
    """
    data = Path(data)
    if not data.exists():
        raise InputError(data, "does not exist")
    cases = _csv_cases(data) if data.is_file() else _folder_cases(data, image_name, label_name)
    seen: dict[str, SegCase] = {}
    for case in cases:
        if case.case in seen:
            raise InputError(data, f"case {case.case!r} appears twice ({seen[case.case].image} and {case.image})")
        seen[case.case] = case
    return cases


def _csv_cases(csv: Path) -> list[SegCase]:
    from smartformer.downstream.cases import read_table, resolve_csv_path

    table = read_table(csv)
    missing = [c for c in ("image", "label") if c not in table.columns]
    if missing:
        raise InputError(csv, f"missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
    cases = []
    for row, record in enumerate(table.to_dict("records"), start=2):
        image, label = (resolve_csv_path(csv, row, column, str(record[column]).strip()) for column in ("image", "label"))
        case = str(record.get("case", "")).strip() or f"{image.parent.name}/{image.name}"
        cases.append(SegCase(case, image, label, str(record.get("patient", "")).strip() or case))
    return cases


def _folder_cases(folder: Path, image_name: str, label_name: str) -> list[SegCase]:
    cases = []
    for case_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        image, label = case_dir / image_name, case_dir / label_name
        if not image.exists():
            continue
        if not label.exists():
            raise InputError(label, f"does not exist (case {case_dir.name} has {image_name} but no label map)")
        cases.append(SegCase(case_dir.name, image, label, case_dir.name))
    if not cases:
        raise InputError(folder, f"holds no CASE/{image_name} + CASE/{label_name} cases (nor is it a CSV)")
    return cases


def split_cases(cases: Sequence[SegCase], val_fraction: float = 0.2,
                seed: int = 0) -> tuple[list[SegCase], list[SegCase]]:
    """Seeded patient-level ``(train, validation)`` split: ``round(fraction * patients)`` patients,
    at least one, to validation, at least one kept for training; no patient on both sides.

    Raises:
        SmartformerError: fewer than two patients, or a fraction outside (0, 1).
    """
    import numpy as np

    if not 0.0 < val_fraction < 1.0:
        raise SmartformerError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    patients = list(dict.fromkeys(c.patient for c in cases))
    if len(patients) < 2:
        raise SmartformerError(f"need cases of at least 2 patients for a train/validation split, got {len(patients)}")
    order = np.random.default_rng([seed, 7]).permutation(len(patients))
    n_val = min(len(patients) - 1, max(1, round(val_fraction * len(patients))))
    held = {patients[i] for i in order[:n_val]}
    return [c for c in cases if c.patient not in held], [c for c in cases if c.patient in held]


def _triple(value: float | Sequence[float]) -> tuple[float, float, float]:
    from smartformer.data.transforms import as_triple

    return as_triple(value, "value")


def _preprocess(spacing: Sequence[float], window: str | Sequence[float], roi: Sequence[int],
                with_label: bool) -> Callable[[dict], dict]:
    """:func:`preprocess_transforms` for volumes already read by ``read_ct`` (its loader left out)."""
    from monai.transforms import Compose

    from smartformer.data.transforms import LoadCTd, preprocess_transforms

    steps = preprocess_transforms(["image"], ["label"] if with_label else [], spacing, window, roi).transforms
    if not isinstance(steps[0], LoadCTd):  # pragma: no cover - guards a change of preprocess_transforms
        raise RuntimeError("preprocess_transforms no longer starts with LoadCTd")
    return Compose(list(steps[1:]))


def _same_grid(a: "MetaTensor", b: "MetaTensor", atol: float = 1e-3) -> bool:
    import numpy as np

    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and bool(
        np.allclose(np.asarray(a.affine), np.asarray(b.affine), atol=atol))


def _grid_text(volume: "MetaTensor") -> str:
    import numpy as np

    shape = "x".join(str(int(n)) for n in volume.shape[1:])
    origin = ", ".join(f"{v:.1f}" for v in np.asarray(volume.affine)[:3, 3])
    return f"{shape} voxels, {volume.meta.get('orientation', '?')}, origin ({origin}) mm"


def check_label_grids(cases: Sequence[SegCase]) -> None:
    """Cheap header check that each label map has its image's voxel grid size.

    Catches most mismatches before anything is decoded; :func:`load_case` also compares affines.

    Raises:
        InputError: an unreadable header, or a label map of another size, naming the label file.
    """
    from smartformer.data.io import validate_volume

    for case in cases:
        image_shape = validate_volume(case.image)
        label_shape = validate_volume(case.label)
        if image_shape != label_shape:
            raise InputError(case.label, f"is on a different grid than its image {case.image} "
                                         f"({'x'.join(map(str, label_shape))} vs {'x'.join(map(str, image_shape))} voxels)")


def remap_labels(label: "torch.Tensor", label_ids: Sequence[int]) -> "torch.Tensor":
    """``label_ids[k]`` -> ``k + 1``, every other value -> 0, as uint8 (``len(label_ids) <= 255``)."""
    import torch

    values = torch.round(label)
    out = torch.zeros(label.shape, dtype=torch.uint8)
    for k, value in enumerate(label_ids, start=1):
        out[values == value] = k
    return out


def load_case(case: SegCase, spacing: Sequence[float], window: str | Sequence[float],
              roi: Sequence[int], label_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Read, check and preprocess one pair: ``{"case", "image" (1, X, Y, Z) float32, "label", "ids"}``.

    ``label`` is the raw label map (float) on the preprocessed grid when ``label_ids`` is None, else
    remapped with :func:`remap_labels`. ``ids`` are the distinct label values present.

    Raises:
        InputError: unreadable files, a label map on another grid than its image (shape or affine),
            or a label map with non-integer values.
    """
    import torch

    from smartformer.data.io import read_ct

    image, label = read_ct(case.image), read_ct(case.label)
    if not _same_grid(image, label):
        raise InputError(case.label, f"is on a different grid than its image {case.image} "
                                     f"({_grid_text(label)} vs {_grid_text(image)})")
    if not torch.equal(label.as_tensor(), torch.round(label.as_tensor())):
        raise InputError(case.label, "is not a label map (it holds non-integer values)")
    out = _preprocess(spacing, window, roi, with_label=True)({"image": image, "label": label})
    raw = out["label"].as_tensor()
    return {
        "case": case.case,
        "image": out["image"].as_tensor().float().contiguous(),
        "label": raw if label_ids is None else remap_labels(raw, label_ids),
        "ids": sorted(int(v) for v in torch.unique(torch.round(raw)).tolist()),
    }


# ---------------------------------------------------------------------------------- training

@dataclass
class SegmentationSettings:
    """How :func:`train_segmentation` trains (every field has a CLI option of the same name)."""

    label_ids: tuple[int, ...] | None = None  # None: every non-zero id found in the label maps
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    window: str | tuple[float, float] = "wide"
    roi: tuple[int, int, int] = (64, 64, 64)
    max_steps: int = 1000
    val_every: int = 100
    val_fraction: float = 0.2
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    freeze_encoder_steps: int = 0
    flip_axes: tuple[int, ...] = (1, 2)
    flip_prob: float = 0.1
    overlap: float = 0.25
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        self.spacing = _triple(self.spacing)
        self.roi = tuple(int(r) for r in _triple(self.roi))  # type: ignore[assignment]
        self.flip_axes = tuple(int(a) for a in self.flip_axes)
        if self.label_ids is not None:
            self.label_ids = tuple(int(i) for i in self.label_ids)
        check_settings(self)


def check_settings(s: SegmentationSettings) -> None:
    """Refuse impossible settings with one line (before anything is read)."""
    from smartformer.data.transforms import parse_window

    parse_window(s.window)
    if any(r % 32 for r in s.roi):
        raise SmartformerError(f"--roi {list(s.roi)}: each side must be a multiple of 32 (SwinUNETR downsamples 32x)")
    if math.prod(r // 32 for r in s.roi) < 2:
        raise SmartformerError(f"--roi {list(s.roi)}: too small to train (the 32x-downsampled patch must have "
                               "more than one voxel for instance norm); use e.g. --roi 64 or --roi 64 32 32")
    if s.label_ids is not None:
        if not s.label_ids or len(set(s.label_ids)) != len(s.label_ids) or any(i <= 0 or i > 65535 for i in s.label_ids):
            raise SmartformerError(f"--labels {list(s.label_ids)}: give distinct label ids in 1..65535")
        if len(s.label_ids) > 255:
            raise SmartformerError("--labels: at most 255 classes")
    positive = {"max_steps": s.max_steps, "val_every": s.val_every, "batch_size": s.batch_size, "log_every": s.log_every}
    for name, value in positive.items():
        if value < 1:
            raise SmartformerError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if s.lr <= 0 or s.weight_decay < 0 or s.warmup_steps < 0 or s.freeze_encoder_steps < 0:
        raise SmartformerError("--lr must be positive; --weight-decay, --warmup-steps and --freeze-encoder-steps >= 0")
    if s.warmup_steps > s.max_steps:
        raise SmartformerError(f"--warmup-steps {s.warmup_steps} exceeds the {s.max_steps} training steps")
    if any(a not in (0, 1, 2) for a in s.flip_axes) or not 0.0 <= s.flip_prob <= 1.0:
        raise SmartformerError("--flip-axes take 0, 1, 2 (RAS x, y, z) and --flip-prob is in [0, 1]")
    if not 0.0 <= s.overlap < 1.0:
        raise SmartformerError("--overlap must be in [0, 1)")


@dataclass
class SegmentationConfig:
    """What ``segmentation.json`` holds: enough to rebuild the network and preprocess a new CT."""

    label_ids: list[int]
    encoder: dict[str, Any]
    spacing: list[float]
    window: str | list[float]
    roi: list[int]
    overlap: float = 0.25
    checkpoint: str = ""
    step: int = 0
    val_dice: dict[str, float] = field(default_factory=dict)
    val_mean_dice: float = float("nan")
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.label_ids)

    def encoder_config(self) -> "Swin3DConfig":
        from smartformer.models.swin3d import Swin3DConfig

        return Swin3DConfig(**self.encoder)


@dataclass
class TrainResult:
    """Where a run ended: best step and its validation Dice per original label id."""

    out_dir: Path
    best_step: int
    best_dice: dict[str, float]
    best_mean_dice: float
    history: list[dict[str, Any]]


def _atomic_write_text(path: Path, text: str) -> None:
    from smartformer.io_utils import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def _save_model(net: "torch.nn.Module", config: SegmentationConfig, out_dir: Path) -> None:
    """``best.safetensors`` then ``segmentation.json``, each written atomically with the umask's
    permissions (safetensors' own ``save_file`` makes 0600 files a colleague cannot read)."""
    from safetensors.torch import save

    from smartformer.io_utils import atomic_write_bytes

    atomic_write_bytes(out_dir / WEIGHTS_FILE,
                       save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                            metadata={"format": "pt", "smartformer_segmentation": str(FORMAT_VERSION)}))
    _atomic_write_text(out_dir / CONFIG_FILE, json.dumps(asdict(config), indent=2) + "\n")


def _train_transforms(s: SegmentationSettings) -> Any:
    from monai.transforms import (Compose, RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd,
                                  RandShiftIntensityd)

    keys = ["image", "label"]
    steps: list[Any] = [RandCropByPosNegLabeld(keys, label_key="label", spatial_size=list(s.roi), pos=1, neg=1,
                                               num_samples=1, image_key="image", image_threshold=0.0,
                                               allow_smaller=True)]
    steps += [RandFlipd(keys, prob=s.flip_prob, spatial_axis=axis) for axis in s.flip_axes]
    steps += [RandScaleIntensityd("image", factors=0.1, prob=0.5), RandShiftIntensityd("image", offsets=0.1, prob=0.5)]
    return Compose(steps, lazy=False).set_random_state(seed=s.seed)


@dataclass
class _Batches:
    """Seeded epochs over the training cases: a fresh permutation each pass, ``batch_size`` at a time."""

    n: int
    batch_size: int
    seed: int
    _order: list[int] = field(default_factory=list)
    _epoch: int = 0

    def next(self) -> list[int]:
        import numpy as np

        picked: list[int] = []
        while len(picked) < self.batch_size:
            if not self._order:
                self._order = np.random.default_rng([self.seed, self._epoch]).permutation(self.n).tolist()
                self._epoch += 1
            picked.append(self._order.pop(0))
        return picked


def _sliding_logits(net: "torch.nn.Module", image: "torch.Tensor", roi: Sequence[int], overlap: float,
                    device: "torch.device", sw_batch_size: int = 2) -> "torch.Tensor":
    """(1, K+1, X, Y, Z) logits of a (1, X, Y, Z) volume, blended over overlapping ROI windows."""
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(image[None].to(device), tuple(roi), sw_batch_size, net, overlap=overlap,
                                    mode="gaussian", progress=False)


def dice_per_case(net: "torch.nn.Module", cases: Sequence[dict[str, Any]], label_ids: Sequence[int],
                  roi: Sequence[int], overlap: float = 0.25, device: "torch.device | str" = "cpu") -> list[dict[str, float]]:
    """Dice per class of each case (preprocessed, remapped), keyed by original label id.

    MONAI ``DiceMetric`` (background left out) on the preprocessed grid, one dict per case; a class
    absent from a case's label map is NaN for that case. Per-case scores are what a paired comparison
    of two models over patients needs (:func:`~smartformer.downstream.metrics.paired_mean_difference`).
    """
    import torch
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    device = torch.device(device)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    k = len(label_ids) + 1
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for case in cases:
            logits = _sliding_logits(net, case["image"], roi, overlap, device)
            pred = one_hot(logits.argmax(1, keepdim=True).cpu(), k)
            metric(y_pred=pred, y=one_hot(case["label"][None].long(), k))
    net.train(was_training)
    rows = metric.aggregate().reshape(len(cases), len(label_ids)).tolist()
    return [{str(i): float(v) for i, v in zip(label_ids, row)} for row in rows]


def validate(net: "torch.nn.Module", cases: Sequence[dict[str, Any]], label_ids: Sequence[int],
             roi: Sequence[int], overlap: float = 0.25, device: "torch.device | str" = "cpu") -> dict[str, float]:
    """Mean Dice per class over ``cases`` (:func:`dice_per_case`), keyed by original label id.

    A class absent from a case's label map does not count for that case, and is NaN when absent
    from every case.
    """
    per_case = dice_per_case(net, cases, label_ids, roi, overlap, device)
    means = {}
    for i in label_ids:
        finite = [row[str(i)] for row in per_case if math.isfinite(row[str(i)])]
        means[str(i)] = sum(finite) / len(finite) if finite else float("nan")
    return means


def _mean(dice: dict[str, float]) -> float:
    finite = [v for v in dice.values() if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def train_segmentation(checkpoint: str | Path, train_cases: Sequence[SegCase], val_cases: Sequence[SegCase],
                       out_dir: str | Path, settings: SegmentationSettings | None = None,
                       device: "torch.device | str | None" = None, progress: bool = True,
                       log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune ``SwinUNETR`` (encoder from ``checkpoint``) on ``train_cases``, validating on ``val_cases``.

    Everything is read and checked before ``out_dir`` is touched. Validation (sliding window,
    Dice per class) runs at step 0, every ``val_every`` steps and at the last step; the best mean
    Dice so far is kept in ``out_dir/best.safetensors`` + ``segmentation.json``.

    Raises:
        InputError: a bad case (see :func:`load_case`), a selected label found in no training label map.
        SmartformerError: bad settings or checkpoint.
    """
    import torch
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from smartformer.downstream.features import load_encoder, pick_device
    from smartformer.train.schedules import cosine_schedule

    s = settings or SegmentationSettings()
    out = Path(out_dir)
    device = pick_device(None) if device is None else torch.device(device)
    if not train_cases or not val_cases:
        raise SmartformerError("need at least one training and one validation case")
    check_label_grids([*train_cases, *val_cases])
    encoder_model = load_encoder(str(checkpoint), seed=s.seed)  # fails fast on a bad checkpoint ...
    encoder = encoder_model.config.backbone
    swinunetr_kwargs(encoder, 1, s.roi)  # ... or on an encoder width SwinUNETR cannot take

    loaded = [load_case(c, s.spacing, s.window, s.roi) for c in tqdm(
        [*train_cases, *val_cases], desc="cases", unit="case", disable=not progress)]
    label_ids = list(s.label_ids) if s.label_ids is not None else sorted(
        {i for case in loaded[:len(train_cases)] for i in case["ids"] if i != 0})
    if not label_ids:
        raise InputError(train_cases[0].label, "no foreground label in any training label map")
    present = {i for case in loaded[:len(train_cases)] for i in case["ids"]}
    absent = [i for i in label_ids if i not in present]
    if absent:
        raise InputError(train_cases[0].label, f"label id(s) {absent} occur in no training label map "
                                               f"(found {sorted(present - {0})})")
    if len(label_ids) > 255:
        raise SmartformerError(f"{len(label_ids)} label ids found; pass --labels with at most 255 of them")
    for case in loaded:
        case["label"] = remap_labels(case["label"], label_ids)
    train_data, val_data = loaded[:len(train_cases)], loaded[len(train_cases):]

    net = segmenter_from_encoder(encoder_model, len(label_ids), s.roi, seed=s.seed, source=str(checkpoint))
    log(f"encoder: {checkpoint} -> SwinUNETR.swinViT, {len(net.swinViT.state_dict())} tensors loaded strictly "
        f"(feature size {encoder.embed_dim}, depths {list(encoder.depths)}, heads {list(encoder.num_heads)}, "
        f"window {list(encoder.window_size)}); {plural(len(label_ids), 'class', 'classes')}: label ids {label_ids}")
    net = net.to(device).train()
    config = SegmentationConfig(label_ids=label_ids, encoder=encoder.to_dict(), spacing=list(s.spacing),
                                window=s.window if isinstance(s.window, str) else list(s.window),
                                roi=list(s.roi), overlap=s.overlap, checkpoint=str(checkpoint))

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS_FILE
    metrics_path.write_text("")
    _atomic_write_text(out / "settings.json", json.dumps(
        {"settings": asdict(s), "label_ids": label_ids, "checkpoint": str(checkpoint),
         "train_cases": [c.case for c in train_cases], "val_cases": [c.case for c in val_cases]}, indent=2) + "\n")

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    lrs = cosine_schedule(s.lr, s.lr * 0.01, s.max_steps, s.warmup_steps)
    augment = _train_transforms(s)
    batches = _Batches(len(train_data), s.batch_size, s.seed)
    history: list[dict[str, Any]] = []
    best_mean, best_step, best_dice = -1.0, 0, {}

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def run_validation(step: int) -> None:
        nonlocal best_mean, best_step, best_dice
        dice = validate(net, val_data, label_ids, s.roi, s.overlap, device)
        mean = _mean(dice)
        improved = math.isfinite(mean) and mean > best_mean
        if improved:
            best_mean, best_step, best_dice = mean, step, dice
            config.step, config.val_dice, config.val_mean_dice = step, dice, mean
            _save_model(net, config, out)
        record({"step": step, "val_dice": dice, "val_mean_dice": mean, "best": improved})

    run_validation(0)
    start = time.perf_counter()
    bar = tqdm(total=s.max_steps, desc="segment", unit="step", disable=not progress, dynamic_ncols=True)
    frozen = s.freeze_encoder_steps > 0
    net.swinViT.requires_grad_(not frozen)
    for step in range(1, s.max_steps + 1):
        if frozen and step > s.freeze_encoder_steps:
            net.swinViT.requires_grad_(True)
            frozen = False
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[step - 1])
        samples = [augment({"image": train_data[i]["image"], "label": train_data[i]["label"]})[0]
                   for i in batches.next()]
        image = torch.stack([torch.as_tensor(x["image"]) for x in samples]).to(device)
        label = torch.stack([torch.as_tensor(x["label"]) for x in samples]).to(device)
        loss = loss_fn(net(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", best_dice=f"{max(best_mean, 0.0):.3f}")
        if step % s.log_every == 0 or step == s.max_steps:
            record({"step": step, "loss": float(loss.item()), "lr": float(lrs[step - 1]),
                    "encoder_frozen": frozen, "elapsed_s": round(time.perf_counter() - start, 2)})
        if step % s.val_every == 0 or step == s.max_steps:
            run_validation(step)
    bar.close()
    if best_step == 0 and not (out / WEIGHTS_FILE).exists():  # every validation was NaN: keep the last model
        config.step = s.max_steps
        _save_model(net, config, out)
    return TrainResult(out_dir=out, best_step=best_step, best_dice=best_dice, best_mean_dice=best_mean,
                       history=history)


# ---------------------------------------------------------------------------------- inference

def load_segmenter(run_dir: str | Path, device: "torch.device | str" = "cpu") -> tuple["SwinUNETR", SegmentationConfig]:
    """The trained network of a run folder (``segmentation.json`` + ``best.safetensors``), in eval mode.

    Raises:
        InputError: naming the folder or file when it is not a segmentation run or is damaged.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / CONFIG_FILE, run_dir / WEIGHTS_FILE
    if not run_dir.is_dir():
        raise InputError(run_dir, "does not exist" if not run_dir.exists() else "is not a folder")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InputError(run_dir, f"not a segmentation run: {path.name} is missing "
                                      f"(expected {CONFIG_FILE} + {WEIGHTS_FILE} from 'smartformer segment train')")
    try:
        config = SegmentationConfig(**json.loads(config_path.read_text()))
        encoder = config.encoder_config()
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise InputError(config_path, f"not a valid segmentation config ({exc})") from None
    net = new_swinunetr(encoder, config.num_classes, config.roi)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InputError(weights_path, f"unreadable safetensors file ({exc})") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(weights_path, f"weights do not match {CONFIG_FILE} ({' '.join(str(exc).split())[:300]})") from None
    return net.to(device).eval(), config


@dataclass
class LabelPrediction:
    """A label map on the input CT's grid: ``labels`` (X, Y, Z) with the original ids, ``affine`` RAS."""

    labels: "np.ndarray"
    affine: "np.ndarray"
    label_ids: list[int]

    def volumes_ml(self) -> dict[int, float]:
        """Volume per label id in millilitres (0 for an id that was not predicted)."""
        import numpy as np

        voxel_ml = abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0
        counts = np.bincount(self.labels.ravel(), minlength=max(self.label_ids) + 1)
        return {i: float(counts[i]) * voxel_ml for i in self.label_ids}


def predict_labels(net: "torch.nn.Module", config: SegmentationConfig, ct: "str | Path | MetaTensor",
                   overlap: float | None = None, device: "torch.device | str" = "cpu",
                   sw_batch_size: int = 2) -> LabelPrediction:
    """Segment one CT (a path in any supported format, or a :func:`read_ct` volume) on its own grid.

    Preprocessed as in training (RAS, body crop, spacing, window, pad), sliding-window logits and
    argmax on that grid, then the class map resampled by nearest neighbour onto the input's grid
    (voxels outside the body crop are background) and mapped back to the original label ids.
    """
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from smartformer.data.io import read_ct

    original = ct if isinstance(ct, MetaTensor) else read_ct(ct)
    image = _preprocess(config.spacing, config.window, config.roi, with_label=False)({"image": original.clone()})["image"]
    net = net.eval().to(device)
    with torch.no_grad():
        logits = _sliding_logits(net, image.as_tensor(), config.roi, config.overlap if overlap is None else overlap,
                                 torch.device(device), sw_batch_size)
    classes = logits[0].argmax(0, keepdim=True).cpu().to(torch.float32)
    on_input = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
        MetaTensor(classes, affine=image.affine), dst_affine=original.affine, spatial_size=original.shape[1:])
    lut = np.asarray([0, *config.label_ids], dtype=np.uint8 if max(config.label_ids) <= 255 else np.uint16)
    labels = lut[np.rint(on_input.as_tensor()[0].numpy()).astype(np.int64)]
    return LabelPrediction(labels=labels, affine=np.asarray(original.affine, dtype=np.float64),
                           label_ids=list(config.label_ids))


def write_labels(prediction: LabelPrediction, path: str | Path) -> Path:
    """Write the label map as NIfTI (uint8, uint16 for ids above 255) with the input's affine, atomically."""
    from smartformer.data.io import write_nifti

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_nifti(prediction.labels, prediction.affine, path.with_name(f".{path.name}.tmp.nii.gz"))
    tmp.replace(path)
    return path
