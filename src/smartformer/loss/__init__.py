"""SMART losses: [CLS] distillation (DINO), masked patch distillation (iBOT), masked L1 reconstruction."""

from smartformer.loss.centering import CenteredTeacherLoss, all_reduce_mean_
from smartformer.loss.dino_clstoken_loss import DINOLoss
from smartformer.loss.ibot_patch_loss import iBOTPatchLoss
from smartformer.loss.reconstruction_loss import masked_l1_loss, upsample_mask

__all__ = ["CenteredTeacherLoss", "DINOLoss", "all_reduce_mean_", "iBOTPatchLoss", "masked_l1_loss", "upsample_mask"]
