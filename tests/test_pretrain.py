"""The pretraining engine end to end: real phantom CTs, real optimizer steps, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from smartformer.cli import main
from smartformer.config import load_config
from smartformer.data.phantom import write_phantoms
from smartformer.models.smartformer import SMARTFormer
from smartformer.train.checkpoint import RunLock, load_checkpoint

# Small and fast: 32^3 views (a 2^3 grid of stride-16 cells), batch 2, no loader workers.
FAST = [
    "data.roi=[32,32,32]",
    "data.spacing=[4.0,4.0,4.0]",
    "data.num_workers=0",
    "train.log_every=1",
    "train.snapshot_every=1000",
    "train.checkpoint_every=1000",
    "masking.warmup_steps=2",
    "optim.warmup_steps=1",
    "optim.freeze_last_layer_steps=1",
    "loss.warmup_teacher_temp_steps=2",
]


def pretrain_argv(data: Path | str, out: Path, *extra: str, steps: int | None = 2, fast: bool = True) -> list[str]:
    """The arguments of ``smartformer pretrain``: ``steps`` steps (``None``: the config's), no progress
    bar, the FAST overrides (``fast=False``: none, as a --resume takes the run's config), then ``extra``."""
    argv = ["pretrain", "--data", str(data), "--out", str(out)]
    if steps is not None:
        argv += ["--max-steps", str(steps)]
    return [*argv, "--no-progress", *(FAST if fast else []), *extra]


def pretrain(data: Path | str, out: Path, *extra: str, steps: int | None = 2, fast: bool = True) -> int:
    """``smartformer pretrain`` in this process, as :func:`pretrain_argv` spells it; its exit status."""
    return main(pretrain_argv(data, out, *extra, steps=steps, fast=fast))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, n=3, seed=0, shape=(64, 64, 48), spacing=(5.0, 5.0, 5.0), progress=False)
    return out


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "smartformer", *args], capture_output=True, text=True, cwd=cwd, env=env, check=False
    )


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_run_writes_everything_and_exports_teacher(phantoms: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert pretrain(phantoms, run, "train.snapshot_every=3", "train.checkpoint_every=2", steps=3) == 0
    assert load_config(str(run / "config.yaml")).data.roi == (32, 32, 32)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "loss",
        "loss_recon",
        "loss_patch",
        "loss_cls",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "mask_ratio",
        "head_diversity",
        "steps_per_s",
        "volumes_per_s",
        "data_wait_s",
        "teacher_cls_entropy",
        "teacher_patch_entropy",
        "teacher_cls_batch_entropy",
        "teacher_patch_batch_entropy",
        "teacher_cls_cosine",
        "teacher_pooled_cosine",
        "attn_air_share",
        "air_cell_share",
    ):
        assert key in rows[-1], key
    assert 0.0 < rows[-1]["teacher_cls_entropy"] < 1.0 and 0.0 < rows[-1]["teacher_patch_entropy"] < 1.0
    assert rows[0]["momentum"] == pytest.approx(0.996) and rows[-1]["momentum"] == pytest.approx(1.0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "train/teacher_cls_cosine" in events.Tags()["scalars"]
    (snapshot,) = events.Images("attention/teacher")  # the step-3 snapshot, as an image
    assert snapshot.step == 3 and snapshot.width > 100
    assert (run / "snapshots" / "attention_step0000003.png").stat().st_size > 1000
    assert (run / "checkpoints" / "step_0000002.pt").is_file()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 3
    assert {"student", "teacher", "optimizer", "scaler", "centers", "rng", "config", "schedules"} <= set(state)
    teacher = SMARTFormer.from_pretrained(run / "teacher")
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, state["teacher"][k]), k


def test_second_run_into_busy_or_used_run_dir_is_refused(phantoms: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    with RunLock(run):
        assert main(["pretrain", "--data", str(phantoms), "--out", str(run), "--max-steps", "1", *FAST]) == 2
    assert "in use" in capsys.readouterr().err
    assert pretrain(phantoms, run, steps=1) == 0
    assert main(["pretrain", "--data", str(phantoms), "--out", str(run), "--max-steps", "2", *FAST]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_uninterrupted_losses(phantoms: Path, tmp_path: Path) -> None:
    steps = 8
    ref = tmp_path / "ref"
    assert cli(*pretrain_argv(phantoms, ref, steps=steps)).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "smartformer", *pretrain_argv(phantoms, run, steps=steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    stopped_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 1 <= stopped_at < steps
    resumed = cli(*pretrain_argv(phantoms, run, "--resume", steps=None, fast=False))
    assert resumed.returncode == 0, resumed.stderr
    expected, got = losses(ref), losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_resume_restores_the_sinkhorn_queue(phantoms: Path, tmp_path: Path) -> None:
    # The queue is training state: a resumed run that lost it would normalise step 3's targets
    # over other rows and log another loss than the uninterrupted run.
    remedies = [
        "loss.centering=sinkhorn",
        "loss.cls_queue=16",
        "loss.koleo_weight=0.1",
        "data.min_body_fraction=0.3",
        "data.min_view_overlap=0.5",
        "data.local_views=2",
    ]
    run = tmp_path / "run"
    assert cli(*pretrain_argv(phantoms, run, *remedies, "train.checkpoint_every=2", steps=3)).returncode == 0
    first = losses(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_koleo" in r for r in rows)
    assert int(load_checkpoint(run / "checkpoints" / "last.pt")["losses"]["cls"]["queue_filled"]) == 12
    shutil.copyfile(run / "checkpoints" / "step_0000002.pt", run / "checkpoints" / "last.pt")
    resumed = cli(*pretrain_argv(phantoms, run, "--resume", steps=None, fast=False))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == pytest.approx(first, rel=1e-6, abs=1e-7)


def test_resume_after_a_lost_checkpoint_logs_each_step_once(phantoms: Path, tmp_path: Path) -> None:
    # A run killed between checkpoints has logged steps its last checkpoint does not hold; the
    # resumed run logs them again, and must replace, not duplicate, them.
    run = tmp_path / "run"
    assert cli(*pretrain_argv(phantoms, run, "train.checkpoint_every=2", steps=4)).returncode == 0
    first = losses(run)
    shutil.copyfile(run / "checkpoints" / "step_0000002.pt", run / "checkpoints" / "last.pt")  # as if killed at 4
    resumed = cli(*pretrain_argv(phantoms, run, "--resume", steps=None, fast=False))
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert losses(run) == pytest.approx(first, rel=1e-6, abs=1e-7)  # the re-run steps, deterministic


def _same(a, b) -> bool:
    """Equal to the bit: tensors with torch.equal, containers element by element."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_second_run_and_a_resumed_run_repeat_the_first_bit_for_bit(phantoms: Path, tmp_path: Path) -> None:
    """The training math is a function of config and seed: every logged value (timings aside) and the
    final state (weights, optimizer, loss scaler, Sinkhorn queue, generators) come out identical,
    run again or resumed from the step-2 checkpoint. The pin for refactors of the engine."""
    timings = {"steps_per_s", "volumes_per_s", "data_wait_s", "data_wait_frac"}

    def run(out: Path, *args: str, steps: int | None = 3, fast: bool = True) -> tuple[list[dict], dict]:
        assert pretrain(phantoms, out, *args, steps=steps, fast=fast) == 0
        rows = [
            {k: v for k, v in json.loads(line).items() if k not in timings}
            for line in (out / "metrics.jsonl").read_text().splitlines()
        ]
        state = load_checkpoint(out / "checkpoints" / "last.pt")
        # The step's randomness is the per-process generator's (masks, noise) and the per-sample view
        # seeds. Torch's global generator only seeds the model (then unused: the loader draws its
        # base seed from it once per invocation); Python's and NumPy's are unused.
        state["rng"] = state["rng"]["generator"]
        return rows, {
            k: state[k] for k in ("step", "student", "teacher", "optimizer", "scaler", "centers", "losses", "rng")
        }

    args = [
        "train.checkpoint_every=2",
        "optim.freeze_last_layer_steps=2",
        "loss.centering=sinkhorn",
        "loss.cls_queue=16",
    ]
    rows, state = run(tmp_path / "first", *args)
    assert [r["step"] for r in rows] == [1, 2, 3]
    again = run(tmp_path / "again", *args)
    shutil.copyfile(
        tmp_path / "again" / "checkpoints" / "step_0000002.pt", tmp_path / "again" / "checkpoints" / "last.pt"
    )
    resumed = run(tmp_path / "again", "--resume", steps=None, fast=False)
    for other_rows, other_state in (again, resumed):
        assert other_rows == rows
        assert _same(state, other_state)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["data.local_views=2"]], ids=["global_views", "with_local_views"])
def test_two_process_gloo_run_keeps_replicas_identical(phantoms: Path, tmp_path: Path, extra: list[str]) -> None:
    """With local views the student runs twice per step under DDP (global, then local views) before one backward."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "smartformer",
            *pretrain_argv(phantoms, run, "train.checkpoint_every=2", "train.device=cpu", *extra, steps=3),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in rows if "replica_max_abs_diff" in r]
    assert [r["step"] for r in checks] == [2, 3]
    assert all(r["replica_max_abs_diff"] == 0.0 for r in checks)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    assert proc.stdout.count("completed at step 3/3") == 1  # only rank 0 reports


def test_corrupt_file_is_named_or_skipped(phantoms: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for case in sorted(phantoms.iterdir())[:2]:
        (data / f"{case.name}.nii.gz").symlink_to(case / "ct.nii.gz")
    bad = data / "broken.nii.gz"
    bad.write_text("this is not a NIfTI file\n")
    # a batch of 2 over 3 volumes reaches the broken one within two steps
    rc = pretrain(data, tmp_path / "a", steps=3)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "broken.nii.gz" in err[0]
    assert pretrain(data, tmp_path / "b", "--skip-bad", steps=2) == 0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(phantoms: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    rc = pretrain(phantoms, run, "train.checkpoint_every=1", "optim.lr=1e37", "optim.clip_grad=1e30", steps=6)
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite loss" in err and "last good checkpoint" in err
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def test_config_errors_are_one_line(phantoms: Path, tmp_path: Path, capsys) -> None:
    for override, needle in [
        ("optim.lr=fast", "optim.lr"),
        ("masking.bogus=1", "masking.bogus"),
        ("masking.strategy=attention_high", "semantic attention"),
    ]:
        extra = ["model.semantic_attention=false"] if "attention_high" in override else []
        rc = main(
            ["pretrain", "--data", str(phantoms), "--out", str(tmp_path / "x"), "--max-steps", "1", override, *extra]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.parametrize(
    "ablation",
    [
        ["model.semantic_attention=false", "masking.strategy=random", "teacher.noise=none"],  # SMIT-like
        ["teacher.noise=gaussian", "masking.strategy=attention_high"],
        ["loss.cls_weight=0", "loss.patch_weight=0", "masking.strategy=block"],
        ["loss.recon_weight=0", "masking.strategy=attention_low"],
    ],
)
def test_ablation_switches_run(phantoms: Path, tmp_path: Path, ablation: list[str]) -> None:
    assert pretrain(phantoms, tmp_path / "r", *ablation, steps=3) == 0
    last = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ("loss_cls" in last) == ("loss.cls_weight=0" not in ablation)
    assert ("loss_recon" in last) == ("loss.recon_weight=0" not in ablation)


def test_uniform_teacher_targets_are_reported_once(phantoms: Path, tmp_path: Path) -> None:
    # CaiT's LayerScale start makes the [CLS] input-independent: the centered targets are
    # uniform, the collapse the engine must name. The default start must not trigger it.
    with pytest.warns(UserWarning, match=r"cls targets are uniform") as caught:
        # center_momentum=0: the center is the last batch mean, so it catches up at once
        assert (
            pretrain(phantoms, tmp_path / "cait", "model.semantic_layer_scale=1e-6", "loss.center_momentum=0", steps=4)
            == 0
        )
    assert sum("uniform" in str(w.message) for w in caught) == 1
    rows = [json.loads(line) for line in (tmp_path / "cait" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["teacher_cls_entropy"] > 0.999
    with warnings.catch_warnings(record=True) as healthy:
        warnings.simplefilter("always")
        assert pretrain(phantoms, tmp_path / "default", "loss.center_momentum=0", steps=4) == 0
    assert not [w for w in healthy if "uniform" in str(w.message)]


@pytest.mark.slow
def test_demo_main_job_end_to_end(tmp_path: Path) -> None:
    import nibabel as nib

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "-n", "1", "--max-steps", "2", "--spacing", "4", "--no-progress"]) == 0
    report = json.loads((out / "demo.json").read_text())
    ct = nib.load(str(out / "phantoms" / "case_000" / "ct.nii.gz"))
    assert set(report["attention"]) == {"smart-tiny-ct", "demo_run"}  # the shipped model and the demo's teacher
    maps = {}
    for name, entry in report["attention"].items():
        attn = nib.load(entry["mean"])
        heads = nib.load(entry["heads"])
        assert attn.shape == ct.shape and heads.shape[:3] == ct.shape and heads.shape[3] == 6
        assert (attn.affine == ct.affine).all() and (heads.affine == ct.affine).all()
        assert float(attn.get_fdata().max()) > 0
        assert Path(entry["png"]).stat().st_size > 1000
        maps[name] = attn.get_fdata()
    assert not np.allclose(maps["smart-tiny-ct"], maps["demo_run"])
    assert SMARTFormer.from_pretrained(report["teacher"]) is not None


def test_bf16_autocast_and_gradient_checkpointing_run(phantoms: Path, tmp_path: Path) -> None:
    assert pretrain(phantoms, tmp_path / "r", "train.precision=bf16", "train.grad_checkpointing=true", steps=2) == 0
    last = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(v == v for v in last.values())  # no NaN
    config = load_config(str(tmp_path / "r" / "config.yaml"))
    assert config.train.precision == "bf16" and config.train.grad_checkpointing


def test_time_budget_stops_saves_and_counts_across_resume(phantoms: Path, tmp_path: Path) -> None:
    """train.max_minutes: the run saves and stops at the first step past the budget; a resume
    counts the time already spent, so a spent budget trains no further."""
    run = tmp_path / "run"
    budget = ["train.max_minutes=0.0001"]  # 6 ms: over after the first step
    assert pretrain(phantoms, run, *budget, steps=50) == 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 1 and state["train_seconds"] > 0.006
    assert pretrain(phantoms, run, "--resume", steps=50, fast=False) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1
    # A larger budget on resume continues from there.
    assert pretrain(phantoms, run, "--resume", "train.max_minutes=100", "train.threads=1", steps=3, fast=False) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    # An override that changes what the run computes is refused, and the run is left as it was.
    before = (run / "config.yaml").read_text()
    assert pretrain(phantoms, run, "--resume", "loss.teacher_temp=0.5", steps=4, fast=False) != 0
    assert (run / "config.yaml").read_text() == before
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
