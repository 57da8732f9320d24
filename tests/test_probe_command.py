"""``smartformer probe`` end to end on phantom lesion vs air crops, and its refusal of bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from downstream_cases import FAST, case_csv, run_downstream, tiny_checkpoint  # noqa: F401  (fixtures)

from smartformer.cli import main
from smartformer.downstream.metrics import METRICS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def probe_run(case_csv, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    options = ["--folds", "3", "--fraction", "0.5", "1.0", "--bootstrap", "50"]
    assert run_downstream("probe", case_csv, [tiny_checkpoint, "random:tiny"], out, *options) == 0
    return out


def test_outputs(probe_run, tiny_checkpoint):
    out, name = probe_run, tiny_checkpoint.name
    for file in ("folds.csv", "predictions.csv", "metrics.json", "roc.png", "comparison.csv", "comparison.md"):
        assert (out / file).is_file(), file
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["case", "patient", "fold", "fraction", "checkpoint", "label", "probability"]
    assert len(predictions) == 24 * 2 * 2  # every case once per checkpoint and fraction: the test fold is whole
    assert predictions.groupby(["checkpoint", "fraction"])["case"].nunique().eq(24).all()
    assert predictions["probability"].between(0, 1).all()
    folds = pd.read_csv(out / "folds.csv").set_index("case")
    assert folds.groupby("patient")["fold"].nunique().eq(1).all()  # patient-level
    assert (
        predictions["fold"].to_numpy() == folds.loc[predictions["case"], "fold"].to_numpy()
    ).all()  # same folds for every checkpoint and fraction
    comparison = pd.read_csv(out / "comparison.csv")
    assert list(comparison["checkpoint"]) == [name, name, "random_tiny", "random_tiny"]
    assert list(comparison["fraction"]) == [0.5, 1.0, 0.5, 1.0]
    paired = comparison["auc_vs_baseline"].to_numpy()  # paired AUC difference against random:tiny
    assert np.isfinite(paired[:2]).all() and np.isnan(paired[2:]).all()
    assert "| auc_vs_baseline |" in (out / "comparison.md").read_text()
    assert (out / "roc.png").stat().st_size > 5000


def test_metrics_json_and_easy_task(probe_run, tiny_checkpoint):
    report = json.loads((probe_run / "metrics.json").read_text())
    assert report["classes"] == {"air": 0, "lesion": 1}
    assert report["cases"] == 24 and report["patients"] == 6 and report["folds"] == 3
    assert report["baseline"] == "random_tiny"
    delta = report["results"][tiny_checkpoint.name]["1"]["auc_vs_baseline"]
    assert delta["ci_low"] <= delta["value"] <= delta["ci_high"]
    for name in (tiny_checkpoint.name, "random_tiny"):
        for fraction in ("0.5", "1"):
            entry = report["results"][name][fraction]
            assert set(entry["overall"]) == set(METRICS) and len(entry["per_fold"]) == 3
            auc = entry["overall"]["auc"]
            assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
            assert auc["value"] > 0.9  # lesion vs air is easy even for random weights
    half = report["results"][tiny_checkpoint.name]["0.5"]["per_fold"]
    full = report["results"][tiny_checkpoint.name]["1"]["per_fold"]
    assert all(h["n_train"] < f["n_train"] for h, f in zip(half, full))  # the fraction shrinks training only
    assert all(f["C"] == 1.0 for f in full)  # too few patients per class for inner CV


def test_fixed_C_and_cls_features(case_csv, tmp_path):
    options = ["--folds", "2", "--C", "0.5", "--features", "cls", "--bootstrap", "0"]
    assert run_downstream("probe", case_csv, "random:tiny", tmp_path, *options) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["features"] == "cls" and report["settings"]["C"] == 0.5
    assert all(f["C"] == 0.5 for f in report["results"]["random_tiny"]["1"]["per_fold"])
    assert np.isnan(report["results"]["random_tiny"]["1"]["overall"]["auc"]["ci_low"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.drop(columns=["label"]), "missing column(s) label"),
        (
            lambda t: t.assign(image=["missing.nii.gz"] + list(t["image"][1:])),
            "row 2: image missing.nii.gz does not exist",
        ),
        (lambda t: t.assign(label=["air", "lesion", "other"] * 8), "exactly two classes, found 3"),
        (lambda t: t.assign(center_x=["left"] + list(t["center_x"][1:])), "row 2: center_x/y/z must be three numbers"),
    ],
)
def test_bad_input_writes_nothing(case_csv, tmp_path, capsys, edit, message):
    bad = case_csv.parent / f"bad_{abs(hash(message))}.csv"
    edit(pd.read_csv(case_csv, dtype=str)).to_csv(bad, index=False)
    out = tmp_path / "out"
    assert run_downstream("probe", bad, "random:tiny", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and message in err[0], err
    assert not out.exists()


def test_bad_options(case_csv, tmp_path, capsys):
    base = ["probe", "--data", str(case_csv), "--out", str(tmp_path / "o"), *FAST]
    assert main([*base, "--checkpoint", "random:huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--checkpoint", "random:tiny", "--folds", "7"]) == 2
    assert "at least 7 patients with class 0; there are 6" in capsys.readouterr().err
    assert main([*base, "--checkpoint", "random:tiny", "--crop", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_scan_level_labels_use_whole_scans(case_csv, tmp_path):
    """Treatment response: a label per scan and no location -> whole-scan crops, same outputs."""
    scans = sorted(case_csv.parent.glob("case_*/ct.nii.gz"))
    csv = tmp_path / "response.csv"
    csv.write_text(
        "image,label\n" + "".join(f"{p},{'responder' if i % 2 else 'progressor'}\n" for i, p in enumerate(scans))
    )
    assert run_downstream("probe", csv, "random:tiny", tmp_path / "out", "--folds", "2", "--bootstrap", "20") == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["located_cases"] == 0 and report["cases"] == len(scans) == 6
    assert report["classes"] == {"progressor": 0, "responder": 1}
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(predictions["case"]) != [] and predictions["case"].str.endswith("/ct").all()


def test_holdout_test_set_beside_the_cv(case_csv, tmp_path, capsys):
    # the SMART paper's LIDC protocol: 3-fold CV on the rest, every fold's model predicts a held-out set
    options = ["--folds", "2", "--holdout", "0.34", "--fraction", "0.5", "1.0", "--bootstrap", "0"]
    assert run_downstream("probe", case_csv, "random:tiny", tmp_path, *options) == 0
    folds = pd.read_csv(tmp_path / "folds.csv")
    held = folds[folds["fold"] == -1]
    assert held["patient"].nunique() == 2 and set(held["label"]) == {0, 1}  # round(0.34 * 6) patients
    assert not set(held["patient"]) & set(folds.loc[folds["fold"] >= 0, "patient"])
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    cv, test = predictions[predictions["set"] == "cv"], predictions[predictions["set"] == "holdout"]
    assert not set(cv["case"]) & set(held["case"])
    # each fold's model at each fraction predicts every held-out case once
    assert len(test) == len(held) * 2 * 2 and set(test["case"]) == set(held["case"])
    report = json.loads((tmp_path / "metrics.json").read_text())
    entry = report["results"]["random_tiny"]["1"]
    assert report["holdout_cases"] == len(held) and entry["n"] == len(folds) - len(held)
    assert entry["holdout"]["n"] == len(held) and len(entry["holdout"]["per_fold"]) == 2
    mean = test[test["fraction"] == 1.0].groupby("case")["probability"].mean()
    from smartformer.downstream.metrics import binary_metrics

    labels = held.set_index("case").loc[mean.index, "label"].to_numpy()
    assert entry["holdout"]["overall"]["auc"]["value"] == pytest.approx(binary_metrics(labels, mean.to_numpy())["auc"])
    assert "held-out test set, random_tiny @ 1:" in capsys.readouterr().out
    assert run_downstream("probe", case_csv, "random:tiny", tmp_path / "x", "--holdout", "1.5") == 2
