"""Pretraining on the real soft-tissue-sarcoma CTs of ../shared/data (skipped where absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smartformer.cli import main

STS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sts"

pytestmark = pytest.mark.skipif(not STS.is_dir(), reason=f"real CT data not found at {STS}")


@pytest.mark.slow
def test_twenty_steps_on_sts_lower_the_reconstruction_loss(tmp_path: Path) -> None:
    run = tmp_path / "sts"
    rc = main(
        [
            "pretrain",
            "--data",
            str(STS),
            "--out",
            str(run),
            "--max-steps",
            "20",
            "--no-progress",
            "data.roi=[32,32,32]",
            "data.num_workers=0",
            "train.log_every=1",
            "train.snapshot_every=1000",
            "optim.warmup_steps=2",
            "masking.warmup_steps=5",
            "loss.warmup_teacher_temp_steps=5",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recon = [r["loss_recon"] for r in rows if "loss_recon" in r]
    assert len(recon) == 20
    first, last = sum(recon[:4]) / 4, sum(recon[-4:]) / 4
    assert last < 0.8 * first, recon
