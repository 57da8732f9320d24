"""``smartformer export --to monai`` says how to use its output: the exact SwinUNETR(...) it needs, printed
and written to NAME.swinunetr.json, and that recipe really loads the weights."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from smartformer.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_printed_and_saved_recipe_loads_the_export(tmp_path: Path, capsys, suffix: str) -> None:
    from monai.networks.nets import SwinUNETR
    from safetensors.torch import load_file

    out = tmp_path / f"swinvit{suffix}"
    assert main(["export", "--checkpoint", "smart-tiny-ct", "--to", "monai", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    code = "\n".join(
        line.strip()
        for line in printed.splitlines()
        if line.strip().startswith(("import ", "from monai", "net = ", "net.load_state_dict"))
    )
    assert "window_size=(4, 4, 4)" in code
    scope: dict = {"N_CLASSES": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exec(code, scope)  # noqa: S102 - the user's own next step, run as printed
    result = scope["net"].state_dict()
    exported = torch.load(out, weights_only=True) if suffix == ".pt" else load_file(out)
    for key, value in exported.items():
        torch.testing.assert_close(result[key], value)

    recipe = json.loads((tmp_path / "swinvit.swinunetr.json").read_text())
    assert recipe["kwargs"]["window_size"] == [4, 4, 4] and recipe["weights"] == out.name
    net = SwinUNETR(**recipe["kwargs"], out_channels=3)
    assert not [k for k in net.load_state_dict(exported, strict=False).missing_keys if k.startswith("swinViT.")]
    with pytest.raises(RuntimeError, match="relative_position_bias_table"):  # why the recipe is needed
        SwinUNETR(in_channels=1, out_channels=3, feature_size=24).load_state_dict(exported, strict=False)
