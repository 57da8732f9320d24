"""Run monitors: the collapse warning read from the logged teacher entropies."""

from __future__ import annotations

import pytest

from smartformer.train.monitor import UNIFORM_ENTROPY, collapse_message


def test_collapse_message_names_the_uniform_branches_only() -> None:
    assert collapse_message({"teacher_cls_entropy": 0.95, "teacher_patch_entropy": 0.8}) is None
    assert collapse_message({"loss": 1.0}) is None  # nothing logged, nothing said
    cls_only = collapse_message({"teacher_cls_entropy": UNIFORM_ENTROPY + 1e-4, "teacher_patch_entropy": 0.8})
    assert cls_only is not None and "cls targets" in cls_only and "patch" not in cls_only
    both = collapse_message({"teacher_cls_entropy": 1.0, "teacher_patch_entropy": 1.0})
    assert both is not None and "cls and patch targets" in both


def test_collapse_message_names_the_one_hot_collapse() -> None:
    from smartformer.train.monitor import ONE_HOT_ENTROPY

    message = collapse_message({"teacher_cls_entropy": 0.001, "teacher_cls_batch_entropy": ONE_HOT_ENTROPY / 2})
    assert message is not None and "one-hot cls target" in message
    patch = collapse_message({"teacher_patch_entropy": 0.01, "teacher_patch_batch_entropy": ONE_HOT_ENTROPY / 2})
    assert patch is not None and "one-hot patch target" in patch
    assert collapse_message({"teacher_cls_entropy": 0.3, "teacher_cls_batch_entropy": 0.5}) is None


def test_collapse_monitors_measure_sameness_and_attention_on_air() -> None:
    import torch

    from smartformer.train.ssl_meta_arch import collapse_monitors

    volumes = torch.zeros(4, 1, 32, 32, 32)  # 2 views x 2 volumes; stride 16: 8 cells each
    volumes[:, :, :16] = 0.8  # the first 4 cells (first along D) are body
    attn = torch.zeros(4, 2, 2, 2, 2)
    attn[:, :, 1] = 0.25  # all attention on the 4 air cells
    same = torch.ones(4, 8)
    monitors = collapse_monitors(volumes, 2, same, same[:, None].expand(4, 8, 8), attn, level=0.25, stride=16)
    assert monitors["teacher_cls_cosine"] == pytest.approx(1.0) and monitors["teacher_pooled_cosine"] == pytest.approx(
        1.0
    )
    assert monitors["attn_air_share"] == pytest.approx(1.0) and monitors["air_cell_share"] == 0.5
    apart = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])  # view-major rows
    monitors = collapse_monitors(volumes, 2, apart, apart[:, None], attn.flip(2), level=0.25, stride=16)
    assert monitors["teacher_cls_cosine"] == pytest.approx(-0.5) and monitors["attn_air_share"] == 0.0
    assert "teacher_cls_cosine" not in collapse_monitors(volumes[:2], 2, apart[:2], apart[:2, None], None, 0.25, 16)
