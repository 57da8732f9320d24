"""Small wording fixes: plurals, help texts that read as written."""

from __future__ import annotations

import pytest

from smartformer.cli import main
from smartformer.wording import plural


def test_plural():
    assert plural(1, "class", "classes") == "1 class" and plural(2, "class", "classes") == "2 classes"
    assert plural(0, "case") == "0 cases" and plural(1, "case") == "1 case"


def test_lesion_summary_of_one_case():
    from pathlib import Path

    from smartformer.data.builders.lesions import CaseResult, summarize
    from smartformer.data.cases import Case

    result = CaseResult(Case(case="p1", image=Path("ct.nii.gz"), patient="p1", mask=Path("tumor.nii.gz")))
    assert summarize([result], 0)[0] == "1 case: 0 lesion samples (label 1), 0 normal-tissue samples (label 0)"


def test_localize_help_reads_as_written(capsys):
    with pytest.raises(SystemExit):
        main(["localize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "%%" not in text and "top-k percent" in text
    assert "smart-tiny-ct" in text


def test_library_errors_name_values_and_the_cli_names_its_option(tmp_path, capsys):
    """A library caller reads the setting as a value (skip_bad=True); the command line, where it
    catches the error, names its own option for it (--skip-bad)."""
    from smartformer.data.builders.lesions import SamplingOptions
    from smartformer.errors import InputError, SmartformerError

    error = InputError(
        "ct.nii.gz", "cannot be used (pass {setting} to leave such files out)", setting="skip_bad", value=True
    )
    assert str(error) == "ct.nii.gz: cannot be used (pass skip_bad=True to leave such files out)"
    assert error.reason == "cannot be used (pass skip_bad=True to leave such files out)"
    error.for_option("--skip-bad")
    assert str(error) == "ct.nii.gz: cannot be used (pass --skip-bad to leave such files out)"
    assert error.reason.endswith("(pass --skip-bad to leave such files out)")
    with pytest.raises(SmartformerError, match=r"^negatives_per_case must be >= 0, got -1$"):
        SamplingOptions(negatives_per_case=-1).check()
    with pytest.raises(SmartformerError, match=r"^min_distance_mm must be >= 0 mm"):
        SamplingOptions(min_distance_mm=-1.0).check()
    argv = ["data", "lesions", "--data", str(tmp_path), "--out", str(tmp_path / "out")]
    assert main([*argv, "--negatives-per-case", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "smartformer: error: --negatives-per-case must be >= 0, got -1"
    assert main([*argv, "--min-distance", "-1"]) == 2
    assert "error: --min-distance must be >= 0 mm" in capsys.readouterr().err


def test_phantom_overwrite_is_a_value_in_the_library_and_a_flag_on_the_command_line(tmp_path, capsys):
    from smartformer.data.phantom import write_phantoms
    from smartformer.errors import InputError

    small = {"seed": 0, "shape": (24, 24, 16), "spacing": (8.0, 8.0, 8.0), "progress": False}
    write_phantoms(tmp_path, n=1, **small)
    with pytest.raises(InputError, match="already exists; pass overwrite=True to replace it"):
        write_phantoms(tmp_path, n=1, **small)
    assert (
        main(
            [
                "data",
                "phantom",
                "--out",
                str(tmp_path),
                "--shape",
                "24",
                "24",
                "16",
                "--spacing",
                "8",
                "8",
                "8",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err


def test_setting_warnings_name_the_option_on_the_command_line(monkeypatch, capsys):
    """A SettingWarning raised under a command shows that command's option; elsewhere, the value."""
    import warnings

    from smartformer.commands import data_phantom
    from smartformer.errors import SettingWarning

    def run(args):
        warnings.warn(
            SettingWarning("odd case (pass {setting} to replace it)", setting="overwrite", value=True), stacklevel=1
        )
        return 0

    monkeypatch.setattr(data_phantom, "run", run)
    with pytest.warns(SettingWarning, match=r"pass --overwrite to replace it"):
        assert main(["data", "phantom", "--out", "unused"]) == 0
    with pytest.warns(SettingWarning, match=r"pass overwrite=True to replace it"):
        run(None)


def test_a_used_run_directory_names_resume_as_a_value_and_as_the_option(tmp_path, capsys):
    from smartformer.config import load_config
    from smartformer.errors import SmartformerError
    from smartformer.train.engine import pretrain

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")  # refused before it is read
    with pytest.raises(
        SmartformerError,
        match=r"holds a run already .*; pass resume=True to continue it or choose "
        r"another output folder$",
    ):
        pretrain(tmp_path, run, load_config("tiny"), progress=False)
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(run), "--no-progress"]) == 2
    assert "; pass --resume to continue it or choose another output folder" in capsys.readouterr().err


def test_config_keys_name_the_option_of_their_last_part():
    from smartformer.cli import build_parser, option_for

    parser = build_parser()
    args = parser.parse_args(["pretrain", "--data", "d", "--out", "o"])
    assert (
        option_for(parser, args, "data.skip_bad") == "--skip-bad" and option_for(parser, args, "resume") == "--resume"
    )
    assert option_for(parser, args, "overwrite") is None  # pretrain has no such option: the value stays
    args = parser.parse_args(["data", "lesions", "--data", "d", "--out", "o"])
    assert option_for(parser, args, "mask_label") == "--mask-label"
