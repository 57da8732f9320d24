"""``smartformer localize`` end to end on two tiny phantoms, and its input handling."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from smartformer.analysis.zero_shot import CENTRE, INTENSITY
from smartformer.cli import main
from smartformer.data.cases import find_cases, lesion_value
from smartformer.data.phantom import LESION_ID, write_phantoms
from smartformer.models.smartformer import SMARTFormer

FAST = ["--spacing", "5", "--roi", "32", "--overlap", "0.25", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")
#: The random-weights baseline: the first checkpoint's architecture, named as random:tiny is in every command.
RANDOM = "random_tiny"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, n=2, seed=5, shape=(64, 64, 48), spacing=(5.0, 5.0, 5.0), progress=False, n_lesions=1)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Two differently initialised tiny models: one save_pretrained dir, one run dir."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    SMARTFormer.from_preset("tiny").save_pretrained(root / "model_a")
    torch.manual_seed(2)
    SMARTFormer.from_preset("tiny").save_pretrained(root / "run_b" / "teacher")
    return [root / "model_a", root / "run_b"]


def test_two_checkpoints_on_phantom_folder(phantoms, checkpoints, tmp_path, capsys):
    rc = main(
        ["localize", "--checkpoint", *map(str, checkpoints), "--data", str(phantoms), "--out", str(tmp_path), *FAST]
    )
    assert rc == 0
    methods = ["model_a", "run_b", CENTRE, INTENSITY, RANDOM]
    cases = pd.read_csv(tmp_path / "cases.csv")
    assert len(cases) == 2 * len(methods) and set(cases["method"]) == set(methods)
    assert cases["auroc"].between(0, 1).all() and cases["pointing"].isin([0.0, 1.0]).all()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["methods"]) == methods
    assert summary["methods"]["model_a"]["cases"] == 2
    assert summary["methods"][CENTRE]["auroc"]["mean"] == pytest.approx(
        cases.loc[cases["method"] == CENTRE, "auroc"].mean()
    )
    table = (tmp_path / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert (tmp_path / "montage.png").stat().st_size > 2000
    assert "2 cases scored" in capsys.readouterr().out


def test_csv_source_and_random_windows(phantoms, checkpoints, tmp_path):
    """A CSV of image/mask pairs (relative paths) with a lesion label, scored on lesion windows."""
    csv = phantoms / "pairs.csv"
    csv.write_text("image,mask\ncase_000/ct.nii.gz,case_000/labels.nii.gz\n")
    rc = main(
        [
            "localize",
            "--checkpoint",
            str(checkpoints[0]),
            "--data",
            str(csv),
            "--out",
            str(tmp_path),
            "--lesion-label",
            str(LESION_ID),
            "--windows",
            "3",
            "--window-mm",
            "120",
            "--no-random-baseline",
            *FAST,
        ]
    )
    assert rc == 0
    cases = pd.read_csv(tmp_path / "cases.csv")
    assert set(cases["method"]) == {"model_a", CENTRE, INTENSITY}
    assert len(cases) == 3


def test_find_cases_layouts(phantoms, tmp_path):
    found = find_cases(phantoms)
    assert [c.case for c in found] == ["case_000", "case_001"]
    assert all(lesion_value(c) == LESION_ID and c.mask.name == "labels.nii.gz" for c in found)
    sts = tmp_path / "STS_001"
    sts.mkdir()
    (sts / "ct.nii.gz").write_bytes(b"")
    (sts / "tumor.nii.gz").write_bytes(b"")
    (case,) = find_cases(tmp_path)
    assert case.mask.name == "tumor.nii.gz" and lesion_value(case) is None


@pytest.mark.parametrize("case", ["missing_data", "no_cases", "csv_columns", "bad_checkpoint"])
def test_bad_input_is_one_line_and_exit_2(case, phantoms, checkpoints, tmp_path, capsys):
    data, ckpt = phantoms, checkpoints[0]
    if case == "missing_data":
        data = tmp_path / "nope"
    elif case == "no_cases":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "csv_columns":
        data = tmp_path / "x.csv"
        data.write_text("image,label\na.nii.gz,b.nii.gz\n")
    else:
        ckpt = tmp_path
    rc = main(["localize", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("smartformer: error:")
