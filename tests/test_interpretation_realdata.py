"""Interpretation commands on the real CTs in ../shared/data (skipped when that folder is absent).

A randomly initialised tiny model at 4 mm keeps each run to a few seconds on 2 busy cores: these
tests check that real inputs (anisotropic, LPS, DICOM, lesion-centred crops) go through
end to end with well-formed outputs, not the quality of the features.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from smartformer.cli import main
from smartformer.data.io import read_ct
from smartformer.models.smartformer import SMARTFormer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ORGANS = DATA / "organs"
STS_CASES = sorted((DATA / "sts").glob("STS_*"))[:3] if DATA.is_dir() else []
FAST = ["--spacing", "4", "--roi", "64", "--no-progress"]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real CT data not found at {DATA}"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return SMARTFormer.from_preset("tiny").save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("image", ["ts_example/ct.nii.gz", "ts_dicom_example/dicom"], ids=["nifti", "dicom"])
def test_organ_ct_clusters(image, model_dir, tmp_path):
    ct_path = ORGANS / image
    labels = ORGANS / Path(image).parts[0] / "organs.nii.gz"
    rc = main(
        [
            "cluster",
            "--checkpoint",
            str(model_dir),
            "--image",
            str(ct_path),
            "--labels",
            str(labels),
            "--names",
            str(ORGANS / "labels.json"),
            "--out",
            str(tmp_path),
            "--tsne-points",
            "300",
            *FAST,
        ]
    )
    assert rc == 0
    report = json.loads(next(tmp_path.glob("*_clustering.json")).read_text())
    assert report["k"] >= 2 and report["tokens"] >= report["k"]
    assert np.isfinite([report["nmi"], report["ari"], report["purity"]]).all()
    assert "liver" in report["tokens_per_label"]
    clusters = nib.load(str(next(tmp_path.glob("*_clusters.nii.gz"))))
    ct = read_ct(ct_path)
    assert clusters.shape == tuple(ct.shape[1:])
    np.testing.assert_allclose(clusters.affine, np.asarray(ct.affine), atol=1e-3)


@pytest.mark.skipif(len(STS_CASES) < 2, reason="fewer than 2 STS cases found")
def test_sts_cases_localize(model_dir, tmp_path):
    csv = tmp_path / "sts.csv"
    csv.write_text(
        "case,image,mask\n" + "".join(f"{c.name},{c / 'ct.nii.gz'},{c / 'tumor.nii.gz'}\n" for c in STS_CASES)
    )
    rc = main(
        [
            "localize",
            "--checkpoint",
            str(model_dir),
            "--data",
            str(csv),
            "--out",
            str(tmp_path / "out"),
            "--windows",
            "2",
            "--window-mm",
            "80",
            *FAST,
        ]
    )
    assert rc == 0
    cases = pd.read_csv(tmp_path / "out" / "cases.csv")
    assert sorted(set(cases["case"])) == [c.name for c in STS_CASES]
    assert cases["auroc"].notna().all() and cases["auroc"].between(0, 1).all()
    assert (tmp_path / "out" / "montage.png").is_file()
