"""What the DINO and iBOT losses share: an EMA-centered, sharpened teacher distribution."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CenteredTeacherLoss", "all_reduce_mean_"]


def all_reduce_mean_(t: Tensor) -> Tensor:
    """Average ``t`` in place over the default process group, if one is initialized."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


class CenteredTeacherLoss(nn.Module):
    """Base of the distillation losses: student temperature, teacher center and its EMA.

    Args:
        out_dim: number of prototypes ``K`` (the head's output size).
        student_temp: student softmax temperature ``T_s``.
        center_momentum: EMA momentum of the center (``c <- m c + (1 - m) batch_mean``).

    Buffers:
        center: ``(1, K)`` float32, the running mean of the teacher logits.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher probabilities ``softmax((t - center) / teacher_temp)``.

        Args:
            teacher_logits: ``(..., K)`` logits of any float dtype.
            teacher_temp: teacher temperature (sharpening, e.g. 0.04 -> 0.07).

        Returns:
            ``(..., K)`` float32 probabilities, detached.
        """
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be positive, got {teacher_temp}")
        t = teacher_logits.detach().float()
        return F.softmax((t - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def teacher_entropy(self, teacher_logits: Tensor, teacher_temp: float) -> float:
        """Mean entropy of the teacher distributions, as a fraction of ``ln K`` (1.0 = uniform).

        The number DINO users watch for collapse: near 0, every input gets the same one-hot
        target; at 1, the targets are uniform and carry no information (centering won over
        sharpening). Healthy training sits in between.
        """
        p = self.softmax_center_teacher(teacher_logits, teacher_temp).reshape(-1, self.out_dim)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        return float(entropy) / math.log(self.out_dim) if self.out_dim > 1 else 0.0

    @torch.no_grad()
    def _ema_center(self, batch_center: Tensor) -> None:
        """``center <- m * center + (1 - m) * mean over processes of batch_center`` ((1, K))."""
        all_reduce_mean_(batch_center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
