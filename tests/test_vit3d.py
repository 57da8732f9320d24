"""The 3D ViT backbone against MONAI's ViT (the oracle): strict weight loading, same outputs."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT

from smartformer.models.vit3d import VIT_PRESETS, ViT3D, ViT3DConfig

CFG = ViT3DConfig(img_size=(32, 64, 32), patch_size=16, hidden_size=48, mlp_dim=192, num_layers=2, num_heads=4)


def monai_vit(cfg: ViT3DConfig, classification: bool = False) -> ViT:
    return ViT(
        cfg.in_chans,
        cfg.img_size,
        cfg.patch_size,
        hidden_size=cfg.hidden_size,
        mlp_dim=cfg.mlp_dim,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        qkv_bias=cfg.qkv_bias,
        classification=classification,
        post_activation=None,
    ).eval()


@pytest.mark.parametrize("fused", [True, False])
def test_weights_load_strictly_into_monai_vit_and_give_its_outputs(fused: bool) -> None:
    torch.manual_seed(0)
    ours = ViT3D(ViT3DConfig(**{**CFG.to_dict(), "fused_attn": fused}))
    ours.eval()
    for p in ours.parameters():  # not the initial zeros/ones: every weight must land in its place
        p.data.normal_(0, 0.2)
    monai = monai_vit(CFG)
    monai.load_state_dict(ours.monai_state_dict(), strict=True)
    x = torch.rand(2, 1, *CFG.img_size)
    with torch.no_grad():
        ref, ref_hidden = monai(x)
        out, hidden = ours(x)
    assert out.shape == ref.shape == (2, 2 * 4 * 2, 48)
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(hidden, ref_hidden, strict=True))


def test_cls_path_matches_monai_classification_vit() -> None:
    # MONAI's classification ViT prepends the [CLS] the same way (no position embedding for it)
    torch.manual_seed(0)
    ours = ViT3D(CFG).eval()
    monai = monai_vit(CFG, classification=True)
    missing, unexpected = monai.load_state_dict(
        {**ours.monai_state_dict(), "cls_token": ours.cls_token.data}, strict=False
    )
    assert unexpected == [] and all(k.startswith("classification_head") for k in missing)
    x = torch.rand(1, 1, *CFG.img_size)
    with torch.no_grad():
        _, hidden = monai(x)
        out = ours.forward_features(x, return_attention=True)
    assert torch.allclose(ours.norm(hidden[-1])[:, 0], out["cls"], atol=1e-5)
    attn = out["attn"]
    assert attn.shape == (1, 4, 2, 4, 2)
    assert torch.allclose(attn.sum(dim=(2, 3, 4)), torch.ones(1, 4), atol=1e-5)


def test_mask_token_replaces_masked_patches_only() -> None:
    torch.manual_seed(0)
    vit = ViT3D(CFG).eval()
    x = torch.rand(1, 1, *CFG.img_size)
    mask = torch.zeros(1, 2, 4, 2, dtype=torch.bool)
    mask[0, 1, 2, 0] = True
    plain, masked = vit.embed(x), vit.embed(x, mask)
    changed = (plain != masked).any(-1)[0]
    assert changed.sum() == 1 and changed[1 + (1 * 4 + 2) * 2 + 0]


def test_presets_and_size_check() -> None:
    paper = VIT_PRESETS["paper"]
    assert (paper.num_layers, paper.hidden_size, paper.num_heads) == (12, 768, 8)
    with pytest.raises(ValueError, match="position embeddings"):
        ViT3D(CFG)(torch.rand(1, 1, 32, 32, 32))


def test_vit_tiny_preset_trains_with_attention_guided_masking(tmp_path) -> None:
    from smartformer.config import load_config
    from smartformer.errors import ConfigError
    from smartformer.models.smartformer import SMARTFormer
    from smartformer.train.ssl_meta_arch import SMARTMetaArch

    torch.manual_seed(0)
    meta = SMARTMetaArch(
        load_config(
            "vit_tiny",
            [
                "model.vit.num_layers=2",
                "masking.warmup_steps=0",
                "masking.ratio=0.5",
                "masking.hint_ratio=0",
                "loss.global_weight=0.1",
            ],
        )
    )
    assert isinstance(meta.student.backbone, ViT3D) and meta.student.config.semantic_stride == 16
    views = torch.rand(1, 2, 1, 64, 64, 64)
    out = meta(views, step=5, teacher_temp=0.04)
    assert {"loss_recon", "loss_patch", "loss_cls", "loss_global"} <= set(out.terms)
    # attention_high with no hint: the masked cells are the teacher [CLS]'s top half
    attn = out.teacher_attn.mean(1).flatten(1)
    top = attn.topk(32, dim=1).indices
    mask = meta.masker(5, (4, 4, 4), 2, attention=out.teacher_attn)
    assert torch.equal(mask.flatten(1).gather(1, top), torch.ones_like(top, dtype=torch.bool))
    out.loss.backward()
    assert meta.student.backbone.cls_token.grad.abs().sum() > 0
    # saved and loaded back through safetensors + config.json
    meta.student.save_pretrained(tmp_path / "enc")
    again = SMARTFormer.from_pretrained(tmp_path / "enc")
    x = torch.rand(1, 1, 64, 64, 64)
    assert torch.allclose(again.eval().attention_maps(x), meta.student.eval().attention_maps(x))
    with pytest.raises(ConfigError, match="must equal model.vit.img_size"):
        load_config("vit_tiny", ["data.roi=[96,96,96]"])
    with pytest.raises(ConfigError, match="model.vit.num_layers: 0 is out of range"):
        load_config("vit_tiny", ["model.vit.num_layers=0"])
    with pytest.raises(ConfigError, match="unknown config key model.vit.depth"):
        load_config("vit_tiny", ["model.vit.depth=2"])


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    vit = ViT3D(CFG)
    x = torch.rand(1, 1, *CFG.img_size)
    grads = []
    for enable in (False, True):
        vit.zero_grad()
        vit.set_grad_checkpointing(enable)
        vit.forward_features(x)["cls"].square().sum().backward()
        grads.append(vit.blocks[0].attn.qkv.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_monai_weights_load_back() -> None:
    torch.manual_seed(0)
    monai = monai_vit(CFG)
    ours = ViT3D(CFG).eval()
    ours.load_monai_state_dict(monai.state_dict())
    x = torch.rand(1, 1, *CFG.img_size)
    with torch.no_grad():
        assert torch.allclose(ours(x)[0], monai(x)[0], atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        ours.load_monai_state_dict({k: v for k, v in monai.state_dict().items() if k != "norm.weight"})


def test_export_to_monai_refuses_a_vit_in_one_line(tmp_path, capsys) -> None:
    from smartformer.cli import main
    from smartformer.models.smartformer import SMARTFormer

    SMARTFormer.from_preset("vit_tiny").save_pretrained(tmp_path / "vit")
    assert main(["export", "--checkpoint", str(tmp_path / "vit"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ViT encoder" in err[0] and "monai_state_dict" in err[0]
    assert not (tmp_path / "x.pt").exists()
