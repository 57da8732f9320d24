"""What a run reports: progress bar, ``metrics.jsonl``, TensorBoard scalars, attention snapshots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.image
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from smartformer.analysis.overlay import save_overlay_png
from smartformer.io_utils import atomic_write_bytes

__all__ = ["MetricsWriter", "attention_snapshot", "collapse_message"]

#: Teacher entropy (fraction of ln K) above which the distillation targets count as uniform.
UNIFORM_ENTROPY = 0.999
#: Entropy (fraction of ln K) of the batch-mean [CLS] target below which every input gets the
#: same one-hot target.
ONE_HOT_ENTROPY = 0.02


class MetricsWriter:
    """Append one JSON line per logging step and mirror every number to TensorBoard.

    ``resume_step``: the step of the checkpoint a resumed run starts from. A run stopped
    without a final checkpoint (killed, machine lost) logged steps past it that the resumed run
    logs again; they are dropped from ``metrics.jsonl`` and purged from TensorBoard, so every
    step appears once.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            # atomically: a crash while trimming must not leave the run's log cut short
            atomic_write_bytes(self.path, "".join(kept).encode())
        self._tb = None
        if tensorboard:
            self._tb = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
            )

    def write(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **{k: (round(v, 7) if isinstance(v, float) else v) for k, v in values.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                group = "loss" if key.startswith("loss") else "train"
                self._tb.add_scalar(f"{group}/{key}", value, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        """Mirror a PNG (e.g. an attention snapshot) to TensorBoard's Images tab."""
        if self._tb is None:
            return
        pixels = matplotlib.image.imread(str(png))[..., :3]  # (H, W, 3) floats in [0, 1], alpha dropped
        self._tb.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def collapse_message(values: dict[str, float]) -> str | None:
    """A one-line warning when a logged record shows a collapsed distillation branch, else None.

    ``values`` is one logged record. Two collapses (DINO, Sec. 5.3):

    * uniform: ``teacher_cls_entropy`` / ``teacher_patch_entropy`` (fractions of ``ln K``) above
      :data:`UNIFORM_ENTROPY`: centering won, the loss sits at ``ln K`` and teaches nothing;
    * one-hot: ``teacher_cls_batch_entropy`` / ``teacher_patch_batch_entropy``, the entropy of the
      batch-mean target, below :data:`ONE_HOT_ENTROPY`: every input (token) of the step gets the
      same sharp target.
    """
    uniform = [
        k.removeprefix("teacher_").removesuffix("_entropy")
        for k in ("teacher_cls_entropy", "teacher_patch_entropy")
        if values.get(k, 0.0) > UNIFORM_ENTROPY
    ]
    if uniform:
        return (
            f"the teacher's {' and '.join(uniform)} targets are uniform (entropy > {UNIFORM_ENTROPY} ln K): "
            "that distillation branch has collapsed and teaches nothing; try a lower loss.teacher_temp, "
            "loss.koleo_weight=0.1 or a larger batch"
        )
    one_hot = [
        branch for branch in ("cls", "patch") if values.get(f"teacher_{branch}_batch_entropy", 1.0) < ONE_HOT_ENTROPY
    ]
    if one_hot:
        return (
            f"every input gets the same one-hot {' and '.join(one_hot)} target (batch-mean entropy < "
            f"{ONE_HOT_ENTROPY} ln K): that branch has collapsed; try a higher loss.teacher_temp, "
            "loss.centering=sinkhorn or loss.koleo_weight=0.1"
        )
    return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` (skipping a half-written last line)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@torch.no_grad()
def attention_snapshot(model: Any, volume: Tensor, path: Path, title: str) -> Path:
    """PNG of the mean semantic attention of ``model`` on ``volume`` (1, 1, D, H, W)."""
    maps = model.attention_maps(volume).float().mean(1, keepdim=True)  # (1, 1, d, h, w)
    heat = F.interpolate(maps, size=volume.shape[2:], mode="trilinear", align_corners=False)
    return save_overlay_png(volume[0, 0].float().cpu().numpy(), heat[0, 0].cpu().numpy(), path, title=title)
