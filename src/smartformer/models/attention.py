"""Window attention with a trainable relative-position bias, fast on CPU in training.

:func:`window_attention` computes ``softmax(scale * q @ k^T + bias + mask) @ v`` for the windows
of a Swin block, where ``bias`` (heads, n, n) is the (trainable) relative-position bias and
``mask`` (nW, n, n) the constant additive mask of shifted windows.

Why a custom autograd function: PyTorch's CPU flash kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``) only runs when ``attn_mask`` does not
require grad; with a trainable bias :func:`~torch.nn.functional.scaled_dot_product_attention`
falls back to the unfused math path, which is no faster than an explicit softmax. Here:

* the forward runs the flash kernel on a detached bias + mask and saves only the output and
  the row log-sum-exp ``lse`` (no (windows, heads, n, n) tensor is kept, and none is ever
  materialised: the combined bias + shift mask is built for chunks of windows and shared by
  the batch elements);
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

# Elements of one chunk of the combined bias + shift mask handed to the flash kernels
# (windows x heads x n x n; 2**21 floats = 8 MiB), and 8x the elements of one chunk of the
# (head_dim + 1)-column operands of the bias-gradient pass.
CHUNK_ELEMENTS = 2**21
# Attention entries (windows x heads x n x n) per step of the bias-gradient pass.
GROUP_ELEMENTS = 2**19


def flash_cpu_available() -> bool:
    """Whether this torch build has the CPU flash-attention kernels used here."""
    return _FLASH_FWD is not None and _FLASH_BWD is not None


def window_attention_weights(q: Tensor, k: Tensor, bias: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """The explicit attention weights ``softmax(scale * q @ k^T + bias + mask)``, (B * nW, heads, n, n).

    Shapes as in :func:`window_attention`; bias and mask are added in ``q``'s dtype.
    """
    bw, h, n, _ = q.shape
    attn = (q * scale) @ k.transpose(-2, -1) + bias.to(q.dtype).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(bw // nw, nw, h, n, n) + mask.to(q.dtype).unsqueeze(1).unsqueeze(0)).view(bw, h, n, n)
    return attn.softmax(-1)


def window_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """Explicit softmax attention, the definition that :func:`window_attention` computes."""
    return window_attention_weights(q, k, bias, mask, scale) @ v


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(bw: int, n: int, h: int, bias: Tensor, mask: Tensor | None, whole: bool = False):
    """Yield (r0, r1, m): rows r0:r1 of the (B*nW) windows and their 4-D additive mask.

    ``m`` is ``bias`` (1, heads, n, n) without a shift mask, else ``bias + mask`` for the
    windows of the block (chunk, heads, n, n), built once per chunk of windows and shared by
    the batch elements. Blocks hold at most ``CHUNK_ELEMENTS // (heads * n * n)`` windows
    (with a shift mask, or unless ``whole``).
    """
    step = max(1, CHUNK_ELEMENTS // (h * n * n))
    if mask is None and whole:
        yield 0, bw, bias.unsqueeze(0)
        return
    if mask is None:
        m = bias.unsqueeze(0)
        for r0 in range(0, bw, step):
            yield r0, min(bw, r0 + step), m
        return
    nw = mask.shape[0]
    for w0 in range(0, nw, step):
        w1 = min(nw, w0 + step)
        m = torch.add(bias.unsqueeze(0), mask[w0:w1].unsqueeze(1))
        for r in range(0, bw, nw):
            yield r + w0, r + w1, m


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, scale: float):
    """Flash CPU forward on windows; returns (out, lse) with out (B*nW, heads, n, hd)."""
    bw, h, n, hd = q.shape
    if mask is None:
        return _FLASH_FWD(q, k, v, attn_mask=bias.unsqueeze(0), scale=scale)
    blocks = list(_row_blocks(bw, n, h, bias, mask))
    if len(blocks) == 1:
        return _FLASH_FWD(q, k, v, attn_mask=blocks[0][2], scale=scale)
    # (B*nW, n, heads, hd) storage: the kernel's own output layout, which the output
    # projection reads without a copy.
    out = q.new_empty(bw, n, h, hd).transpose(1, 2)
    lse = None
    for r0, r1, m in blocks:
        o, block_lse = _FLASH_FWD(q[r0:r1], k[r0:r1], v[r0:r1], attn_mask=m, scale=scale)
        if lse is None:
            lse = block_lse.new_empty(bw, n, h).transpose(1, 2)
        out[r0:r1].copy_(o)
        lse[r0:r1].copy_(block_lse)
    return out, lse


def _unpack(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B*nW, n, 3, heads, hd) -> q, k, v views (B*nW, heads, n, hd)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


class _FlashWindowAttention(torch.autograd.Function):
    """Inputs either q, k, v or (packed) qkv, None, None; see :func:`window_attention_qkv`."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor | None, v: Tensor | None, bias: Tensor, mask: Tensor | None, scale: float):
        packed = k is None
        with torch.autocast("cpu", enabled=False):
            bias_d = bias.detach().to(_acc_dtype(q.dtype))
            out, lse = _flash_forward(*(_unpack(q) if packed else (q, k, v)), bias_d, mask, scale)
        ctx.save_for_backward(*((q,) if packed else (q, k, v)), bias_d, mask, out, lse)
        ctx.packed = packed
        ctx.scale = scale
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        if ctx.packed:
            qkv, bias, mask, out, lse = ctx.saved_tensors
            q, k, v = _unpack(qkv)
            need_qkv = ctx.needs_input_grad[0]
        else:
            q, k, v, bias, mask, out, lse = ctx.saved_tensors
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
            dbias = _flash_backward(dout, q, k, v, bias, mask, out, lse, ctx.scale, grads, need_bias)
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
        for r0, r1, m in _row_blocks(bw, n, h, bias, mask, whole=True):
            rows = slice(r0, r1)
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
    nw = bw if mask is None else mask.shape[0]  # groups do not cross batch elements
    g = max(1, min(nw, GROUP_ELEMENTS // (h * n * n)))
    # Windows whose shift mask is not all zero (the others need no clamp).
    masked = None if mask is None else (mask != 0).flatten(1).any(1)
    bias2 = (bias * _LOG2E).unsqueeze(0)
    mask2 = None if mask is None else (mask * _LOG2E).unsqueeze(1)
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
            if mask2 is None:
                p.copy_(bias2.expand(m, h, n, n))
            else:
                torch.add(bias2, mask2[w0 : w0 + m], out=p)
            p3 = p.view(m * h, n, n)
            p3.baddbmm_(qa[i * h : j * h], kt[i * h : j * h])
            if masked is not None and bool(masked[w0 : w0 + m].any()):
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
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Attention within windows with an additive relative-position bias and shifted-window mask.

    Args:
        q, k, v: (B * nW, heads, n, head_dim), windows of one batch element contiguous
            (batch-major, as produced by window partitioning).
        bias: (heads, n, n) relative-position bias; may require grad.
        mask: (nW, n, n) additive shifted-window mask (a constant), or None.
        scale: softmax scale, ``head_dim ** -0.5`` by default.

    Returns:
        (B * nW, heads, n, head_dim), equal to :func:`window_attention_reference`.
    """
    return _window_attention(q, k, v, bias, mask, scale)


def window_attention_qkv(qkv: Tensor, bias: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
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
    if mask is not None:
        mask = mask.detach()
        if bw % mask.shape[0]:
            raise ValueError(f"{bw} windows are not a multiple of the mask's {mask.shape[0]} windows")
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


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA with the bias as attn_mask (its gradient flows through SDPA; fine on CUDA)."""
    bias = bias.to(q.dtype)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=scale)
    nw = mask.shape[0]
    full = bias.unsqueeze(0) + mask.unsqueeze(1).to(q.dtype)  # (nW, heads, n, n)
    # One call per batch element: 4-D inputs (which the fused kernels need) without a
    # (B * nW, heads, n, n) copy of the mask.
    outs = [
        F.scaled_dot_product_attention(q[r : r + nw], k[r : r + nw], v[r : r + nw], attn_mask=full, scale=scale)
        for r in range(0, q.shape[0], nw)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs)
