"""Swin3D against MONAI's SwinTransformer (the oracle), mask token, checkpointing, input checks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.swin_unetr import SwinTransformer

from smartformer.models.swin3d import PRESETS, Swin3D, pad_to_multiple


def monai_twin(preset: str) -> SwinTransformer:
    cfg = PRESETS[preset]
    return SwinTransformer(
        in_chans=1,
        embed_dim=cfg.embed_dim,
        window_size=cfg.window_size,
        patch_size=(2, 2, 2),
        depths=cfg.depths,
        num_heads=cfg.num_heads,
    )


@pytest.mark.parametrize(
    "preset,size",
    [("tiny", (64, 64, 64)), ("smit", (64, 64, 64)), ("base", (64, 64, 64)), ("tiny", (32, 64, 96))],
)
@pytest.mark.parametrize("fused", [True, False])
def test_monai_weights_give_monai_outputs(preset: str, size: tuple[int, int, int], fused: bool) -> None:
    torch.manual_seed(0)
    monai = monai_twin(preset).eval()
    ours = Swin3D.from_preset(preset, fused_attn=fused).eval()
    missing, unexpected = ours.load_state_dict(monai.state_dict(), strict=False)
    assert missing == ["mask_token"] and unexpected == []
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        expected = monai(x)
        got = ours.forward_stages(x)
    assert len(got) == 5
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert (e - g).abs().max().item() <= 1e-4


def test_monai_equivalence_holds_in_training_mode_with_gradients() -> None:
    torch.manual_seed(1)
    monai = monai_twin("tiny")
    ours = Swin3D.from_preset("tiny")
    ours.load_state_dict(monai.state_dict(), strict=False)
    x = torch.randn(1, 1, 32, 32, 64)
    sum(o.square().mean() for o in monai(x)).backward()
    sum(o.square().mean() for o in ours.forward_stages(x)).backward()
    theirs = dict(monai.named_parameters())
    for name, p in ours.named_parameters():
        if name == "mask_token":
            continue
        assert torch.allclose(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-3), name


def test_mask_token_changes_only_masked_cells() -> None:
    torch.manual_seed(0)
    model = Swin3D.from_preset("tiny").eval()
    x = torch.randn(2, 1, 64, 64, 64)
    mask = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    mask[0, 1, 2, 3] = True
    mask[1, 0, 0, :2] = True
    with torch.no_grad():
        plain = model.embed(x)
        masked = model.embed(x, mask)
    cells = mask.repeat_interleave(8, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)
    changed = (plain - masked).abs().amax(-1) > 0
    assert torch.equal(changed, cells)
    assert torch.allclose(masked[cells], model.mask_token.reshape(1, -1).expand(int(cells.sum()), -1))
    # a mask token learns: it receives gradient only through masked cells
    model.train()
    model.forward_features(x, mask, strides=(16,))[16].sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_mask_grid_must_divide_token_grid() -> None:
    model = Swin3D.from_preset("tiny")
    with pytest.raises(ValueError, match="does not divide"):
        model.embed(torch.zeros(1, 1, 64, 64, 64), torch.zeros(1, 3, 4, 4, dtype=torch.bool))


def test_gradient_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    a = Swin3D.from_preset("tiny", drop_path_rate=0.0)
    b = Swin3D.from_preset("tiny", grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 32, 64, 32)
    for m in (a, b):
        feats = m.forward_features(x, strides=(16, 32))
        (feats[16].square().mean() + feats[32].mean()).backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("size", [(64, 64, 64), (32, 96, 64), (96, 96, 32)])
def test_feature_shapes_follow_strides(size: tuple[int, int, int]) -> None:
    model = Swin3D.from_preset("tiny").eval()
    with torch.no_grad():
        feats = model.forward_features(torch.zeros(1, 1, *size), strides=(2, 4, 8, 16, 32))
    for stride, f in feats.items():
        assert f.shape[1:4] == tuple(s // stride for s in size)
        assert f.shape[-1] == model.width(stride)


def test_sides_not_multiple_of_32_are_refused_and_pad_helper_fixes_them() -> None:
    model = Swin3D.from_preset("tiny")
    x = torch.zeros(1, 1, 40, 64, 70)
    with pytest.raises(ValueError, match="multiple of 32"):
        model(x)
    padded, original = pad_to_multiple(x)
    assert padded.shape[2:] == (64, 64, 96) and original == (40, 64, 70)
    assert model(padded).shape == (1, 384, 2, 2, 3)


def test_inference_mode_forward_then_training_backward() -> None:
    """The cached shift mask made under inference_mode must not poison later training passes."""
    from smartformer.models.smartformer import SMARTFormer

    torch.manual_seed(0)
    model = SMARTFormer.from_preset("tiny", heads=False, decoder=False)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.inference_mode():
        model.forward_features(x)
    out = model.forward_features(x)["cls"].sum()
    out.backward()
    assert model.backbone.patch_embed.proj.weight.grad is not None


def test_shifted_stages_run_on_the_meta_device() -> None:
    """FLOP counting (benchmarks/backbone.py) runs the model on ``meta``: the compact shift mask,
    built from data on the CPU, must move there without reading values back."""
    model = Swin3D.from_preset("tiny").to("meta")
    x = torch.empty(1, 1, 64, 64, 64, device="meta")
    model.set_fused_attn(False)  # as the FLOP count does: the counter does not know the CPU kernels
    outs = model.forward_stages(x)
    assert [o.device.type for o in outs] == ["meta"] * len(outs)
    assert tuple(outs[-1].shape[2:]) == (2, 2, 2)


@pytest.mark.parametrize(
    "grid,ws,ss",
    [((5, 6, 7), (4, 4, 4), (2, 2, 2)), ((8, 8, 8), (4, 4, 4), (0, 0, 0)), ((7, 9, 4), (7, 7, 4), (3, 3, 0))],
)
def test_window_layout_is_pad_roll_partition_and_back(grid, ws, ss) -> None:
    """One gather each way equals MONAI's pad + roll + window partition and its reverse (values
    and gradients; padding rows are zero forward and get no gradient back)."""
    import torch.nn.functional as F

    from smartformer.models.swin3d import WindowLayout, _window_partition

    def reference(t: torch.Tensor) -> torch.Tensor:
        pads = [(-g) % w for g, w in zip(grid, ws)]
        t = F.pad(t, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        return _window_partition(torch.roll(t, shifts=[-s for s in ss], dims=(1, 2, 3)), ws)

    torch.manual_seed(0)
    layout = WindowLayout.build(2, grid, ws, ss)
    x = torch.randn(2, *grid, 5, dtype=torch.float64, requires_grad=True)
    expected, got = reference(x), layout.partition(x)
    assert torch.equal(got, expected)
    weights = torch.randn_like(expected)
    assert torch.equal(*(torch.autograd.grad((y * weights).sum(), x)[0] for y in (got, expected)))
    windows = expected.detach().requires_grad_()
    back = layout.reverse(windows, grid)
    assert torch.equal(back, x.detach())
    v = torch.randn_like(back)
    (grad,) = torch.autograd.grad((back * v).sum(), windows)
    assert torch.equal(grad, reference(v))


def test_patch_merging_gradient_is_the_concatenations() -> None:
    from smartformer.models.swin3d import PatchMerging

    torch.manual_seed(0)
    merge = PatchMerging(3).double()
    for size in ((4, 6, 8), (3, 5, 4)):
        x = torch.randn(2, *size, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(merge, (x,))


def test_the_residual_stream_is_contiguous_channels_last() -> None:
    """A channels-first residual stream (a permuted view of the patch embedding) costs a copy in
    every layer norm, linear and window gather of the first stage."""
    model = Swin3D.from_preset("tiny")
    x = model.embed(torch.randn(1, 1, 64, 64, 64))
    assert x.is_contiguous()
    assert model.stages[0].forward_blocks(x).is_contiguous()
