"""Attention-head diversity as the SMART paper measures it: the entropy of each head's attention
distances, per Swin stage.

The published paper (DAGMaN, MIDL 2025) compares masking strategies and the noisy teacher by
"the entropy of the heads' attention distances" in each of the four Swin stages; it gives no
formula. Our reading, fixed here: in a window-attention block, a query's *attention distance*
is the attention-weighted mean distance, in voxels, between its token and the tokens of its
window (``sum_j a_ij |p_i - p_j|``, as in ViT's mean attention distance). Over every query of a
stage's blocks, each head's distances form a distribution; its entropy (a 16-bin histogram on 0
to the window's diagonal, divided by ln 16, so 0 = every query attends at one distance, 1 =
distances spread evenly) says how varied that head's reach is. A stage reports the mean of its
heads' entropies and their standard deviation across heads, with the mean distance.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from smartformer.models.swin3d import Swin3D, _effective_window

__all__ = ["BINS", "head_distance_entropy"]

BINS = 16


def _offsets(ws: tuple[int, int, int], device: torch.device) -> Tensor:
    """(n, n) distances, in window cells, between the tokens of a window in raster order."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(w, device=device) for w in ws), indexing="ij"), -1)
    pos = grid.reshape(-1, 3).float()
    return torch.cdist(pos, pos)


@torch.no_grad()
def head_distance_entropy(backbone: Swin3D, x: Tensor) -> dict[str, float]:
    """Per stage ``k`` (1-4): ``head_distance_entropy_s{k}`` (mean over heads, in [0, 1]),
    ``head_distance_entropy_sd_s{k}`` (across heads) and ``head_distance_s{k}`` (mean attention
    distance in voxels) of the backbone on ``x`` (B, 1, D, H, W); see the module doc."""
    per_stage: dict[int, list[Tensor]] = {}
    reach: dict[int, float] = {}
    handles = []
    for k, stage in enumerate(backbone.stages, start=1):
        stride = 2**k
        for blk in stage.blocks:
            grid: dict[str, Any] = {}
            handles.append(
                blk.register_forward_pre_hook(
                    lambda _m, args, g=grid: g.__setitem__("shape", tuple(args[0].shape[1:4]))
                )
            )

            def hook(
                attn: Any, args: tuple, _out: Tensor, blk: Any = blk, g: dict = grid, k: int = k, stride: int = stride
            ) -> None:
                windows, mask = args[0], (args[1] if len(args) > 1 else None)
                ws, _ = _effective_window(g["shape"], blk.window_size, blk.shift_size)
                weights = attn.attention_weights(windows, mask).float()  # (BW, heads, n, n)
                dist = _offsets(ws, windows.device) * stride
                per_query = (weights * dist).sum(-1)  # (BW, heads, n)
                per_stage.setdefault(k, []).append(per_query.transpose(0, 1).reshape(attn.num_heads, -1))
                reach[k] = max(reach.get(k, 0.0), float(dist.max()))

            handles.append(blk.attn.register_forward_hook(hook))
    try:
        backbone.forward_features(x, strides=(16,))
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, float] = {}
    for k, chunks in per_stage.items():
        distances = torch.cat(chunks, 1)  # (heads, queries)
        top = reach[k] if reach[k] > 0 else 1.0
        entropies = []
        for head in distances:
            counts = torch.histc(head, bins=BINS, min=0.0, max=top)
            p = counts / counts.sum()
            p = p[p > 0]
            entropies.append(float(-(p * p.log()).sum()) / math.log(BINS))
        values = torch.tensor(entropies)
        out[f"head_distance_entropy_s{k}"] = float(values.mean())
        out[f"head_distance_entropy_sd_s{k}"] = float(values.std(unbiased=False))
        out[f"head_distance_s{k}"] = float(distances.mean())
    return out
