"""Masked patch-token self-distillation loss (iBOT) with an EMA-centered, sharpened teacher.

Order of calls in a training step (as in iBOT)::

    loss = ibot_loss(student_patch_logits, teacher_patch_logits, mask, teacher_temp)
    ibot_loss.update_center(teacher_patch_logits)

Two views are handled by stacking them on the batch dimension (``B = views * batch``): the
teacher logits of each view are computed on the unmasked view and the student's on the masked
version of the same view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smartformer.loss.centering import CenteredTeacherLoss


class iBOTPatchLoss(CenteredTeacherLoss):
    """Cross-entropy between teacher and student distributions on masked patch tokens.

    For each image ``b`` with masked tokens ``M_b`` (``|M_b| > 0``)::

        l_b = (1 / |M_b|) sum_{n in M_b} sum_k -softmax((t[b,n] - c) / T_t)_k * log_softmax(s[b,n] / T_s)_k

    and the loss is the mean of ``l_b`` over the images with at least one masked token. Images
    with an empty mask contribute nothing and do not count in the mean (iBOT itself counts them
    as zeros in the mean); if no image has a masked token the loss is an exact 0 that still
    carries a graph to the student logits, never NaN.

    Everything is computed in float32 with autocast disabled, whatever the input dtype.

    Args:
        out_dim: number of prototypes ``K`` of the patch head.
        student_temp: student softmax temperature ``T_s``.
        center_momentum: EMA momentum of the center.

    Buffers:
        center: ``(1, K)`` float32, the running mean of the teacher patch logits.
    """

    def forward(
        self,
        student_patch_logits: Tensor,
        teacher_patch_logits: Tensor,
        mask: Tensor,
        teacher_temp: float,
        targets: Tensor | None = None,
    ) -> Tensor:
        """Masked-token iBOT loss.

        Args:
            student_patch_logits: ``(B, N, K)`` student logits on the masked view.
            teacher_patch_logits: ``(B, N, K)`` teacher logits on the unmasked view.
            mask: bool, ``(B, N)`` or ``(B, d, h, w)`` with ``d*h*w == N`` (flattened in C
                order, matching the token order), True = masked.
            teacher_temp: teacher temperature for this step.
            targets: the ``(B, N, K)`` teacher targets if already computed by :meth:`targets`.

        Returns:
            Scalar float32 loss.
        """
        if student_patch_logits.shape != teacher_patch_logits.shape or student_patch_logits.dim() != 3:
            raise ValueError(
                "student and teacher patch logits must both be (B, N, K); got "
                f"{tuple(student_patch_logits.shape)} and {tuple(teacher_patch_logits.shape)}"
            )
        b, n, _ = student_patch_logits.shape
        if mask.dtype != torch.bool or mask.shape[0] != b or mask[0].numel() != n:
            raise ValueError(
                f"mask must be a bool (B, N) or (B, d, h, w) tensor with B={b}, N={n}; "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        m = mask.reshape(b, n).to(device=student_patch_logits.device, dtype=torch.float32)
        with torch.autocast(device_type=student_patch_logits.device.type, enabled=False):
            log_p_s = F.log_softmax(student_patch_logits.float() / self.student_temp, dim=-1)
            p_t = targets if targets is not None else self.targets(teacher_patch_logits, teacher_temp)
            ce = -(p_t * log_p_s).sum(dim=-1)  # (B, N)
            n_masked = m.sum(dim=1)  # (B,)
            per_image = (ce * m).sum(dim=1) / n_masked.clamp(min=1.0)
            n_images = (n_masked > 0).sum().clamp(min=1)
            return per_image.sum() / n_images

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: Tensor) -> None:
        """EMA update of ``center`` with the mean of the teacher logits over all tokens.

        The mean is over every image and token of this process (masked or not), then averaged
        over the processes of the default ``torch.distributed`` group when it is initialized.
        Call it after the loss of the same step.

        Args:
            teacher_patch_logits: ``(B, N, K)`` teacher logits.
        """
        k = teacher_patch_logits.shape[-1]
        self._ema_center(teacher_patch_logits.detach().float().reshape(-1, k).mean(dim=0, keepdim=True))
