"""One way to name a checkpoint: every form a user has, resolved to one network.

As timm keeps its ``_hub``, every command, the downstream evaluations and the benchmarks load
their encoders here, so they all accept the same forms and refuse the same mistakes with the same
one-line :class:`~smartformer.errors.CheckpointError` (the checkpoint, then the reason):

=================================  =======================================================================
``runs/ct1``                       a pretraining run directory (``pretrain --out``): its ``teacher/``, or the
                                   teacher of ``checkpoints/last.pt`` while the run has written no ``teacher/``
``runs/ct1/teacher``               a ``save_pretrained`` directory (``model.safetensors`` + ``config.json``)
``runs/ct1/checkpoints/last.pt``   a training checkpoint (``last.pt``, ``step_N.pt``): its teacher (or student)
``weights.safetensors`` / ``.pt``  a weights file: ``save_pretrained``'s ``model.safetensors`` (read with the
                                   ``config.json`` beside it), or bare Swin encoder weights such as ``export``'s
                                   output or a MONAI ``SwinUNETR`` checkpoint: the encoder alone, its
                                   architecture read from the tensors, without semantic attention
``smart-tiny-ct``                  a pretrained model shipped inside the package (:data:`PRETRAINED`)
``random:tiny``, ``random:tiny@7``  a preset with random weights (the untrained baseline), seeded by the
                                   caller's seed, or by the one after ``@``
=================================  =======================================================================

A path that exists wins over a shipped name. Training checkpoints and weights files load with
``weights_only=True``: no code in them ever runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from smartformer.config import build_model_config, config_from_dict
from smartformer.errors import CheckpointError, InputError, SmartformerError
from smartformer.models.convert import checkpoint_filter_fn, load_weights
from smartformer.models.smartformer import (
    CONFIG_NAME,
    MODEL_PRESETS,
    PRETRAINED,
    WEIGHTS_NAME,
    SMARTConfig,
    SMARTFormer,
    pretrained_path,
)
from smartformer.models.swin3d import Swin3DConfig
from smartformer.train.checkpoint import CHECKPOINT_DIR, LAST, check_state_fits, last_checkpoint, step_checkpoints

__all__ = [
    "RANDOM_PREFIX",
    "Checkpoint",
    "checkpoint_names",
    "infer_swin_config",
    "load_encoder",
    "preset_of",
    "random_baseline",
    "resolve_checkpoint",
]

RANDOM_PREFIX = "random:"
#: Which network of a training checkpoint (or of a run directory's ``checkpoints/last.pt``).
Which = Literal["teacher", "student"]
#: Keys of the parts an encoder never uses downstream (projection heads, the reconstruction decoder).
_HEAD_PREFIXES = ("cls_head.", "patch_head.", "decoder.", "global_head.", "global_norm.")
#: Config fields that leave the encoder's architecture and initialisation as they are.
_NOT_ENCODER = (
    "heads",
    "global_head",
    "head_out_dim",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "head_nlayers",
    "patch_out_dim",
    "shared_head",
    "decoder",
    "decoder_stride",
)
_RUN_TIME = ("drop_path_rate", "fused_attn", "grad_checkpointing")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint argument, resolved: which form it is and where its weights are.

    ``kind`` is ``pretrained`` (a save_pretrained directory, also a run's ``teacher/`` and a shipped
    model), ``training`` (a training checkpoint file, also a run directory without ``teacher/``),
    ``weights`` (a weights file) or ``random``. ``path`` is the directory or file read (None for
    ``random``); ``run`` the pretraining run it belongs to, if any.
    """

    spec: str
    kind: Literal["pretrained", "training", "weights", "random"]
    path: Path | None = None
    run: Path | None = None
    preset: str | None = None
    seed: int | None = None

    @property
    def source(self) -> str:
        """What was read, for summaries: the resolved path, or the ``random:`` argument itself."""
        return str(self.path) if self.path is not None else self.spec

    @property
    def base_name(self) -> str:
        """A short name for tables and plots (made unique by :func:`checkpoint_names`).

        A run's ``teacher/`` and its checkpoints are named after the run (``ct1``, ``ct1_step_0000100``);
        ``random:tiny`` is ``random_tiny`` and ``random:tiny@7`` is ``random_tiny_seed7``.
        """
        if self.kind == "random":
            return f"random_{self.preset}" + (f"_seed{self.seed}" if self.seed is not None else "")
        assert self.path is not None
        if self.run is not None:
            own = self.path.name in ("teacher", LAST, WEIGHTS_NAME)
            return self.run.name if own else f"{self.run.name}_{self.path.stem}"
        if self.kind == "weights" and (self.path.parent / CONFIG_NAME).is_file():
            return self.path.parent.name  # save_pretrained's model.safetensors: named as its folder
        return self.path.stem if self.path.is_file() else self.path.name

    def load(self, seed: int = 0, which: Which = "teacher") -> SMARTFormer:
        """The network, without projection heads or decoder, in eval mode.

        ``seed`` draws the weights of ``random:PRESET`` (``random:PRESET@SEED`` keeps its own), so
        the baseline is the same network in every run; ``which`` picks the network of a training
        checkpoint.

        Raises:
            CheckpointError: unreadable weights, or weights that do not fit their config (one line
                naming both and the first tensor that differs).
        """
        if which == "student" and self.kind == "pretrained" and self.run is not None:
            return self._student()
        try:
            if self.kind == "random":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed if self.seed is not None else seed)
                    model = SMARTFormer.from_preset(str(self.preset), heads=False, decoder=False)
            elif self.kind == "pretrained":
                assert self.path is not None
                model = _load_pretrained(self.path / CONFIG_NAME, self.path / WEIGHTS_NAME)
            elif self.kind == "training":
                assert self.path is not None
                model = _load_training(load_weights(self.path), self.path, which)
            else:
                model = _load_weights_file(self, which)
        except CheckpointError:
            raise
        except InputError as exc:
            raise CheckpointError(exc.path, exc.reason) from None
        except SmartformerError as exc:
            raise CheckpointError(self.spec, str(exc)) from None
        return model.eval()

    def _student(self) -> SMARTFormer:
        """The student of a run directory: its newest training checkpoint (``teacher/`` holds the teacher)."""
        assert self.run is not None
        newest = last_checkpoint(self.run) or next(iter(step_checkpoints(self.run)), None)
        if newest is None:
            raise CheckpointError(
                self.spec, "holds no training checkpoint (checkpoints/last.pt), whose student was asked for"
            )
        return Checkpoint(self.spec, "training", newest, run=self.run).load(which="student")


def resolve_checkpoint(spec: str | Path) -> Checkpoint:
    """Which form ``spec`` is (see the module docstring), without loading its weights.

    Raises:
        CheckpointError: ``spec`` is none of the forms: a missing path, a folder without a
            checkpoint, an unknown ``random:`` preset or seed.
    """
    text = str(spec)
    if text.startswith(RANDOM_PREFIX):
        return _random(text)
    path = Path(text).expanduser()
    if not path.exists():
        shipped = pretrained_path(text)
        if shipped is not None:
            return Checkpoint(text, "pretrained", shipped)
        raise CheckpointError(
            text, "does not exist, and is no shipped model (" + ", ".join(PRETRAINED) + ") nor random:PRESET"
        )
    if path.is_file():
        run = path.parent.parent if path.parent.name == CHECKPOINT_DIR else None
        if path.suffix == ".safetensors" or (path.parent / CONFIG_NAME).is_file():
            return Checkpoint(text, "weights", path, run=_run_of(path.parent) if path.name == WEIGHTS_NAME else None)
        return Checkpoint(text, "training" if run is not None else "weights", path, run=run)
    if _is_pretrained(path):
        return Checkpoint(text, "pretrained", path, run=_run_of(path))
    if _is_pretrained(path / "teacher"):
        return Checkpoint(text, "pretrained", path / "teacher", run=path)
    newest = last_checkpoint(path) or next(iter(step_checkpoints(path)), None)
    if newest is not None:
        return Checkpoint(text, "training", newest, run=path)
    raise CheckpointError(
        text,
        f"holds no checkpoint: a folder needs {WEIGHTS_NAME} + {CONFIG_NAME} "
        "(save_pretrained), or teacher/ or checkpoints/last.pt (a pretraining run)",
    )


def load_encoder(
    spec: str | Path, seed: int = 0, which: Which = "teacher", need_attention: bool = False
) -> SMARTFormer:
    """The network of a checkpoint argument (any form; see :func:`resolve_checkpoint` and
    :meth:`Checkpoint.load`), without projection heads or decoder, in eval mode.

    ``need_attention`` refuses, in one line, a network without semantic attention maps (the
    pooled-token ablation, or bare encoder weights); token features need no such module.
    """
    checkpoint = resolve_checkpoint(spec)
    model = checkpoint.load(seed=seed, which=which)
    if need_attention and not model.has_attention:
        reason = (
            "bare encoder weights"
            if checkpoint.kind == "weights" and _is_bare(checkpoint)
            else "built with semantic_attention=False"
        )
        raise CheckpointError(checkpoint.spec, f"this model has no semantic attention module ({reason})")
    return model


def checkpoint_names(specs: list[str] | list[Path], reserved: tuple[str, ...] = ()) -> list[str]:
    """Short unique names of checkpoint arguments (:attr:`Checkpoint.base_name`, ``_2``, ``_3``... on
    repeats), none of them in ``reserved``.

    Raises:
        CheckpointError: an argument that is no checkpoint (see :func:`resolve_checkpoint`).
    """
    names: list[str] = []
    for spec in specs:
        base = resolve_checkpoint(spec).base_name
        name, k = base, 2
        while name in names or name in reserved:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def preset_of(config: SMARTConfig) -> str | None:
    """The model preset whose encoder ``config`` builds (heads, decoder and run-time switches such as
    drop path aside), else None."""

    def encoder(c: SMARTConfig) -> str:
        data = {k: v for k, v in c.to_dict().items() if k not in _NOT_ENCODER}
        data["backbone"] = {k: v for k, v in data["backbone"].items() if k not in _RUN_TIME}
        return json.dumps(data, sort_keys=True, default=str)

    wanted = encoder(config)
    return next((name for name, preset in MODEL_PRESETS.items() if encoder(preset) == wanted), None)


def random_baseline(model: SMARTFormer, seed: int = 0, like: str = "model") -> tuple[str, SMARTFormer]:
    """The untrained baseline of ``model``: its encoder with random weights drawn from ``seed``, in eval mode,
    and its name: ``random_PRESET``, as ``random:PRESET`` is named by :func:`checkpoint_names` (the same
    network), or ``random_LIKE`` for an architecture that is no preset."""
    preset = preset_of(model.config)
    if preset is not None:
        return f"random_{preset}", Checkpoint(f"{RANDOM_PREFIX}{preset}", "random", preset=preset).load(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return f"random_{like}", SMARTFormer(_encoder_config(model.config)).eval()


def infer_swin_config(backbone: Mapping[str, Any]) -> Swin3DConfig:
    """The :class:`Swin3DConfig` that backbone weights (Swin3D keys) imply: width, depths, heads, window.

    Raises:
        SmartformerError: the weights lack the tensors the architecture is read from.
    """
    try:
        embed_dim = int(backbone["patch_embed.proj.weight"].shape[0])
        depths, heads, window = [], [], None
        for stage in range(1, 5):
            blocks = {int(m.group(1)) for k in backbone if (m := re.match(rf"layers{stage}\.0\.blocks\.(\d+)\.", k))}
            table = backbone[f"layers{stage}.0.blocks.0.attn.relative_position_bias_table"]
            depths.append(max(blocks) + 1)
            heads.append(int(table.shape[1]))
            side = round(table.shape[0] ** (1 / 3))
            window = (side + 1) // 2
        return Swin3DConfig(
            embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), window_size=(window,) * 3
        )
    except (KeyError, ValueError, IndexError) as exc:
        raise SmartformerError(f"cannot tell the encoder architecture from the weights (missing {exc})") from None


# ------------------------------------------------------------------------------------ the forms
def _random(text: str) -> Checkpoint:
    preset, _, seed = text[len(RANDOM_PREFIX) :].partition("@")
    if preset not in MODEL_PRESETS:
        raise CheckpointError(text, "unknown preset; choose " + ", ".join(f"random:{p}" for p in sorted(MODEL_PRESETS)))
    if seed and not seed.isdigit():
        raise CheckpointError(text, f"the seed after @ must be a whole number >= 0, got {seed!r}")
    return Checkpoint(text, "random", preset=preset, seed=int(seed) if seed else None)


def _is_pretrained(folder: Path) -> bool:
    return folder.is_dir() and (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def _run_of(folder: Path) -> Path | None:
    """The run whose ``teacher/`` ``folder`` is (a folder named teacher/ is taken as one)."""
    return folder.parent if folder.name == "teacher" else None


def _encoder_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}


def _encoder_config(config: SMARTConfig) -> SMARTConfig:
    return SMARTConfig.from_dict({**config.to_dict(), "heads": False, "decoder": False, "global_head": False})


def _fit(
    model: SMARTFormer | torch.nn.Module,
    state: Mapping[str, Any],
    config: str,
    weights: Path,
    leave_out: tuple[str, ...] = (),
) -> Any:
    """Load ``state`` strictly into ``model`` (but for the keys ``leave_out``); a misfit is one line naming
    the weights, where the architecture came from, and the first tensor that differs."""
    expected = {k: v for k, v in model.state_dict().items() if k not in leave_out}
    try:
        check_state_fits(expected, state, config, str(weights))
    except SmartformerError as exc:  # "WEIGHTS does not fit CONFIG: ..."
        raise CheckpointError(weights, str(exc)[len(str(weights)) :].lstrip()) from None
    model.load_state_dict(state, strict=not leave_out)
    return model


def _load_pretrained(config_path: Path, weights: Path) -> SMARTFormer:
    """A ``save_pretrained`` pair: ``config.json`` and a safetensors weights file."""
    try:
        config = SMARTConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8"))["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(config_path, f"not a valid smartformer config ({exc})") from None
    return _fit(SMARTFormer(_encoder_config(config)), _encoder_state(load_weights(weights)), str(config_path), weights)


def _load_training(state: Any, source: Path, which: Which) -> SMARTFormer:
    """A training checkpoint: the network ``which``, built from the run's config stored with it."""
    if (
        not isinstance(state, dict)
        or not isinstance(state.get(which), dict)
        or not isinstance(state.get("config"), dict)
    ):
        raise InputError(source, f"not a smartformer training checkpoint (no {which} weights and config)")
    config = build_model_config(config_from_dict(state["config"]))
    return _fit(
        SMARTFormer(_encoder_config(config)),
        _encoder_state(state[which]),
        f"the run config stored with it ({which} weights)",
        source,
    )


def _is_bare(checkpoint: Checkpoint) -> bool:
    """Whether a weights file is read without a ``config.json`` beside it."""
    return checkpoint.path is not None and not (checkpoint.path.parent / CONFIG_NAME).is_file()


def _load_weights_file(checkpoint: Checkpoint, which: Which) -> SMARTFormer:
    """A weights file: with ``config.json`` beside it, that model; a training checkpoint by content; else
    bare Swin encoder weights (MONAI layout or ours), the encoder alone without semantic attention."""
    assert checkpoint.path is not None
    if not _is_bare(checkpoint):
        return _load_pretrained(checkpoint.path.parent / CONFIG_NAME, checkpoint.path)
    state = load_weights(checkpoint.path)
    if isinstance(state, dict) and isinstance(state.get(which), dict) and isinstance(state.get("config"), dict):
        return _load_training(state, checkpoint.path, which)  # a training checkpoint kept outside its run
    if isinstance(state, dict) and any(str(k).startswith(("semantic.", "backbone.cls_token")) for k in state):
        raise InputError(
            checkpoint.path,
            f"holds a whole SMARTFormer but no {CONFIG_NAME} beside it; give the "
            "save_pretrained directory it came from",
        )
    backbone = checkpoint_filter_fn(state, keep_mask_token=False)
    config = SMARTConfig(backbone=infer_swin_config(backbone), semantic_attention=False, heads=False, decoder=False)
    model = SMARTFormer(config)
    # all but the mask token, which no export has
    _fit(model.backbone, backbone, "the Swin encoder its tensors imply", checkpoint.path, leave_out=("mask_token",))
    return model
