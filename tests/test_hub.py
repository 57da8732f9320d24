"""One way to name a checkpoint (issue 16): every form a user has goes through ``models/hub.py``, and
every command that takes ``--checkpoint`` accepts the same forms with the same help and errors.

Everything is real: a one-step pretraining run of the tiny preset on phantoms, its ``teacher/``,
its ``checkpoints/*.pt``, an exported weights file, the shipped model and seeded random weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from test_pretrain import phantoms, pretrain  # noqa: F401  (the phantom CTs fixture)

from smartformer.cli import build_parser, main
from smartformer.commands._options import CHECKPOINT_HELP
from smartformer.errors import CheckpointError
from smartformer.models.hub import checkpoint_names, load_encoder, preset_of, random_baseline, resolve_checkpoint
from smartformer.models.smartformer import PRETRAINED, SMARTFormer, pretrained_path

pytestmark = pytest.mark.usefixtures("one_thread")

#: Commands with a --checkpoint, as the parser has them (segment's is under `segment train`).
CHECKPOINT_COMMANDS = ["attention", "export", "probe", "finetune", "localize", "features", "cluster", "segment train"]
#: The forms of a checkpoint argument, by what each test calls it.
FORMS = ["run", "teacher", "last.pt", "step.pt", "weights", "bare weights", "shipped", "random", "random@seed"]


@pytest.fixture(scope="module")
def run(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A pretraining run after one step: config.yaml, teacher/, checkpoints/last.pt and step_0000001.pt."""
    out = tmp_path_factory.mktemp("hub") / "ct1"
    assert pretrain(phantoms, out, "train.checkpoint_every=1", steps=1) == 0
    return out


@pytest.fixture(scope="module")
def exported(run: Path) -> Path:
    """``export``'s output: the bare Swin encoder under MONAI's keys, no config.json beside it."""
    out = run.parent / "exported" / "swinvit.safetensors"
    out.parent.mkdir()
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    return out


def spec_of(form: str, run: Path, exported: Path) -> str:
    return {
        "run": str(run),
        "teacher": str(run / "teacher"),
        "last.pt": str(run / "checkpoints" / "last.pt"),
        "step.pt": str(run / "checkpoints" / "step_0000001.pt"),
        "weights": str(run / "teacher" / "model.safetensors"),
        "bare weights": str(exported),
        "shipped": PRETRAINED[0],
        "random": "random:tiny",
        "random@seed": "random:tiny@7",
    }[form]


# ------------------------------------------------------------------------------- the resolver
@pytest.mark.parametrize("form", FORMS)
def test_every_form_resolves_and_loads_an_encoder(form: str, run: Path, exported: Path) -> None:
    spec = spec_of(form, run, exported)
    checkpoint = resolve_checkpoint(spec)
    kind = {
        "run": "pretrained",
        "teacher": "pretrained",
        "last.pt": "training",
        "step.pt": "training",
        "weights": "weights",
        "bare weights": "weights",
        "shipped": "pretrained",
        "random": "random",
        "random@seed": "random",
    }[form]
    assert checkpoint.kind == kind and checkpoint.spec == spec
    model = load_encoder(spec)
    assert isinstance(model, SMARTFormer) and not model.training
    assert model.cls_head is None and model.patch_head is None and model.decoder is None  # encoder only
    assert model.config.backbone.embed_dim == 24  # the tiny preset, whatever the form
    assert model.has_attention == (form != "bare weights")  # bare encoder weights: no semantic attention
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.inference_mode():
        assert model.forward_features(x)["cls"].shape[0] == 1


def test_the_run_forms_hold_the_same_teacher(run: Path, exported: Path) -> None:
    """The run, its teacher/, its checkpoints and the weights file all give the teacher after step 1;
    the exported file gives its Swin encoder."""
    reference = load_encoder(run).state_dict()
    for form in ("teacher", "last.pt", "step.pt", "weights"):
        state = load_encoder(spec_of(form, run, exported)).state_dict()
        assert state.keys() == reference.keys(), form
        assert all(torch.equal(state[k], reference[k]) for k in reference), form
    bare = load_encoder(exported).backbone.state_dict()
    assert all(torch.equal(v, reference[f"backbone.{k}"]) for k, v in bare.items() if k != "mask_token")
    student = load_encoder(run, which="student").state_dict()  # a run's student: from checkpoints/last.pt
    stored = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["student"]
    assert student.keys() == reference.keys() and all(torch.equal(student[k], stored[k]) for k in student)


def test_random_weights_are_seeded(run: Path) -> None:
    def weights(model: SMARTFormer) -> torch.Tensor:
        return model.backbone.patch_embed.proj.weight

    assert torch.equal(weights(load_encoder("random:tiny", seed=3)), weights(load_encoder("random:tiny", seed=3)))
    assert not torch.equal(weights(load_encoder("random:tiny", seed=3)), weights(load_encoder("random:tiny", seed=4)))
    # @SEED wins over the caller's seed
    assert torch.equal(weights(load_encoder("random:tiny@7", seed=0)), weights(load_encoder("random:tiny", seed=7)))
    # localize's and the demo's baseline is random:PRESET of the model's preset, by the same name
    name, model = random_baseline(load_encoder(run), seed=3, like="ct1")
    assert name == "random_tiny" == checkpoint_names(["random:tiny"])[0]
    assert torch.equal(weights(model), weights(load_encoder("random:tiny", seed=3)))
    assert preset_of(load_encoder(PRETRAINED[0]).config) == "tiny"


def test_the_shipped_model_resolves_offline_and_a_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (name,) = PRETRAINED
    assert resolve_checkpoint(name).path == pretrained_path(name)
    monkeypatch.chdir(tmp_path)
    SMARTFormer.from_preset("tiny").save_pretrained(tmp_path / name)
    assert resolve_checkpoint(name).path == Path(name)


def test_names_follow_one_rule(run: Path, exported: Path) -> None:
    specs = [spec_of(form, run, exported) for form in FORMS]
    assert checkpoint_names(specs) == [
        "ct1",
        "ct1_2",
        "ct1_3",
        "ct1_step_0000001",
        "ct1_4",
        "swinvit",
        PRETRAINED[0],
        "random_tiny",
        "random_tiny_seed7",
    ]
    assert checkpoint_names(["random:tiny"], reserved=("random_tiny",)) == ["random_tiny_2"]


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("nowhere", "does not exist, and is no shipped model"),
        ("random:huge", "unknown preset; choose random:base"),
        ("random:tiny@x", "the seed after @ must be a whole number"),
        ("EMPTY_DIR", "holds no checkpoint"),
        ("NOT_WEIGHTS", "refusing to load"),
    ],
)
def test_bad_arguments_are_one_line_naming_them(spec: str, reason: str, tmp_path: Path) -> None:
    if spec == "EMPTY_DIR":
        spec = str(tmp_path)
    elif spec == "NOT_WEIGHTS":
        (tmp_path / "notes.pt").write_text("not weights")
        spec = str(tmp_path / "notes.pt")
    with pytest.raises(CheckpointError) as caught:
        load_encoder(spec)
    message = str(caught.value)
    assert message.startswith(f"{spec}: ") and reason in message and "\n" not in message


def test_weights_that_do_not_fit_their_config_name_both(run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "encoder"
    SMARTFormer.from_preset("tiny", heads=False, decoder=False).save_pretrained(folder)
    text = (folder / "config.json").read_text(encoding="utf-8")
    (folder / "config.json").write_text(text.replace('"embed_dim": 24', '"embed_dim": 48'), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"model.safetensors: does not fit .*config.json: .*differ in shape"):
        load_encoder(folder)


# ------------------------------------------------------------------------------- the commands
def _subparser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_every_checkpoint_option_is_found() -> None:
    """No command grows a --checkpoint of its own that this file would miss."""

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> list[str]:
        found = [" ".join(path)] if any("--checkpoint" in a.option_strings for a in parser._actions) else []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += walk(sub, (*path, name))
        return found

    assert sorted(walk(build_parser(), ())) == sorted(CHECKPOINT_COMMANDS)


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_every_command_has_the_shared_checkpoint_option(command: str) -> None:
    parser = _subparser(build_parser(), command.split())
    (action,) = [a for a in parser._actions if "--checkpoint" in a.option_strings]
    assert action.help.startswith(CHECKPOINT_HELP) and action.required and action.type is None


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_every_command_refuses_a_bad_checkpoint_with_the_same_line(
    command: str,
    phantoms: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
) -> None:
    """Each command goes through the resolver: the same one-line error, before any output."""
    ct = phantoms / "case_000" / "ct.nii.gz"
    csv = tmp_path / "cases.csv"
    csv.write_text(f"image,label\n{ct},1\n")
    out = tmp_path / "out"
    rest = {
        "attention": ["--image", str(ct), "--out", str(out)],
        "export": ["--out", str(tmp_path / "w.pt")],
        "probe": ["--data", str(csv), "--out", str(out)],
        "finetune": ["--data", str(csv), "--out", str(out)],
        "localize": ["--data", str(phantoms), "--out", str(out)],
        "features": ["--data", str(csv), "--out", str(tmp_path / "f.csv")],
        "cluster": ["--image", str(ct), "--labels", str(phantoms / "case_000" / "labels.nii.gz"), "--out", str(out)],
        "segment train": ["--data", str(phantoms), "--out", str(out), "--labels", "1"],
    }[command]
    assert main([*command.split(), "--checkpoint", str(tmp_path / "nowhere"), *rest]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [
        (
            f"smartformer: error: {tmp_path / 'nowhere'}: does not exist, and is no shipped model "
            f"({PRETRAINED[0]}) nor random:PRESET"
        )
    ]
    assert not out.exists() and not (tmp_path / "w.pt").exists() and not (tmp_path / "f.csv").exists()


@pytest.mark.parametrize("form", ["run", "last.pt", "weights", "bare weights", "random@seed"])
def test_export_takes_every_form(form: str, run: Path, exported: Path, tmp_path: Path) -> None:
    """``export --checkpoint runs/ct1`` failed with 'not a save_pretrained directory' before issue 16."""
    out = tmp_path / "swinvit.pt"
    assert main(["export", "--checkpoint", spec_of(form, run, exported), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert state and all(k.startswith("swinViT.") for k in state)
    if form != "random@seed":
        reference = load_encoder(run).backbone.state_dict()
        assert all(torch.equal(v, reference[k[len("swinViT.") :]]) for k, v in state.items())


@pytest.mark.parametrize("form", ["run", "step.pt", "weights", "random@seed"])
def test_attention_takes_every_form(
    form: str,
    run: Path,
    exported: Path,
    phantoms: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    spec = spec_of(form, run, exported)
    ct = phantoms / "case_000" / "ct.nii.gz"
    assert (
        main(
            [
                "attention",
                "--checkpoint",
                spec,
                "--image",
                str(ct),
                "--out",
                str(tmp_path),
                "--spacing",
                "8",
                "--roi",
                "32",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "ct_mean.nii.gz").is_file()


def test_attention_refuses_bare_encoder_weights_in_one_line(
    exported: Path,
    phantoms: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
) -> None:
    ct = phantoms / "case_000" / "ct.nii.gz"
    assert main(["attention", "--checkpoint", str(exported), "--image", str(ct), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"smartformer: error: {exported}: this model has no semantic attention module (bare encoder weights)"
    )
