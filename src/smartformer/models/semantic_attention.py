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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassAttention", "ClassAttentionBlock", "SemanticAttention"]


class ClassAttention(nn.Module):
    """Multi-head attention of one query ([CLS]) over N tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused_attn: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = fused_attn
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
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
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
