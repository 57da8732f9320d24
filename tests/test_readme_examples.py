"""The README's command sequences, run as written (on phantoms shaped like the real data, and on the
real data where ``../shared/data`` exists)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smartformer.cli import main
from smartformer.data.phantom import LESION_ID, write_phantoms

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"
#: Appended to the README's probe line in tests: small crops, two folds, few bootstrap draws.
FAST_PROBE = ["--crop", "32", "--spacing", "4", "--folds", "2", "--bootstrap", "20", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_command(start: str) -> list[str]:
    """The README's command line that starts with ``start`` (its ``# comment`` dropped), as argv."""
    for line in README.read_text().splitlines():
        if line.startswith(start):
            return shlex.split(line.split(" #")[0])[1:]  # without "smartformer"
    raise AssertionError(f"README.md has no line starting with {start!r}")


def test_lesions_then_probe_as_in_the_readme(tmp_path, monkeypatch):
    """``data lesions --data ../shared/data/sts`` then ``probe`` on its CSV, from a working directory
    beside ``shared/``: the CSV's relative paths must resolve for probe (they did not, issue 17)."""
    sts = tmp_path / "shared" / "data" / "sts"
    for case in write_phantoms(
        tmp_path / "phantoms", 6, seed=5, shape=(48, 48, 40), spacing=(4.0, 4.0, 4.0), n_lesions=1, progress=False
    ):
        folder = sts / f"STS_{case.name[-3:]}"
        folder.mkdir(parents=True)
        (case / "ct.nii.gz").rename(folder / "ct.nii.gz")
        labels = nib.load(str(case / "labels.nii.gz"))
        tumour = (np.asarray(labels.dataobj) == LESION_ID).astype(np.uint8)
        nib.save(nib.Nifti1Image(tumour, labels.affine), str(folder / "tumor.nii.gz"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    lesions = readme_command("smartformer data lesions --data ../shared/data/sts")
    assert main([*lesions, "--no-progress"]) == 0
    csv = Path(lesions[lesions.index("--out") + 1]) / "lesions.csv"
    image = csv.read_text().splitlines()[1].split(",")[0]
    assert (csv.parent / image).is_file(), f"{image} is not relative to the CSV's folder"
    probe = readme_command(f"smartformer probe --data {csv}")
    probe[probe.index("--checkpoint") + 1 : probe.index("--out")] = ["random:tiny"]  # no second model: fast
    assert main([*probe, *FAST_PROBE]) == 0
    assert (Path(probe[probe.index("--out") + 1]) / "metrics.json").is_file()


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED / "data" / "sts").is_dir(), reason=f"real CT data not found at {SHARED / 'data'}")
def test_lesions_then_probe_on_the_real_sts_data(tmp_path, monkeypatch):
    """The same two README lines on the 51 real STS cases (``../shared`` linked beside the working directory)."""
    (tmp_path / "shared").symlink_to(SHARED)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    lesions = readme_command("smartformer data lesions --data ../shared/data/sts")
    assert main([*lesions, "--no-progress"]) == 0
    probe = readme_command("smartformer probe --data data/sts_lesions/lesions.csv")
    assert main([*probe, *FAST_PROBE]) == 0


def readme_python() -> str:
    """The README's first Python example."""
    text = README.read_text()
    start = text.index("```python\n") + len("```python\n")
    return text[start : text.index("```", start)]


def test_python_example_runs_as_written(tmp_path, monkeypatch):
    """The README's library example on a CT of any size (it once called attention_maps on a raw volume)."""
    import torch

    from smartformer.models.smartformer import SMARTFormer

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    SMARTFormer.from_preset("tiny").save_pretrained(tmp_path / "runs" / "ct1" / "teacher")
    (case,) = write_phantoms(
        tmp_path / "ph", 1, seed=1, shape=(50, 44, 36), spacing=(3.0, 3.0, 3.0), n_lesions=1, progress=False
    )
    (case / "ct.nii.gz").rename(tmp_path / "ct.nii.gz")
    exec(readme_python(), {})  # noqa: S102 - the README's code, as a user would paste it
    mean = nib.load(str(tmp_path / "maps" / "ct_mean.nii.gz"))
    assert mean.shape == nib.load(str(tmp_path / "ct.nii.gz")).shape
    assert (tmp_path / "maps" / "ct.png").is_file()


def test_make_test_fast_leaves_out_slow_and_realdata_tests():
    """``make test-fast`` (the edit-test loop) deselects what ``make test`` (CI) keeps."""
    import subprocess
    import sys

    # Under CI this test itself runs inside `make test`: the inherited MAKEFLAGS/MAKELEVEL would make the
    # inner make print "Entering/Leaving directory" lines around the recipe, so they are dropped here.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "test-fast"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    command = shlex.split(dry.strip().splitlines()[-1])
    assert command[1:4] == ["-m", "pytest", "-q"] and command[-2:] == ["-m", "not slow and not realdata"]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *command[-2:], str(Path(__file__))],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert "test_lesions_then_probe_as_in_the_readme" in collected
    assert "test_lesions_then_probe_on_the_real_sts_data" not in collected


def readme_command_lines() -> list[str]:
    """Every ``smartformer ...`` command of the README's code blocks (continuations joined, comments dropped)."""
    lines, inside, pending = [], False, ""
    for raw in README.read_text().splitlines():
        if raw.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line = pending + raw.split(" #")[0].strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("smartformer "):
            lines.append(line)
        elif " -m smartformer " in line:  # torchrun ... -m smartformer pretrain ...
            lines.append("smartformer " + line.split(" -m smartformer ", 1)[1])
    return lines


def test_every_readme_command_parses():
    """Each README command line has options the CLI knows (the argument parser accepts it as written)."""
    from smartformer.cli import build_parser

    lines = readme_command_lines()
    assert len(lines) > 20
    parser = build_parser()
    for line in lines:
        if "..." in shlex.split(line):  # an elided line ("the same with ...")
            continue
        argv = shlex.split(line)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {line}")


#: What the README's "Use it on your CTs" lines get appended in the test: small, fast settings.
FAST_RUN = {
    "pretrain": [
        "--max-steps",
        "2",
        "--no-progress",
        "data.roi=[32,32,32]",
        "data.spacing=[5.0,5.0,5.0]",
        "data.num_workers=0",
        "train.snapshot_every=1000",
        "train.log_every=1",
    ],
    "attention": ["--spacing", "5", "--roi", "32", "--no-progress"],
    "localize": ["--spacing", "5", "--roi", "32", "--no-progress"],
    "cluster": ["--spacing", "5", "--roi", "32", "--no-progress", "--tsne-points", "60"],
}


@pytest.mark.slow
def test_use_it_on_your_cts_as_written(tmp_path, monkeypatch):
    """The README's "Use it on your CTs" sequence, in order, on phantoms put where its paths point
    (``/data/my_cts`` becomes a local folder; ablation, torchrun, probe and segment lines are left out)."""
    monkeypatch.chdir(tmp_path)
    cases = write_phantoms(
        tmp_path / "my_cts", 2, seed=4, shape=(48, 48, 40), spacing=(5.0, 5.0, 5.0), n_lesions=1, progress=False
    )
    ct, labels = cases[0] / "ct.nii.gz", cases[0] / "labels.nii.gz"
    (tmp_path / "ct.nii.gz").write_bytes(ct.read_bytes())
    (tmp_path / "organs.nii.gz").write_bytes(labels.read_bytes())
    (tmp_path / "labels.json").write_text((cases[0] / "labels.json").read_text())
    image = nib.load(str(labels))
    tumour = (np.asarray(image.dataobj) == LESION_ID).astype(np.uint8)
    nib.save(nib.Nifti1Image(tumour, image.affine), str(tmp_path / "tumor.nii.gz"))
    (tmp_path / "cases.csv").write_text("image,mask\nct.nii.gz,tumor.nii.gz\n")

    text = README.read_text()
    block = text[text.index("## Use it on your CTs") :]
    block = block[block.index("```bash\n") + 8 : block.index("```", block.index("```bash\n") + 8)]
    wanted = [
        line
        for line in readme_command_lines()
        if line in {ln.split(" #")[0].strip() for ln in block.splitlines()}
        and not any(skip in line for skip in ("cts.csv", "--config base", " probe ", " segment "))
    ]
    assert [line.split()[1] for line in wanted] == [
        "data",
        "pretrain",
        "pretrain",
        "export",
        "attention",
        "attention",
        "localize",
        "cluster",
        "report",
    ]
    for line in wanted:
        argv = shlex.split(line.replace("/data/my_cts", "my_cts"))[1:]
        extra = ["--max-steps", "3", "--no-progress"] if "--resume" in argv else FAST_RUN.get(argv[0], [])
        assert main([*argv, *extra]) == 0, line  # (a resumed run takes its settings from config.yaml)
    assert (tmp_path / "swinvit.swinunetr.json").is_file() and (tmp_path / "maps" / "ct.png").is_file()
    page = (tmp_path / "runs" / "ct1" / "report.html").read_text(encoding="utf-8")
    assert "Localization" in page and "Clustering" in page
