"""EMA teacher, teacher input noise and head diversity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smartformer.train.teacher import TeacherNoise, build_teacher, head_diversity, update_momentum


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


@pytest.mark.parametrize(("m", "want"), [(0.0, 3.0), (1.0, 1.0), (0.5, 2.0), (0.75, 1.5)])
def test_update_momentum_exact(m: float, want: float) -> None:
    student = _net()
    teacher = build_teacher(student)
    _fill(teacher, 1.0)
    _fill(student, 3.0)
    dict(student.named_buffers())["1.running_mean"].fill_(0.25)
    update_momentum(student, teacher, m)
    assert all(torch.all(p == want) for p in teacher.parameters())
    assert torch.all(dict(teacher.named_buffers())["1.running_mean"] == 0.25)  # buffers are copied
    assert all(torch.all(p == 3.0) for p in student.parameters())  # the student is untouched


def test_update_momentum_rejects_mismatched_models() -> None:
    with pytest.raises(ValueError, match="differ"):
        update_momentum(_net(), nn.Linear(3, 4), 0.9)


def test_teacher_is_a_detached_copy_without_grads() -> None:
    student = _net().train()
    teacher = build_teacher(student)
    assert teacher.training  # the mode is left as it was
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    pairs = zip(student.parameters(), teacher.parameters(), strict=True)
    assert all(ps.data_ptr() != pt.data_ptr() for ps, pt in pairs)
    x = torch.randn(5, 3)
    (student(x).sum() + teacher(x).sum()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert not build_teacher(_net().eval()).training


@pytest.mark.parametrize(("grid", "ratio", "want"), [((4, 4, 4), 0.1, 6), ((6, 6, 6), 0.1, 22), ((4, 4, 4), 0.25, 16)])
def test_patch_dropout_drops_exact_cell_count(grid: tuple[int, int, int], ratio: float, want: int) -> None:
    x = torch.randn(3, 1, 16 * grid[0], 16 * grid[1], 16 * grid[2])
    out, drop = TeacherNoise("patch_dropout", ratio=ratio)(x, grid, generator=torch.Generator().manual_seed(0))
    assert out is x
    assert drop is not None and drop.dtype == torch.bool and drop.shape == (3, *grid)
    assert drop.sum(dim=(1, 2, 3)).tolist() == [want] * 3
    _, again = TeacherNoise("patch_dropout", ratio=ratio)(x, grid, generator=torch.Generator().manual_seed(0))
    assert again is not None and torch.equal(drop, again)


def test_gaussian_noise_has_sigma_std_and_none_is_identity() -> None:
    x = torch.rand(2, 1, 32, 32, 32)
    noisy, drop = TeacherNoise("gaussian", sigma=0.2)(x, (2, 2, 2), generator=torch.Generator().manual_seed(1))
    assert drop is None
    diff = noisy - x
    assert diff.std().item() == pytest.approx(0.2, rel=0.02)
    assert abs(diff.mean().item()) < 0.005
    same, drop = TeacherNoise("none")(x, (2, 2, 2))
    assert drop is None and torch.equal(same, x)


def test_teacher_noise_validates_arguments() -> None:
    with pytest.raises(ValueError, match="unknown teacher noise"):
        TeacherNoise("dropout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer multiple"):
        TeacherNoise()(torch.zeros(1, 1, 30, 32, 32), (4, 4, 4))


def test_head_diversity_closed_forms() -> None:
    base = torch.rand(2, 1, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    same = head_diversity(base.expand(2, 4, 3, 3, 3))
    assert same.item() == pytest.approx(0.0, abs=1e-6)

    one_hot = torch.eye(4).reshape(1, 4, 1, 2, 2).expand(3, 4, 1, 2, 2)  # 4 heads, disjoint cells
    assert head_diversity(one_hot).item() == 1.0

    # heads a, a, b with a . b = 0: pair distances 0, 1, 1 -> 2/3
    three = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert head_diversity(three).item() == pytest.approx(2.0 / 3.0, rel=1e-6)
    # [1, 0] vs [1, 1]: 1 - 1/sqrt(2)
    two = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert head_diversity(two).item() == pytest.approx(1.0 - 1.0 / math.sqrt(2.0), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 heads"):
        head_diversity(torch.rand(2, 1, 8))
