"""The demo's attention step: every model's tumour figures printed beside a centre prior and random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smartformer.analysis.zero_shot import CENTRE, attention_with_baselines
from smartformer.commands.demo import localization_lines
from smartformer.config import load_config
from smartformer.data.phantom import write_phantoms
from smartformer.models.smartformer import SMARTFormer

pytestmark = pytest.mark.usefixtures("one_thread")
#: The same network with random weights, named as ``random:tiny`` is in every command.
RANDOM = "random_tiny"


def test_models_are_scored_next_to_both_baselines(tmp_path: Path) -> None:
    (case,) = write_phantoms(
        tmp_path / "ph", n=1, seed=3, shape=(48, 48, 40), spacing=(5.0, 5.0, 5.0), n_lesions=1, progress=False
    )
    config = load_config("tiny", ["data.spacing=5", "data.roi=32"])
    torch.manual_seed(1)
    models = {"trained": (SMARTFormer.from_preset("tiny").eval(), "a model")}
    entries = attention_with_baselines(case, models, config, tmp_path / "att")
    assert list(entries) == ["trained", RANDOM, CENTRE]
    for entry in entries.values():
        assert 0.0 <= entry["auroc"] <= 1.0 and entry["tumour_enrichment"] > 0 and entry["body_mean"] > 0
    assert Path(entries["trained"]["png"]).is_file() and "png" not in entries[RANDOM]
    table = "\n".join(localization_lines(entries))
    assert "chance: AUROC 0.5, enrichment 1.0" in table and "(random_tiny, centre_prior)" in table
    for name in ("trained", RANDOM, CENTRE):
        row = next(line for line in table.splitlines() if line.strip().startswith(name))
        assert f"{entries[name]['tumour_enrichment']:.3f}" in row and f"{entries[name]['auroc']:.3f}" in row
