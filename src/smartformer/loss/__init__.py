"""SMART losses: [CLS] distillation (DINO), masked patch distillation (iBOT), masked L1 reconstruction,
and the KoLeo spreading term (DINOv2)."""

from smartformer.loss.centering import CENTERINGS, CenteredTeacherLoss, all_reduce_mean_, sinkhorn_knopp
from smartformer.loss.dino_clstoken_loss import DINOLoss
from smartformer.loss.ibot_patch_loss import iBOTPatchLoss
from smartformer.loss.koleo_loss import KoLeoLoss
from smartformer.loss.reconstruction_loss import masked_l1_loss, upsample_mask

__all__ = [
    "CENTERINGS",
    "CenteredTeacherLoss",
    "DINOLoss",
    "KoLeoLoss",
    "all_reduce_mean_",
    "iBOTPatchLoss",
    "masked_l1_loss",
    "sinkhorn_knopp",
    "upsample_mask",
]
