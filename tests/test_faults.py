"""The bad-input and fault matrix (issue 18): bad files, full disks, killed runs, mistaken commands.

Everything is real: NIfTI files written with nibabel, real pretraining runs, real checkpoints and
real processes killed with SIGKILL. A full disk is injected where the bytes reach the operating
system (``os.write`` fails with ENOSPC for files under one folder), as a full file system would.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_pretrain import phantoms, pretrain, pretrain_argv  # noqa: F401  (the phantom CTs fixture)

from smartformer.cli import main
from smartformer.config import load_config
from smartformer.data.dataset import build_pretrain_dataset
from smartformer.data.io import read_ct, validate_volume
from smartformer.errors import ConfigError, InputError
from smartformer.models.smartformer import SMARTFormer
from smartformer.train.checkpoint import RunLock, load_checkpoint


def good_cts(phantoms: Path) -> list[Path]:
    return sorted(phantoms.glob("case_*/ct.nii.gz"))


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(
        nib.Nifti1Image(array.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine),
        str(path),
    )
    return path


def ct_like(shape: tuple[int, int, int] = (40, 40, 32), seed: int = 0) -> np.ndarray:
    """Air around a noisy soft-tissue block."""
    array = np.full(shape, -1000.0, dtype=np.float32)
    inner = tuple(slice(n // 8, n - n // 8) for n in shape)
    array[inner] = np.random.default_rng(seed).normal(40, 20, array[inner].shape)
    return array


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch):
    """``disk_full(folder)``: from now on, writing any file under ``folder`` fails with ENOSPC."""
    real_write = os.write

    def arm(folder: Path) -> None:
        folder = str(folder.resolve())

        def write(fd: int, data) -> int:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.startswith(folder + os.sep):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)

    return arm


# --- 1. the preprocessing cache ------------------------------------------------------------------


def test_half_written_cache_entry_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    ct = write_nifti(tmp_path / "ct.nii.gz", ct_like())
    cache = tmp_path / "cache"
    assert build_pretrain_dataset([ct], cache, spacing=2.0, roi=32)[0]["views"].shape == (2, 1, 32, 32, 32)
    (entry,) = cache.glob("*/*.pt")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # what a full disk left behind
    with pytest.warns(UserWarning, match=rf"{ct}.*unreadable.*rebuilding"):
        assert build_pretrain_dataset([ct], cache, spacing=2.0, roi=32)[0]["views"].shape == (2, 1, 32, 32, 32)
    assert isinstance(torch.load(entry, weights_only=True), dict)  # rebuilt whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_pretrain_dataset([ct], cache, spacing=2.0, roi=32)[0]  # and now a plain hit


def test_full_disk_while_caching_is_one_line_and_leaves_no_partial_entry(
    phantoms: Path, tmp_path: Path, capsys, disk_full
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    disk_full(cache)
    # through a DataLoader worker process (forked: the full disk is inherited), as in real runs
    assert pretrain(phantoms, tmp_path / "run", f"data.cache_dir={cache}", "data.num_workers=1") == 2
    line = one_error_line(capsys)
    assert str(cache) in line and "disk full" in line and "--skip-bad" not in line
    assert not [p for p in cache.rglob("*") if p.is_file() and p.name != "settings.json"]


# --- 2. non-finite, constant and tiny volumes ------------------------------------------------------


def test_nan_volume_is_a_named_input_error_everywhere(phantoms: Path, tmp_path: Path, capsys) -> None:
    array = ct_like()
    array[10, 10, 10] = np.nan
    nan = write_nifti(tmp_path / "data" / "nan.nii.gz", array)
    with pytest.raises(InputError, match="non-finite"):
        read_ct(nan)
    assert main(["data", "check", str(nan)]) == 1
    out = capsys.readouterr().out
    assert "non-finite" in out and "nan..nan" not in out
    assert (
        main(
            [
                "attention",
                "--checkpoint",
                "smart-tiny-ct",
                "--image",
                str(nan),
                "--out",
                str(tmp_path / "maps"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert str(nan) in one_error_line(capsys)
    for ct in good_cts(phantoms):
        (tmp_path / "data" / f"{ct.parent.name}.nii.gz").symlink_to(ct)
    with pytest.warns(UserWarning, match=r"nan\.nii\.gz"):
        assert pretrain(tmp_path / "data", tmp_path / "run", "--skip-bad", steps=3) == 0


def test_constant_and_tiny_volumes_warn_or_are_skipped(phantoms: Path, tmp_path: Path, capsys) -> None:
    constant = write_nifti(tmp_path / "data" / "constant.nii.gz", np.full((40, 40, 32), 40.0))
    tiny = write_nifti(tmp_path / "data" / "tiny.nii.gz", ct_like((6, 6, 6)))
    assert main(["data", "check", str(constant)]) == 0
    assert "warning: is a constant volume" in capsys.readouterr().out
    with pytest.warns(UserWarning) as caught:
        dataset = build_pretrain_dataset([constant, tiny], tmp_path / "c1", spacing=2.0, roi=32)
        dataset[0], dataset[1]
    messages = " ".join(str(w.message) for w in caught)
    assert f"{constant}: is a constant volume" in messages and f"{tiny}: covers" in messages
    assert "(pass skip_bad=True to leave such volumes out)" in messages  # a value here; --skip-bad on the CLI
    good = good_cts(phantoms)[0]
    with pytest.warns(UserWarning, match="skipping unreadable volume.*constant"):
        dataset = build_pretrain_dataset([constant, good], tmp_path / "c2", spacing=4.0, roi=32, skip_bad=True)
        assert dataset[0]["views"].shape == (2, 1, 32, 32, 32)  # the next good volume instead
    # The finding is kept with the cache entry: a later --skip-bad run over the same cache skips too.
    with pytest.warns(UserWarning, match="skipping unreadable volume.*covers"):
        dataset = build_pretrain_dataset([tiny, good], tmp_path / "c1", spacing=2.0, roi=32, skip_bad=True)
        assert dataset[0]["views"].shape == (2, 1, 32, 32, 32)


# --- 3. malformed headers ---------------------------------------------------------------------------


def _raw_nifti(path: Path, sform: np.ndarray | None = None, pixdim: list[float] | None = None) -> Path:
    """A NIfTI written byte by byte from a header, so that nibabel cannot repair what we set."""
    array = ct_like()
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    header["pixdim"][1:4] = [2.0, 2.0, 2.0] if pixdim is None else pixdim
    if sform is not None:
        header.set_sform(sform, code=1)
    blob = header.binaryblock + b"\0" * 4 + array.tobytes(order="F")
    with (gzip.open if path.name.endswith(".gz") else open)(path, "wb") as fh:
        fh.write(blob)
    return path


def _zero_column_sform(path: Path) -> Path:
    bad = np.diag([2.0, 2.0, 2.0, 1.0])
    bad[:, 0] = 0
    bad[3, 3] = 1
    return _raw_nifti(path, sform=bad)


def _pixdim(path: Path, pixdim: list[float]) -> Path:
    return _raw_nifti(path, pixdim=pixdim)


def test_malformed_geometry_is_one_line_per_file_naming_the_field(phantoms: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    zero = _zero_column_sform(data / "zero_sform.nii.gz")
    negative = _pixdim(data / "negative_pixdim.nii.gz", [2.0, -2.0, 2.0])
    nil = _pixdim(data / "zero_pixdim.nii", [0.0, 2.0, 2.0])
    (data / "good.nii.gz").symlink_to(good_cts(phantoms)[0])
    for path, field in ((zero, "sform"), (negative, "pixdim"), (nil, "pixdim")):
        for reader in (read_ct, validate_volume):
            with pytest.raises(InputError, match=field) as caught:
                reader(path)
            assert str(caught.value).startswith(str(path))
    assert main(["data", "check", str(data)]) == 1
    out = capsys.readouterr().out
    assert "3 failed" in out and "1 ok" in out  # every file reported, the good one too
    with pytest.warns(UserWarning, match="zero_sform"):
        assert pretrain(data, tmp_path / "run", "--skip-bad", steps=1) == 0


def test_a_volume_monai_cannot_preprocess_is_named_or_skipped(phantoms: Path, tmp_path: Path) -> None:
    # 10 m voxels: resampling to 2 mm would need petabytes; MONAI's error named no file
    absurd = write_nifti(tmp_path / "absurd.nii.gz", ct_like(), np.diag([1e4, 1e4, 1e4, 1.0]))
    with pytest.raises(InputError, match="cannot be preprocessed") as caught:
        build_pretrain_dataset([absurd], tmp_path / "c1", spacing=2.0, roi=32)[0]
    assert str(caught.value).startswith(str(absurd)) and "\n" not in str(caught.value)
    with pytest.warns(UserWarning, match=r"skipping unreadable volume .*absurd\.nii\.gz"):
        dataset = build_pretrain_dataset(
            [absurd, good_cts(phantoms)[0]], tmp_path / "c2", spacing=4.0, roi=32, skip_bad=True
        )
        assert dataset[0]["views"].shape == (2, 1, 32, 32, 32)


def test_tiny_file_with_huge_header_is_refused_before_reading(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 512))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    for name, opener in (("huge.nii.gz", gzip.open), ("huge.nii", open)):
        path = tmp_path / name
        with opener(path, "wb") as fh:
            fh.write(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
        for reader in (validate_volume, read_ct):
            with pytest.raises(InputError, match="header declares 536.9 MB"):
                reader(path)
    headers = {  # the same claim in the ITK formats whose voxels follow the header
        "huge.mha": "ObjectType = Image\nNDims = 3\nDimSize = 512 512 512\nElementType = MET_FLOAT\n"
        "ElementSpacing = 1 1 1\nElementDataFile = LOCAL\n",
        "huge.nrrd": "NRRD0004\ntype: float\ndimension: 3\nsizes: 512 512 512\nspacings: 1 1 1\n"
        "encoding: raw\nendian: little\n\n",
    }
    for name, text in headers.items():
        (tmp_path / name).write_bytes(text.encode() + b"\0" * 1024)
        for reader in (validate_volume, read_ct):
            with pytest.raises(InputError, match="header declares 536.9 MB"):
                reader(tmp_path / name)


# --- 4, 5. export ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert pretrain(phantoms, run, "train.checkpoint_every=1", steps=2) == 0
    return run


def test_export_never_overwrites_its_input_a_run_or_a_file(finished_run: Path, tmp_path: Path, capsys) -> None:
    last = finished_run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    for out, needle in (
        (last, "being exported"),
        (finished_run / "checkpoints" / "x.pt", "checkpoint of the run"),
        (tmp_path, "is a folder"),
    ):
        assert main(["export", "--checkpoint", str(last), "--out", str(out), "--force"]) == 2
        assert needle in one_error_line(capsys)
    assert last.read_bytes() == before
    assert not list(tmp_path.iterdir()) and not list(finished_run.glob("checkpoints/.*"))
    out = tmp_path / "swinvit.pt"
    assert main(["export", "--checkpoint", str(last), "--out", str(out)]) == 0
    assert main(["export", "--checkpoint", str(last), "--out", str(out)]) == 2
    assert "--force" in one_error_line(capsys)
    assert main(["export", "--checkpoint", str(last), "--out", str(out), "--force"]) == 0


def test_export_full_disk_is_one_line_and_leaves_no_temp_file(
    finished_run: Path, tmp_path: Path, capsys, disk_full
) -> None:
    disk_full(tmp_path)
    assert (
        main(["export", "--checkpoint", str(finished_run / "teacher"), "--out", str(tmp_path / "w.safetensors")]) == 2
    )
    assert "disk full" in one_error_line(capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_export_refuses_weights_that_are_not_the_monai_layout(tmp_path: Path, capsys, damage: str) -> None:
    state = SMARTFormer.from_preset("tiny", heads=False, decoder=False).backbone.state_dict()
    key = "layers2.0.blocks.1.mlp.linear1.weight"
    if damage == "missing":
        del state[key]
    else:
        state[key] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "backbone.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "backbone.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    assert key in one_error_line(capsys)
    assert not (tmp_path / "o.pt").exists()


# --- 6. weights that do not fit their config --------------------------------------------------------


def test_wrong_shape_weights_are_one_line_naming_config_and_weights(tmp_path: Path, capsys) -> None:
    from smartformer.downstream.features import load_encoder

    model_dir = tmp_path / "encoder"
    SMARTFormer.from_preset("tiny", heads=False, decoder=False).save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["model"]["backbone"]["embed_dim"] = 48
    (model_dir / "config.json").write_text(json.dumps(config))
    ct = write_nifti(tmp_path / "ct.nii.gz", ct_like())
    assert (
        main(
            [
                "attention",
                "--checkpoint",
                str(model_dir),
                "--image",
                str(ct),
                "--out",
                str(tmp_path / "m"),
                "--no-progress",
            ]
        )
        == 2
    )
    line = one_error_line(capsys)
    assert "config.json" in line and "model.safetensors" in line and "differ in shape" in line
    with pytest.raises(Exception, match="config.json.*differ in shape") as caught:  # probe, segment, finetune
        load_encoder(str(model_dir))
    assert "\n" not in str(caught.value)


def test_resume_with_an_edited_config_is_one_line(finished_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("model: {}", "model: {backbone: {embed_dim: 48}}"))
    assert pretrain("unused", run, "--resume", steps=3, fast=False) == 2
    line = one_error_line(capsys)
    assert "last.pt" in line and "does not fit the model of this config" in line


# --- 7. independent checkpoint files, verified on resume -------------------------------------------


def test_last_and_step_checkpoints_are_independent_and_resume_falls_back(phantoms: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert pretrain(phantoms, run, "train.checkpoint_every=1", steps=2) == 0
    folder = run / "checkpoints"
    last, step1, step2 = folder / "last.pt", folder / "step_0000001.pt", folder / "step_0000002.pt"
    assert last.stat().st_ino != step2.stat().st_ino and last.stat().st_nlink == 1
    kept = step2.read_bytes()
    last.write_bytes(step1.read_bytes())  # the manual "recovery" cp step_1.pt last.pt
    assert step2.read_bytes() == kept
    last.write_bytes(kept[: len(kept) // 3])  # truncated
    assert step2.read_bytes() == kept
    with pytest.warns(UserWarning, match=r"last\.pt.*resuming from step_0000002\.pt \(step 2\)"):
        assert pretrain(phantoms, run, "--resume", steps=3, fast=False) == 0
    assert load_checkpoint(last)["step"] == 3
    assert steps_logged(run) == [1, 2, 3]


# --- 8, 10, 13. killed runs, metrics, and the run lock ------------------------------------------------


def test_kill_9_frees_the_lock_at_once_and_metrics_hold_one_run(phantoms: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    workers = "data.num_workers=1"  # a real DataLoader worker
    args = [sys.executable, "-m", "smartformer", *pretrain_argv(phantoms, run, workers, steps=200)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and (not (run / "metrics.jsonl").is_file() or len(steps_logged(run)) < 2):
            time.sleep(0.05)
        assert len(steps_logged(run)) >= 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run / "checkpoints").exists()  # killed before its first checkpoint
    with RunLock(run):  # the orphaned worker does not hold the dead run's lock
        pass
    with pytest.warns(UserWarning, match="no checkpoint to resume from yet"):
        assert pretrain(phantoms, run, "--resume", steps=2, fast=False) == 0
    assert steps_logged(run) == [1, 2]  # not [1, 2, ..., 1, 2]
    # A fresh run in a folder an earlier attempt left metrics in (no checkpoint) starts the file anew.
    for ckpt in (run / "checkpoints").iterdir():
        ckpt.unlink()
    assert pretrain(phantoms, run, steps=1) == 0
    assert steps_logged(run) == [1]


def test_resume_of_a_run_that_does_not_exist_is_refused(phantoms: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "typo"
    assert pretrain(phantoms, run, "--resume") == 2
    assert "no run to resume" in one_error_line(capsys)
    assert not run.exists()
    with pytest.warns(UserWarning, match="starting at step 0"):
        assert pretrain(phantoms, run, "--resume-or-start", steps=1) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1


# --- 9. configuration ranges -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=0", "data.batch_size"),
        ("masking.ratio=1.5", "masking.ratio"),
        ("data.roi=[50,50,50]", "data.roi"),
        ("optim.lr=-1", "optim.lr"),
        ("train.max_steps=0", "train.max_steps"),
        ("data.flip_prob=2", "data.flip_prob"),
        ("loss.teacher_temp=0", "loss.teacher_temp"),
        ("optim.lr=.nan", "optim.lr"),
        ("train.device=gpu", "train.device"),
        ("data.window=soft", "data.window"),
        ("model.backbone.embed_dim=-24", "model.backbone.embed_dim"),
        ("model.backbone.num_heads=[0,6,12,24]", "model.backbone.num_heads"),
        ("data.local_views=-1", "data.local_views"),
        ("data.local_roi=[48,32,32]", "data.local_roi"),
        ("data.local_views=2 data.local_roi=[128,32,32]", "data.local_roi"),
    ],
)
def test_out_of_range_config_values_are_one_line(tmp_path: Path, capsys, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config("tiny", override.split())
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"), *override.split()]) == 2
    assert one_error_line(capsys).startswith(f"smartformer: error: {key}")
    assert not (tmp_path / "r").exists()


def test_an_empty_or_partial_yaml_means_its_preset(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "some.yaml").write_text("preset: tiny\noptim:\n  lr: 1.0e-3\n")
    tiny = load_config("tiny")
    assert load_config(str(tmp_path / "empty.yaml")) == tiny
    partial = load_config(str(tmp_path / "some.yaml"))
    assert partial.optim.lr == 1e-3 and partial.data.roi == tiny.data.roi and partial.train == tiny.train


# --- 11. missing files are found before step 1 -------------------------------------------------------


def test_a_missing_listed_file_stops_the_run_before_step_1(phantoms: Path, tmp_path: Path, capsys) -> None:
    from smartformer.data.sampler import ResumableSampler

    rows = [str(p) for p in good_cts(phantoms)]
    last_drawn = ResumableSampler(len(rows) + 1, seed=0).keys_of_epoch(0)[-1]  # batch 2: drawn at step 2
    rows.insert(last_drawn, str(tmp_path / "gone.nii.gz"))
    (tmp_path / "cts.csv").write_text("image\n" + "\n".join(rows) + "\n")
    assert pretrain(tmp_path / "cts.csv", tmp_path / "run", steps=5) == 2
    line = one_error_line(capsys)
    assert "gone.nii.gz: does not exist" in line and "--skip-bad" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert main(["pretrain", "--data", str(tmp_path / "cts.csv"), "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "no run to resume" in one_error_line(capsys)  # the failed start left no run behind


# --- 14. output locations -----------------------------------------------------------------------------


def test_output_under_a_file_is_one_line(phantoms: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    assert pretrain(phantoms, tmp_path / "file" / "run") == 2
    assert "file" in one_error_line(capsys)
    assert pretrain(phantoms, tmp_path / "file") == 2
    one_error_line(capsys)


def test_an_output_file_that_is_a_folder_is_one_line(phantoms: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)  # written by code that names no path itself
    assert pretrain(phantoms, run, steps=1) == 2
    line = one_error_line(capsys)
    assert "metrics.jsonl" in line and "is a folder" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(phantoms: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    assert pretrain(phantoms, folder / "run") == 2
    assert "permission denied" in one_error_line(capsys)


def test_full_disk_while_checkpointing_keeps_the_last_good_one(
    finished_run: Path, tmp_path: Path, phantoms: Path, capsys, disk_full
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    disk_full(run / "checkpoints")
    assert pretrain(phantoms, run, "--resume", steps=3, fast=False) == 2
    line = one_error_line(capsys)
    assert "checkpoints" in line and "disk full" in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_0000001.pt", "step_0000002.pt"]
