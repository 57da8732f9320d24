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
