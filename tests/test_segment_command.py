"""``smartformer segment``: SwinUNETR from a SMART encoder, trained on phantoms, predicting on the input grid.

One short training run (module fixture) on three small phantoms serves the training and predict
tests: real MONAI SwinUNETR, real optimizer steps, real files.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from smartformer.cli import main
from smartformer.data.io import read_ct
from smartformer.data.phantom import write_phantoms
from smartformer.downstream.segmentation import build_segmenter, load_segmenter
from smartformer.errors import SmartformerError
from smartformer.models.convert import MONAI_PREFIX, to_monai_state_dict
from smartformer.models.smartformer import SMARTFormer

SPACING = (9.0, 9.0, 9.0)  # 40 x 32 x 32 voxels: a 360 x 288 x 288 mm field of view, the whole body
SHAPE = (40, 32, 32)
LABELS = (2, 3, 8)  # left lung, right lung, liver: remapped to classes 1, 2, 3 and back
TRAIN_ARGS = [
    "--labels",
    *map(str, LABELS),
    "--roi",
    "64",
    "32",
    "32",
    "--spacing",
    "6",
    "--batch-size",
    "1",
    "--max-steps",
    "12",
    "--val-every",
    "6",
    "--log-every",
    "3",
    "--lr",
    "1e-3",
    "--seed",
    "0",
    "--no-progress",
]


@pytest.fixture(scope="module")
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return SMARTFormer.from_preset("tiny").save_pretrained(tmp_path_factory.mktemp("enc") / "tiny")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, 3, seed=0, shape=SHAPE, spacing=SPACING, progress=False)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, threads, encoder_dir: Path, phantoms: Path) -> dict:
    """One real training run through the CLI: its folder and what it printed."""
    import contextlib
    import io

    run = tmp_path_factory.mktemp("seg") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(
            [
                "segment",
                "train",
                "--checkpoint",
                str(encoder_dir),
                "--data",
                str(phantoms),
                "--out",
                str(run),
                *TRAIN_ARGS,
            ]
        )
    assert rc == 0
    return {"run": run, "stdout": stdout.getvalue()}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_swinvit_holds_the_checkpoint_encoder(threads, encoder_dir: Path) -> None:
    net, encoder = build_segmenter(encoder_dir, num_classes=3, roi=(64, 64, 64))
    expected = to_monai_state_dict(SMARTFormer.from_pretrained(encoder_dir).backbone.state_dict())
    got = net.swinViT.state_dict()
    assert set(got) == {k[len(MONAI_PREFIX) :] for k in expected}
    for key, value in got.items():
        assert torch.equal(value, expected[MONAI_PREFIX + key]), key
    # the architecture follows the checkpoint (tiny: width 24, window 4), not SwinUNETR's defaults
    assert encoder.window_size == (4, 4, 4)
    assert net.swinViT.layers1[0].blocks[0].attn.window_size == (4, 4, 4)
    assert net.out.conv.conv.out_channels == 4  # background + 3 classes
    # and the equality is not what SwinUNETR starts with anyway: a fresh one differs
    fresh, _ = build_segmenter("random:tiny", num_classes=3, seed=1)
    differing = [
        k for k, v in fresh.swinViT.state_dict().items() if v.is_floating_point() and not torch.equal(v, got[k])
    ]
    assert "patch_embed.proj.weight" in differing


def test_training_improves_validation_dice(trained: dict) -> None:
    run = trained["run"]
    assert "loaded strictly" in trained["stdout"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [e for e in lines if "val_dice" in e]
    assert [e["step"] for e in val] == [0, 6, 12]
    assert [e["step"] for e in lines if "loss" in e] == [3, 6, 9, 12]
    lungs = {e["step"]: (e["val_dice"]["2"] + e["val_dice"]["3"]) / 2 for e in val}
    best = max(val, key=lambda e: e["val_mean_dice"])
    assert best["step"] > 0
    assert lungs[best["step"]] > lungs[0] + 0.15, lungs
    config = json.loads((run / "segmentation.json").read_text())
    assert config["label_ids"] == list(LABELS) and config["step"] == best["step"]
    assert config["val_mean_dice"] == pytest.approx(best["val_mean_dice"])
    # the kept weights are those of the best step: validating them again gives its Dice
    net, cfg = load_segmenter(run)
    assert cfg.encoder["window_size"] == [4, 4, 4]
    settings = json.loads((run / "settings.json").read_text())
    assert len(settings["train_cases"]) == 2 and len(settings["val_cases"]) == 1
    assert not list(run.glob(".*tmp*"))


def _lps_zyx(ras_path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The CT stored LPS (x and y reversed), in SimpleITK's (z, y, x) order, and its LPS origin:
    the same world as the RAS file, another voxel order."""
    image = nib.load(str(ras_path))
    data = np.asarray(image.dataobj)
    far = image.affine @ np.array([data.shape[0] - 1, data.shape[1] - 1, 0, 1.0])  # RAS of the last x, y voxel
    zyx = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0)).astype(np.int16)
    return zyx, (-float(far[0]), -float(far[1]), float(far[2]))


def test_predict_writes_label_maps_on_each_input_grid(
    trained: dict, phantoms: Path, tmp_path: Path, write_volume, write_dicom_series, capsys
) -> None:
    run = trained["run"]
    # an unseen case on another grid: 7.2 mm voxels (1.2 model voxels) never fall half-way between two 6 mm
    # model voxels, nor do 7.2 mm extents give half sizes, so MONAI has no ties to round differently per orientation
    write_phantoms(tmp_path / "new", 1, seed=5, shape=(48, 38, 38), spacing=(7.2, 7.2, 7.2), progress=False)
    ras = tmp_path / "new" / "case_000" / "ct.nii.gz"
    zyx, origin = _lps_zyx(ras)
    lps = write_volume(tmp_path / "lps" / "ct_lps.nrrd", zyx, (7.2, 7.2, 7.2), origin)
    dicom = write_dicom_series(tmp_path / "dicom", zyx, (7.2, 7.2, 7.2), origin)
    out = tmp_path / "pred"
    assert (
        main(
            [
                "segment",
                "predict",
                "--model",
                str(run),
                "--image",
                str(ras),
                "--image",
                str(lps),
                "--image",
                str(dicom),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "ml" in capsys.readouterr().out

    truth = np.asarray(nib.load(str(tmp_path / "new" / "case_000" / "labels.nii.gz")).dataobj)
    maps = {}
    for name, source in (("ct", ras), ("ct_lps", lps), ("dicom", dicom)):
        written = nib.load(str(out / f"{name}_seg.nii.gz"))
        reference = read_ct(source)
        assert written.shape == tuple(reference.shape[1:]), name
        assert np.allclose(written.affine, np.asarray(reference.affine), atol=1e-4), name
        assert written.get_data_dtype() == np.uint8
        maps[name] = np.asarray(written.dataobj)
        assert set(np.unique(maps[name]).tolist()) <= {0, *LABELS}, name
        assert {2, 3} <= set(np.unique(maps[name]).tolist()), name
    assert nib.aff2axcodes(nib.load(str(out / "ct_lps_seg.nii.gz")).affine) == ("L", "P", "S")
    # the LPS and DICOM inputs are the same world as the RAS one: their maps are its map, axes reversed
    for name in ("ct_lps", "dicom"):
        assert np.array_equal(maps[name][::-1, ::-1, :], maps["ct"]), name
    # and they lie where the lungs are (after 12 steps: roughly)
    assert _dice(np.isin(maps["ct"], (2, 3)), np.isin(truth, (2, 3))) > 0.3


def test_predict_on_the_input_grid_scores_like_validation(trained: dict, phantoms: Path, tmp_path: Path) -> None:
    """The validation case predicted on its own 9 mm grid gets about the Dice the run measured on the
    6 mm model grid: a map shifted, flipped or swapped on the way back would not."""
    run = trained["run"]
    config = json.loads((run / "segmentation.json").read_text())
    case = json.loads((run / "settings.json").read_text())["val_cases"][0]
    assert (
        main(
            [
                "segment",
                "predict",
                "--model",
                str(run),
                "--image",
                str(phantoms / case / "ct.nii.gz"),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    predicted = np.asarray(nib.load(str(tmp_path / "ct_seg.nii.gz")).dataobj)
    truth = np.asarray(nib.load(str(phantoms / case / "labels.nii.gz")).dataobj)
    for label in LABELS:
        assert _dice(predicted == label, truth == label) == pytest.approx(config["val_dice"][str(label)], abs=0.08)


def _run_err(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_bad_inputs_exit_2_with_one_line(threads, encoder_dir: Path, phantoms: Path, tmp_path: Path, capsys) -> None:
    import shutil

    out = tmp_path / "out"
    train = ["segment", "train", "--checkpoint", str(encoder_dir), "--out", str(out), *TRAIN_ARGS]

    # a label map on another grid than its CT: same size, shifted origin (the header check cannot see it)
    data = tmp_path / "data"
    shutil.copytree(phantoms, data)
    label = nib.load(str(data / "case_001" / "labels.nii.gz"))
    shifted = label.affine.copy()
    shifted[:3, 3] += 18.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), str(data / "case_001" / "labels.nii.gz"))
    rc, err = _run_err([*train, "--data", str(data)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and str(data / "case_001" / "labels.nii.gz") in err
    assert "different grid" in err

    # ... and another size (refused from the headers, before anything is decoded)
    nib.save(nib.Nifti1Image(np.zeros((20, 16, 16), np.uint8), label.affine), str(data / "case_001" / "labels.nii.gz"))
    rc, err = _run_err([*train, "--data", str(data)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "case_001/labels.nii.gz" in err and "20x16x16" in err

    # a CSV without a label (or mask) column
    csv = tmp_path / "cases.csv"
    csv.write_text("image,patient\n" + "".join(f"{phantoms}/case_00{i}/ct.nii.gz,p{i}\n" for i in range(3)))
    rc, err = _run_err([*train, "--data", str(csv)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and str(csv) in err and "label" in err

    # a checkpoint folder without weights
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(encoder_dir / "config.json", no_weights / "config.json")
    good_csv = tmp_path / "good.csv"
    good_csv.write_text(
        "image,label\n"
        + "".join(f"{phantoms}/case_00{i}/ct.nii.gz,{phantoms}/case_00{i}/labels.nii.gz\n" for i in range(3))
    )
    bad_ckpt = [a if a != str(encoder_dir) else str(no_weights) for a in train]
    rc, err = _run_err([*bad_ckpt, "--data", str(good_csv)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and str(no_weights) in err

    # an encoder SwinUNETR cannot be built around (width 18: MONAI needs multiples of 12)
    odd = SMARTFormer.from_preset("tiny", backbone={"embed_dim": 18}).save_pretrained(tmp_path / "odd")
    odd_ckpt = [a if a != str(encoder_dir) else str(odd) for a in train]
    rc, err = _run_err([*odd_ckpt, "--data", str(good_csv)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "multiple of 12" in err

    # none of that wrote anything
    assert not out.exists()

    # predict: a folder that is no run, an image that does not exist
    rc, err = _run_err(
        [
            "segment",
            "predict",
            "--model",
            str(encoder_dir),
            "--image",
            str(phantoms / "case_000" / "ct.nii.gz"),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert rc == 2 and len(err.splitlines()) == 1 and str(encoder_dir) in err and "segmentation.json" in err


def test_roi_too_small_to_train_is_refused() -> None:
    from smartformer.downstream.segmentation import SegmentationSettings

    with pytest.raises(SmartformerError, match="too small"):
        SegmentationSettings(roi=(32, 32, 32))
    with pytest.raises(SmartformerError, match="multiple of 32"):
        SegmentationSettings(roi=(48, 64, 64))


def test_csv_cases_resolve_against_the_csv_and_split_by_patient(phantoms: Path, tmp_path: Path) -> None:
    import shutil

    from smartformer.data.cases import find_cases
    from smartformer.downstream.segmentation import split_cases

    data = tmp_path / "set"
    for i in range(3):
        shutil.copytree(phantoms / f"case_00{i}", data / f"scan{i}")
    shutil.copytree(phantoms / "case_000", data / "scan3")
    csv = data / "cases.csv"
    csv.write_text(
        "image,label,patient\n"
        + "".join(f"scan{i}/ct.nii.gz,scan{i}/labels.nii.gz,{p}\n" for i, p in enumerate("AABC"))
    )
    cases = find_cases(csv)
    assert [c.image for c in cases] == [data / f"scan{i}" / "ct.nii.gz" for i in range(4)]
    assert [c.patient for c in cases] == list("AABC")
    for seed in range(6):
        train, val = split_cases(cases, 0.34, seed)
        assert len({c.patient for c in val}) == 1 and train
        assert not {c.patient for c in train} & {c.patient for c in val}
        assert len(train) + len(val) == 4


def test_frozen_encoder_keeps_its_weights_while_the_decoder_learns(threads, phantoms: Path, tmp_path: Path) -> None:
    """random:tiny, --epochs 1 (2 cases, batch 1: 2 steps), encoder frozen throughout."""
    from safetensors.torch import load_file

    run = tmp_path / "frozen"
    args = [a for a in TRAIN_ARGS if a not in ("--max-steps", "12")]
    assert (
        main(
            [
                "segment",
                "train",
                "--checkpoint",
                "random:tiny",
                "--data",
                str(phantoms),
                "--out",
                str(run),
                *args,
                "--epochs",
                "1",
                "--freeze-encoder-steps",
                "2",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if "val_dice" in e] == [0, 2]
    assert all(e["encoder_frozen"] for e in lines if "loss" in e)
    saved = load_file(str(run / "best.safetensors"))
    start, _ = build_segmenter("random:tiny", num_classes=len(LABELS), seed=0)
    before = start.state_dict()
    assert json.loads((run / "segmentation.json").read_text())["step"] == 2  # the trained model was kept
    for key, value in before.items():
        if key.startswith("swinViT."):
            assert torch.equal(saved[key], value), key
    assert not torch.equal(saved["out.conv.conv.weight"], before["out.conv.conv.weight"])
