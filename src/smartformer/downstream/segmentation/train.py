"""Training ``SwinUNETR`` on image + label map pairs, and validating it.

:func:`train_segmentation`: DiceCE loss, AdamW with warm-up + cosine learning rate, random
positive/negative ROI crops, flips and intensity jitter; sliding-window validation with MONAI's
``DiceMetric`` per class (:func:`validate`, :func:`dice_per_case`); ``best.safetensors`` +
``segmentation.json`` (everything :func:`~smartformer.downstream.segmentation.predict.load_segmenter`
needs) written atomically whenever the mean validation Dice improves; one JSON line per
log/validation step in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd, RandShiftIntensityd
from safetensors.torch import save
from tqdm.auto import tqdm

from smartformer.data.cases import Case
from smartformer.data.transforms import as_triple
from smartformer.data.windows import parse_window
from smartformer.downstream.features import load_encoder, pick_device
from smartformer.downstream.segmentation.cases import check_label_grids, load_case, remap_labels
from smartformer.downstream.segmentation.model import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    SegmentationConfig,
    _sliding_logits,
    segmenter_from_encoder,
    swinunetr_kwargs,
)
from smartformer.errors import InputError, SmartformerError
from smartformer.io_utils import atomic_write_bytes
from smartformer.models.sizes import SIZE_MULTIPLE, check_input_size
from smartformer.train.schedules import cosine_schedule
from smartformer.wording import plural

METRICS_FILE = "metrics.jsonl"


def _triple(value: float | Sequence[float]) -> tuple[float, float, float]:
    return as_triple(value, "value")


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
    parse_window(s.window)
    check_input_size(s.roi, "ROI")  # SwinUNETR downsamples by the same factor as the Swin encoder
    if math.prod(r // SIZE_MULTIPLE for r in s.roi) < 2:
        raise SmartformerError(
            f"ROI {list(s.roi)}: too small to train (the {SIZE_MULTIPLE}x-downsampled patch must "
            "have more than one voxel for instance norm); use e.g. 64 or 64 x 32 x 32"
        )
    if s.label_ids is not None:
        if (
            not s.label_ids
            or len(set(s.label_ids)) != len(s.label_ids)
            or any(i <= 0 or i > 65535 for i in s.label_ids)
        ):
            raise SmartformerError(f"label ids {list(s.label_ids)}: give distinct label ids in 1..65535")
        if len(s.label_ids) > 255:
            raise SmartformerError(f"{len(s.label_ids)} label ids: at most 255 classes")
    positive = {
        "max_steps": s.max_steps,
        "val_every": s.val_every,
        "batch_size": s.batch_size,
        "log_every": s.log_every,
    }
    for name, value in positive.items():
        if value < 1:
            raise SmartformerError(f"{name} must be at least 1, got {value}")
    if s.lr <= 0 or s.weight_decay < 0 or s.warmup_steps < 0 or s.freeze_encoder_steps < 0:
        raise SmartformerError(
            f"lr must be positive (got {s.lr:g}); weight_decay, warmup_steps and "
            f"freeze_encoder_steps >= 0 (got {s.weight_decay:g}, {s.warmup_steps}, "
            f"{s.freeze_encoder_steps})"
        )
    if s.warmup_steps > s.max_steps:
        raise SmartformerError(f"warmup_steps {s.warmup_steps} exceeds the {s.max_steps} training steps")
    if any(a not in (0, 1, 2) for a in s.flip_axes) or not 0.0 <= s.flip_prob <= 1.0:
        raise SmartformerError(
            f"flip axes take 0, 1, 2 (RAS x, y, z), got {list(s.flip_axes)}, and the flip "
            f"probability is in [0, 1], got {s.flip_prob:g}"
        )
    if not 0.0 <= s.overlap < 1.0:
        raise SmartformerError(f"sliding-window overlap must be in [0, 1), got {s.overlap:g}")


@dataclass
class TrainResult:
    """Where a run ended: best step and its validation Dice per original label id."""

    out_dir: Path
    best_step: int
    best_dice: dict[str, float]
    best_mean_dice: float
    history: list[dict[str, Any]]


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _save_model(net: torch.nn.Module, config: SegmentationConfig, out_dir: Path) -> None:
    """``best.safetensors`` then ``segmentation.json``, each written atomically with the umask's
    permissions (safetensors' own ``save_file`` makes 0600 files a colleague cannot read)."""
    atomic_write_bytes(
        out_dir / WEIGHTS_FILE,
        save(
            {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
            metadata={"format": "pt", "smartformer_segmentation": str(FORMAT_VERSION)},
        ),
    )
    _atomic_write_text(out_dir / CONFIG_FILE, json.dumps(asdict(config), indent=2) + "\n")


def _train_transforms(s: SegmentationSettings) -> Any:
    keys = ["image", "label"]
    steps: list[Any] = [
        RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=list(s.roi),
            pos=1,
            neg=1,
            num_samples=1,
            image_key="image",
            image_threshold=0.0,
            allow_smaller=True,
        )
    ]
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
        picked: list[int] = []
        while len(picked) < self.batch_size:
            if not self._order:
                self._order = np.random.default_rng([self.seed, self._epoch]).permutation(self.n).tolist()
                self._epoch += 1
            picked.append(self._order.pop(0))
        return picked


def dice_per_case(
    net: torch.nn.Module,
    cases: Sequence[dict[str, Any]],
    label_ids: Sequence[int],
    roi: Sequence[int],
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """Dice per class of each case (preprocessed, remapped), keyed by original label id.

    MONAI ``DiceMetric`` (background left out) on the preprocessed grid, one dict per case; a class
    absent from a case's label map is NaN for that case. Per-case scores are what a paired comparison
    of two models over patients needs (:func:`~smartformer.downstream.metrics.paired_mean_difference`).
    """
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


def validate(
    net: torch.nn.Module,
    cases: Sequence[dict[str, Any]],
    label_ids: Sequence[int],
    roi: Sequence[int],
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
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


def train_segmentation(
    checkpoint: str | Path,
    train_cases: Sequence[Case],
    val_cases: Sequence[Case],
    out_dir: str | Path,
    settings: SegmentationSettings | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Fine-tune ``SwinUNETR`` (encoder from ``checkpoint``) on ``train_cases``, validating on ``val_cases``.

    Everything is read and checked before ``out_dir`` is touched. Validation (sliding window,
    Dice per class) runs at step 0, every ``val_every`` steps and at the last step; the best mean
    Dice so far is kept in ``out_dir/best.safetensors`` + ``segmentation.json``.

    Raises:
        InputError: a bad case (see :func:`load_case`), a selected label found in no training label map.
        SmartformerError: bad settings or checkpoint.
    """
    s = settings or SegmentationSettings()
    out = Path(out_dir)
    device = pick_device(None) if device is None else torch.device(device)
    if not train_cases or not val_cases:
        raise SmartformerError("need at least one training and one validation case")
    check_label_grids([*train_cases, *val_cases])
    encoder_model = load_encoder(str(checkpoint), seed=s.seed)  # fails fast on a bad checkpoint ...
    encoder = encoder_model.config.backbone
    swinunetr_kwargs(encoder, 1, s.roi)  # ... or on an encoder width SwinUNETR cannot take

    loaded = [
        load_case(c, s.spacing, s.window, s.roi)
        for c in tqdm([*train_cases, *val_cases], desc="cases", unit="case", disable=not progress)
    ]
    label_ids = (
        list(s.label_ids)
        if s.label_ids is not None
        else sorted({i for case in loaded[: len(train_cases)] for i in case["ids"] if i != 0})
    )
    if not label_ids:
        raise InputError(train_cases[0].mask, "no foreground label in any training label map")
    present = {i for case in loaded[: len(train_cases)] for i in case["ids"]}
    absent = [i for i in label_ids if i not in present]
    if absent:
        raise InputError(
            train_cases[0].mask, f"label id(s) {absent} occur in no training label map (found {sorted(present - {0})})"
        )
    if len(label_ids) > 255:
        raise SmartformerError(f"{len(label_ids)} label ids found; at most 255 classes can be segmented, choose some")
    for case in loaded:
        case["label"] = remap_labels(case["label"], label_ids)
    train_data, val_data = loaded[: len(train_cases)], loaded[len(train_cases) :]

    net = segmenter_from_encoder(encoder_model, len(label_ids), s.roi, seed=s.seed, source=str(checkpoint))
    log(
        f"encoder: {checkpoint} -> SwinUNETR.swinViT, {len(net.swinViT.state_dict())} tensors loaded strictly "
        f"(feature size {encoder.embed_dim}, depths {list(encoder.depths)}, heads {list(encoder.num_heads)}, "
        f"window {list(encoder.window_size)}); {plural(len(label_ids), 'class', 'classes')}: label ids {label_ids}"
    )
    net = net.to(device).train()
    config = SegmentationConfig(
        label_ids=label_ids,
        encoder=encoder.to_dict(),
        spacing=list(s.spacing),
        window=s.window if isinstance(s.window, str) else list(s.window),
        roi=list(s.roi),
        overlap=s.overlap,
        checkpoint=str(checkpoint),
    )

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS_FILE
    metrics_path.write_text("")
    _atomic_write_text(
        out / "settings.json",
        json.dumps(
            {
                "settings": asdict(s),
                "label_ids": label_ids,
                "checkpoint": str(checkpoint),
                "train_cases": [c.case for c in train_cases],
                "val_cases": [c.case for c in val_cases],
            },
            indent=2,
        )
        + "\n",
    )

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
        samples = [
            augment({"image": train_data[i]["image"], "label": train_data[i]["label"]})[0] for i in batches.next()
        ]
        image = torch.stack([torch.as_tensor(x["image"]) for x in samples]).to(device)
        label = torch.stack([torch.as_tensor(x["label"]) for x in samples]).to(device)
        loss = loss_fn(net(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", best_dice=f"{max(best_mean, 0.0):.3f}")
        if step % s.log_every == 0 or step == s.max_steps:
            record(
                {
                    "step": step,
                    "loss": float(loss.item()),
                    "lr": float(lrs[step - 1]),
                    "encoder_frozen": frozen,
                    "elapsed_s": round(time.perf_counter() - start, 2),
                }
            )
        if step % s.val_every == 0 or step == s.max_steps:
            run_validation(step)
    bar.close()
    if best_step == 0 and not (out / WEIGHTS_FILE).exists():  # every validation was NaN: keep the last model
        config.step = s.max_steps
        _save_model(net, config, out)
    return TrainResult(out_dir=out, best_step=best_step, best_dice=best_dice, best_mean_dice=best_mean, history=history)
