"""The SMART paper's head diversity: entropy of each head's attention distances, per Swin stage."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from smartformer.analysis.head_distance import head_distance_entropy
from smartformer.cli import main
from smartformer.data.phantom import write_phantoms
from smartformer.models.swin3d import Swin3D


def _constant_attention(backbone: Swin3D, self_bias: float) -> Swin3D:
    """q = k = 0; the relative-position bias alone decides: ``self_bias`` on each token itself."""
    with torch.no_grad():
        for stage in backbone.stages:
            for blk in stage.blocks:
                blk.attn.qkv.weight.zero_()
                blk.attn.qkv.bias.zero_()
                table = blk.attn.relative_position_bias_table
                table.zero_()
                centre = int(blk.attn.relative_position_index.diagonal()[0])  # offset (0, 0, 0)
                table[centre] = self_bias
    return backbone.eval()


def test_heads_that_attend_to_themselves_reach_nothing() -> None:
    torch.manual_seed(0)
    out = head_distance_entropy(_constant_attention(Swin3D.from_preset("tiny"), 100.0), torch.rand(1, 1, 64, 64, 64))
    for k in range(1, 5):
        assert out[f"head_distance_s{k}"] == pytest.approx(0.0, abs=1e-6)
        assert out[f"head_distance_entropy_s{k}"] == pytest.approx(0.0, abs=1e-6)
        assert out[f"head_distance_entropy_sd_s{k}"] == pytest.approx(0.0, abs=1e-6)


def test_uniform_attention_gives_the_mean_distance_of_the_window() -> None:
    torch.manual_seed(0)
    out = head_distance_entropy(_constant_attention(Swin3D.from_preset("tiny"), 0.0), torch.rand(1, 1, 64, 64, 64))
    # stage 4 at 64^3: a 4^3 grid, one unshifted 4^3 window, uniform weights, cells 16 voxels apart
    cells = np.array(list(itertools.product(range(4), repeat=3)), dtype=float)
    per_query = np.linalg.norm(cells[:, None] - cells[None], axis=-1).mean(1) * 16
    assert out["head_distance_s4"] == pytest.approx(per_query.mean(), rel=1e-5)
    # every head alike: no spread across heads; the queries' distances are spread over several bins
    assert out["head_distance_entropy_sd_s4"] == pytest.approx(0.0, abs=1e-6)
    counts, _ = np.histogram(per_query, bins=16, range=(0, 16 * math.sqrt(27)))
    p = counts[counts > 0] / counts.sum()
    assert out["head_distance_entropy_s4"] == pytest.approx(float(-(p * np.log(p)).sum() / math.log(16)), abs=1e-5)


def test_pretraining_logs_it_and_report_draws_it(tmp_path) -> None:
    data = tmp_path / "ph"
    write_phantoms(data, n=2, seed=0, shape=(64, 64, 48), spacing=(5.0, 5.0, 5.0), progress=False)
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(data),
                "--out",
                str(run),
                "--max-steps",
                "2",
                "--no-progress",
                "data.num_workers=0",
                "train.head_distance_every=2",
                "train.log_every=1",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "head_distance_entropy_s1" in r]
    assert [r["step"] for r in logged] == [2]
    assert all(0 <= logged[0][f"head_distance_entropy_s{k}"] <= 1 for k in range(1, 5))
    assert main(["report", str(run), "--out", str(tmp_path / "report.html")]) == 0
    # the curves gain a row for it: four panels of the same height as the rows above
    from PIL import Image

    from smartformer.analysis.report import curves_png

    with_row = Image.open(curves_png(rows, tmp_path / "a.png")).size[1]
    without = [{k: v for k, v in r.items() if not k.startswith("head_distance")} for r in rows]
    assert with_row > Image.open(curves_png(without, tmp_path / "b.png")).size[1]
