"""SMART as published (issue 13): ViT semantic attention in stage 3, GITD, the `paper` preset."""

from __future__ import annotations

import math

import pytest
import torch

from smartformer.config import build_model_config, load_config
from smartformer.errors import ConfigError
from smartformer.loss import DINOLoss
from smartformer.models.semantic_attention import SemanticAttention, ViTSemanticAttention
from smartformer.models.smartformer import SMARTConfig, SMARTFormer
from smartformer.train.ssl_meta_arch import SMARTMetaArch


def _views(seed: int = 0, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 2, 1, size, size, size, generator=g)  # (B, V, 1, D, H, W)


def test_vit_map_is_the_head_mean_of_the_cls_row_over_the_patch_tokens() -> None:
    torch.manual_seed(0)
    sa = ViTSemanticAttention(dim=32, num_heads=4, depth=2).eval()
    tokens = torch.randn(2, 2, 3, 4, 32)
    out = sa(tokens)
    # the last block's [CLS] row by hand, from its own parameters
    x = torch.cat([sa.cls_token.expand(2, -1, -1), tokens.reshape(2, 24, 32)], 1)
    x, _ = sa.blocks[0](x)
    blk = sa.blocks[1]
    q, k, _ = blk.attn.qkv(blk.norm1(x)).view(2, 25, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    row = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / 8**0.5, -1).squeeze(2)  # (B, heads, 1 + N)
    expected = row[:, :, 1:] / row[:, :, 1:].sum(-1, keepdim=True)
    assert torch.allclose(out.attn.reshape(2, 4, 24), expected, atol=1e-6)
    assert torch.allclose(out.attn.sum(dim=(2, 3, 4)), torch.ones(2, 4), atol=1e-6)
    # every token attends to every other one: the patch tokens change too (class attention leaves them)
    assert out.tokens.shape == tokens.shape and not torch.allclose(out.stream, tokens)
    # the fused path gives the same outputs as the explicit one
    sa.blocks.apply(lambda m: setattr(m, "fused_attn", False) if hasattr(m, "fused_attn") else None)
    ref = sa(tokens)
    assert torch.allclose(ref.cls, out.cls, atol=1e-5) and torch.allclose(ref.attn, out.attn, atol=1e-6)


@pytest.mark.parametrize(
    "stage,merged,grid", [(2, False, 16), (3, False, 8), (3, True, 4), (4, False, 4), (4, True, 2)]
)
def test_semantic_stage_sets_the_grid_and_width(stage: int, merged: bool, grid: int) -> None:
    torch.manual_seed(0)
    model = SMARTFormer.from_preset(
        "tiny", semantic_form="vit", semantic_stage=stage, semantic_merged=merged, semantic_heads=3
    ).eval()
    out = model(torch.rand(1, 1, 64, 64, 64), return_attention=True)
    stride = 64 // grid
    assert model.config.semantic_stride == stride
    assert out["attn"].shape == (1, 3, grid, grid, grid)
    assert out["tokens"].shape == (1, grid**3, 24 * stride // 2)
    assert out["recon"].shape == (1, 1, 64, 64, 64)


def test_old_configs_with_semantic_stride_still_load() -> None:
    assert (
        SMARTConfig.from_dict({"semantic_stride": 32}).semantic_stage,
        SMARTConfig.from_dict({"semantic_stride": 32}).semantic_merged,
    ) == (4, True)
    assert SMARTConfig.from_dict({"semantic_stride": 8}).semantic_stride == 8
    assert load_config("tiny", ["model.semantic_stride=8"]) is not None
    with pytest.raises(ConfigError, match="semantic_stage"):
        load_config("tiny", ["model.semantic_stage=5"])
    with pytest.raises(ConfigError, match="semantic_continue needs semantic_form=vit"):
        load_config("tiny", ["model.semantic_continue=true"])


def test_continue_feeds_the_sa_tokens_into_the_next_stage() -> None:
    torch.manual_seed(0)
    kw = dict(semantic_form="vit", semantic_stage=3, semantic_heads=3, global_head=True)
    side = SMARTFormer.from_preset("tiny", **kw).eval()
    inline = SMARTFormer.from_preset("tiny", **kw, semantic_continue=True).eval()
    inline.load_state_dict(side.state_dict())
    x = torch.rand(1, 1, 64, 64, 64)
    a, b = side(x), inline(x)
    assert torch.allclose(a["cls"], b["cls"]) and torch.allclose(a["tokens"], b["tokens"])  # same up to stage 3
    assert not torch.allclose(a["pooled"], b["pooled"], atol=1e-4)  # stage 4 sees other tokens
    # without continue, stage 4 is the plain Swin's
    plain = side.backbone.forward_features(x, strides=(16,))[16]
    assert torch.allclose(a["pooled"], side.global_norm(plain).mean(dim=(1, 2, 3)), atol=1e-6)


def _meta(*overrides: str) -> SMARTMetaArch:
    torch.manual_seed(0)
    return SMARTMetaArch(
        load_config("tiny", ["model.semantic_form=vit", "model.semantic_stage=3", "model.semantic_heads=3", *overrides])
    )


def test_cls_loss_alone_reaches_the_sa_blocks_and_the_stages_below() -> None:
    meta = _meta("loss.recon_weight=0", "loss.patch_weight=0", "loss.cls_weight=0.1")
    out = meta(_views(), step=0, teacher_temp=0.04)
    assert set(k for k in out.terms if k.startswith("loss_")) == {"loss_cls"}
    out.loss.backward()
    params = dict(meta.student.named_parameters())
    for name in (
        "semantic.cls_token",
        "semantic.blocks.0.attn.qkv.weight",
        "semantic.blocks.1.mlp.linear1.weight",
        "backbone.layers3.0.blocks.1.attn.qkv.weight",
        "backbone.patch_embed.proj.weight",
    ):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    # stage 4 is after the semantic attention and feeds no loss here
    assert params["backbone.layers4.0.blocks.0.attn.qkv.weight"].grad is None


def test_gitd_is_the_dino_loss_of_the_pooled_stage4_logits_and_changes_the_loss() -> None:
    views = _views()
    meta, plain = _meta("loss.global_weight=0.1"), _meta()
    for net in ("student", "teacher"):  # the same weights, less the GITD head
        getattr(plain, net).load_state_dict(getattr(meta, net).state_dict(), strict=False)
    without = plain(views, step=0, teacher_temp=0.04, generator=torch.Generator().manual_seed(3))
    out = meta(views, step=0, teacher_temp=0.04, generator=torch.Generator().manual_seed(3))
    assert "loss_global" not in without.terms and meta.student.global_head is not None
    for key in ("loss_recon", "loss_patch", "loss_cls"):  # same weights, same masks: the other terms agree
        assert out.terms[key] == pytest.approx(without.terms[key], rel=1e-5)
    assert out.terms["loss"] == pytest.approx(without.terms["loss"] + 0.1 * out.terms["loss_global"], rel=1e-5)
    # the term by hand: cross-view DINO loss of the global logits, teacher on the noisy views
    x = views.transpose(0, 1).reshape(4, 1, 64, 64, 64)
    g = torch.Generator().manual_seed(1)
    meta2 = _meta("loss.global_weight=0.1", "teacher.noise=none", "masking.strategy=random")
    out2 = meta2(views, step=0, teacher_temp=0.04, generator=g)
    with torch.no_grad():
        t = meta2.teacher(x, heads=True, reconstruct=False)["global_logits"]
    g = torch.Generator().manual_seed(1)
    from smartformer.data.masking import generate_mask

    mask = generate_mask("random", (8, 8, 8), 4, ratio=0.6, generator=g)
    s = meta2.student(x, mask=mask, reconstruct=False)["global_logits"]
    ref = DINOLoss(meta2.student.config.head_out_dim, 0.1)(list(s.chunk(2)), list(t.chunk(2)), 0.04)
    assert out2.terms["loss_global"] == pytest.approx(float(ref.detach()), rel=1e-4)
    out.loss.backward()
    head = meta.student.global_head.mlp[0].weight.grad
    assert head is not None and head.abs().sum() > 0
    meta.after_step(out, 0.99)
    assert meta.gitd_loss is not None and meta.gitd_loss.center.abs().sum() > 0


def test_gitd_on_equal_logits_is_log_k() -> None:
    # a closed form: uniform teacher and student targets give ln K, as for the [CLS] loss
    loss = DINOLoss(16, 0.1)([torch.zeros(3, 16)] * 2, [torch.zeros(3, 16)] * 2, 0.04)
    assert float(loss) == pytest.approx(math.log(16), rel=1e-6)


def test_paper_preset_builds_the_stated_shapes() -> None:
    config = load_config("paper")
    model_cfg = build_model_config(config)
    bb = model_cfg.backbone
    assert (bb.depths, bb.num_heads, bb.window_size, bb.patch_size, bb.embed_dim) == (
        (2, 2, 8, 2),
        (4, 4, 8, 16),
        (4, 4, 4),
        2,
        48,
    )
    assert bb.drop_path_rate == pytest.approx(0.1)
    assert (
        model_cfg.semantic_form,
        model_cfg.semantic_stage,
        model_cfg.semantic_merged,
        model_cfg.semantic_depth,
        model_cfg.semantic_continue,
    ) == ("vit", 3, False, 2, False)
    assert config.data.roi == (128, 128, 128) and config.data.spacing == (2.0, 2.0, 2.0)
    assert config.optim.lr * config.data.batch_size == pytest.approx(8e-4)
    assert config.optim.warmup_for(config.train.max_steps) == round(0.1 * config.train.max_steps)
    assert (config.teacher.noise, config.teacher.noise_ratio) == ("patch_dropout", 0.7)
    assert (config.masking.strategy, config.masking.ratio, config.masking.hint_ratio) == ("attention_hint", 0.7, 0.1)
    assert (config.loss.recon_weight, config.loss.patch_weight, config.loss.cls_weight, config.loss.global_weight) == (
        1.0,
        0.1,
        0.1,
        0.1,
    )
    model_cfg.global_head = True
    model = SMARTFormer(model_cfg).eval()
    assert isinstance(model.semantic, ViTSemanticAttention) and len(model.semantic.blocks) == 2
    assert [len(s.blocks) for s in model.backbone.stages] == [2, 2, 8, 2]
    assert [s.blocks[0].attn.num_heads for s in model.backbone.stages] == [4, 4, 8, 16]
    assert model.backbone.stages[3].blocks[-1].drop_path.p == pytest.approx(0.1)
    with torch.no_grad():  # a small input: 128^3 is for the benchmark, not the tests
        out = model(torch.rand(1, 1, 64, 64, 64), return_attention=True)
    assert out["attn"].shape == (1, 8, 8, 8, 8)  # stage 3 at stride 8
    assert out["tokens"].shape == (1, 512, 192) and out["cls"].shape == (1, 192)
    assert out["pooled"].shape == (1, 384)  # the paper's "feature embedding size 384" at stage 4
    assert out["recon"].shape == (1, 1, 64, 64, 64)
    assert out["global_logits"].shape == (1, 8192)


@pytest.mark.parametrize("preset", ["tiny", "base", "smit"])
def test_existing_presets_keep_their_method(preset: str) -> None:
    config = load_config(preset)
    model_cfg = build_model_config(config)
    assert (model_cfg.semantic_form, model_cfg.semantic_stride, model_cfg.semantic_continue) == (
        "class_attention",
        16,
        False,
    )
    assert config.loss.global_weight == 0 and config.optim.warmup_fraction == 0
    assert isinstance(SMARTFormer(model_cfg).semantic, SemanticAttention)


def test_decoder_is_one_linear_layer_per_token() -> None:
    # The paper's AMIP head is "a 1-layer linear prediction head": ours is a 1x1x1 convolution
    # (a linear map of each token to its 16^3 voxels) and a pixel shuffle, nothing else.
    torch.manual_seed(0)
    dec = SMARTFormer.from_preset("tiny").decoder
    assert [type(m).__name__ for m in dec.modules()] == ["ReconstructionDecoder", "Conv3d"]
    feats = torch.randn(1, 2, 2, 2, 192)
    lin = feats @ dec.proj.weight.view(16**3, 192).T + dec.proj.bias  # (1, 2, 2, 2, 16^3)
    voxels = dec(feats)
    assert torch.allclose(
        voxels[0, 0, 16:32, 0:16, 16:32].reshape(-1), lin[0, 1, 0, 1].view(16, 16, 16).reshape(-1), atol=1e-5
    )


def test_gitd_center_is_saved_and_resumed(tmp_path) -> None:
    # GITD's center is training state like the [CLS] one: a resume that lost it would log another
    # loss at step 3 than the uninterrupted run. The paper's SA (vit, stage 3) rides along.
    import json
    import shutil

    from smartformer.cli import main
    from smartformer.data.phantom import write_phantoms
    from smartformer.train.checkpoint import load_checkpoint

    data = tmp_path / "ph"
    write_phantoms(data, n=2, seed=0, shape=(48, 48, 40), spacing=(5.0, 5.0, 5.0), progress=False)
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--out", str(run), "--no-progress"]
    fast = [
        "data.roi=[32,32,32]",
        "data.spacing=[4.0,4.0,4.0]",
        "data.num_workers=0",
        "train.log_every=1",
        "train.snapshot_every=1000",
        "train.checkpoint_every=2",
        "masking.warmup_steps=1",
        "optim.warmup_steps=1",
        "loss.global_weight=0.1",
        "model.semantic_form=vit",
        "model.semantic_stage=3",
        "model.semantic_heads=3",
    ]

    def losses() -> dict[int, float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {f"{r['step']}/{key}": r[key] for r in rows if "loss" in r for key in ("loss", "loss_global")}

    assert main([*args, "--max-steps", "3", *fast]) == 0
    first = losses()
    center = load_checkpoint(run / "checkpoints" / "step_0000002.pt")["losses"]["global"]["center"]
    assert center.abs().sum() > 0
    shutil.copyfile(run / "checkpoints" / "step_0000002.pt", run / "checkpoints" / "last.pt")
    assert main([*args, "--resume"]) == 0
    assert losses() == pytest.approx(first, rel=1e-6, abs=1e-7)
