"""[CLS] self-distillation loss (DINO) with an EMA-centered, sharpened teacher.

Order of calls in a training step (as in DINO)::

    loss = dino_loss(student_logits, teacher_logits, teacher_temp)
    dino_loss.update_center(teacher_logits)

The center used by the loss is the one from *before* this step's update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from smartformer.loss.centering import CenteredTeacherLoss


class DINOLoss(CenteredTeacherLoss):
    """Cross-view cross-entropy between teacher and student [CLS] distributions.

    For every teacher view ``q`` and every student view ``v != q`` the loss is
    ``mean_b sum_k -softmax((t_q - c) / T_t)[b, k] * log_softmax(s_v / T_s)[b, k]``;
    the result is the average over all such ``(q, v)`` pairs. The student may have more
    views than the teacher (extra local crops are paired with every teacher view).

    Everything is computed in float32 with autocast disabled, whatever the input dtype.

    Args:
        out_dim: number of prototypes ``K`` (the head's output size).
        student_temp: student softmax temperature ``T_s``.
        center_momentum: EMA momentum of the center (``c <- m c + (1 - m) batch_mean``).

    Buffers:
        center: ``(1, K)`` float32, the running mean of the teacher logits.
    """

    def forward(
        self,
        student_logits: Sequence[Tensor],
        teacher_logits: Sequence[Tensor],
        teacher_temp: float,
        targets: Tensor | None = None,
    ) -> Tensor:
        """Cross-view DINO loss.

        Args:
            student_logits: one ``(B, K)`` tensor per student view.
            teacher_logits: one ``(B, K)`` tensor per teacher view (no gradient flows to them).
            teacher_temp: teacher temperature for this step.
            targets: the ``(T, B, K)`` teacher targets if already computed by
                :meth:`view_targets` (so that monitors and loss share one computation).

        Returns:
            Scalar float32 loss.
        """
        n_s, n_t = len(student_logits), len(teacher_logits)
        n_pairs = n_s * n_t - min(n_s, n_t)
        if n_pairs < 1:
            raise ValueError(f"DINO loss needs at least one cross-view pair; got {n_s} student and {n_t} teacher views")
        device = student_logits[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            log_p_s = torch.stack(
                [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_logits]
            )  # (S, B, K)
            p_t = targets if targets is not None else self.view_targets(teacher_logits, teacher_temp)  # (T, B, K)
            # ce[q, v] = mean_b sum_k -p_t[q, b, k] * log_p_s[v, b, k]
            ce = -torch.einsum("qbk,vbk->qv", p_t, log_p_s) / p_t.shape[1]
            same_view = torch.eye(n_t, n_s, dtype=torch.bool, device=ce.device)
            return ce.masked_fill(same_view, 0.0).sum() / n_pairs

    @torch.no_grad()
    def view_targets(self, teacher_logits: Sequence[Tensor], teacher_temp: float) -> Tensor:
        """The ``(T, B, K)`` targets of every teacher view (Sinkhorn-Knopp normalises them jointly)."""
        stacked = torch.stack([t.detach().float() for t in teacher_logits])
        return self.targets(stacked, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_logits: Sequence[Tensor]) -> None:
        """EMA update of ``center`` with the batch mean of the teacher logits (and the queue).

        The batch mean is taken over all views and samples of this process, then averaged over
        the processes of the default ``torch.distributed`` group when it is initialized (the
        mean of the per-process means). With a Sinkhorn-Knopp queue, this step's logits enter
        it. Call it after the loss of the same step.

        Args:
            teacher_logits: one ``(B, K)`` tensor per teacher view.
        """
        rows = torch.cat([t.detach().float() for t in teacher_logits])
        self._ema_center(rows.mean(dim=0, keepdim=True))
        self._push_queue(rows)
