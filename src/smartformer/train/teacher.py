"""Momentum (EMA) teacher, the teacher's input noise, and the head-diversity metric."""

from __future__ import annotations

import copy
from typing import Literal, TypeVar, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartformer.data.masking import generate_mask

NoiseKind = Literal["patch_dropout", "gaussian", "none"]
NOISE_KINDS: tuple[str, ...] = get_args(NoiseKind)
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def deactivate_requires_grad(model: nn.Module) -> None:
    """Set ``requires_grad = False`` on every parameter of ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)


def build_teacher(student: ModuleT) -> ModuleT:
    """A deep copy of ``student`` whose parameters take no gradient.

    The train / eval mode is copied as it is and not changed here: the caller decides the
    teacher's mode. Pass the bare module, not a ``DistributedDataParallel`` wrapper.

    Args:
        student: the student network (backbone and heads).

    Returns:
        The teacher, same device / dtype / state as the student at the time of the call.
    """
    teacher = copy.deepcopy(student)
    deactivate_requires_grad(teacher)
    return teacher


@torch.no_grad()
def update_momentum(student: nn.Module, teacher: nn.Module, m: float) -> None:
    """EMA update ``teacher = m * teacher + (1 - m) * student``; buffers are copied.

    Parameters are paired in registration order (the teacher must come from
    :func:`build_teacher` or have the same architecture); the update uses the fused
    ``torch._foreach_*`` kernels. Buffers (e.g. normalization statistics) are copied from the
    student.

    Args:
        student: the trained network (the bare module, not a DDP wrapper).
        teacher: the EMA network, updated in place.
        m: momentum in [0, 1] (``1`` leaves the teacher unchanged, ``0`` copies the student).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    s_params: list[Tensor] = list(student.parameters())
    t_params: list[Tensor] = list(teacher.parameters())
    s_buffers = list(student.buffers())
    t_buffers = list(teacher.buffers())
    if len(s_params) != len(t_params) or len(s_buffers) != len(t_buffers):
        raise ValueError(
            f"student and teacher differ: {len(s_params)} vs {len(t_params)} parameters, "
            f"{len(s_buffers)} vs {len(t_buffers)} buffers"
        )
    if t_params:
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - m)
    for t_buf, s_buf in zip(t_buffers, s_buffers, strict=True):
        t_buf.copy_(s_buf)


class TeacherNoise:
    """Noise on the teacher's input ("noise regularized teacher").

    - ``patch_dropout``: exactly ``round(ratio * N)`` random cells of the ``(d, h, w)`` grid are
      dropped (round half up, as in :func:`smartformer.data.masking.count_for_ratio`); the input
      is returned unchanged with the bool drop mask ``(B, d, h, w)``, which the caller passes to
      the teacher's forward so that those cells' tokens are replaced by the mask token.
    - ``gaussian``: ``x + sigma * N(0, 1)`` voxel-wise (sigma in normalized intensity units), no mask.
    - ``none``: ``x`` unchanged, no mask (ablation).

    Args:
        kind: one of ``NOISE_KINDS``.
        ratio: dropped fraction of cells for ``patch_dropout``.
        sigma: standard deviation for ``gaussian``.
    """

    def __init__(self, kind: NoiseKind = "patch_dropout", ratio: float = 0.1, sigma: float = 0.1) -> None:
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown teacher noise {kind!r}; choose one of {NOISE_KINDS}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.kind = kind
        self.ratio = ratio
        self.sigma = sigma

    def __repr__(self) -> str:
        return f"TeacherNoise(kind={self.kind!r}, ratio={self.ratio}, sigma={self.sigma})"

    def __call__(
        self, x: Tensor, grid: tuple[int, int, int], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Apply the noise to one view.

        Args:
            x: ``(B, 1, D, H, W)`` teacher input.
            grid: the semantic-stage cell grid ``(d, h, w)`` (``D/d`` etc. integers).
            generator: random generator for reproducibility (its device is used for drawing).

        Returns:
            ``(x_noisy, drop_mask)``: the input (noised for ``gaussian``) and, for
            ``patch_dropout``, a bool ``(B, d, h, w)`` mask of dropped cells, else None.
        """
        if x.dim() != 5:
            raise ValueError(f"teacher input must be (B, C, D, H, W), got shape {tuple(x.shape)}")
        if len(grid) != 3 or any(g < 1 or s % g for s, g in zip(x.shape[2:], grid, strict=True)):
            raise ValueError(f"volume {tuple(x.shape[2:])} is not an integer multiple of the grid {tuple(grid)}")
        if self.kind == "patch_dropout":
            drop = generate_mask("random", grid, x.shape[0], ratio=self.ratio, generator=generator, device=x.device)
            return x, drop
        if self.kind == "gaussian":
            gen_device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32)
            return x + (self.sigma * noise).to(device=x.device, dtype=x.dtype), None
        return x, None


def head_diversity(attn: Tensor) -> Tensor:
    """Mean pairwise cosine distance between the attention maps of different heads.

    Each head's map is flattened; for every unordered pair of heads ``(i, j)`` the distance is
    ``1 - cos(a_i, a_j)``; the result averages over pairs, then over the batch. It is 0 when all
    heads are equal and 1 when the maps are pairwise orthogonal (e.g. disjoint supports); for
    non-negative maps such as softmax attention it lies in [0, 1]. Computed in float32.

    Args:
        attn: ``(B, heads, ...)`` per-head attention maps, ``heads >= 2``.

    Returns:
        Scalar float32 tensor.
    """
    if attn.dim() < 3 or attn.shape[1] < 2:
        raise ValueError(f"attn must be (B, heads, ...) with at least 2 heads, got shape {tuple(attn.shape)}")
    b, heads = attn.shape[:2]
    flat = F.normalize(attn.float().reshape(b, heads, -1), dim=-1)
    cos = flat @ flat.transpose(1, 2)  # (B, heads, heads)
    pairs = torch.triu_indices(heads, heads, offset=1, device=attn.device)
    return (1.0 - cos[:, pairs[0], pairs[1]]).mean()
