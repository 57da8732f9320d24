"""``smartformer report``: one HTML page from a run directory with training curves and interpretation results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from smartformer.analysis.overlay import save_overlay_png
from smartformer.cli import main
from smartformer.data.phantom import LESION_ID, write_phantoms
from smartformer.models.smartformer import SMARTFormer


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fake_run(run_dir: Path) -> None:
    """metrics.jsonl (with a half-written last line), 10 snapshots, config.yaml and teacher/."""
    lines = [
        json.dumps({"step": s, "loss": 2.0 / s, "loss_recon": 1.0 / s, "lr": 1e-4 * s, "momentum": 0.996})
        for s in range(1, 21)
    ]
    (run_dir / "metrics.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "lo')
    (run_dir / "config.yaml").write_text("preset: tiny\n")
    rng = np.random.default_rng(0)
    for step in range(0, 100, 10):
        save_overlay_png(
            rng.random((16, 16, 8)), rng.random((16, 16, 8)), run_dir / "snapshots" / f"attention_step{step:07d}.png"
        )
    torch.manual_seed(0)
    SMARTFormer.from_preset("tiny").save_pretrained(run_dir / "teacher")


def test_report_gathers_everything(tmp_path):
    run_dir = tmp_path / "run"
    _fake_run(run_dir)
    phantoms = tmp_path / "phantoms"
    (case,) = write_phantoms(
        phantoms, n=1, seed=2, shape=(64, 64, 48), spacing=(5.0, 5.0, 5.0), progress=False, n_lesions=1
    )
    fast = ["--spacing", "5", "--roi", "32"]
    assert (
        main(
            [
                "attention",
                "--checkpoint",
                str(run_dir),
                "--image",
                str(case / "ct.nii.gz"),
                "--out",
                str(run_dir / "attention"),
                "--mask",
                str(case / "labels.nii.gz"),
                "--mask-label",
                str(LESION_ID),
                *fast,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "localize",
                "--checkpoint",
                str(run_dir),
                "--data",
                str(phantoms),
                "--out",
                str(run_dir / "localize"),
                "--no-random-baseline",
                "--no-progress",
                *fast,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "cluster",
                "--checkpoint",
                str(run_dir),
                "--image",
                str(case / "ct.nii.gz"),
                "--labels",
                str(case / "labels.nii.gz"),
                "--out",
                str(run_dir / "cluster"),
                "--no-progress",
                *fast,
            ]
        )
        == 0
    )

    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "20 logged steps, last step 20" in page  # the half-written line is skipped
    assert "preset: tiny" in page
    assert page.count("attention_step") == 8  # evenly spaced subset of the 10 snapshots
    assert "attention_step0000000" in page and "attention_step0000090" in page
    assert "centre_prior" in page and "intensity_prior" in page and "<td>run</td>" in page
    assert "NMI" in page and "t-SNE" in page
    assert "attention/ct.png" in page
    # curves, 8 snapshots, attention PNG, montage, t-SNE: all embedded
    assert page.count("data:image/png;base64,") == 12


def test_report_refuses_an_empty_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no metrics.jsonl" in err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_report_takes_results_from_elsewhere_and_states_the_effective_lr(tmp_path):
    """``--results DIR`` finds a localize output outside the run; small lr values keep their digits."""
    from smartformer.config import load_config
    from smartformer.train.schedules import annotate_effective_lr

    run_dir = tmp_path / "run"
    _fake_run(run_dir)
    with (run_dir / "metrics.jsonl").open("a") as fh:  # after the half-written line, as a resumed run would
        fh.write("\n" + json.dumps({"step": 22, "loss": 0.1, "loss_patch": 0.002, "lr": 0.0005}) + "\n")
    config = load_config("tiny")
    (run_dir / "config.yaml").write_text(annotate_effective_lr(config.to_yaml(), config))
    phantoms = tmp_path / "phantoms"
    write_phantoms(phantoms, n=1, seed=2, shape=(64, 64, 48), spacing=(5.0, 5.0, 5.0), progress=False, n_lesions=1)
    assert (
        main(
            [
                "localize",
                "--checkpoint",
                str(run_dir),
                "--data",
                str(phantoms),
                "--out",
                str(tmp_path / "loc"),
                "--no-random-baseline",
                "--no-progress",
                "--spacing",
                "5",
                "--roi",
                "32",
            ]
        )
        == 0
    )

    assert main(["report", str(run_dir)]) == 0
    assert "Localization" not in (run_dir / "report.html").read_text(encoding="utf-8")
    assert main(["report", str(run_dir), "--results", str(tmp_path / "loc")]) == 0
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<h3>Localization: " in page and "centre_prior" in page
    assert "<td>lr</td><td>0.0005</td>" in page
    assert "effective peak lr 0.0005" in page
    assert main(["report", str(run_dir), "--results", str(tmp_path / "missing")]) == 2


def test_curves_add_a_row_of_collapse_monitors_when_logged(tmp_path):
    from matplotlib.image import imread

    from smartformer.analysis.report import MONITOR_KEYS, curves_png

    plain = [{"step": s, "loss": 1.0 / s, "lr": 1e-4} for s in range(1, 11)]
    watched = [{**r, **{k: 0.5 for k in MONITOR_KEYS}, "air_cell_share": 0.4} for r in plain]
    without = imread(curves_png(plain, tmp_path / "plain.png"))
    with_monitors = imread(curves_png(watched, tmp_path / "watched.png"))
    assert with_monitors.shape[0] == pytest.approx(1.5 * without.shape[0], rel=0.05)  # three rows, not two
