"""Mask generation on the semantic-stage cell grid (random, block, attention-guided).

A mask is a bool tensor ``(B, d, h, w)`` on the grid of the semantic stage (one cell = one token
at stride 16, e.g. ``(6, 6, 6)`` for a 96^3 crop), True = masked. Every strategy masks an exact
number of cells per sample; counts use :func:`count_for_ratio` (round half up).

Two views get independent masks: call the generator once per view, with that view's teacher
attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

MaskingStrategy = Literal["random", "block", "attention_high", "attention_hint", "attention_low"]
MASKING_STRATEGIES: tuple[str, ...] = get_args(MaskingStrategy)
ATTENTION_STRATEGIES: frozenset[str] = frozenset({"attention_high", "attention_hint", "attention_low"})

# Block masking: a block's volume (in cells) is drawn uniformly in
# [min(_BLOCK_MIN_CELLS, remaining), remaining]; its two aspect ratios are log-uniform in
# [1/_BLOCK_MAX_ASPECT, _BLOCK_MAX_ASPECT]; after _BLOCK_MAX_TRIES placements the remainder is
# filled with random single cells.
_BLOCK_MIN_CELLS = 4
_BLOCK_MAX_ASPECT = 3.0
_BLOCK_MAX_TRIES = 100


def count_for_ratio(ratio: float, n: int) -> int:
    """``round(ratio * n)`` with halves rounded up (``0.5 * 5 -> 3``), as used by every strategy."""
    return int(math.floor(ratio * n + 0.5))


def _check_grid(grid: Sequence[int]) -> tuple[int, int, int]:
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be three positive ints (d, h, w), got {tuple(grid)}")
    return int(grid[0]), int(grid[1]), int(grid[2])


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _scatter_mask(indices: Tensor, n: int) -> Tensor:
    """Bool ``(B, n)`` with True at ``indices`` ``(B, k)``."""
    mask = torch.zeros(indices.shape[0], n, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)


def _random_subset(candidates: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """Choose ``k`` cells uniformly among the True cells of each row of ``candidates`` ``(B, n)``.

    Every row must have at least ``k`` candidates. Returns a bool ``(B, n)`` mask.
    """
    scores = _rand(tuple(candidates.shape), generator, candidates.device)
    scores = scores.masked_fill(~candidates, -1.0)
    return _scatter_mask(scores.topk(k, dim=1).indices, candidates.shape[1])


def _attention_scores(attention: Tensor, batch: int, grid: tuple[int, int, int], device: torch.device) -> Tensor:
    """``(B, N)`` float32 scores from a ``(B, d, h, w)`` or ``(B, heads, d, h, w)`` attention map."""
    scores = attention.detach().float()
    if scores.dim() == 5:
        scores = scores.mean(dim=1)
    if scores.dim() != 4 or scores.shape[0] != batch or tuple(scores.shape[1:]) != grid:
        raise ValueError(
            f"attention must be (B, d, h, w) or (B, heads, d, h, w) with B={batch} and grid {grid}; "
            f"got shape {tuple(attention.shape)}"
        )
    return scores.reshape(batch, -1).to(device)


def _block_mask_one(grid: tuple[int, int, int], k: int, generator: torch.Generator | None) -> Tensor:
    """One ``(d, h, w)`` bool mask (on the generator's device) of exactly ``k`` cells made of 3-D blocks.

    Boxes of random volume and aspect are placed at random; a box that would overshoot keeps a
    random subset of its new cells; cells still missing after ``_BLOCK_MAX_TRIES`` placements
    are chosen at random among the unmasked ones.
    """
    d, h, w = grid
    device = generator.device if generator is not None else torch.device("cpu")
    mask = torch.zeros(grid, dtype=torch.bool, device=device)
    count = 0
    log_aspect = math.log(_BLOCK_MAX_ASPECT)
    for _ in range(_BLOCK_MAX_TRIES):
        remaining = k - count
        if remaining == 0:
            break
        u = torch.rand(6, generator=generator, device=device).tolist()
        low = min(_BLOCK_MIN_CELLS, remaining)
        side = (low + u[0] * (remaining - low)) ** (1.0 / 3.0)
        a1 = math.exp((2.0 * u[1] - 1.0) * log_aspect)
        a2 = math.exp((2.0 * u[2] - 1.0) * log_aspect)
        bd = min(max(round(side * a1), 1), d)
        bh = min(max(round(side * a2), 1), h)
        bw = min(max(round(side / (a1 * a2)), 1), w)
        z0, y0, x0 = int(u[3] * (d - bd + 1)), int(u[4] * (h - bh + 1)), int(u[5] * (w - bw + 1))
        block = torch.zeros_like(mask)
        block[z0 : z0 + bd, y0 : y0 + bh, x0 : x0 + bw] = True
        new = block & ~mask
        n_new = int(new.sum())
        if n_new > remaining:
            new = _random_subset(new.reshape(1, -1), remaining, generator).reshape(grid)
            n_new = remaining
        mask |= new
        count += n_new
    if count < k:
        fill = _random_subset((~mask).reshape(1, -1), k - count, generator).reshape(grid)
        mask |= fill
    return mask


def generate_mask(
    strategy: MaskingStrategy,
    grid: tuple[int, int, int],
    batch: int,
    ratio: float = 0.6,
    hint_ratio: float = 0.1,
    attention: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Generate one mask per sample on a ``(d, h, w)`` cell grid.

    With ``N = d*h*w`` and ``k = count_for_ratio(ratio, N)``, the number of masked cells per
    sample is exactly:

    - ``random``: ``k`` cells uniformly at random;
    - ``block``: ``k`` cells made of random 3-D boxes (BEiT / SimMIM-style block masking);
    - ``attention_high``: the ``k`` cells of highest attention (AttMask "high");
    - ``attention_low``: the ``k`` cells of lowest attention (ablation);
    - ``attention_hint``: the ``k`` cells of highest attention, of which
      ``r = count_for_ratio(hint_ratio, k)`` chosen uniformly at random are revealed again, so
      ``k - r`` cells are masked, all among the top ``k`` (AttMask "hints").

    Ties in the attention are broken by ``torch.topk``.

    Args:
        strategy: one of ``MASKING_STRATEGIES``.
        grid: cell grid ``(d, h, w)``.
        batch: number of samples ``B``.
        ratio: fraction of cells to mask (``r``).
        hint_ratio: fraction of the top-``k`` cells revealed again (``attention_hint`` only).
        attention: ``(B, d, h, w)`` or ``(B, heads, d, h, w)`` teacher attention (averaged over
            heads); required by the attention strategies, ignored by the others.
        generator: random generator for reproducibility (its device is used for drawing).
        device: device of the returned mask; defaults to the attention's device, else CPU.

    Returns:
        Bool tensor ``(B, d, h, w)``, True = masked.
    """
    if strategy not in MASKING_STRATEGIES:
        raise ValueError(f"unknown masking strategy {strategy!r}; choose one of {MASKING_STRATEGIES}")
    grid = _check_grid(grid)
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    _check_ratio("ratio", ratio)
    _check_ratio("hint_ratio", hint_ratio)
    if device is None:
        device = attention.device if attention is not None else torch.device("cpu")
    device = torch.device(device)
    n = grid[0] * grid[1] * grid[2]
    k = count_for_ratio(ratio, n)

    if strategy == "random":
        mask = _random_subset(torch.ones(batch, n, dtype=torch.bool, device=device), k, generator)
    elif strategy == "block":
        mask = torch.stack([_block_mask_one(grid, k, generator).reshape(-1) for _ in range(batch)]).to(device)
    else:
        if attention is None:
            raise ValueError(f"masking strategy {strategy!r} needs the teacher attention map; got None")
        scores = _attention_scores(attention, batch, grid, device)
        top = scores.topk(k, dim=1, largest=strategy != "attention_low").indices  # (B, k)
        if strategy == "attention_hint":
            n_reveal = count_for_ratio(hint_ratio, k)
            keep = scores.new_ones(batch, k, dtype=torch.bool)
            keep &= ~_random_subset(keep, n_reveal, generator)
            top = top[keep].reshape(batch, k - n_reveal)
        mask = _scatter_mask(top, n)
    return mask.reshape(batch, *grid)


@dataclass(frozen=True)
class MaskGenerator:
    """Masking policy with a random warm-up (AttMask's ``pred_start_epoch``, in steps).

    Before ``warmup_steps`` the teacher's attention is meaningless, so ``random`` masking is
    used; from then on ``strategy``. Call once per view (views get independent masks).

    Attributes:
        strategy: strategy used after the warm-up.
        ratio: masking ratio ``r``.
        hint_ratio: revealed fraction ``h`` for ``attention_hint``.
        warmup_steps: number of initial steps that use ``random``.
    """

    strategy: MaskingStrategy = "attention_hint"
    ratio: float = 0.6
    hint_ratio: float = 0.1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in MASKING_STRATEGIES:
            raise ValueError(f"unknown masking strategy {self.strategy!r}; choose one of {MASKING_STRATEGIES}")
        _check_ratio("ratio", self.ratio)
        _check_ratio("hint_ratio", self.hint_ratio)
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def strategy_at(self, step: int) -> MaskingStrategy:
        """The strategy in force at ``step``: ``random`` during the warm-up, else ``strategy``."""
        return "random" if step < self.warmup_steps else self.strategy

    def needs_attention(self, step: int) -> bool:
        """Whether the mask at ``step`` depends on the teacher attention."""
        return self.strategy_at(step) in ATTENTION_STRATEGIES

    def __call__(
        self,
        step: int,
        grid: tuple[int, int, int],
        batch: int,
        attention: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Mask ``(B, d, h, w)`` bool for one view at ``step`` (see :func:`generate_mask`)."""
        return generate_mask(
            self.strategy_at(step),
            grid,
            batch,
            ratio=self.ratio,
            hint_ratio=self.hint_ratio,
            attention=attention,
            generator=generator,
            device=device,
        )
