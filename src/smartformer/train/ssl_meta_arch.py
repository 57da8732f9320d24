"""The SMART training step: noisy EMA teacher, attention-guided masking, AMIP losses.

One :meth:`SMARTMetaArch.forward` call computes every loss term for a batch of view pairs:

1. the teacher sees the (noisy, unmasked) views and returns [CLS]/patch logits and its semantic
   attention map (one pass, no gradient);
2. the student's masks come from that attention (``attention_hint`` by default; ``random``
   during the warm-up) -- no extra forward pass;
3. the student sees the masked views and is trained on masked-voxel reconstruction, masked
   patch-token distillation (iBOT) and cross-view [CLS] distillation (DINO).

The EMA update and the loss centers are applied by :meth:`after_step` once the optimizer ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from smartformer.config import PretrainConfig, build_model_config
from smartformer.data.masking import ATTENTION_STRATEGIES, MaskGenerator
from smartformer.errors import ConfigError
from smartformer.loss import DINOLoss, iBOTPatchLoss, masked_l1_loss
from smartformer.models.smartformer import SMARTFormer
from smartformer.train.teacher import TeacherNoise, build_teacher, head_diversity, update_momentum

__all__ = ["SMARTMetaArch", "StepOutput"]


@dataclass
class StepOutput:
    loss: Tensor  # weighted total, differentiable
    terms: dict[str, float]  # every term, detached floats
    teacher_attn: Tensor | None  # (V*B, heads, d, h, w)
    teacher_cls_logits: list[Tensor]  # per view, for the center update
    teacher_patch_logits: Tensor | None


class SMARTMetaArch(nn.Module):
    """Student, teacher, losses and the masking / noise policies of one SMART run."""

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__()
        self.config = config
        model_cfg = build_model_config(config)
        loss = config.loss
        if config.masking.strategy in ATTENTION_STRATEGIES and not model_cfg.semantic_attention:
            raise ConfigError(
                f"masking.strategy={config.masking.strategy} needs the semantic attention module; "
                "with model.semantic_attention=false use random or block masking"
            )
        self.use_heads = loss.cls_weight > 0 or loss.patch_weight > 0
        model_cfg.heads = self.use_heads
        model_cfg.decoder = loss.recon_weight > 0
        if not (self.use_heads or model_cfg.decoder):
            raise ConfigError("every loss term is switched off (loss.*_weight are all 0)")
        self.student = SMARTFormer(model_cfg)
        self.teacher = build_teacher(self.student)
        self.teacher.eval()
        self.masker = MaskGenerator(
            config.masking.strategy, config.masking.ratio, config.masking.hint_ratio, config.masking.warmup_steps
        )
        self.noise = TeacherNoise(config.teacher.noise, config.teacher.noise_ratio, config.teacher.noise_sigma)
        self.dino_loss = DINOLoss(model_cfg.head_out_dim, loss.student_temp, loss.center_momentum)
        self.ibot_loss = iBOTPatchLoss(
            model_cfg.patch_out_dim or model_cfg.head_out_dim, loss.student_temp, loss.center_momentum
        )

    def train(self, mode: bool = True) -> "SMARTMetaArch":
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout / drop-path
        return self

    def forward(
        self,
        views: Tensor,
        step: int,
        teacher_temp: float,
        generator: torch.Generator | None = None,
        student: nn.Module | None = None,
        autocast: torch.autocast | None = None,
    ) -> StepOutput:
        """Loss terms for ``views`` (B, V, 1, D, H, W); ``student`` may be the DDP-wrapped student."""
        cfg = self.config.loss
        student = student if student is not None else self.student
        b, v = views.shape[:2]
        x = views.transpose(0, 1).reshape(v * b, *views.shape[2:])  # view-major: rows [v*b:(v+1)*b]
        stride = self.student.config.semantic_stride
        grid = tuple(s // stride for s in x.shape[2:])
        ctx = autocast if autocast is not None else torch.autocast(x.device.type, enabled=False)

        # The last class-attention map is cheap (one query), so it is always taken: for masking
        # and for the head-diversity log.
        with torch.no_grad(), ctx:
            x_teacher, drop = self.noise(x, grid, generator=generator)
            t_out = self.teacher(x_teacher, mask=drop, return_attention=self.teacher.semantic is not None,
                                 reconstruct=False)
        attn = t_out["attn"]
        mask = self.masker(step, grid, v * b, attention=attn, generator=generator, device=x.device)

        with ctx:
            s_out = student(x, mask=mask, reconstruct=cfg.recon_weight > 0, return_attention=False)

        terms: dict[str, Tensor] = {}
        if cfg.recon_weight > 0:
            terms["recon"] = masked_l1_loss(s_out["recon"], x, mask)
        t_cls: list[Tensor] = []
        t_patch = None
        entropies: dict[str, float] = {}  # collapse monitors: 1.0 = uniform targets
        if self.use_heads:
            t_cls = list(t_out["cls_logits"].float().chunk(v))
            t_patch = t_out["patch_logits"].float()
            if cfg.patch_weight > 0:
                terms["patch"] = self.ibot_loss(s_out["patch_logits"], t_patch, mask, teacher_temp)
                entropies["teacher_patch_entropy"] = self.ibot_loss.teacher_entropy(t_patch, teacher_temp)
            if cfg.cls_weight > 0:
                terms["cls"] = self.dino_loss(list(s_out["cls_logits"].chunk(v)), t_cls, teacher_temp)
                entropies["teacher_cls_entropy"] = self.dino_loss.teacher_entropy(t_out["cls_logits"], teacher_temp)
        weights = {"recon": cfg.recon_weight, "patch": cfg.patch_weight, "cls": cfg.cls_weight}
        total = sum(weights[k] * t for k, t in terms.items())
        values = {f"loss_{k}": float(t.detach()) for k, t in terms.items()}
        values["loss"] = float(total.detach())
        values["mask_ratio"] = float(mask.float().mean())
        values.update(entropies)
        if attn is not None:
            values["head_diversity"] = float(head_diversity(attn))
        return StepOutput(total, values, attn, t_cls, t_patch)

    @torch.no_grad()
    def after_step(self, out: StepOutput, momentum: float) -> None:
        """EMA update of the teacher and of the loss centers (after ``optimizer.step()``)."""
        update_momentum(self.student, self.teacher, momentum)
        if out.teacher_cls_logits and self.config.loss.cls_weight > 0:
            self.dino_loss.update_center(out.teacher_cls_logits)
        if out.teacher_patch_logits is not None and self.config.loss.patch_weight > 0:
            self.ibot_loss.update_center(out.teacher_patch_logits)

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on weight matrices only (not biases, norms, tokens, bias tables)."""
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or name.endswith(("mask_token", "cls_token", "relative_position_bias_table"))
            (no_decay if skip else decay).append(p)
        return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]

    def last_layer_parameters(self) -> list[Tensor]:
        """The prototypes of the DINO heads (frozen during the first steps, as DINO does)."""
        return [p for n, p in self.student.named_parameters() if ".last_layer." in n and p.requires_grad]
