"""The pretraining configuration's schema: one dataclass per section, with its defaults.

Every key a YAML preset, a user's file or a ``section.key=value`` override may set is a field
here; :mod:`smartformer.config.loader` reads, merges and validates them into these classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import yaml

__all__ = [
    "PretrainConfig",
    "DataConfig",
    "TeacherConfig",
    "MaskingConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
]


@dataclass
class DataConfig:
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    window: str = "wide"  # preset name (wide, lung, abdomen) or "lo,hi" in HU
    roi: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 2  # per process
    num_workers: int = 2
    cache_dir: str | None = None  # None: <out>/../.smartformer-cache next to the run directory
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    flip_prob: float = 0.5
    skip_bad: bool = False
    # Views that hold anatomy: redraw a view (up to 10 times) while less than this fraction of
    # its voxels is body (above -500 HU); 0 = off. Limb crops and padded volumes are mostly air.
    min_body_fraction: float = 0.0
    # Views of one volume share anatomy: each view after the first overlaps the first by at
    # least this fraction of its side along every axis (0 = placed independently, as SMIT does).
    min_view_overlap: float = 0.0
    # DINO's multi-crop: this many smaller local views per volume, seen by the student only, whose
    # [CLS] learns the teacher's targets of the global views (0 = off). Placed inside the first
    # global view; data.local_roi is their size (multiples of 32, at most data.roi).
    local_views: int = 0
    local_roi: tuple[int, int, int] = (32, 32, 32)


@dataclass
class TeacherConfig:
    momentum: float = 0.996  # cosine to 1.0 over the whole run
    noise: Literal["patch_dropout", "gaussian", "none"] = "patch_dropout"
    noise_ratio: float = 0.1
    noise_sigma: float = 0.1


@dataclass
class MaskingConfig:
    strategy: Literal["random", "block", "attention_high", "attention_hint", "attention_low"] = "attention_hint"
    ratio: float = 0.6
    hint_ratio: float = 0.1
    warmup_steps: int = 100  # random masking until the teacher's attention means something


@dataclass
class LossConfig:
    recon_weight: float = 1.0
    patch_weight: float = 0.1
    cls_weight: float = 0.1
    # GITD (the published paper's fourth loss, 0.1 there): cross-view distillation of the
    # average-pooled stage-4 tokens through a projection head and center of their own.
    global_weight: float = 0.0
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 300
    # The patch branch's teacher temperature after the warm-up (None: teacher_temp). Its schedule
    # is the [CLS] one scaled by patch_teacher_temp / teacher_temp. A [CLS] temperature low enough
    # to keep the [CLS] targets informative at batch 2 (0.02) makes the patch targets one-hot.
    patch_teacher_temp: float | None = None
    center_momentum: float = 0.9
    # ema: DINO's centering; sinkhorn: Sinkhorn-Knopp targets (SwAV, DINOv2), for both heads.
    centering: Literal["ema", "sinkhorn"] = "ema"
    # With sinkhorn: past teacher [CLS] outputs kept in a queue for the normalisation (SwAV's
    # remedy for small batches; 0 = the current batch only).
    cls_queue: int = 0
    # KoLeo on the student [CLS] of each view (DINOv2 uses 0.1); spreads the batch apart.
    koleo_weight: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-4  # per sample of global batch (lr = lr * global batch)
    min_lr: float = 1e-6
    warmup_steps: int = 100
    # > 0: the lr warm-up is this fraction of train.max_steps instead of optim.warmup_steps
    # (the paper: 80 of 800 epochs, 0.1).
    warmup_fraction: float = 0.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_steps: int = 100  # DINO freezes the prototypes for the first epoch

    def warmup_for(self, max_steps: int) -> int:
        """The lr warm-up in steps: ``warmup_fraction`` of ``max_steps`` when set, else ``warmup_steps``."""
        return round(self.warmup_fraction * max_steps) if self.warmup_fraction > 0 else self.warmup_steps


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA where supported, else fp32
    grad_checkpointing: bool = False
    # torch.compile the student's forward + backward; where it cannot compile, one warning and eager
    # (train/compile.py). Off by default: on a 2-core CPU compiling the tiny step costs minutes.
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: bool = True  # keep step_N checkpoints besides `last`
    snapshot_every: int = 100  # attention PNG of a fixed volume
    # Every N steps, the SMART paper's head diversity of the teacher's Swin on that volume: the
    # entropy of each head's attention distances per stage (analysis/head_distance.py); 0 = off.
    head_distance_every: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # Wall-clock budget of the training loop in minutes, summed over resumed invocations (0 = none):
    # the run saves and stops at the first step past it, before max_steps. The schedules still
    # span max_steps, so set max_steps to what fits the budget.
    max_minutes: float = 0.0


@dataclass
class PretrainConfig:
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the model preset (SMARTConfig fields)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
