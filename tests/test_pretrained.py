"""The pretrained model shipped in the package: loads by its short name, small, documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smartformer.cli import main
from smartformer.models.hub import resolve_checkpoint
from smartformer.models.smartformer import PRETRAINED, WEIGHTS_NAME, SMARTFormer, pretrained_path


def test_shipped_model_loads_by_short_name_and_is_small() -> None:
    (name,) = PRETRAINED
    folder = pretrained_path(name)
    assert folder is not None and (folder / "README.md").is_file()
    assert (folder / WEIGHTS_NAME).stat().st_size < 20 * 2**20
    model = SMARTFormer.from_pretrained(name).eval()
    assert model.semantic is not None and model.config.backbone.embed_dim == 24  # the tiny preset
    # Pretrained weights, not an initialisation: they differ from a fresh model's.
    fresh = SMARTFormer(model.config)
    key = "backbone.layers1.0.blocks.0.attn.qkv.weight"
    assert not torch.equal(model.state_dict()[key], fresh.state_dict()[key])
    card = (folder / "README.md").read_text()
    for must in ("CC BY", "Apache-2.0", "steps", "limit"):
        assert must in card, must
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["heads"] is False and config["model"]["decoder"] is False  # encoder only


def test_path_wins_over_name_and_unknown_names_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (name,) = PRETRAINED
    assert resolve_checkpoint(Path(name)).path == pretrained_path(name)
    SMARTFormer.from_preset("tiny").save_pretrained(tmp_path / name)  # a local folder of that name
    assert resolve_checkpoint(Path(name)).path == Path(name)
    assert pretrained_path("smart-huge-ct") is None
    assert main(["attention", "--checkpoint", "smart-huge-ct", "--image", "x.nii.gz", "--out", "o"]) == 2


def test_shipped_model_exports_to_monai_by_name(tmp_path: Path) -> None:
    from monai.networks.nets import SwinUNETR

    from smartformer.models.convert import load_weights

    (name,) = PRETRAINED
    out = tmp_path / "swinvit.pt"
    assert main(["export", "--checkpoint", name, "--to", "monai", "--out", str(out)]) == 0
    model = SMARTFormer.from_pretrained(name)
    bb = model.config.backbone
    net = SwinUNETR(
        in_channels=1,
        out_channels=2,
        feature_size=bb.embed_dim,
        depths=tuple(bb.depths),
        num_heads=tuple(bb.num_heads),
        window_size=tuple(bb.window_size),
        spatial_dims=3,
    )
    state = {k.removeprefix("swinViT."): v for k, v in load_weights(out).items()}
    net.swinViT.load_state_dict(state, strict=True)
    assert torch.equal(net.swinViT.patch_embed.proj.weight, model.backbone.patch_embed.proj.weight)
