"""Semantic attention: exact softmax maps on the stage grid, fused path, pooled-token ablation."""

from __future__ import annotations

import pytest
import torch

from smartformer.errors import SmartformerError
from smartformer.models.semantic_attention import SemanticAttention
from smartformer.models.smartformer import SMARTFormer


@pytest.mark.parametrize("size", [(64, 64, 64), (32, 64, 96), (96, 96, 96)])
def test_attention_maps_are_softmax_rows_on_the_stage_grid(size: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = SMARTFormer.from_preset("tiny").eval()
    attn = model.attention_maps(torch.rand(2, 1, *size))
    heads = model.config.semantic_heads
    assert attn.shape == (2, heads, *(s // 16 for s in size))
    assert (attn >= 0).all()
    assert torch.allclose(attn.sum(dim=(2, 3, 4)), torch.ones(2, heads), atol=1e-5)


def test_maps_equal_explicit_softmax_of_query_key_scores() -> None:
    torch.manual_seed(0)
    sa = SemanticAttention(dim=32, num_heads=4, depth=2).eval()
    tokens = torch.randn(2, 2, 3, 4, 32)
    cls, attn = sa(tokens)
    # recompute the last block's map by hand from its own parameters
    flat = tokens.reshape(2, 24, 32)
    c = sa.cls_token.expand(2, -1, -1)
    blk0, blk1 = sa.blocks
    c, _ = blk0(c, flat)
    q = blk1.attn.q(blk1.norm1(c)).view(2, 1, 4, 8).transpose(1, 2)
    k = blk1.attn.kv(blk1.norm1(flat))[..., :32].view(2, 24, 4, 8).transpose(1, 2)
    expected = torch.softmax((q @ k.transpose(-1, -2)) / 8**0.5, dim=-1).squeeze(2)
    assert torch.allclose(attn.reshape(2, 4, 24), expected, atol=1e-6)


def test_cls_depends_on_the_input_from_initialisation() -> None:
    # The regression behind the [CLS] collapse: with CaiT's LayerScale start (1e-4) the [CLS]
    # of a fresh model was the learnt constant token for every input (cosine 0.9999999 between
    # unrelated inputs), so the centered teacher targets were uniform and stayed so.
    torch.manual_seed(0)
    sa = SemanticAttention(dim=48, num_heads=6).eval()
    tokens = torch.randn(8, 4, 4, 4, 48)
    cls, _ = sa(tokens, return_attn=False)
    unit = torch.nn.functional.normalize(cls, dim=-1)
    cosine = (unit @ unit.T)[~torch.eye(8, dtype=torch.bool)]
    assert cosine.max() < 0.99
    torch.manual_seed(0)
    cait = SemanticAttention(dim=48, num_heads=6, init_values=1e-4).eval()
    unit = torch.nn.functional.normalize(cait(tokens, return_attn=False)[0], dim=-1)
    assert (unit @ unit.T).min() > 0.9999  # the trap the default avoids


def test_layer_scale_start_is_a_model_option() -> None:
    model = SMARTFormer.from_preset("tiny", semantic_layer_scale=0.5)
    assert model.semantic is not None
    assert all(torch.all(blk.gamma1 == 0.5) for blk in model.semantic.blocks)


def test_fused_and_explicit_class_attention_agree() -> None:
    torch.manual_seed(0)
    sa = SemanticAttention(dim=48, num_heads=6).eval()
    tokens = torch.randn(3, 4, 4, 4, 48)
    fused, none = sa(tokens, return_attn=False)
    explicit, attn = sa(tokens, return_attn=True)
    assert none is None and attn is not None
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_pooled_token_ablation_has_no_attention_maps() -> None:
    model = SMARTFormer.from_preset("tiny", semantic_attention=False).eval()
    x = torch.rand(1, 1, 64, 64, 64)
    out = model(x)
    assert out["cls"].shape == (1, model.embed_dim) and out["attn"] is None
    with pytest.raises(SmartformerError, match="semantic_attention=False"):
        model.attention_maps(x)


def test_full_forward_shapes() -> None:
    model = SMARTFormer.from_preset("tiny")
    mask = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    out = model(torch.rand(2, 1, 64, 64, 64), mask=mask, return_attention=True)
    assert out["cls_logits"].shape == (2, model.config.head_out_dim)
    assert out["patch_logits"].shape == (2, 64, model.config.head_out_dim)
    assert out["recon"].shape == (2, 1, 64, 64, 64)
    assert out["grid"] == (4, 4, 4)
