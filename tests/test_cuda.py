"""CUDA paths (issue 15): run by ``benchmarks/gpu_check.sh`` on a GPU (``pytest -m cuda``); skipped without one.

* the backbone's forward and backward on CUDA against the CPU (same weights, same input);
* window attention through SDPA with a relative-position bias that needs gradients (and the
  shifted-window mask) against the explicit-softmax definition, values and every gradient;
* one SMART training step under bf16 autocast: loss and gradients finite;
* the whole-volume attention maps on CUDA against the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from smartformer.models.attention import window_attention, window_attention_reference
from smartformer.models.swin3d import Swin3D, _shift_mask

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32 (on by default for cuDNN convolutions on Ampere and later): fp32 means fp32 here."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_backbone_forward_backward_cuda_matches_cpu(preset):
    torch.manual_seed(0)
    cpu = Swin3D.from_preset(preset)
    gpu = Swin3D.from_preset(preset).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 1, 64, 64, 64)
    outs = {}
    for name, model, inp in (("cpu", cpu, x), ("cuda", gpu, x.cuda())):
        stages = model.forward_stages(inp)
        loss = sum((s.float() ** 2).mean() for s in stages)
        loss.backward()
        outs[name] = (stages, {k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    for a, b in zip(outs["cuda"][0], outs["cpu"][0]):
        assert _rel(a, b) < 1e-4
    grads_cpu = outs["cpu"][1]
    assert set(outs["cuda"][1]) == set(grads_cpu)
    worst = max(_rel(g, grads_cpu[k]) for k, g in outs["cuda"][1].items())
    assert worst < 1e-3, worst


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_with_a_trainable_bias_matches_the_explicit_softmax(shifted, dtype):
    """window_attention on CUDA is SDPA with attn_mask = bias (+ shift mask), the bias requiring grad:
    PyTorch must route its gradient (memory-efficient kernel or math fallback) -- compared with the
    explicit softmax in float64 on the same inputs."""
    torch.manual_seed(0)
    ws, heads, hd, batch = 4, 3, 16, 2
    n, nw = ws**3, 8
    q, k, v = (torch.randn(batch * nw, heads, n, hd, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    bias = (torch.randn(heads, n, n, device="cuda") * 0.5).requires_grad_()
    mask = _shift_mask((2 * ws,) * 3, (ws,) * 3, (ws // 2,) * 3, torch.device("cuda")) if shifted else None
    out = window_attention(q, k, v, bias, mask, hd**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), grad)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = window_attention_reference(*ref_in[:3], ref_in[3], None if mask is None else mask.double(), hd**-0.5)
    want = torch.autograd.grad(ref, ref_in, grad.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert _rel(out, ref) < tol
    for name, g, w in zip("qkvb", got, want):
        assert torch.isfinite(g).all(), name
        assert _rel(g, w) < tol * 10, name
    assert got[3].dtype == torch.float32  # the bias table's gradient stays in its dtype


def test_bf16_autocast_training_step_is_finite():
    from smartformer.config import load_config
    from smartformer.train.ssl_meta_arch import SMARTMetaArch

    cfg = load_config("tiny", ["data.roi=[64,64,64]", "data.batch_size=2", "masking.warmup_steps=0"])
    torch.manual_seed(0)
    meta = SMARTMetaArch(cfg).cuda().train()
    opt = torch.optim.AdamW(meta.param_groups(), lr=1e-4)
    views = torch.rand(2, 2, 1, 64, 64, 64, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for step in range(2):
        out = meta(views, step=step, teacher_temp=0.04, generator=gen, autocast=autocast)
        assert math.isfinite(out.terms["loss"]), out.terms
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grads = [p.grad for p in meta.student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in meta.student.parameters())
        opt.step()
        meta.after_step(out, 0.996)


def test_attention_volume_on_cuda_matches_cpu():
    import numpy as np
    from monai.data import MetaTensor

    from smartformer.analysis.attention import attention_volume
    from smartformer.models.smartformer import SMARTFormer

    torch.manual_seed(0)
    model = SMARTFormer.from_preset("tiny", heads=False, decoder=False)
    g = torch.Generator().manual_seed(0)
    ct = MetaTensor(
        torch.rand(1, 90, 70, 80, generator=g) * 1000 - 500, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    )
    for mode in ("whole", "sliding"):
        cpu = attention_volume(model, ct, mode=mode, device="cpu").mean
        gpu = attention_volume(model, ct, mode=mode, device="cuda").mean
        np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4)
