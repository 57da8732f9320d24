"""Weights in and out: save/load round trip, MONAI export, foreign checkpoints, pickle refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR

from smartformer.cli import main
from smartformer.errors import SmartformerError
from smartformer.models.convert import checkpoint_filter_fn, load_weights, to_monai_state_dict
from smartformer.models.smartformer import SMARTFormer
from smartformer.models.swin3d import Swin3D


def tiny_unetr() -> SwinUNETR:
    return SwinUNETR(
        in_channels=1, out_channels=3, feature_size=24, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=4
    )


def test_save_and_load_pretrained_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SMARTFormer.from_preset("tiny").eval()
    model.save_pretrained(tmp_path / "enc", include_heads=True)
    loaded = SMARTFormer.from_pretrained(tmp_path / "enc").eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.rand(1, 1, 64, 64, 64)
    assert torch.equal(model.attention_maps(x), loaded.attention_maps(x))


def test_encoder_only_save_drops_heads(tmp_path: Path) -> None:
    model = SMARTFormer.from_preset("tiny")
    model.save_pretrained(tmp_path)
    loaded = SMARTFormer.from_pretrained(tmp_path)
    assert loaded.cls_head is None and loaded.decoder is None
    with pytest.raises(SmartformerError, match="without projection heads"):
        loaded.forward_head({"cls": torch.zeros(1, 192), "tokens": torch.zeros(1, 1, 192)})


def test_from_pretrained_reports_missing_or_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(SmartformerError, match="not found"):
        SMARTFormer.from_pretrained(tmp_path)
    SMARTFormer.from_preset("tiny").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SmartformerError, match="unreadable safetensors"):
        SMARTFormer.from_pretrained(tmp_path)


def test_export_loads_into_swinunetr_strictly_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = Swin3D.from_preset("tiny").eval()
    exported = to_monai_state_dict(ours.state_dict())
    net = tiny_unetr().eval()
    net.swinViT.load_state_dict({k[len("swinViT.") :]: v for k, v in exported.items()}, strict=True)
    missing, unexpected = net.load_state_dict(exported, strict=False)
    assert unexpected == [] and not [k for k in missing if k.startswith("swinViT.")]
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        for a, b in zip(net.swinViT(x), ours.forward_stages(x)):
            assert (a - b).abs().max() <= 1e-4
    # and back: the SwinUNETR state dict loads into Swin3D unchanged
    back = Swin3D.from_preset("tiny")
    back.load_state_dict(checkpoint_filter_fn(net.state_dict(), keep_mask_token=False), strict=False)
    for k, v in checkpoint_filter_fn(net.state_dict()).items():
        assert torch.equal(back.state_dict()[k], v)


def test_filter_maps_wrapped_and_legacy_names() -> None:
    ours = Swin3D.from_preset("tiny")
    legacy = {
        "module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
        for k, v in ours.state_dict().items()
    }
    legacy["module.head.weight"] = torch.zeros(2)
    mapped = checkpoint_filter_fn({"state_dict": legacy})
    assert set(mapped) == set(ours.state_dict())
    with pytest.raises(SmartformerError, match="no backbone weights"):
        checkpoint_filter_fn({"foo": torch.zeros(1)})


class Payload:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("pwned",))


def test_pickle_bearing_checkpoint_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Payload()}, bad)
    with pytest.raises(SmartformerError, match="refusing to load"):
        load_weights(bad)
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "o.pt")]) == 2
    assert not (tmp_path / "o.pt").exists()


def test_export_cli_from_pretrained_dir(tmp_path: Path) -> None:
    SMARTFormer.from_preset("tiny").save_pretrained(tmp_path / "enc")
    out = tmp_path / "swinvit.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smartformer",
            "export",
            "--checkpoint",
            str(tmp_path / "enc"),
            "--to",
            "monai",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    state = torch.load(out, weights_only=True)
    net = tiny_unetr()
    net.swinViT.load_state_dict({k[len("swinViT.") :]: v for k, v in state.items()}, strict=True)
    # safetensors output too
    assert main(["export", "--checkpoint", str(tmp_path / "enc"), "--out", str(tmp_path / "w.safetensors")]) == 0
    assert set(load_weights(tmp_path / "w.safetensors")) == set(state)


def test_export_cli_reports_missing_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.pt" in err[0]
