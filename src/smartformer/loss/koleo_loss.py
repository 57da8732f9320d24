"""KoLeo regulariser (Sablayrolles et al., 2019; used by DINOv2 on the student [CLS]).

``-mean_i log(min_{j != i} ||x_i - x_j||)`` over L2-normalised embeddings: it grows without
bound as two samples of a batch approach each other, so it spreads the batch over the sphere.
At the batch sizes of 3D CT (2 volumes per step) it directly pushes the two [CLS] embeddings
of a view apart, the opposite of the collapse in which every CT gets the same [CLS].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator as a loss (lower = more spread).

    Args:
        eps: added to the nearest-neighbour distance inside the log (finite for equal rows).

    Example::

        koleo = KoLeoLoss()
        loss = koleo(student_cls)  # (B, C), B >= 2
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C)`` embeddings (B >= 2) -> scalar float32 loss."""
        if x.dim() != 2 or x.shape[0] < 2:
            raise ValueError(f"KoLeo needs a (B, C) batch with B >= 2, got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = F.normalize(x.float(), dim=-1, eps=self.eps)
            # nearest neighbour by the largest dot product, excluding oneself
            dots = z @ z.t()
            dots.fill_diagonal_(-2.0)
            nearest = dots.argmax(dim=1)
            distance = (z - z[nearest]).norm(dim=-1)
            return -torch.log(distance + self.eps).mean()
