"""Fused window attention (models/attention.py) against the explicit-softmax reference."""

from __future__ import annotations

import pytest
import torch

from smartformer.models import attention as A
from smartformer.models.attention import (
    flash_cpu_available,
    window_attention,
    window_attention_qkv,
    window_attention_reference,
)
from smartformer.models.swin3d import Swin3D, WindowAttention, _shift_mask


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is as fast, and immune to a busy second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


needs_flash = pytest.mark.skipif(not flash_cpu_available(), reason="this torch build has no CPU flash-attention op")


def _case(ws: int, heads: int, batch: int, shifted: bool, dtype=torch.float32, seed: int = 0):
    """qkv (as the module produces it), a module with a random bias table, and the shift mask."""
    torch.manual_seed(seed)
    hd = 8
    grid = (2 * ws,) * 3
    n, nw = ws**3, 8
    attn = WindowAttention(heads * hd, heads, (ws,) * 3).to(dtype)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0.0, 0.5)  # larger than the init: a real test
    mask = _shift_mask(grid, (ws,) * 3, (ws // 2,) * 3, torch.device("cpu")).to(dtype) if shifted else None
    qkv = torch.randn(batch * nw, n, 3, heads, hd, dtype=dtype, requires_grad=True)
    return attn, qkv, mask


def _packed(q, k, v, bias, mask, scale):
    """window_attention_qkv on the tensor that q, k, v are views of (as the module calls it)."""
    return window_attention_qkv(q._base if q._base is not None else q, bias, mask, scale)


def _run(fn, attn, qkv, mask, seed: int = 1):
    attn.zero_grad(set_to_none=True)
    qkv.grad = None
    n = qkv.shape[1]
    if fn is _packed:
        out = window_attention_qkv(qkv, attn.relative_position_bias(n), mask, attn.scale)
    else:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = fn(q, k, v, attn.relative_position_bias(n), mask, attn.scale)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * g).sum().backward()
    return out.detach(), qkv.grad.clone(), attn.relative_position_bias_table.grad.clone()


@pytest.fixture(params=[False, True], ids=["grads-in-bias-pass", "flash-backward"])
def flash_backward(request, monkeypatch):
    """Both ways of getting dq, dk, dv (see attention.USE_FLASH_BACKWARD)."""
    monkeypatch.setattr(A, "USE_FLASH_BACKWARD", request.param)
    return request.param


@needs_flash
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
@pytest.mark.parametrize(
    "ws,heads,batch", [(2, 3, 2), (3, 2, 3), (4, 4, 2), (7, 2, 2)], ids=["n8", "n27", "n64", "n343"]
)
@pytest.mark.parametrize("api", ["qkv", "q_k_v"])
def test_matches_explicit_softmax(ws, heads, batch, shifted, flash_backward, api):
    attn, qkv, mask = _case(ws, heads, batch, shifted)
    out, dqkv, dtable = _run(_packed if api == "qkv" else window_attention, attn, qkv, mask)
    ref_out, ref_dqkv, ref_dtable = _run(window_attention_reference, attn, qkv, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dqkv, ref_dqkv, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dtable, ref_dtable, atol=1e-5, rtol=1e-4)
    assert dtable.abs().max() > 1e-2  # the bias gradient is not trivially zero


@needs_flash
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_chunked_paths(monkeypatch, shifted, flash_backward):
    """Small chunks: several row blocks and several steps per block in d(bias)."""
    attn, qkv, mask = _case(4, 3, 3, shifted)
    ref = _run(window_attention_reference, attn, qkv, mask)
    monkeypatch.setattr(A, "CHUNK_ELEMENTS", 3 * 64 * 64 * 3)  # row blocks of a few windows
    monkeypatch.setattr(A, "GROUP_ELEMENTS", 3 * 64 * 64 * 3)  # and per bias-gradient step
    for fn in (window_attention, _packed):
        for a, b in zip(_run(fn, attn, qkv, mask), ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@needs_flash
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_no_grad_matches(shifted):
    attn, qkv, mask = _case(4, 2, 2, shifted)
    q, k, v = qkv.detach().permute(2, 0, 3, 1, 4).unbind(0)
    with torch.no_grad():
        bias = attn.relative_position_bias(64)
        out = window_attention(q, k, v, bias, mask, attn.scale)
        ref = window_attention_reference(q, k, v, bias, mask, attn.scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_flash
def test_only_bias_or_only_qkv_requires_grad():
    attn, qkv, mask = _case(3, 2, 2, True)
    q, k, v = qkv.detach().permute(2, 0, 3, 1, 4).unbind(0)
    (window_attention(q, k, v, attn.relative_position_bias(27), mask, attn.scale) ** 2).sum().backward()
    got = attn.relative_position_bias_table.grad.clone()
    attn.zero_grad(set_to_none=True)
    (window_attention_reference(q, k, v, attn.relative_position_bias(27), mask, attn.scale) ** 2).sum().backward()
    torch.testing.assert_close(got, attn.relative_position_bias_table.grad, atol=1e-5, rtol=1e-4)

    bias = attn.relative_position_bias(27)
    qr = q.clone().requires_grad_()
    (window_attention(qr, k, v, bias.detach(), mask, attn.scale) ** 2).sum().backward()
    qr2 = q.clone().requires_grad_()
    (window_attention_reference(qr2, k, v, bias.detach(), mask, attn.scale) ** 2).sum().backward()
    torch.testing.assert_close(qr.grad, qr2.grad, atol=1e-5, rtol=1e-4)


@needs_flash
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_gradcheck_float64(shifted, flash_backward):
    try:
        A._FLASH_FWD(*(torch.zeros(1, 1, 2, 2, dtype=torch.float64),) * 3)
    except RuntimeError as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"CPU flash kernel has no float64: {exc}")
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 8, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 8, 8, dtype=torch.float64, requires_grad=True)
    mask = None
    if shifted:
        mask = torch.zeros(2, 8, 8, dtype=torch.float64)
        mask[1, :4, 4:] = mask[1, 4:, :4] = -100.0
    assert torch.autograd.gradcheck(lambda q, k, v, b: window_attention(q, k, v, b, mask, 0.5), (q, k, v, bias))


@needs_flash
def test_bfloat16_autocast_close_to_float32(flash_backward):
    attn, qkv, mask = _case(4, 2, 2, True)
    ref = _run(window_attention_reference, attn, qkv, mask)
    for fn in (window_attention, _packed):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, dqkv, dtable = _run(fn, attn, qkv, mask)
        assert out.dtype == torch.bfloat16 and dtable.dtype == torch.float32
        for a, b in zip((out.float(), dqkv, dtable), ref):
            assert ((a - b).norm() / b.norm()).item() < 0.03


def test_fallbacks_match(monkeypatch):
    """Without the flash op (reference math) and the CUDA code path (SDPA, run here on CPU)."""
    attn, qkv, mask = _case(3, 2, 2, True)
    ref = _run(window_attention_reference, attn, qkv, mask)
    for got in (
        _run(lambda *a: A._sdpa(*a), attn, qkv, mask),
        _run(lambda *a: A._sdpa(*a), attn, qkv, None),
    ):
        assert got[0].shape == ref[0].shape
    for got, want in zip(_run(lambda *a: A._sdpa(*a), attn, qkv, mask), ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(A, "_FLASH_FWD", None)
    for fn in (window_attention, _packed):
        for a, b in zip(_run(fn, attn, qkv, mask), ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_swin3d_fused_equals_explicit():
    """Whole tiny backbone, forward + backward: same parameter gradients either way."""
    torch.manual_seed(0)
    model = Swin3D.from_preset("tiny")
    x = torch.randn(2, 1, 32, 64, 32)
    weights = None

    def grads(fused: bool):
        nonlocal weights
        model.set_fused_attn(fused)
        model.zero_grad(set_to_none=True)
        outs = model.forward_stages(x, normalize=False)
        if weights is None:
            g = torch.Generator().manual_seed(1)
            weights = [torch.randn(o.shape, generator=g) for o in outs]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        return [o.detach() for o in outs], {
            k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None
        }

    outs_f, grads_f = grads(True)
    outs_e, grads_e = grads(False)
    for a, b in zip(outs_f, outs_e):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert grads_f.keys() == grads_e.keys() and len(grads_e) > 50
    for name in grads_e:
        torch.testing.assert_close(
            grads_f[name], grads_e[name], atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_explicit_path_runs_a_bfloat16_model():
    """fused_attn=False on a model cast to bf16: the shift mask is added in the model's dtype, as
    in window_attention_reference (it used to promote the weights to fp32, which `@ v` refused)."""
    torch.manual_seed(0)
    model = Swin3D.from_preset("tiny", fused_attn=False).eval()
    x = torch.randn(1, 1, 32, 64, 32)
    with torch.no_grad():
        ref = model.forward_stages(x)
        got = model.to(torch.bfloat16).forward_stages(x.bfloat16())
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        assert ((a.float() - b).norm() / b.norm()).item() < 0.05


def _grads_qkv_bias(fn, q, k, v, bias, mask, scale: float, packed: bool = False):
    """Output and d(q, k, v, bias) of ``fn`` under a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    if packed:  # as the module calls it: q, k, v views of one (B * nW, n, 3, heads, hd) tensor
        qkv = torch.stack(leaves[:3]).permute(1, 3, 0, 2, 4)  # (B*nW, n, 3, heads, hd)
        out = window_attention_qkv(qkv, leaves[3], mask, scale)
    else:
        out = fn(*leaves[:3], leaves[3], mask, scale)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * g).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.fixture(params=["runs", "chunks"])
def pattern_calls(request, monkeypatch):
    """Both ways of calling the flash kernels with a shift mask (see attention.RUN_ELEMENTS),
    the chunks of a few windows each."""
    monkeypatch.setattr(A, "RUN_ELEMENTS", 0 if request.param == "runs" else 2**40)
    monkeypatch.setattr(A, "CHUNK_ELEMENTS", 3 * 2 * 64 * 64)  # 3 windows of 64 tokens, 1 of 343
    return request.param


@needs_flash
@pytest.mark.parametrize(
    "grid,ws,ss",
    [((12, 8, 16), (4, 4, 4), (2, 2, 2)), ((8, 12, 4), (4, 4, 4), (2, 2, 0)), ((14, 21, 7), (7, 7, 7), (3, 3, 3))],
    ids=["3-axes", "2-axes", "n343"],
)
@pytest.mark.parametrize("api", ["qkv", "q_k_v"])
def test_compact_shift_mask_equals_the_full_mask(grid, ws, ss, api, flash_backward, pattern_calls):
    """The model's compact mask (patterns + per-window index) gives the explicit softmax with the
    full (nW, n, n) mask: output and the gradients of q, k, v and the bias; so does a full mask
    passed by a caller, and the explicit paths accept either."""
    from smartformer.models.swin3d import _shift_windows

    compact = _shift_windows(grid, ws, ss, torch.device("cpu"))
    full = _shift_mask(grid, ws, ss, torch.device("cpu"))
    assert torch.equal(compact.dense(), full)
    # One pattern per subset of the shifted axes with a last slab apart from the body (the empty
    # subset: the all-zero pattern); on (14, 21, 7) every window is in the w axis's last slab.
    assert compact.patterns.shape[0] == 2 ** sum(s > 0 and g > w for g, w, s in zip(grid, ws, ss))
    torch.manual_seed(0)
    heads, hd, batch, n, nw = 2, 4, 2, full.shape[1], full.shape[0]
    q, k, v = (torch.randn(batch * nw, heads, n, hd) for _ in range(3))
    bias = torch.randn(heads, n, n)
    scale = 0.7
    ref = _grads_qkv_bias(window_attention_reference, q, k, v, bias, full, scale)
    assert ref[4].abs().max() > 1e-2
    for mask in (compact, full):
        got = _grads_qkv_bias(window_attention, q, k, v, bias, mask, scale, packed=api == "qkv")
        for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    explicit = _grads_qkv_bias(window_attention_reference, q, k, v, bias, compact, scale)
    for a, b in zip(explicit, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(_grads_qkv_bias(A._sdpa, q, k, v, bias, compact, scale), ref):  # the CUDA path
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    weights = A.window_attention_weights(q, k, bias, compact, scale)
    torch.testing.assert_close(weights, A.window_attention_weights(q, k, bias, full, scale), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(window_attention(q, k, v, bias, compact, scale), ref[0], atol=1e-5, rtol=1e-5)


def test_runs_cover_each_window_once_with_its_pattern():
    """The strided runs of the flash calls: every row of every batch element exactly once, in a
    run of its own pattern; the all-zero windows of a raster row share one run."""
    from smartformer.models.swin3d import _shift_windows

    mask = _shift_windows((12, 8, 16), (4, 4, 4), (2, 2, 2), torch.device("cpu"))
    nw, batch = mask.num_windows, 3
    zero = [bool((p == 0).all()) for p in mask.patterns]
    seen = []
    for pattern, runs in mask.runs(batch):
        for r in runs:
            rows = list(range(nw * batch))[r]
            seen += rows
            for row in rows:
                p = int(mask.index[row % nw])
                assert (pattern < 0 and zero[p]) or pattern == p
    assert sorted(seen) == list(range(nw * batch))
    zero_runs = dict(mask.runs(batch))[-1]
    assert len(zero_runs) == batch * 2 * 1 and all(r.step == 1 and r.stop - r.start == 3 for r in zero_runs)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_stage_on_a_padded_grid_matches_the_full_mask(fused, pattern_calls):
    """A stage whose grid needs padding on every axis (10 x 7 x 13 tokens, windows of 4): its
    cached compact mask gives the same output and gradients as the explicit path fed the full mask."""
    from smartformer.models.swin3d import BasicLayer

    torch.manual_seed(0)
    layer = BasicLayer(16, 2, 2, (4, 4, 4), [0.0, 0.0], fused_attn=fused)
    with torch.no_grad():
        for blk in layer.blocks:
            blk.attn.relative_position_bias_table.normal_(0.0, 0.5)
    x = torch.randn(2, 10, 7, 13, 16)
    g = torch.randn(2, 10, 7, 13, 16, generator=torch.Generator().manual_seed(1))

    def run(mask_of):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = xi
        for blk in layer.blocks:
            y = blk(y, mask_of())
        (y * g).sum().backward()
        return [y.detach(), xi.grad] + [p.grad for p in layer.blocks.parameters()]

    got = run(lambda: layer.shift_mask((10, 7, 13), x.device))
    full = _shift_mask((12, 8, 16), (4, 4, 4), (2, 2, 2), torch.device("cpu"))
    layer.blocks.apply(lambda m: setattr(m, "fused_attn", False) if isinstance(m, WindowAttention) else None)
    ref = run(lambda: full)
    assert len(got) == len(ref) > 10
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_cached_shift_mask_is_compact_on_a_whole_ct_grid():
    """Stage 1 of the base preset on a whole CT (128 x 96 x 80 tokens, 3192 windows of 343):
    the cached mask holds 8 patterns and an index, not the 1.5 GB (nW, n, n) tensor."""
    model = Swin3D.from_preset("base")
    mask = model.stages[0].shift_mask((128, 96, 80), torch.device("cpu"))
    n = 343
    assert mask.num_windows == 19 * 14 * 12 and tuple(mask.patterns.shape) == (8, n, n)
    held = sum(t.numel() * t.element_size() for t in vars(mask).values() if isinstance(t, torch.Tensor))
    assert held <= 8 * n * n * 4 + 8 * mask.num_windows  # 3.8 MB
    assert sum(mask.masked) == 19 * 14 * 12 - 18 * 13 * 11  # the last slab of each axis
    assert model.stages[0].shift_mask((128, 96, 80), torch.device("cpu")) is mask  # cached
