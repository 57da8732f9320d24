"""3D Swin transformer backbone, weight-compatible with MONAI's ``SwinTransformer``.

Parameter names and layout follow MONAI's ``SwinTransformer`` (the ``swinViT`` of
``SwinUNETR``): a state dict moves between the two unchanged, except for our extra
``mask_token``. What differs is how it runs:

* window attention runs fused (``fused_attn=True``), in training as well as inference, through
  :func:`smartformer.models.attention.window_attention`: PyTorch's CPU flash-attention kernel with
  a custom backward for the trainable relative-position bias (SDPA on CUDA), never materialising
  the (windows, heads, n, n) attention matrices; ``fused_attn=False`` is the explicit-softmax
  reference path;
* activations stay channels-last between stages, and shifted-window masks are cached per grid;
* a block's pad, cyclic shift and window partition (and their reverse) are one row gather each
  way (:class:`WindowLayout`, cached per grid), and patch merging's backward is one pass;
* a learnable mask token replaces the patch embeddings of masked cells (SimMIM / iBOT);
* gradient checkpointing per block (``grad_checkpointing=True``).

Stage naming: the backbone has a patch embedding (stride 2) and four stages. Stage ``i``
(``layers{i}``) runs its blocks at stride ``2**i`` and ends with a patch merging to stride
``2**(i+1)``. "The tokens at stride ``s``" means the output of the blocks that run at stride
``s`` (before merging) for ``s`` in 2, 4, 8, 16, and the merged output of the last stage for 32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import (
    MaskLike,
    ShiftMask,
    window_attention_qkv,
    window_attention_reference,
    window_attention_weights,
)
from .sizes import SIZE_MULTIPLE, check_input_size, is_input_size

__all__ = [
    "PRESETS",
    "SIZE_MULTIPLE",
    "is_input_size",
    "check_input_size",
    "Swin3D",
    "Swin3DConfig",
    "WindowAttention",
    "SwinBlock",
    "BasicLayer",
    "PatchMerging",
    "PatchEmbed",
    "WindowLayout",
    "pad_to_multiple",
    "upsample_cell_mask",
]


@dataclass
class Swin3DConfig:
    """Hyper-parameters of :class:`Swin3D` (names follow MONAI's ``SwinTransformer``)."""

    in_chans: int = 1
    embed_dim: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: tuple[int, int, int] = (7, 7, 7)
    patch_size: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    fused_attn: bool = True
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        ws = self.window_size
        self.window_size = (int(ws),) * 3 if isinstance(ws, int) else tuple(int(w) for w in ws)  # type: ignore[assignment]
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError("depths and num_heads need one entry per stage (4)")
        if self.patch_size != 2:
            raise ValueError("patch_size must be 2 (strides 2..32 are assumed throughout)")
        for i, h in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % h:
                raise ValueError(f"stage {i + 1}: width {self.embed_dim * 2**i} is not divisible by {h} heads")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Swin3DConfig] = {
    # MONAI SwinUNETR's encoder.
    "base": Swin3DConfig(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=(7, 7, 7)),
    # SMIT (Jiang et al., MICCAI 2022).
    "smit": Swin3DConfig(embed_dim=48, depths=(2, 2, 4, 2), num_heads=(4, 4, 4, 4), window_size=(4, 4, 4)),
    # The published SMART/DAGMaN Swin (MIDL 2025): 384 channels at stage 4.
    "paper": Swin3DConfig(embed_dim=48, depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), window_size=(4, 4, 4)),
    # Small enough to pretrain on a 2-core CPU.
    "tiny": Swin3DConfig(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=(4, 4, 4)),
}


def _effective_window(grid: Sequence[int], window: Sequence[int], shift: Sequence[int]):
    """MONAI's rule: a window larger than the grid shrinks to the grid and does not shift."""
    ws, ss = list(window), list(shift)
    for i, g in enumerate(grid):
        if g <= window[i]:
            ws[i], ss[i] = g, 0
    return tuple(ws), tuple(ss)


def _window_partition(x: Tensor, ws: Sequence[int]) -> Tensor:
    """(B, D, H, W, C) -> (B * nW, ws0*ws1*ws2, C), windows in (d, h, w) raster order."""
    b, d, h, w, c = x.shape
    x = x.view(b, d // ws[0], ws[0], h // ws[1], ws[1], w // ws[2], ws[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws[0] * ws[1] * ws[2], c)


class _GatherRows(torch.autograd.Function):
    """``src.index_select(0, index)`` with ``zero_rows`` zeroed, whose gradient is the gather by
    ``back_index`` (with ``back_zero_rows`` zeroed): the two gathers of a :class:`WindowLayout`
    are each other's gradient, so either way one copy forward and one backward."""

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, zero_rows, back_index: Tensor, back_zero_rows) -> Tensor:
        ctx.save_for_backward(back_index, back_zero_rows)
        return _gather_rows(src, index, zero_rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _gather_rows(grad, *ctx.saved_tensors), None, None, None, None


def _gather_rows(src: Tensor, index: Tensor, zero_rows: Tensor | None) -> Tensor:
    out = src.index_select(0, index)
    if zero_rows is not None:
        out.index_fill_(0, zero_rows, 0)
    return out


class WindowLayout:
    """A block's pad, cyclic shift and window partition of (B, D, H, W, C) tokens, as one gather.

    MONAI's block pads the normalised tokens with zeros to whole windows, rolls them by minus the
    shift, partitions them into windows and, after attention, reverses the partition, rolls back
    and crops: four to five copies each way, and as many in the backward. Here the token rows go
    straight to their window rows: ``index`` (B * nW * n,) holds the source token of each window
    row (token 0 for a padding row, which ``pad_rows`` lists and the gather zeroes), ``inverse``
    (B * D * H * W,) the window row of each token. Partition and reverse are one
    ``index_select`` each, and the gradient of each is the other (:class:`_GatherRows`).
    """

    def __init__(self, index: Tensor, pad_rows: Tensor | None, inverse: Tensor, window_tokens: int) -> None:
        self.index = index
        self.pad_rows = pad_rows
        self.inverse = inverse
        self.window_tokens = window_tokens

    @classmethod
    def build(
        cls, batch: int, grid: Sequence[int], ws: Sequence[int], ss: Sequence[int], device: torch.device | str = "cpu"
    ) -> WindowLayout:
        """The layout of ``batch`` elements on ``grid`` with (effective) windows ``ws`` shifted by ``ss``.

        Built on the CPU (the index arithmetic reads values back) and moved to ``device``.
        """
        padded = [-(-g // w) * w for g, w in zip(grid, ws)]
        tokens = grid[0] * grid[1] * grid[2]
        ids = torch.full(padded, -1, dtype=torch.long)
        ids[: grid[0], : grid[1], : grid[2]] = torch.arange(tokens).view(*grid)
        if any(ss):
            ids = torch.roll(ids, shifts=tuple(-s for s in ss), dims=(0, 1, 2))
        src = _window_partition(ids.view(1, *padded, 1), ws).reshape(-1)  # source token per window row
        rows = src.numel()
        pad = src < 0
        real = torch.nonzero(~pad).squeeze(1)
        inverse = torch.empty(tokens, dtype=torch.long)
        inverse[src[real]] = real
        offsets = torch.arange(batch).view(-1, 1)
        index = (src.clamp_min(0) + offsets * tokens).reshape(-1)
        inverse = (inverse + offsets * rows).reshape(-1)
        pad_rows = None
        if bool(pad.any()):
            pad_rows = (torch.nonzero(pad).squeeze(1) + offsets * rows).reshape(-1).to(device)
        return cls(index.to(device), pad_rows, inverse.to(device), ws[0] * ws[1] * ws[2])

    def partition(self, x: Tensor) -> Tensor:
        """(B, D, H, W, C) tokens -> (B * nW, n, C) windows, as padding, shift and partition."""
        c = x.shape[-1]
        rows = _GatherRows.apply(x.reshape(-1, c), self.index, self.pad_rows, self.inverse, None)
        return rows.view(-1, self.window_tokens, c)

    def reverse(self, windows: Tensor, grid: Sequence[int]) -> Tensor:
        """Inverse of :meth:`partition`: (B * nW, n, C) -> (B, D, H, W, C), padding dropped."""
        c = windows.shape[-1]
        rows = _GatherRows.apply(windows.reshape(-1, c), self.inverse, None, self.index, self.pad_rows)
        return rows.view(-1, *grid, c)


def _shift_windows(grid: Sequence[int], ws: Sequence[int], ss: Sequence[int], device: torch.device) -> ShiftMask:
    """Additive mask of shifted windows, compact: 0 within a region, -100 across.

    A token's region along an axis is the body, the last window's strip that the roll brings
    from the far side, or the last ``s`` tokens (one region where the axis does not shift).
    Windows off the last slab of every shifted axis lie in one region (the all-zero pattern);
    the others have one of at most 7 more patterns. The (P, n, n) patterns are built from the
    distinct region labellings of the windows, so a whole CT's mask takes megabytes, not the
    1.5 GB of the full (nW, n, n) one. It is built on the CPU (``unique`` has no meta kernel, and
    on CUDA it would synchronise anyway) and moved to ``device``.
    """
    labels = []
    for g, w, s in zip(grid, ws, ss):
        label = torch.zeros(g, dtype=torch.int8, device="cpu")
        if s:
            label[g - w : g - s] = 1
            label[g - s :] = 2
        labels.append(label)
    region = labels[0].view(-1, 1, 1) * 9 + labels[1].view(1, -1, 1) * 3 + labels[2].view(1, 1, -1)
    win = _window_partition(region.view(1, *grid, 1), ws).squeeze(-1)  # (nW, n)
    distinct, index = torch.unique(win, dim=0, return_inverse=True)  # (P, n), (nW,)
    patterns = torch.where(distinct.unsqueeze(1) != distinct.unsqueeze(2), -100.0, 0.0)
    return ShiftMask(patterns, index).to(device=device)


def _shift_mask(grid: Sequence[int], ws: Sequence[int], ss: Sequence[int], device: torch.device) -> Tensor:
    """The full (nW, n, n) mask of :func:`_shift_windows` (the definition; the model uses the compact one)."""
    return _shift_windows(grid, ws, ss, device).dense()


class WindowAttention(nn.Module):
    """Multi-head self-attention inside 3D windows with a relative-position bias."""

    def __init__(
        self, dim: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = True, fused_attn: bool = True
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = tuple(window_size)
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = fused_attn
        wd, wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        coords = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij"))
        coords = coords.flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += wd - 1
        rel[:, :, 1] += wh - 1
        rel[:, :, 2] += ww - 1
        rel[:, :, 0] *= (2 * wh - 1) * (2 * ww - 1)
        rel[:, :, 1] *= 2 * ww - 1
        # Persistent, as in MONAI, so that state dicts match key for key.
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self, n: int) -> Tensor:
        """(heads, n, n) bias for windows of ``n`` tokens (MONAI's ``[:n, :n]`` rule for small grids)."""
        idx = self.relative_position_index[:n, :n].reshape(-1)
        return self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: MaskLike = None) -> Tensor:
        """x: (B * nW, n, C); mask: the additive shifted-window mask (a :class:`ShiftMask` or a
        full (nW, n, n) tensor) or None."""
        bw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(bw, n, 3, h, c // h)
        if self.fused_attn:
            # Flash kernel in fp32/bf16 on CPU with a custom backward for the bias, the qkv
            # gradient written in qkv's layout (see models/attention.py); SDPA on CUDA. The bias
            # stays in the table's dtype.
            out = window_attention_qkv(qkv, self.relative_position_bias(n).contiguous(), mask, self.scale)
        else:  # the explicit-softmax definition of the fused path
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = window_attention_reference(q, k, v, self.relative_position_bias(n), mask, self.scale)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))

    def attention_weights(self, x: Tensor, mask: MaskLike = None) -> Tensor:
        """The explicit softmax weights (B * nW, heads, n, n) of :meth:`forward`'s input, for analysis."""
        bw, n, c = x.shape
        q, k, _ = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return window_attention_weights(q, k, self.relative_position_bias(n), mask, self.scale)


class Mlp(nn.Module):
    """Two-layer GELU MLP named like MONAI's ``MLPBlock`` (``linear1``, ``linear2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class SwinBlock(nn.Module):
    """One (shifted-)window attention block on channels-last (B, D, H, W, C) tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        shift_size: Sequence[int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(shift_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias, fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def window_layout(self, batch: int, grid: Sequence[int], device: torch.device | str) -> WindowLayout:
        """This block's (uncached) :class:`WindowLayout` for ``batch`` elements on ``grid``."""
        return WindowLayout.build(batch, grid, *_effective_window(grid, self.window_size, self.shift_size), device)

    def _attention(self, x: Tensor, mask: MaskLike, layout: WindowLayout | None = None) -> Tensor:
        grid = x.shape[1:4]
        if layout is None:
            layout = self.window_layout(x.shape[0], grid, x.device)
        shifted = any(_effective_window(grid, self.window_size, self.shift_size)[1])
        windows = self.attn(layout.partition(self.norm1(x)), mask if shifted else None)
        return layout.reverse(windows, grid)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.drop_path(self.mlp(self.norm2(x)))

    def forward(
        self, x: Tensor, mask: MaskLike, use_checkpoint: bool = False, layout: WindowLayout | None = None
    ) -> Tensor:
        """``layout``: this block's :class:`WindowLayout` for ``x`` (built here if None)."""
        if use_checkpoint and torch.is_grad_enabled():
            x = x + self.drop_path(checkpoint(self._attention, x, mask, layout, use_reentrant=False))
            return x + checkpoint(self._mlp, x, use_reentrant=False)
        x = x + self.drop_path(self._attention(x, mask, layout))
        return x + self._mlp(x)


class PatchMerging(nn.Module):
    """2x2x2 patch merging in MONAI's ``"merging"`` neighbour order."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(8 * dim)

    def forward(self, x: Tensor) -> Tensor:
        d, h, w = x.shape[1:4]
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        return self.reduction(self.norm(_Merge.apply(x)))


# MONAI's order of the eight (d, h, w) neighbours that patch merging concatenates.
_MERGE_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))


def _neighbours(x: Tensor) -> list[Tensor]:
    """The eight strided (B, D/2, H/2, W/2, C) views of (B, D, H, W, C) ``x``, in :data:`_MERGE_ORDER`."""
    return [x[:, i::2, j::2, k::2, :] for i, j, k in _MERGE_ORDER]


class _Merge(torch.autograd.Function):
    """``torch.cat(_neighbours(x), -1)`` with a one-pass backward: autograd's own backward of the
    eight slices builds eight zero-filled gradients of ``x``'s size and adds them up."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return torch.cat(_neighbours(x), -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        dx = grad.new_empty(ctx.shape)
        for part, g in zip(_neighbours(dx), grad.chunk(8, -1)):
            part.copy_(g)
        return dx


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating plain and shifted windows, then patch merging."""

    # Window layouts cached per stage: a plain and a shifted one for each of a few input sizes.
    LAYOUTS_KEPT = 8

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Sequence[int],
        drop_path: Sequence[float],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(w // 2 for w in window_size)
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                (0, 0, 0) if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path[i],
                fused_attn=fused_attn,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim)
        self._masks: dict[tuple, ShiftMask] = {}
        self._layouts: dict[tuple, WindowLayout] = {}

    def shift_mask(self, grid: Sequence[int], device: torch.device) -> ShiftMask | None:
        """The cached additive mask for shifted windows on this grid (None if nothing shifts),
        compact: a few (n, n) patterns and each window's pattern."""
        ws, ss = _effective_window(grid, self.window_size, self.shift_size)
        if not any(ss):
            return None
        padded = tuple(-(-g // w) * w for g, w in zip(grid, ws))
        key = (padded, ws, ss, str(device))
        if key not in self._masks:
            # A normal tensor even when first built under torch.inference_mode: an inference
            # tensor in the cache would break any later training pass of the same model.
            with torch.inference_mode(False):
                self._masks[key] = _shift_windows(padded, ws, ss, device)
        return self._masks[key]

    def window_layout(self, block: SwinBlock, batch: int, grid: Sequence[int], device: torch.device) -> WindowLayout:
        """The cached :class:`WindowLayout` of ``block`` (one of this stage's) on ``batch`` x ``grid``;
        the layouts of the last few (batch, grid) pairs are kept (they take O(tokens) memory)."""
        ws, ss = _effective_window(grid, self.window_size, block.shift_size)
        key = (batch, tuple(grid), ws, ss, str(device))
        if key not in self._layouts:
            with torch.inference_mode(False):  # as for the masks: no inference tensors in the cache
                self._layouts[key] = block.window_layout(batch, grid, device)
            while len(self._layouts) > self.LAYOUTS_KEPT:
                del self._layouts[next(iter(self._layouts))]
        return self._layouts[key]

    def forward_blocks(self, x: Tensor, use_checkpoint: bool = False) -> Tensor:
        """Run the blocks on (B, D, H, W, C) tokens, without merging."""
        b, grid = x.shape[0], tuple(x.shape[1:4])
        mask = self.shift_mask(grid, x.device)
        for blk in self.blocks:
            x = blk(x, mask, use_checkpoint, self.window_layout(blk, b, grid, x.device))
        return x

    def forward(self, x: Tensor, use_checkpoint: bool = False) -> Tensor:
        return self.downsample(self.forward_blocks(x, use_checkpoint))


class PatchEmbed(nn.Module):
    """Non-overlapping 2x2x2 patches to ``embed_dim`` channels (MONAI's ``PatchEmbed`` names)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 2) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def upsample_cell_mask(mask: Tensor, grid: Sequence[int]) -> Tensor:
    """Repeat a boolean cell mask (B, d, h, w) up to a finer ``grid`` (integer factors only)."""
    if mask.ndim != 4:
        raise ValueError(f"mask must be (B, d, h, w), got shape {tuple(mask.shape)}")
    for axis, (m, g) in enumerate(zip(mask.shape[1:], grid)):
        if g % m:
            raise ValueError(f"mask grid {tuple(mask.shape[1:])} does not divide token grid {tuple(grid)}")
        mask = mask.repeat_interleave(g // m, dim=axis + 1)
    return mask


def pad_to_multiple(
    x: Tensor, multiple: int = SIZE_MULTIPLE, value: float = 0.0
) -> tuple[Tensor, tuple[int, int, int]]:
    """Pad (B, C, D, H, W) at the far end of each axis to a multiple; returns the original size."""
    size = tuple(x.shape[2:])
    pads = [(-s) % multiple for s in size]
    if any(pads):
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), value=value)
    return x, size  # type: ignore[return-value]


class Swin3D(nn.Module):
    """3D Swin transformer encoder (patch 2, four stages) with MONAI-compatible weights.

    Example::

        model = Swin3D.from_preset("tiny")
        feats = model.forward_features(torch.rand(1, 1, 64, 64, 64))  # {16: (1,4,4,4,192), 32: (1,2,2,2,384)}
    """

    def __init__(self, config: Swin3DConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = config if config is not None else Swin3DConfig(**kwargs)
        cfg = self.config
        self.embed_dim = cfg.embed_dim
        self.grad_checkpointing = cfg.grad_checkpointing
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, 1, cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        for i in range(4):
            layer = BasicLayer(
                cfg.embed_dim * 2**i,
                cfg.depths[i],
                cfg.num_heads[i],
                cfg.window_size,
                dpr[sum(cfg.depths[:i]) : sum(cfg.depths[: i + 1])],
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                fused_attn=cfg.fused_attn,
            )
            # One-element ModuleLists, as in MONAI: keys read ``layers1.0.blocks...``.
            self.add_module(f"layers{i + 1}", nn.ModuleList([layer]))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Swin3D:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(Swin3DConfig(**{**PRESETS[name].to_dict(), **overrides}))

    @property
    def stages(self) -> list[BasicLayer]:
        return [getattr(self, f"layers{i}")[0] for i in range(1, 5)]

    def width(self, stride: int) -> int:
        """Channels of the tokens at ``stride`` (2, 4, 8, 16 or 32)."""
        return self.embed_dim * stride // 2

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_fused_attn(self, enable: bool = True) -> None:
        for stage in self.stages:
            for blk in stage.blocks:
                blk.attn.fused_attn = enable

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected input (B, {self.config.in_chans}, D, H, W), got {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % SIZE_MULTIPLE]
        if bad:
            raise ValueError(
                f"every spatial side must be a multiple of {SIZE_MULTIPLE}, got {tuple(x.shape[2:])}; "
                "pad with smartformer.models.swin3d.pad_to_multiple"
            )

    def embed(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Patch embedding (B, D/2, H/2, W/2, C); masked cells get the mask token.

        ``mask`` is boolean (B, d, h, w) on any grid that divides the patch grid (typically the
        stride-16 cell grid); True marks a masked cell.
        """
        # Contiguous channels-last: as a permuted view of the convolution's output, the residual
        # stream of the first stage would stay channels-first in memory, and every layer norm,
        # linear and gather on it would copy it first.
        x = self.patch_embed(x).permute(0, 2, 3, 4, 1).contiguous()
        if mask is not None:
            m = upsample_cell_mask(mask.bool(), x.shape[1:4]).unsqueeze(-1).to(x.dtype)
            x = x * (1 - m) + self.mask_token.to(x.dtype) * m
        return x

    def forward_features(
        self, x: Tensor, mask: Tensor | None = None, strides: Sequence[int] = (16, 32)
    ) -> dict[int, Tensor]:
        """Channels-last token maps (B, d, h, w, C) at the requested strides (see module doc)."""
        self.check_input(x)
        wanted = set(strides)
        if not wanted <= {2, 4, 8, 16, 32}:
            raise ValueError(f"strides must be among 2, 4, 8, 16, 32, got {sorted(wanted)}")
        out: dict[int, Tensor] = {}
        x = self.embed(x, mask)
        stride = 2
        for stage in self.stages:
            x = stage.forward_blocks(x, self.grad_checkpointing)
            if stride in wanted:
                out[stride] = x
            if stride == max(wanted):
                return out
            x = stage.downsample(x)
            stride *= 2
        out[32] = x
        return out

    def forward_stages(self, x: Tensor, mask: Tensor | None = None, normalize: bool = True) -> list[Tensor]:
        """MONAI ``SwinTransformer.forward`` outputs: five channels-first maps, strides 2 to 32."""
        self.check_input(x)
        x = self.embed(x, mask)
        outs = [x]
        for stage in self.stages:
            x = stage(x, self.grad_checkpointing)
            outs.append(x)
        if normalize:
            outs = [F.layer_norm(o, o.shape[-1:]) for o in outs]
        return [o.permute(0, 4, 1, 2, 3).contiguous() for o in outs]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Final (stride 32) features, channels-first (B, 16 * embed_dim, D/32, H/32, W/32)."""
        return self.forward_features(x, mask, strides=(32,))[32].permute(0, 4, 1, 2, 3)
