"""Semantic (class-)attention module: a learnable [CLS] query over the tokens of one Swin stage.

CaiT-style class-attention blocks (Touvron et al., 2021): only the [CLS] token is a query; the
keys and values are the LayerNorm'd patch tokens. Each block updates the [CLS] embedding with
attention then an MLP, both with LayerScale. The last block's [CLS]->token attention, one map
per head on the stage's grid, is what SMART uses to guide masking and what the ``attention``
command shows.

Attention maps are always exact softmax weights (each map sums to 1 over the grid): the module
computes them explicitly, even when training uses fused ``scaled_dot_product_attention``. The
class attention has a single query, so the explicit path costs next to nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartformer.models.swin3d import Mlp

__all__ = [
    "ClassAttention",
    "ClassAttentionBlock",
    "SemanticAttention",
    "SemanticOutput",
    "SelfAttention",
    "ViTBlock",
    "ViTSemanticAttention",
]


def _head_scale(dim: int, num_heads: int) -> float:
    """The attention scale ``1 / sqrt(dim / heads)``; refuses a width the heads do not divide."""
    if dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
    return (dim // num_heads) ** -0.5


def _mlp(dim: int, mlp_ratio: float) -> nn.Sequential:
    """The blocks' two-layer GELU MLP, ``dim -> dim * mlp_ratio -> dim``."""
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class ClassAttention(nn.Module):
    """Multi-head attention of one query ([CLS]) over N tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused_attn: bool = True) -> None:
        super().__init__()
        self.num_heads, self.scale, self.fused_attn = num_heads, _head_scale(dim, num_heads), fused_attn
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, cls: Tensor, tokens: Tensor, return_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        """cls: (B, 1, C), tokens: (B, N, C) -> ((B, 1, C), attention (B, heads, N) or None)."""
        b, n, c = tokens.shape
        h = self.num_heads
        q = self.q(cls).view(b, 1, h, c // h).transpose(1, 2)
        k, v = self.kv(tokens).view(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn and not return_attn:
            out, attn = F.scaled_dot_product_attention(q, k, v, scale=self.scale), None
        else:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, h, 1, N)
            out, attn = weights @ v, weights.squeeze(2)
        return self.proj(out.transpose(1, 2).reshape(b, 1, c)), attn


class ClassAttentionBlock(nn.Module):
    """[CLS] <- [CLS] + gamma1 * CA(norm1([CLS]), norm1(tokens)); [CLS] <- [CLS] + gamma2 * MLP(norm2([CLS])).

    ``init_values`` is the LayerScale start (``gamma1``, ``gamma2``). CaiT's small values
    (1e-5 .. 1e-4) suit a supervised loss; under self-distillation they are a trap: the [CLS]
    starts as the learnt constant token, equal for every input to 1e-4, the centered teacher
    targets are then uniform, and a uniform target gives the student nothing to learn from
    (the [CLS] loss sits at ln K for good). 1.0 makes the [CLS] depend on the input from step 0.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float = 1.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio)
        self.gamma1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, cls: Tensor, tokens: Tensor, return_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        update, attn = self.attn(self.norm1(cls), self.norm1(tokens), return_attn)
        cls = cls + self.gamma1 * update
        cls = cls + self.gamma2 * self.mlp(self.norm2(cls))
        return cls, attn


class SemanticAttention(nn.Module):
    """``depth`` class-attention blocks; returns the [CLS] embedding and per-head attention maps.

    Args:
        dim: width of the stage's tokens.
        num_heads: attention heads (one map each).
        depth: number of class-attention blocks (SPEC default 2).

    Example::

        sa = SemanticAttention(dim=192, num_heads=6)
        cls, attn = sa(tokens)  # tokens (B, d, h, w, 192) -> cls (B, 192), attn (B, 6, d, h, w)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float = 1.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(
            ClassAttentionBlock(dim, num_heads, mlp_ratio, qkv_bias, init_values, fused_attn) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, return_attn: bool = True) -> tuple[Tensor, Tensor | None]:
        """tokens: channels-last (B, d, h, w, C) -> ([CLS] (B, C), attention (B, heads, d, h, w) or None)."""
        b, d, h, w, c = tokens.shape
        flat = tokens.reshape(b, d * h * w, c)
        cls = self.cls_token.expand(b, -1, -1)
        attn = None
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            cls, a = blk(cls, flat, return_attn and i == last)
            if a is not None:
                attn = a.reshape(b, self.num_heads, d, h, w)
        return self.norm(cls.squeeze(1)), attn


class SemanticOutput(NamedTuple):
    """What :class:`ViTSemanticAttention` returns.

    ``cls``: (B, C) normed [CLS]; ``attn``: (B, heads, d, h, w) or None; ``tokens``: (B, d, h, w, C)
    normed patch tokens (what the patch loss reads); ``stream``: (B, d, h, w, C) the patch tokens'
    residual stream before the final norm (what continues into the next Swin stage, if asked).
    """

    cls: Tensor
    attn: Tensor | None
    tokens: Tensor
    stream: Tensor


class SelfAttention(nn.Module):
    """Multi-head self-attention over a sequence whose first token is the [CLS] (timm's ``Attention``;
    parameter names of MONAI's ``SABlock``: ``qkv``, ``out_proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused_attn: bool = True) -> None:
        super().__init__()
        self.num_heads, self.scale, self.fused_attn = num_heads, _head_scale(dim, num_heads), fused_attn
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, return_cls_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        """x: (B, 1 + N, C) -> ((B, 1 + N, C), the [CLS] query's softmax row (B, heads, 1 + N) or None)."""
        b, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        cls_attn = None
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            if return_cls_attn:  # one query row, explicit: the output above is untouched
                cls_attn = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).softmax(-1).squeeze(2)
        else:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
            out = weights @ v
            cls_attn = weights[:, :, 0] if return_cls_attn else None
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c)), cls_attn


class ViTBlock(nn.Module):
    """Pre-norm ViT block: ``x + MSA(norm1(x))`` then ``x + MLP(norm2(x))`` (no LayerScale, as ViT).

    Parameter names are those of MONAI's ``TransformerBlock`` (less its unused ``norm_cross_attn``).
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, fused_attn: bool = True
    ) -> None:
        super().__init__()
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, return_cls_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        update, attn = self.attn(self.norm1(x), return_cls_attn)
        x = x + update
        return x + self.mlp(self.norm2(x)), attn


class ViTSemanticAttention(nn.Module):
    """Semantic attention as published: ``depth`` ViT blocks over [CLS] + the N patch tokens of one stage.

    No position embedding is added: the Swin tokens already carry position (relative-position
    biases, local windows); the paper does not mention one.

    The map is the head mean (kept per head here) of the last block's [CLS] softmax row over the N
    patch tokens, renormalised over those N (the paper's softmax runs over N+1 keys, the [CLS]
    itself among them; dividing by the patch tokens' share keeps the ranking and makes every map
    sum to 1, as the class-attention maps do).

    Example::

        sa = ViTSemanticAttention(dim=96, num_heads=8)
        out = sa(tokens)  # tokens (B, d, h, w, 96) -> out.cls (B, 96), out.attn (B, 8, d, h, w)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, num_heads, mlp_ratio, qkv_bias, fused_attn) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, return_attn: bool = True) -> SemanticOutput:
        """tokens: channels-last (B, d, h, w, C) -> :class:`SemanticOutput`."""
        b, d, h, w, c = tokens.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens.reshape(b, d * h * w, c)], dim=1)
        attn = None
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x, a = blk(x, return_attn and i == last)
            if a is not None:
                patches = a[:, :, 1:].float()
                attn = (patches / patches.sum(-1, keepdim=True)).reshape(b, self.num_heads, d, h, w)
        normed = self.norm(x)
        return SemanticOutput(normed[:, 0], attn, normed[:, 1:].reshape(b, d, h, w, c), x[:, 1:].reshape(b, d, h, w, c))
