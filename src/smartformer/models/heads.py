"""Heads on top of the backbone: DINO projection head and SimMIM-style voxel decoder."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "ReconstructionDecoder", "pixel_shuffle_3d"]


class DINOHead(nn.Module):
    """MLP (``nlayers`` linear layers, GELU) -> L2-normalised bottleneck -> weight-normalised prototypes.

    Works on any leading shape: (B, C) for the [CLS] or (B, N, C) for patch tokens.
    ``norm_last_layer`` fixes the weight-norm magnitude to 1 (DINO's default), so only the
    direction of each prototype is learnt.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError("nlayers must be >= 1")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(x)


def pixel_shuffle_3d(x: Tensor, factor: int) -> Tensor:
    """(B, C * r^3, d, h, w) -> (B, C, d*r, h*r, w*r), the 3D analogue of ``nn.PixelShuffle``."""
    b, c, d, h, w = x.shape
    r = factor
    if c % r**3:
        raise ValueError(f"channels {c} not divisible by {r}^3")
    x = x.view(b, c // r**3, r, r, r, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c // r**3, d * r, h * r, w * r)


class ReconstructionDecoder(nn.Module):
    """SimMIM's light decoder: a 1x1x1 convolution to ``stride^3 * out_chans`` channels, then 3D pixel shuffle."""

    def __init__(self, in_dim: int, stride: int = 32, out_chans: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv3d(in_dim, stride**3 * out_chans, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: channels-last (B, d, h, w, C) features -> voxels (B, out_chans, d*s, h*s, w*s)."""
        return pixel_shuffle_3d(self.proj(x.permute(0, 4, 1, 2, 3)), self.stride)
