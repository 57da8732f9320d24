"""What the DINO and iBOT losses share: the teacher's targets, centered and sharpened.

Two ways to keep the teacher from handing every input the same target:

* ``"ema"`` (DINO, iBOT): subtract an EMA of the batch-mean logits, then a sharp softmax;
* ``"sinkhorn"`` (SwAV, DINOv2): a few Sinkhorn-Knopp iterations that make the targets of a
  batch use every prototype equally. With few samples per step (a 3D batch of 2) equal use is
  a weak constraint, so past teacher outputs can be kept in a FIFO queue (SwAV's remedy for
  small batches) and take part in the normalisation; only the current rows are returned.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CENTERINGS", "CenteredTeacherLoss", "all_reduce_mean_", "sinkhorn_knopp"]

CENTERINGS = ("ema", "sinkhorn")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean_(t: Tensor) -> Tensor:
    """Average ``t`` in place over the default process group, if one is initialized."""
    if _distributed():
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp targets: ``softmax(logits / temp)`` rebalanced so that prototypes are used equally.

    Alternately normalises the rows of ``Q = exp(logits / temp)`` over the samples (equal total
    mass per prototype) and over the prototypes (one unit per sample), as SwAV and DINOv2 do.
    Under ``torch.distributed`` the sums run over the samples of every process.

    Args:
        logits: ``(N, K)`` float logits (no gradient).
        temp: temperature (> 0).
        iterations: number of row/column normalisation rounds.

    Returns:
        ``(N, K)`` float32 rows that each sum to 1.
    """
    q = logits.float() / temp
    shift = q.max()
    if _distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = (q - shift).exp().t()  # (K, N); one shift for all processes, it cancels in the normalisations
    world = dist.get_world_size() if _distributed() else 1
    n = q.shape[1] * world
    k = q.shape[0]
    total = q.sum()
    if _distributed():
        dist.all_reduce(total)
    q = q / total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if _distributed():
            dist.all_reduce(rows)
        q = q / rows.clamp_min(1e-30) / k
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / n
    q = q * n
    return q.t()


class CenteredTeacherLoss(nn.Module):
    """Base of the distillation losses: student temperature and the teacher's targets.

    Args:
        out_dim: number of prototypes ``K`` (the head's output size).
        student_temp: student softmax temperature ``T_s``.
        center_momentum: EMA momentum of the center (``c <- m c + (1 - m) batch_mean``).
        centering: ``"ema"`` (default) or ``"sinkhorn"``; see the module docstring.
        queue_size: with ``"sinkhorn"``, how many past teacher outputs (rows) take part in the
            normalisation besides the current batch (0 = none).
        sinkhorn_iterations: normalisation rounds of :func:`sinkhorn_knopp`.

    Buffers:
        center: ``(1, K)`` float32, the running mean of the teacher logits (kept up to date
            with either centering, so that one can switch and the entropy monitors stay
            comparable).
        queue: ``(queue_size, K)`` float32 past teacher logits (newest first); ``queue_filled``
            counts the valid rows.
    """

    center: Tensor
    queue: Tensor
    queue_filled: Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: Literal["ema", "sinkhorn"] = "ema",
        queue_size: int = 0,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {', '.join(CENTERINGS)}, got {centering!r}")
        if queue_size < 0 or (queue_size and centering != "sinkhorn"):
            raise ValueError(f"queue_size must be >= 0 and needs centering='sinkhorn', got {queue_size}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("queue", torch.zeros(queue_size, out_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher probabilities ``softmax((t - center) / teacher_temp)`` (the EMA centering).

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
    def targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """The teacher's target distributions under this loss's ``centering``.

        Args:
            teacher_logits: ``(..., K)`` logits; with ``"sinkhorn"`` every row of the tensor
                counts as one sample of the batch.
            teacher_temp: teacher temperature.

        Returns:
            ``(..., K)`` float32 probabilities, detached.
        """
        if self.centering == "ema":
            return self.softmax_center_teacher(teacher_logits, teacher_temp)
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be positive, got {teacher_temp}")
        flat = teacher_logits.detach().float().reshape(-1, self.out_dim)
        n_queue = int(self.queue_filled)
        rows = torch.cat([flat, self.queue[:n_queue]]) if n_queue else flat
        q = sinkhorn_knopp(rows, teacher_temp, self.sinkhorn_iterations)
        return q[: flat.shape[0]].reshape(teacher_logits.shape)

    @staticmethod
    def entropy_fraction(probs: Tensor) -> float:
        """Mean entropy of the rows of ``probs`` (..., K), as a fraction of ``ln K``."""
        k = probs.shape[-1]
        p = probs.reshape(-1, k)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        return float(entropy) / math.log(k) if k > 1 else 0.0

    @torch.no_grad()
    def teacher_entropy(self, teacher_logits: Tensor, teacher_temp: float) -> float:
        """Mean entropy of the teacher's target distributions, as a fraction of ``ln K`` (1.0 = uniform).

        The number DINO users watch for collapse: near 0, every input gets a one-hot target;
        at 1, the targets are uniform and carry no information (centering won over sharpening).
        Healthy training sits in between. See also :meth:`batch_entropy`.
        """
        return self.entropy_fraction(self.targets(teacher_logits, teacher_temp))

    @staticmethod
    def batch_entropy(probs: Tensor) -> float:
        """Entropy of the batch-mean target distribution, as a fraction of ``ln K``.

        Low means every input of the step gets the same (sharp) target: the one-hot collapse
        that the per-sample entropy alone cannot tell from healthy sharp targets.
        """
        k = probs.shape[-1]
        return CenteredTeacherLoss.entropy_fraction(probs.reshape(-1, k).mean(0, keepdim=True))

    @torch.no_grad()
    def _ema_center(self, batch_center: Tensor) -> None:
        """``center <- m * center + (1 - m) * mean over processes of batch_center`` ((1, K))."""
        all_reduce_mean_(batch_center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    @torch.no_grad()
    def _push_queue(self, rows: Tensor) -> None:
        """Put this step's teacher logits (N, K) at the front of the queue (oldest rows drop out)."""
        size = self.queue.shape[0]
        if size == 0:
            return
        rows = rows.detach().float().reshape(-1, self.out_dim)[:size]
        self.queue.copy_(torch.cat([rows, self.queue[: size - rows.shape[0]]]))
        self.queue_filled.fill_(min(size, int(self.queue_filled) + rows.shape[0]))
