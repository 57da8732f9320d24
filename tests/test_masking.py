"""Mask generation: exact counts, attention ordering, hints, blocks, reproducibility, warm-up."""

from __future__ import annotations

import pytest
import torch

from smartformer.data.masking import (
    MASKING_STRATEGIES,
    MaskGenerator,
    MaskingStrategy,
    count_for_ratio,
    generate_mask,
)

GRIDS = [(4, 4, 4), (6, 6, 6), (2, 3, 5)]
RATIOS = [0.0, 0.25, 0.6, 0.75, 1.0]


def _ranked_attention(batch: int, grid: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """(B, d, h, w) attention whose cell values are a random permutation of 0..N-1 per sample."""
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    return torch.stack([torch.randperm(n, generator=gen).float() for _ in range(batch)]).reshape(batch, *grid)


def test_count_for_ratio_rounds_half_up() -> None:
    assert count_for_ratio(0.6, 64) == 38
    assert count_for_ratio(0.6, 216) == 130
    assert count_for_ratio(0.5, 5) == 3
    assert count_for_ratio(0.1, 38) == 4
    assert count_for_ratio(1.0, 30) == 30


@pytest.mark.parametrize("strategy", MASKING_STRATEGIES)
def test_every_strategy_masks_the_exact_count(strategy: MaskingStrategy) -> None:
    gen = torch.Generator().manual_seed(0)
    for grid in GRIDS:
        n = grid[0] * grid[1] * grid[2]
        for ratio in RATIOS:
            mask = generate_mask(
                strategy, grid, 3, ratio=ratio, hint_ratio=0.1, attention=_ranked_attention(3, grid), generator=gen
            )
            assert mask.shape == (3, *grid) and mask.dtype == torch.bool
            k = count_for_ratio(ratio, n)
            want = k - count_for_ratio(0.1, k) if strategy == "attention_hint" else k
            assert mask.sum(dim=(1, 2, 3)).tolist() == [want] * 3, (grid, ratio)


def test_hand_counts_for_the_default_grids() -> None:
    att = _ranked_attention(2, (6, 6, 6))
    assert generate_mask("random", (4, 4, 4), 2).sum().item() == 2 * 38
    assert generate_mask("block", (6, 6, 6), 2).sum().item() == 2 * 130
    # attention_hint at r=0.6, h=0.1 on 6^3: top 130, reveal 13 -> 117 masked.
    assert generate_mask("attention_hint", (6, 6, 6), 2, attention=att).sum().item() == 2 * 117


def test_attention_high_and_low_pick_the_top_and_bottom_cells() -> None:
    grid = (4, 4, 4)
    att = _ranked_attention(2, grid, seed=5)  # values 0..63, all distinct
    high = generate_mask("attention_high", grid, 2, ratio=0.25, attention=att)
    low = generate_mask("attention_low", grid, 2, ratio=0.25, attention=att)
    assert torch.equal(high, att >= 64 - 16)
    assert torch.equal(low, att < 16)


def test_attention_is_averaged_over_heads() -> None:
    grid = (2, 3, 5)
    att = _ranked_attention(2, grid, seed=6)
    noise = 20.0 * torch.randn(2, *grid, generator=torch.Generator().manual_seed(7))
    per_head = torch.stack([att + noise, att - noise], dim=1)  # each head (and their max) is scrambled
    torch.testing.assert_close(per_head.mean(dim=1), att)
    mask = generate_mask("attention_high", grid, 2, ratio=0.4, attention=per_head)
    assert torch.equal(mask, att >= 30 - 12)


def test_attention_hint_reveals_a_random_subset_of_the_top_cells() -> None:
    grid = (6, 6, 6)
    att = _ranked_attention(2, grid, seed=8)
    top = att >= 216 - 130
    masks = [
        generate_mask(
            "attention_hint",
            grid,
            2,
            ratio=0.6,
            hint_ratio=0.1,
            attention=att,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in (0, 1)
    ]
    for mask in masks:
        assert not (mask & ~top).any()  # masked cells are all among the top 130
        assert mask.sum(dim=(1, 2, 3)).tolist() == [117, 117]
    assert not torch.equal(masks[0], masks[1])  # the revealed hints are random


def test_generator_reproducibility_and_independent_samples() -> None:
    grid = (6, 6, 6)
    att = _ranked_attention(4, grid)
    for strategy in ("random", "block", "attention_hint"):
        a, b, c = (
            generate_mask(strategy, grid, 4, attention=att, generator=torch.Generator().manual_seed(s))
            for s in (11, 11, 12)
        )
        assert torch.equal(a, b), strategy
        assert not torch.equal(a, c), strategy
    rnd = generate_mask("random", grid, 4, generator=torch.Generator().manual_seed(13))
    assert len({tuple(m.flatten().tolist()) for m in rnd}) == 4


def _adjacent_masked_pairs(mask: torch.Tensor) -> float:
    """Mean number of masked-masked face-adjacent cell pairs per sample."""
    pairs = (mask[:, 1:] & mask[:, :-1]).sum() + (mask[:, :, 1:] & mask[:, :, :-1]).sum()
    pairs += (mask[:, :, :, 1:] & mask[:, :, :, :-1]).sum()
    return pairs.item() / mask.shape[0]


def test_block_masks_are_more_contiguous_than_random() -> None:
    grid = (6, 6, 6)
    block = generate_mask("block", grid, 16, ratio=0.3, generator=torch.Generator().manual_seed(14))
    rnd = generate_mask("random", grid, 16, ratio=0.3, generator=torch.Generator().manual_seed(14))
    assert _adjacent_masked_pairs(block) > 1.5 * _adjacent_masked_pairs(rnd)


def test_invalid_requests_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="needs the teacher attention"):
        generate_mask("attention_hint", (4, 4, 4), 2)
    with pytest.raises(ValueError, match="attention must be"):
        generate_mask("attention_high", (4, 4, 4), 2, attention=torch.rand(2, 6, 6, 6))
    with pytest.raises(ValueError, match="unknown masking strategy"):
        generate_mask("checkerboard", (4, 4, 4), 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ratio"):
        generate_mask("random", (4, 4, 4), 2, ratio=1.5)


def test_mask_generator_uses_random_during_warmup() -> None:
    grid = (4, 4, 4)
    att = _ranked_attention(2, grid, seed=9)
    gen = MaskGenerator(strategy="attention_high", ratio=0.25, warmup_steps=5)
    assert [gen.strategy_at(s) for s in (0, 4, 5, 100)] == ["random", "random", "attention_high", "attention_high"]
    assert not gen.needs_attention(4) and gen.needs_attention(5)
    warm = gen(4, grid, 2, generator=torch.Generator().manual_seed(0))  # no attention needed yet
    assert torch.equal(warm, generate_mask("random", grid, 2, ratio=0.25, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="needs the teacher attention"):
        gen(5, grid, 2)
    assert torch.equal(gen(5, grid, 2, attention=att), att >= 64 - 16)
    with pytest.raises(ValueError, match="warmup_steps"):
        MaskGenerator(warmup_steps=-1)
