"""Window attention with a trainable relative-position bias, fast on CPU in training.

:func:`window_attention` computes ``softmax(scale * q @ k^T + bias + mask) @ v`` for the windows
of a Swin block, where ``bias`` (heads, n, n) is the (trainable) relative-position bias and
``mask`` the constant additive mask of shifted windows: a :class:`ShiftMask` (its distinct
(n, n) patterns and each window's pattern; a shifted Swin block has at most 8 patterns, and most
windows, those off the last slab of every shifted axis, have the all-zero one) or a full
(nW, n, n) tensor.

Why a custom autograd function: PyTorch's CPU flash kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``) only runs when ``attn_mask`` does not
require grad; with a trainable bias :func:`~torch.nn.functional.scaled_dot_product_attention`
falls back to the unfused math path, which is no faster than an explicit softmax. Here:

* the forward runs the flash kernel on a detached bias + mask and saves only the output and
  the row log-sum-exp ``lse`` (no (windows, heads, n, n) tensor is kept, and none is ever
  materialised): the windows of one mask pattern are taken as a few strided runs
  (:meth:`ShiftMask.runs`, views, no copies), each one kernel call with a (1, heads, n, n)
  attention mask: the bias alone for the all-zero pattern, bias + pattern (built once per
  pattern) for the others; where runs are short (small windows), chunks of consecutive windows
  with the combined bias + shift mask built per chunk and shared by the batch elements;
* the backward recomputes, a few windows at a time (:func:`_bias_grad`),
  ``P = exp(scale * q @ k^T + bias + mask - lse)`` and ``dS = P * (dO @ V^T - rowsum(dO * O))``,
  accumulates ``d(bias) = sum over windows of dS`` and, from the same P and dS,
  ``dV = P^T dO``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``. With
  ``USE_FLASH_BACKWARD = True`` dq, dk, dv come from the flash backward kernel instead (slower
  here, as that kernel recomputes P and dS itself); it is always used when the bias needs no
  gradient.

On CUDA (and wherever the CPU flash op is unavailable) plain SDPA is used: CUDA's
memory-efficient kernel supports gradients of ``attn_mask``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ShiftMask",
    "window_attention",
    "window_attention_qkv",
    "window_attention_reference",
    "window_attention_weights",
    "flash_cpu_available",
]

try:
    _FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    _FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
except (AttributeError, RuntimeError):  # pragma: no cover - older / stripped builds
    _FLASH_FWD = _FLASH_BWD = None

_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Elements of one chunk of the combined bias + shift mask handed to the flash kernels where the
# mask's runs are short (windows x heads x n x n; 2**21 floats = 8 MiB), and 8x the elements of
# one chunk of the (head_dim + 1)-column operands of the bias-gradient pass.
CHUNK_ELEMENTS = 2**21
# Attention entries (windows x heads x n x n) per step of the bias-gradient pass.
GROUP_ELEMENTS = 2**19
# Mean attention entries (windows x heads x n x n) per strided run below which the flash calls
# take chunks of consecutive windows with the bias + mask materialised instead: runs of small
# windows (7 windows of 64 tokens in the tiny preset) make many short calls, each a thread
# barrier, slower than a few chunks when the cores are shared; the runs of a whole CT (11
# windows of 343 tokens) are 4 M entries.
RUN_ELEMENTS = 2**20


def flash_cpu_available() -> bool:
    """Whether this torch build has the CPU flash-attention kernels used here."""
    return _FLASH_FWD is not None and _FLASH_BWD is not None


class ShiftMask:
    """Compact additive mask of shifted windows: distinct patterns and each window's pattern.

    ``patterns`` (P, n, n) holds the distinct masks, ``index`` (nW,) the pattern of each window
    of one batch element; the full mask is ``patterns[index]`` (:meth:`dense`), never built
    here. Its memory is O(P n^2), where the full mask is O(nW n^2) (1.5 GB on a whole CT).
    """

    def __init__(self, patterns: Tensor, index: Tensor) -> None:
        if patterns.ndim != 3 or index.ndim != 1:
            raise ValueError(
                f"patterns must be (P, n, n) and index (nW,), got {tuple(patterns.shape)}, {tuple(index.shape)}"
            )
        self.patterns = patterns
        self.index = index
        nonzero = torch.count_nonzero(patterns.flatten(1), 1).tolist()
        # Per window: its pattern, or -1 where that pattern is all zero (the bias alone).
        self._keys = [p if nonzero[p] else -1 for p in index.tolist()]
        self._runs: dict[int, list[tuple[int, list[slice]]]] = {}

    @classmethod
    def from_dense(cls, mask: Tensor) -> ShiftMask:
        """The full (nW, n, n) mask as a ShiftMask of nW patterns (views of ``mask``, no copy)."""
        return cls(mask, torch.arange(mask.shape[0], device=mask.device))

    @property
    def num_windows(self) -> int:
        """Windows of one batch element."""
        return self.index.shape[0]

    @property
    def masked(self) -> list[bool]:
        """Per window of one batch element: whether its pattern is not all zero."""
        return [k >= 0 for k in self._keys]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ShiftMask:
        """The same mask with patterns in ``dtype`` and both tensors on ``device`` (self if nothing changes).

        The per-window keys are kept, not recomputed, so a mask built on the CPU moves to a device
        whose tensors cannot be read back (``meta``) or only with a synchronisation (CUDA).
        """
        patterns = self.patterns.to(dtype=dtype, device=device)
        if patterns is self.patterns:
            return self
        out = ShiftMask.__new__(ShiftMask)
        out.patterns, out.index = patterns, self.index.to(device=device)
        out._keys, out._runs = self._keys, self._runs
        return out

    def detach(self) -> ShiftMask:
        """The same mask, its patterns out of any autograd graph (the mask is a constant)."""
        return self if not self.patterns.requires_grad else ShiftMask(self.patterns.detach(), self.index)

    def dense(self) -> Tensor:
        """The full (nW, n, n) mask."""
        return self.patterns[self.index]

    def runs(self, batch: int) -> list[tuple[int, list[slice]]]:
        """(pattern, slices) per pattern, -1 for the all-zero one, over ``batch`` elements.

        The (B * nW) rows of each pattern, split greedily into arithmetic progressions, as
        ``slice(start, stop, step)``: the interior windows of a (d, h, w) raster are runs of a
        row of windows, the windows of a last slab progressions of stride a row or a plane,
        so a pattern takes a handful of kernel calls on views, with no gather.
        """
        if batch not in self._runs:
            nw = self.num_windows
            rows: dict[int, list[int]] = {}
            for b in range(batch):
                for w, key in enumerate(self._keys):
                    rows.setdefault(key, []).append(b * nw + w)
            self._runs[batch] = [(key, _progressions(r)) for key, r in sorted(rows.items())]
        return self._runs[batch]


def _progressions(rows: list[int]) -> list[slice]:
    """Sorted distinct ``rows`` as maximal (greedy) arithmetic progressions."""
    out, i = [], 0
    while i < len(rows):
        j = i + 1
        if j < len(rows):
            step = rows[j] - rows[i]
            while j + 1 < len(rows) and rows[j + 1] - rows[j] == step:
                j += 1
            j += 1
        else:
            step = 1
        out.append(slice(rows[i], rows[j - 1] + 1, step))
        i = j
    return out


MaskLike = ShiftMask | Tensor | None


def as_shift_mask(mask: MaskLike) -> ShiftMask | None:
    """``mask`` as a detached :class:`ShiftMask` (a full (nW, n, n) tensor is wrapped, not copied)."""
    if mask is None or isinstance(mask, ShiftMask):
        return None if mask is None else mask.detach()
    return ShiftMask.from_dense(mask.detach())


def window_attention_weights(q: Tensor, k: Tensor, bias: Tensor, mask: MaskLike, scale: float) -> Tensor:
    """The explicit attention weights ``softmax(scale * q @ k^T + bias + mask)``, (B * nW, heads, n, n).

    Shapes as in :func:`window_attention`; bias and mask are added in ``q``'s dtype, the mask
    only to the windows whose pattern is not all zero.
    """
    bw, h, n, _ = q.shape
    attn = (q * scale) @ k.transpose(-2, -1) + bias.to(q.dtype).unsqueeze(0)
    mask = as_shift_mask(mask)
    if mask is not None:
        nw = mask.num_windows
        sel = torch.tensor([w for w, m in enumerate(mask.masked) if m], dtype=torch.long, device=q.device)
        add = mask.patterns[mask.index[sel]].to(q.dtype)  # (masked windows, n, n)
        attn = attn.view(bw // nw, nw, h, n, n).index_add(1, sel, add[None, :, None].expand(bw // nw, -1, h, -1, -1))
        attn = attn.view(bw, h, n, n)
    return attn.softmax(-1)


def window_attention_reference(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: MaskLike, scale: float) -> Tensor:
    """Explicit softmax attention, the definition that :func:`window_attention` computes."""
    return window_attention_weights(q, k, bias, mask, scale) @ v


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(bw: int, bias: Tensor, mask: ShiftMask | None):
    """Yield (rows, m): a slice (possibly strided) of the B*nW windows and their 4-D additive mask.

    Without a shift mask: all windows, ``m = bias`` (1, heads, n, n). With one, per pattern its
    strided runs (:meth:`ShiftMask.runs`), ``m`` (1, heads, n, n) the bias alone for the
    all-zero pattern, else bias + pattern, built once per pattern; or, where the runs are short
    (under ``RUN_ELEMENTS`` attention entries on average), chunks of consecutive windows with
    ``m`` = bias + their masks (chunk, heads, n, n), built once per chunk and shared by the
    batch elements.
    """
    b = bias.unsqueeze(0)
    if mask is None:
        yield slice(0, bw), b
        return
    runs = mask.runs(bw // mask.num_windows)
    if bw * b.numel() >= RUN_ELEMENTS * sum(len(r) for _, r in runs):
        for pattern, slices in runs:
            m = b if pattern < 0 else torch.add(b, mask.patterns[pattern])
            yield from ((r, m) for r in slices)
        return
    nw = mask.num_windows
    step = max(1, CHUNK_ELEMENTS // b.numel())
    for w0 in range(0, nw, step):
        w1 = min(nw, w0 + step)
        m = torch.add(b, mask.patterns[mask.index[w0:w1]].unsqueeze(1))
        for r in range(0, bw, nw):
            yield slice(r + w0, r + w1), m


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: ShiftMask | None, scale: float):
    """Flash CPU forward on windows; returns (out, lse) with out (B*nW, heads, n, hd)."""
    bw, h, n, hd = q.shape
    if mask is None:
        return _FLASH_FWD(q, k, v, attn_mask=bias.unsqueeze(0), scale=scale)
    # (B*nW, n, heads, hd) storage: the kernel's own output layout, which the output
    # projection reads without a copy.
    out = q.new_empty(bw, n, h, hd).transpose(1, 2)
    lse = None
    for rows, m in _row_blocks(bw, bias, mask):
        o, block_lse = _FLASH_FWD(q[rows], k[rows], v[rows], attn_mask=m, scale=scale)
        if lse is None:
            lse = block_lse.new_empty(bw, n, h).transpose(1, 2)
        out[rows].copy_(o)
        lse[rows].copy_(block_lse)
    return out, lse


def _unpack(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B*nW, n, 3, heads, hd) -> q, k, v views (B*nW, heads, n, hd)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


class _FlashWindowAttention(torch.autograd.Function):
    """Inputs either q, k, v or (packed) qkv, None, None; see :func:`window_attention_qkv`."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor | None, v: Tensor | None, bias: Tensor, mask: ShiftMask | None, scale: float):
        packed = k is None
        with torch.autocast("cpu", enabled=False):
            bias_d = bias.detach().to(_acc_dtype(q.dtype))
            out, lse = _flash_forward(*(_unpack(q) if packed else (q, k, v)), bias_d, mask, scale)
        ctx.save_for_backward(*((q,) if packed else (q, k, v)), bias_d, out, lse)
        ctx.mask = mask
        ctx.packed = packed
        ctx.scale = scale
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        if ctx.packed:
            qkv, bias, out, lse = ctx.saved_tensors
            q, k, v = _unpack(qkv)
            need_qkv = ctx.needs_input_grad[0]
        else:
            q, k, v, bias, out, lse = ctx.saved_tensors
            need_qkv = any(ctx.needs_input_grad[:3])
        need_bias = ctx.needs_input_grad[3]
        grads = None
        if need_qkv:
            manual = need_bias and not USE_FLASH_BACKWARD
            dtype = bias.dtype if manual else q.dtype  # the GEMMs of the bias pass write in fp32
            bw, h, n, hd = q.shape
            if ctx.packed:
                dqkv = torch.empty(bw, n, 3, h, hd, dtype=dtype, device=q.device)
                grads = _unpack(dqkv)
            else:
                grads = tuple(torch.empty(bw, h, n, hd, dtype=dtype, device=q.device) for _ in range(3))
        with torch.autocast("cpu", enabled=False):
            dbias = _flash_backward(dout, q, k, v, bias, ctx.mask, out, lse, ctx.scale, grads, need_bias)
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        if grads is None:
            return None, None, None, dbias, None, None
        if ctx.packed:
            return dqkv.to(q.dtype), None, None, dbias, None, None
        return *(g.to(q.dtype) for g in grads), dbias, None, None


_LOG2E = 1.4426950408889634
# P is computed as exp2(log2(e) * logits): exp2 is about twice as fast as exp on CPU. Logits
# below this floor would give denormal P (for which exp2/exp are ~40x slower); clamping there
# changes P by less than 2e-38, far below the resolution of P.
_EXP2_FLOOR = {torch.float32: -126.0, torch.float64: -1022.0}


# How dq, dk, dv are computed when the bias needs a gradient: False (default) in the
# bias-gradient pass, which has P and dS at hand anyway (three more batched GEMMs per group of
# windows); True from the flash backward kernel (which recomputes P and dS itself). Measured on
# a 2-core AMD EPYC (base preset, 64^3): the first is ~15% faster for the whole backbone.
USE_FLASH_BACKWARD = False


def _flash_backward(dout, q, k, v, bias, mask, out, lse, scale, grads, need_bias):
    """Fills ``grads`` (dq, dk, dv: (B*nW, heads, n, hd) views, or None) and returns d(bias)."""
    bw, h, n, hd = q.shape
    if grads is not None and not (need_bias and not USE_FLASH_BACKWARD):
        for rows, m in _row_blocks(bw, bias, mask):
            g = _FLASH_BWD(
                dout[rows], q[rows], k[rows], v[rows], out[rows], lse[rows], 0.0, False, attn_mask=m, scale=scale
            )
            for dst, src in zip(grads, g):
                dst[rows].copy_(src)
        grads = None
    if need_bias:
        return _bias_grad(dout, q, k, v, out, lse, bias, mask, scale, grads)
    return None


def _bias_grad(dout, q, k, v, out, lse, bias, mask, scale, grads=None) -> Tensor:
    """sum over windows of dS = P * (dO V^T - rowsum(dO * O)), a few windows at a time.

    Both n x n factors come out of a single GEMM each, with the row terms folded into the
    operands (head_dim + 1 columns)::

        log2(e) * (scale q k^T - lse) = [log2(e) scale q, -log2(e) lse] @ [k, 1]^T
        dO V^T - rowsum(dO * O)       = [dO, -rowsum(dO * O)]           @ [V, 1]^T

    so per group of windows: the bias (+ shift mask) written into the work buffer, one
    in-place ``baddbmm_``, ``exp2_``, one ``bmm`` and the product accumulated into d(bias).
    Groups hold ``GROUP_ELEMENTS`` attention entries (one window when n = 343), so that the
    two work buffers stay in cache.
    """
    bw, h, n, hd = q.shape
    acc = bias.dtype
    dev = q.device
    floor = _EXP2_FLOOR[acc]
    nw = bw if mask is None else mask.num_windows  # groups do not cross batch elements
    g = max(1, min(nw, GROUP_ELEMENTS // (h * n * n)))
    # Windows whose shift mask is not all zero (the others need neither the mask nor a clamp).
    masked = None if mask is None else mask.masked
    bias2 = (bias * _LOG2E).unsqueeze(0)
    patterns2 = None if mask is None else mask.patterns * _LOG2E
    dbias = torch.zeros(h, n, n, dtype=acc, device=dev)
    pbuf = torch.empty(g, h, n, n, dtype=acc, device=dev)
    dsbuf = torch.empty_like(pbuf)
    rows = max(g, (CHUNK_ELEMENTS // (8 * h * n * (hd + 1))) // g * g)
    for r0 in range(0, bw, rows):
        r1 = min(bw, r0 + rows)
        c = r1 - r0
        qa = torch.empty(c, h, n, hd + 1, dtype=acc, device=dev)
        torch.mul(q[r0:r1].to(acc), scale * _LOG2E, out=qa[..., :hd])
        torch.mul(lse[r0:r1], -_LOG2E, out=qa[..., hd])
        ka = torch.ones(c, h, n, hd + 1, dtype=acc, device=dev)
        ka[..., :hd] = k[r0:r1]
        da = torch.empty(c, h, n, hd + 1, dtype=acc, device=dev)
        da[..., :hd] = dout[r0:r1]
        torch.sum(dout[r0:r1].to(acc) * out[r0:r1].to(acc), -1, out=da[..., hd])
        da[..., hd].neg_()
        va = torch.ones(c, h, n, hd + 1, dtype=acc, device=dev)
        va[..., :hd] = v[r0:r1]
        kt, vt = ka.transpose(-1, -2).flatten(0, 1), va.transpose(-1, -2).flatten(0, 1)
        qa, da = qa.flatten(0, 1), da.flatten(0, 1)
        i = 0
        while i < c:
            w0 = (r0 + i) % nw
            j = min(c, i + g, i + nw - w0)  # stop at the end of a batch element
            m = j - i
            p, ds = pbuf[:m], dsbuf[:m]
            with_mask = masked is not None and any(masked[w0 : w0 + m])
            if with_mask:
                torch.add(bias2, patterns2[mask.index[w0 : w0 + m]].unsqueeze(1), out=p)
            else:
                p.copy_(bias2.expand(m, h, n, n))
            p3 = p.view(m * h, n, n)
            p3.baddbmm_(qa[i * h : j * h], kt[i * h : j * h])
            if with_mask:
                p3.clamp_min_(floor)
            p3.exp2_()
            torch.bmm(da[i * h : j * h], vt[i * h : j * h], out=ds.view(m * h, n, n))
            if grads is not None:
                ds.mul_(p)  # dS
                dbias.add_(ds.sum(0) if m > 1 else ds[0])
                ds3, sl = ds.view(m * h, n, n), slice(i * h, j * h)
                products = (
                    (ds3, kt[sl, :hd, :].transpose(1, 2), scale),  # dq = scale dS K
                    (ds3.transpose(1, 2), qa[sl, :, :hd], 1 / _LOG2E),  # dk = scale dS^T Q
                    (p3.transpose(1, 2), da[sl, :, :hd], None),  # dv = P^T dO
                )
                for dst, (a, b, f) in zip(grads, products):
                    dst = dst[r0 + i : r0 + j]
                    if m == 1:  # (heads, n, hd) with BLAS-compatible strides: written in place
                        res = torch.bmm(a, b, out=dst[0])
                    else:
                        res = torch.bmm(a, b).view(m, h, n, hd)
                    if f is not None:
                        res.mul_(f)
                    if m > 1:
                        dst.copy_(res)
            elif m == 1:
                dbias.addcmul_(p[0], ds[0])
            else:
                dbias.add_(ds.mul_(p).sum(0))
            i = j
    return dbias


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: MaskLike = None, scale: float | None = None
) -> Tensor:
    """Attention within windows with an additive relative-position bias and shifted-window mask.

    Args:
        q, k, v: (B * nW, heads, n, head_dim), windows of one batch element contiguous
            (batch-major, as produced by window partitioning).
        bias: (heads, n, n) relative-position bias; may require grad.
        mask: additive shifted-window mask (a constant) of the nW windows of one batch element:
            a :class:`ShiftMask`, a full (nW, n, n) tensor, or None.
        scale: softmax scale, ``head_dim ** -0.5`` by default.

    Returns:
        (B * nW, heads, n, head_dim), equal to :func:`window_attention_reference`.
    """
    return _window_attention(q, k, v, bias, mask, scale)


def window_attention_qkv(qkv: Tensor, bias: Tensor, mask: MaskLike = None, scale: float | None = None) -> Tensor:
    """:func:`window_attention` on the packed output of a qkv projection.

    ``qkv`` is (B * nW, n, 3, heads, head_dim) (the ``qkv`` linear's output viewed); its
    gradient is written directly in that layout, sparing the stack and copy that autograd
    would otherwise need to bring separate dq, dk, dv back into it.
    """
    return _window_attention(qkv, None, None, bias, mask, scale)


def _window_attention(q, k, v, bias, mask, scale) -> Tensor:
    packed = k is None
    q_ = _unpack(q)[0] if packed else q
    if scale is None:
        scale = q_.shape[-1] ** -0.5
    bw = q_.shape[0]
    mask = as_shift_mask(mask)
    if mask is not None and bw % mask.num_windows:
        raise ValueError(f"{bw} windows are not a multiple of the mask's {mask.num_windows} windows")
    dev = q.device.type
    if dev == "cuda" or not flash_cpu_available() or dev != "cpu" or q.dtype not in _FLASH_DTYPES:
        if packed:
            q, k, v = _unpack(q)
        if dev == "cuda":
            return _sdpa(q, k, v, bias, mask, scale)
        return window_attention_reference(q, k, v, bias, mask, scale)
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        q = q.to(dtype)
    if not packed:
        k, v = k.to(q.dtype), v.to(q.dtype)
    acc = _acc_dtype(q.dtype)
    if mask is not None:
        mask = mask.to(acc)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        return _FlashWindowAttention.apply(q, k, v, bias, mask, scale)
    with torch.autocast("cpu", enabled=False):
        return _flash_forward(*(_unpack(q) if packed else (q, k, v)), bias.detach().to(acc), mask, scale)[0]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: MaskLike, scale: float) -> Tensor:
    """SDPA with the bias as attn_mask (its gradient flows through SDPA; fine on CUDA)."""
    bias = bias.to(q.dtype)
    mask = as_shift_mask(mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=scale)
    nw = mask.num_windows
    # (nW, heads, n, n), gathered from the (P, heads, n, n) sums: no (nW, n, n) mask is built
    # (no gather where the patterns are a full mask's windows).
    full = bias.unsqueeze(0) + mask.patterns.unsqueeze(1).to(q.dtype)
    if full.shape[0] != nw or not torch.equal(mask.index, torch.arange(nw, device=mask.index.device)):
        full = full[mask.index]
    # One call per batch element: 4-D inputs (which the fused kernels need) without a
    # (B * nW, heads, n, n) copy of the mask.
    outs = [
        F.scaled_dot_product_attention(q[r : r + nw], k[r : r + nw], v[r : r + nw], attn_mask=full, scale=scale)
        for r in range(0, q.shape[0], nw)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs)
