"""Run monitors: the collapse warning read from the logged teacher entropies."""

from __future__ import annotations

from smartformer.train.monitor import UNIFORM_ENTROPY, collapse_message


def test_collapse_message_names_the_uniform_branches_only() -> None:
    assert collapse_message({"teacher_cls_entropy": 0.95, "teacher_patch_entropy": 0.8}) is None
    assert collapse_message({"loss": 1.0}) is None  # nothing logged, nothing said
    cls_only = collapse_message({"teacher_cls_entropy": UNIFORM_ENTROPY + 1e-4, "teacher_patch_entropy": 0.8})
    assert cls_only is not None and "cls targets" in cls_only and "patch" not in cls_only
    both = collapse_message({"teacher_cls_entropy": 1.0, "teacher_patch_entropy": 1.0})
    assert both is not None and "cls and patch targets" in both
