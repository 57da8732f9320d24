"""3D ViT backbone, weight-compatible with MONAI's ``ViT`` (the encoder of ``UNETR``).

The published SMART paper also reports the method on a ViT (12 blocks, width 768, 8 heads; their
Table 2). On a ViT the semantic attention is the [CLS] it already has (AttMask-style): the map is
the head mean of the last block's [CLS] row over the patch tokens.

Parameter names and layout follow MONAI's ``ViT(proj_type="conv", pos_embed_type="learnable")``:
``patch_embedding.patch_embeddings`` (a strided convolution), ``patch_embedding.position_embeddings``
(one per patch, none for the [CLS]), ``blocks.{i}.{norm1,attn.qkv,attn.out_proj,norm2,mlp.linear1,
mlp.linear2}``, ``norm`` and ``cls_token``. :meth:`ViT3D.monai_state_dict` is what
``ViT(..., classification=False)`` (UNETR's encoder) loads with ``strict=True``: it drops our
``cls_token`` and ``mask_token`` and adds the ``norm_cross_attn`` that MONAI registers and never
uses without cross-attention. What differs is how it runs: fused attention
(``scaled_dot_product_attention``), and a learnable mask token that replaces the patch embedding
of masked cells before the position embedding is added (iBOT).

Example::

    vit = ViT3D(ViT3DConfig(img_size=(64, 64, 64), hidden_size=96, num_layers=4, num_heads=4))
    out = vit.forward_features(torch.rand(2, 1, 64, 64, 64), return_attention=True)
    out["cls"].shape, out["tokens"].shape, out["attn"].shape  # (2, 96), (2, 4, 4, 4, 96), (2, 4, 4, 4, 4)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from smartformer.models.semantic_attention import ViTBlock
from smartformer.models.swin3d import upsample_cell_mask

__all__ = ["ViT3D", "ViT3DConfig", "VIT_PRESETS"]


@dataclass
class ViT3DConfig:
    """Hyper-parameters of :class:`ViT3D` (names follow MONAI's ``ViT``)."""

    in_chans: int = 1
    img_size: tuple[int, int, int] = (96, 96, 96)
    patch_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 8
    qkv_bias: bool = False  # MONAI's default, and UNETR's
    fused_attn: bool = True

    def __post_init__(self) -> None:
        size = self.img_size
        self.img_size = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)  # type: ignore[assignment]
        if len(self.img_size) != 3 or any(s % self.patch_size for s in self.img_size):
            raise ValueError(
                f"img_size {self.img_size} must be 3 sides, each a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")

    @property
    def grid(self) -> tuple[int, int, int]:
        """The patch grid (d, h, w)."""
        return tuple(s // self.patch_size for s in self.img_size)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


VIT_PRESETS: dict[str, ViT3DConfig] = {
    # The paper's ViT variant (their Table 2) on the paper's 128^3 views, patch 16 as UNETR.
    "paper": ViT3DConfig(img_size=(128, 128, 128), hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=8),
    # Small enough for a 2-core CPU.
    "tiny": ViT3DConfig(img_size=(64, 64, 64), hidden_size=96, mlp_dim=384, num_layers=4, num_heads=4),
}


class _PatchEmbedding(nn.Module):
    """MONAI's ``PatchEmbeddingBlock`` parameters: a strided convolution and learnt position embeddings."""

    def __init__(self, cfg: ViT3DConfig) -> None:
        super().__init__()
        n = cfg.grid[0] * cfg.grid[1] * cfg.grid[2]
        self.patch_embeddings = nn.Conv3d(
            cfg.in_chans, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, n, cfg.hidden_size))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)


class ViT3D(nn.Module):
    """3D ViT with a [CLS] token whose attention is the semantic attention (see module doc)."""

    def __init__(self, config: ViT3DConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else ViT3DConfig(**kwargs)
        self.patch_embedding = _PatchEmbedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_dim / cfg.hidden_size, cfg.qkv_bias, cfg.fused_attn)
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    def embed(self, x: Tensor, mask: Tensor | None = None, cls: bool = True) -> Tensor:
        """(B, [1 +] N, C) tokens: patches (mask token where ``mask``), position embeddings, [CLS] first."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_chans or tuple(x.shape[2:]) != cfg.img_size:
            raise ValueError(
                f"expected input (B, {cfg.in_chans}, {', '.join(map(str, cfg.img_size))}), "
                f"got {tuple(x.shape)} (the position embeddings are learnt for that size)"
            )
        t = self.patch_embedding.patch_embeddings(x).flatten(2).transpose(1, 2)
        if mask is not None:
            m = upsample_cell_mask(mask.bool(), cfg.grid).flatten(1).unsqueeze(-1).to(t.dtype)
            t = t * (1 - m) + self.mask_token.to(t.dtype) * m
        t = t + self.patch_embedding.position_embeddings
        return torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) if cls else t

    def forward_features(
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False, cls: bool = True
    ) -> dict[str, Any]:
        """Run the ViT.

        Args:
            x: (B, C, *img_size) volume.
            mask: optional bool cell mask (B, d, h, w) on a grid that divides the patch grid.
            return_attention: the last block's [CLS] row over the patches, renormalised over them.
            cls: False runs without the [CLS] token, as MONAI's ``ViT(classification=False)``.

        Returns:
            ``cls`` (B, C) or None, ``tokens`` (B, d, h, w, C) normed patch tokens, ``attn``
            (B, heads, d, h, w) or None, ``hidden_states`` the blocks' outputs (B, [1 +] N, C)
            before the final norm (what MONAI's ``ViT`` returns second, for UNETR's skips).
        """
        t = self.embed(x, mask, cls)
        hidden, attn = [], None
        for i, blk in enumerate(self.blocks):
            want = return_attention and cls and i == len(self.blocks) - 1
            if self.grad_checkpointing and torch.is_grad_enabled():
                t, a = checkpoint(blk, t, want, use_reentrant=False)
            else:
                t, a = blk(t, want)
            hidden.append(t)
            if a is not None:
                patches = a[:, :, 1:].float()
                attn = (patches / patches.sum(-1, keepdim=True)).reshape(t.shape[0], -1, *self.config.grid)
        t = self.norm(t)
        patches = t[:, 1:] if cls else t
        return {
            "cls": t[:, 0] if cls else None,
            "tokens": patches.reshape(t.shape[0], *self.config.grid, -1),
            "attn": attn,
            "hidden_states": hidden,
        }

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """MONAI ``ViT(classification=False)``'s outputs: normed patch tokens (B, N, C) and the blocks' outputs."""
        out = self.forward_features(x, cls=False)
        return out["tokens"].flatten(1, 3), out["hidden_states"]

    def monai_state_dict(self) -> dict[str, Tensor]:
        """The weights as MONAI's ``ViT(classification=False)`` (UNETR's ``vit``) loads them, ``strict=True``."""
        state = {k: v for k, v in self.state_dict().items() if k not in ("cls_token", "mask_token")}
        dim = self.config.hidden_size
        for i in range(len(self.blocks)):  # registered by MONAI's TransformerBlock, unused without cross-attention
            state[f"blocks.{i}.norm_cross_attn.weight"] = torch.ones(dim)
            state[f"blocks.{i}.norm_cross_attn.bias"] = torch.zeros(dim)
        return state

    def load_monai_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load the weights of a MONAI ``ViT(classification=False or True)``; strict on every key of ours
        except the ones MONAI lacks (``mask_token``; ``cls_token`` without classification), which keep
        their values. Its ``norm_cross_attn`` and ``classification_head`` are left out.

        Raises:
            ValueError: a missing or unexpected weight, named.
        """
        keep = {
            k: v for k, v in state.items() if ".norm_cross_attn." not in k and not k.startswith("classification_head.")
        }
        missing, unexpected = self.load_state_dict(keep, strict=False)
        missing = [k for k in missing if k not in ("mask_token", "cls_token")]
        if missing or unexpected:
            raise ValueError(f"not the weights of this ViT: missing {missing[:3]}, unexpected {unexpected[:3]}")
