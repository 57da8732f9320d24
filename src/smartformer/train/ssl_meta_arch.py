"""The SMART training step: noisy EMA teacher, attention-guided masking, AMIP losses.

One :meth:`SMARTMetaArch.forward` call computes every loss term for a batch of view pairs:

1. the teacher sees the (noisy, unmasked) views and returns [CLS]/patch logits and its semantic
   attention map (one pass, no gradient);
2. the student's masks come from that attention (``attention_hint`` by default; ``random``
   during the warm-up) -- no extra forward pass;
3. the student sees the masked views and is trained on masked-voxel reconstruction, masked
   patch-token distillation (iBOT), cross-view [CLS] distillation (DINO) and, optionally, the
   cross-view distillation of the pooled stage-4 tokens (the paper's GITD) and the KoLeo
   spreading term on its [CLS] (DINOv2);
4. with local views (DINO's multi-crop, ``data.local_views``), the student also sees them,
   unmasked, and their [CLS] joins the DINO loss as extra student views, paired with every
   teacher (global) view.

Besides the loss terms, every step reports the collapse monitors (see :func:`collapse_monitors`).

The EMA update and the loss centers are applied by :meth:`after_step` once the optimizer ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartformer.config import PretrainConfig, build_model_config
from smartformer.data.masking import ATTENTION_STRATEGIES, MaskGenerator
from smartformer.data.transforms import body_level
from smartformer.errors import ConfigError
from smartformer.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss, masked_l1_loss
from smartformer.models.smartformer import SMARTFormer
from smartformer.train.teacher import TeacherNoise, build_teacher, head_diversity, update_momentum

__all__ = ["SMARTMetaArch", "StepOutput", "collapse_monitors"]


def _mean_cross_cosine(x: Tensor, views: int) -> float | None:
    """Mean cosine between the rows of different volumes of the same view (rows view-major)."""
    per_view = F.normalize(x.detach().float(), dim=-1).reshape(views, -1, x.shape[-1])
    b = per_view.shape[1]
    if b < 2:
        return None
    sims = per_view @ per_view.transpose(1, 2)  # (V, B, B)
    off = ~torch.eye(b, dtype=torch.bool, device=x.device)
    return float(sims[:, off].mean())


@torch.no_grad()
def collapse_monitors(
    volumes: Tensor, views: int, cls: Tensor, tokens: Tensor, attn: Tensor | None, level: float, stride: int
) -> dict[str, float]:
    """What tells a collapsing run from a learning one, beyond the loss.

    Args:
        volumes: the ``(V*B, 1, D, H, W)`` inputs, view-major.
        views: ``V``.
        cls: the teacher's ``(V*B, C)`` [CLS] embeddings; tokens: its ``(V*B, N, C)`` tokens.
        attn: its ``(V*B, heads, d, h, w)`` attention, or None.
        level: windowed intensity of the body threshold (:func:`body_level`).
        stride: the attention grid's stride in voxels.

    Returns:
        ``teacher_cls_cosine`` / ``teacher_pooled_cosine``: mean cosine between the [CLS] (or
        mean token) of *different* volumes (1.0: every CT gets the same embedding; needs 2 or
        more volumes per step); ``attn_air_share``: the share of the attention on cells that
        are mostly air, next to ``air_cell_share``, the share a uniform map would give.
    """
    out: dict[str, float] = {}
    for name, x in (("teacher_cls_cosine", cls), ("teacher_pooled_cosine", tokens.mean(1))):
        value = _mean_cross_cosine(x, views)
        if value is not None:
            out[name] = value
    if attn is not None:
        body = F.avg_pool3d((volumes > level).float(), stride).flatten(1) >= 0.5  # (V*B, N)
        weights = attn.float().mean(1).flatten(1)  # (V*B, N), rows sum to 1
        out["attn_air_share"] = float((weights * (~body)).sum(1).mean())
        out["air_cell_share"] = float((~body).float().mean())
    return out


@dataclass
class StepOutput:
    loss: Tensor  # weighted total, differentiable
    terms: dict[str, float]  # every term, detached floats
    teacher_attn: Tensor | None  # (V*B, heads, d, h, w)
    teacher_cls_logits: list[Tensor]  # per view, for the center update
    teacher_patch_logits: Tensor | None
    teacher_global_logits: list[Tensor] = field(default_factory=list)  # per view, GITD's center update


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
        self.use_heads = loss.cls_weight > 0 or loss.patch_weight > 0 or loss.global_weight > 0
        model_cfg.heads = self.use_heads
        model_cfg.global_head = loss.global_weight > 0
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
        if loss.cls_queue and loss.centering != "sinkhorn":
            raise ConfigError("loss.cls_queue needs loss.centering=sinkhorn (EMA centering keeps no queue)")
        if config.data.local_views and model_cfg.vit is not None:
            raise ConfigError(
                "data.local_views needs the Swin backbone (the ViT's position embeddings fit data.roi only)"
            )
        if config.data.local_views and loss.cls_weight <= 0:
            raise ConfigError("data.local_views needs loss.cls_weight > 0 (local views train only the [CLS] loss)")
        if loss.koleo_weight > 0 and config.data.batch_size < 2:
            raise ConfigError("loss.koleo_weight needs data.batch_size >= 2 (it spreads the volumes of a step apart)")
        self.dino_loss = DINOLoss(
            model_cfg.head_out_dim,
            loss.student_temp,
            loss.center_momentum,
            centering=loss.centering,
            queue_size=loss.cls_queue,
        )
        self.ibot_loss = iBOTPatchLoss(
            model_cfg.patch_out_dim or model_cfg.head_out_dim,
            loss.student_temp,
            loss.center_momentum,
            centering=loss.centering,
        )
        # GITD: the same centering and sharpening as the [CLS] loss, with a center of its own.
        # Built only when used, so that the other runs' state dicts are unchanged.
        self.gitd_loss = (
            DINOLoss(
                model_cfg.head_out_dim,
                loss.student_temp,
                loss.center_momentum,
                centering=loss.centering,
                queue_size=loss.cls_queue,
            )
            if loss.global_weight > 0
            else None
        )
        self.koleo_loss = KoLeoLoss()
        # the patch branch follows the [CLS] temperature schedule, scaled (loss.patch_teacher_temp)
        self.patch_temp_scale = (
            loss.patch_teacher_temp / loss.teacher_temp if loss.patch_teacher_temp is not None else 1.0
        )
        self.body_level = body_level(config.data.window)

    def train(self, mode: bool = True) -> SMARTMetaArch:
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
        local_views: Tensor | None = None,
    ) -> StepOutput:
        """Loss terms for ``views`` (B, V, 1, D, H, W); ``student`` may be the DDP-wrapped student.

        ``local_views`` (B, L, 1, d, h, w): smaller views for the student's [CLS] only (multi-crop).
        """
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
            t_out = self.teacher(x_teacher, mask=drop, return_attention=self.teacher.has_attention, reconstruct=False)
        attn = t_out["attn"]
        mask = self.masker(step, grid, v * b, attention=attn, generator=generator, device=x.device)

        x_local, n_local = None, 0
        if local_views is not None and cfg.cls_weight > 0:  # unmasked, view-major like x, [CLS] head only
            n_local = local_views.shape[1]
            x_local = local_views.transpose(0, 1).reshape(n_local * b, *local_views.shape[2:])
        with ctx:
            s_out = student(x, mask=mask, reconstruct=cfg.recon_weight > 0, return_attention=False, local=x_local)
        s_local_cls = list(s_out["local_cls_logits"].chunk(n_local)) if n_local else []

        terms: dict[str, Tensor] = {}
        if cfg.recon_weight > 0:
            terms["recon"] = masked_l1_loss(s_out["recon"], x, mask)
        t_cls: list[Tensor] = []
        t_patch = None
        t_global: list[Tensor] = []
        entropies: dict[str, float] = {}  # collapse monitors: 1.0 = uniform targets
        if self.use_heads:
            t_cls = list(t_out["cls_logits"].float().chunk(v))
            t_patch = t_out["patch_logits"].float()
            if cfg.patch_weight > 0:
                patch_temp = teacher_temp * self.patch_temp_scale
                patch_targets = self.ibot_loss.targets(t_patch, patch_temp)
                terms["patch"] = self.ibot_loss(s_out["patch_logits"], t_patch, mask, patch_temp, targets=patch_targets)
                entropies["teacher_patch_entropy"] = self.ibot_loss.entropy_fraction(patch_targets)
                entropies["teacher_patch_batch_entropy"] = self.ibot_loss.batch_entropy(patch_targets)
            if cfg.cls_weight > 0:
                cls_targets = self.dino_loss.view_targets(t_cls, teacher_temp)
                terms["cls"] = self.dino_loss(
                    [*s_out["cls_logits"].chunk(v), *s_local_cls], t_cls, teacher_temp, targets=cls_targets
                )
                entropies["teacher_cls_entropy"] = self.dino_loss.entropy_fraction(cls_targets)
                entropies["teacher_cls_batch_entropy"] = self.dino_loss.batch_entropy(cls_targets)
            if self.gitd_loss is not None:
                t_global = list(t_out["global_logits"].float().chunk(v))
                terms["global"] = self.gitd_loss(list(s_out["global_logits"].chunk(v)), t_global, teacher_temp)
        if cfg.koleo_weight > 0:
            terms["koleo"] = torch.stack([self.koleo_loss(c) for c in s_out["cls"].chunk(v)]).mean()
        weights = {
            "recon": cfg.recon_weight,
            "patch": cfg.patch_weight,
            "cls": cfg.cls_weight,
            "global": cfg.global_weight,
            "koleo": cfg.koleo_weight,
        }
        total = sum(weights[k] * t for k, t in terms.items())
        values = {f"loss_{k}": float(t.detach()) for k, t in terms.items()}
        values["loss"] = float(total.detach())
        values["mask_ratio"] = float(mask.float().mean())
        values.update(entropies)
        values.update(collapse_monitors(x, v, t_out["cls"], t_out["tokens"], attn, self.body_level, stride))
        if attn is not None:
            values["head_diversity"] = float(head_diversity(attn))
        return StepOutput(total, values, attn, t_cls, t_patch, t_global)

    @torch.no_grad()
    def after_step(self, out: StepOutput, momentum: float) -> None:
        """EMA update of the teacher and of the loss centers (after ``optimizer.step()``)."""
        update_momentum(self.student, self.teacher, momentum)
        if out.teacher_cls_logits and self.config.loss.cls_weight > 0:
            self.dino_loss.update_center(out.teacher_cls_logits)
        if out.teacher_patch_logits is not None and self.config.loss.patch_weight > 0:
            self.ibot_loss.update_center(out.teacher_patch_logits)
        if out.teacher_global_logits and self.gitd_loss is not None:
            self.gitd_loss.update_center(out.teacher_global_logits)

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on weight matrices only (not biases, norms, tokens, bias tables)."""
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or name.endswith(
                ("mask_token", "cls_token", "relative_position_bias_table", "position_embeddings")
            )
            (no_decay if skip else decay).append(p)
        return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]

    def last_layer_parameters(self) -> list[Tensor]:
        """The prototypes of the DINO heads (frozen during the first steps, as DINO does)."""
        return [p for n, p in self.student.named_parameters() if ".last_layer." in n and p.requires_grad]
