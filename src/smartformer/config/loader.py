"""Reading a configuration: YAML presets shipped with the package, merged with dotted overrides.

``load_config("tiny", ["masking.strategy=random", "optim.lr=2e-4"])`` reads
``presets/tiny.yaml`` (or a user's YAML file, which may name a preset in ``base:``), applies the
overrides, and validates every key and type against :mod:`smartformer.config.schema`, then every
value against its range. Mistakes are :class:`~smartformer.errors.ConfigError` with the dotted
key in the message.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from smartformer.config.preset_files import PRESET_DIR, available_presets
from smartformer.config.schema import PretrainConfig
from smartformer.data.windows import parse_window
from smartformer.errors import ConfigError
from smartformer.models.sizes import SIZE_MULTIPLE, is_input_size
from smartformer.models.smartformer import MODEL_PRESETS, SMARTConfig
from smartformer.models.swin3d import Swin3DConfig
from smartformer.models.vit3d import ViT3DConfig

__all__ = [
    "load_config",
    "config_from_dict",
    "validate_ranges",
    "available_presets",
    "build_model_config",
    "parse_override",
]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists to tuples and ints to floats."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, get_args(tp)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and len(args) > 1
                and args[1] is not Ellipsis
            ):
                value = [value] * len(args)  # a scalar stands for an isotropic triple
            else:
                raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(tp, type) and is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _resolve(source: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset name or a YAML file; a file may inherit from a preset or file via ``base:``."""
    path = Path(source)
    if source in available_presets() and not path.is_file():
        data = _read_yaml(PRESET_DIR / f"{source}.yaml")
    elif path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{source}: config file not found")
        data = _read_yaml(path)
    else:
        raise ConfigError(f"{source}: not a preset ({', '.join(available_presets())}) nor a YAML file")
    parent = data.pop("base", None)
    if parent is None and not (source in available_presets() and not path.is_file()):
        # A user file without base: starts from the preset it names (default tiny), so that an
        # empty file, or one that sets a few keys, means that preset plus those keys.
        named = data.get("preset", PretrainConfig.preset)
        parent = named if isinstance(named, str) and named in available_presets() else None
    if parent is not None:
        if parent in seen:
            raise ConfigError(f"{source}: circular base: {parent}")
        data = _merge(_resolve(str(parent), seen + (source,)), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(source: str = "tiny", overrides: Sequence[str] = ()) -> PretrainConfig:
    """Resolve a preset name or YAML path, apply ``section.key=value`` overrides, and validate."""
    data = _resolve(source)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[path[-1]] = value
    config = _build(PretrainConfig, data, "")
    validate_ranges(config)
    build_model_config(config)  # validates the model section now, not at the first step
    return config


#: Range checks of values, by dotted key: (test, what the value must be). Keys not listed are
#: checked for type only (and floats for being finite).
_RANGES: dict[str, tuple[Any, str]] = {
    "data.spacing": (lambda v: all(x > 0 for x in v), "positive (mm)"),
    "data.roi": (
        is_input_size,
        f"multiples of {SIZE_MULTIPLE} (the Swin encoder downsamples by {SIZE_MULTIPLE}), e.g. [64,64,64]",
    ),
    "data.batch_size": (lambda v: v >= 1, "at least 1"),
    "data.num_workers": (lambda v: v >= 0, "0 or more"),
    "data.intensity_scale": (lambda v: v >= 0, "0 or more"),
    "data.intensity_shift": (lambda v: v >= 0, "0 or more"),
    "data.flip_prob": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "data.min_body_fraction": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "data.min_view_overlap": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "data.local_views": (lambda v: v >= 0, "0 or more (0: off)"),
    "data.local_roi": (is_input_size, f"multiples of {SIZE_MULTIPLE}, e.g. [32,32,32]"),
    "teacher.momentum": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "teacher.noise_ratio": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "teacher.noise_sigma": (lambda v: v >= 0, "0 or more"),
    "masking.ratio": (lambda v: 0 < v < 1, "above 0 and below 1"),
    "masking.hint_ratio": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "masking.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "loss.recon_weight": (lambda v: v >= 0, "0 or more"),
    "loss.patch_weight": (lambda v: v >= 0, "0 or more"),
    "loss.cls_weight": (lambda v: v >= 0, "0 or more"),
    "loss.global_weight": (lambda v: v >= 0, "0 or more"),
    "loss.koleo_weight": (lambda v: v >= 0, "0 or more"),
    "loss.student_temp": (lambda v: v > 0, "positive"),
    "loss.teacher_temp": (lambda v: v > 0, "positive"),
    "loss.warmup_teacher_temp": (lambda v: v > 0, "positive"),
    "loss.warmup_teacher_temp_steps": (lambda v: v >= 0, "0 or more"),
    "loss.patch_teacher_temp": (lambda v: v > 0, "positive (or null: the same as loss.teacher_temp)"),
    "loss.center_momentum": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "loss.cls_queue": (lambda v: v >= 0, "0 or more"),
    "optim.lr": (lambda v: v > 0, "positive"),
    "optim.min_lr": (lambda v: v >= 0, "0 or more"),
    "optim.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "optim.warmup_fraction": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "optim.weight_decay": (lambda v: v >= 0, "0 or more"),
    "optim.weight_decay_end": (lambda v: v >= 0, "0 or more"),
    "optim.clip_grad": (lambda v: v > 0, "positive"),
    "optim.freeze_last_layer_steps": (lambda v: v >= 0, "0 or more"),
    "train.max_steps": (lambda v: v >= 1, "at least 1"),
    "train.log_every": (lambda v: v >= 1, "at least 1"),
    "train.checkpoint_every": (lambda v: v >= 1, "at least 1"),
    "train.snapshot_every": (lambda v: v >= 1, "at least 1"),
    "train.head_distance_every": (lambda v: v >= 0, "0 or more (0: off)"),
    "train.threads": (lambda v: v >= 0, "0 or more (0: torch's default)"),
    "train.max_minutes": (lambda v: v >= 0, "0 or more (0: no limit)"),
    "train.device": (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:N"),
}


def validate_ranges(config: PretrainConfig) -> None:
    """Check every value of ``config`` against its allowed range (types are checked when built).

    Raises:
        ConfigError: one line naming the first value out of range and what it must be.
    """
    for section in fields(config):
        node = getattr(config, section.name)
        if not is_dataclass(node):
            continue
        for f in fields(node):
            key, value = f"{section.name}.{f.name}", getattr(node, f.name)
            numbers = value if isinstance(value, tuple) else (value,)
            if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):
                raise ConfigError(f"{key}: {value!r} must be a finite number")
            check = _RANGES.get(key)
            if check is not None and value is not None and not check[0](value):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{key}: {shown!r} is out of range; it must be {check[1]}")
    if config.data.local_views and any(lr > r for lr, r in zip(config.data.local_roi, config.data.roi)):
        raise ConfigError(
            f"data.local_roi: {list(config.data.local_roi)} is out of range; it must be at most "
            f"data.roi {list(config.data.roi)} along every axis (local views are the smaller ones)"
        )

    try:
        parse_window(config.data.window)
    except ConfigError as exc:
        raise ConfigError(f"data.{exc}") from None


def _each(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


#: Range checks of the model section, by key under ``model.`` (sizes must be at least 1).
_MODEL_RANGES: dict[str, tuple[Any, str]] = {
    **{
        key: (lambda v: all(x >= 1 for x in _each(v)), "at least 1")
        for key in (
            "backbone.embed_dim",
            "backbone.depths",
            "backbone.num_heads",
            "backbone.window_size",
            "semantic_depth",
            "semantic_heads",
            "head_out_dim",
            "head_hidden_dim",
            "head_bottleneck_dim",
            "head_nlayers",
            "patch_out_dim",
            "vit.patch_size",
            "vit.hidden_size",
            "vit.mlp_dim",
            "vit.num_layers",
            "vit.num_heads",
        )
    },
    "backbone.mlp_ratio": (lambda v: v > 0, "positive"),
    "backbone.drop_path_rate": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "semantic_layer_scale": (lambda v: v > 0, "positive"),
    "semantic_stage": (lambda v: v in (1, 2, 3, 4), "1, 2, 3 or 4"),
}


def _check_model_ranges(values: dict[str, Any]) -> None:
    """Range checks of the merged model section (``backbone.*`` keys flattened); values of the
    wrong type are left to the type checks, which name them."""
    for key, (test, what) in _MODEL_RANGES.items():
        value = values.get(key)
        try:
            ok = value is None or test(value)
        except TypeError:
            continue
        if not ok:
            raise ConfigError(f"model.{key}: {value!r} is out of range; it must be {what}")


def config_from_dict(data: dict[str, Any]) -> PretrainConfig:
    """A :class:`PretrainConfig` from its ``to_dict()`` form (e.g. a checkpoint's ``config``), validated."""
    config = _build(PretrainConfig, data, "")
    validate_ranges(config)
    return config


def build_model_config(config: PretrainConfig) -> SMARTConfig:
    """The :class:`SMARTConfig` named by ``preset`` with the ``model`` section applied."""
    if config.preset not in MODEL_PRESETS:
        raise ConfigError(f"preset: unknown model preset {config.preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    base = MODEL_PRESETS[config.preset].to_dict()
    overrides = dict(config.model)
    backbone = _merge(base.pop("backbone"), overrides.pop("backbone", {}) or {})
    vit = base.pop("vit")
    if "vit" in overrides:  # a mapping merges into the preset's ViT (or starts one); null drops it
        extra = overrides.pop("vit")
        vit = _merge(vit or {}, extra) if isinstance(extra, dict) else extra
    try:
        merged = SMARTConfig.upgrade({**base, **overrides})
    except ValueError as exc:
        raise ConfigError(f"model.{exc}") from None
    hints = typing.get_type_hints(SMARTConfig)
    for key, value in merged.items():
        if key not in hints:
            raise ConfigError(f"unknown config key model.{key}")
        if key != "backbone":
            merged[key] = _coerce(value, hints[key], f"model.{key}")
    _check_model_ranges(
        {
            **merged,
            **{f"backbone.{k}": v for k, v in backbone.items()},
            **{f"vit.{k}": v for k, v in (vit if isinstance(vit, dict) else {}).items()},
        }
    )
    try:
        bb = _build(Swin3DConfig, backbone, "model.backbone.")
        bb.grad_checkpointing = bb.grad_checkpointing or config.train.grad_checkpointing
        vit_cfg = None if vit is None else _build(ViT3DConfig, vit, "model.vit.")
        if vit_cfg is not None and config.data.roi != vit_cfg.img_size:
            raise ConfigError(
                f"data.roi {list(config.data.roi)} must equal model.vit.img_size "
                f"{list(vit_cfg.img_size)} (the ViT's position embeddings are learnt for it)"
            )
        return SMARTConfig(**{**merged, "backbone": bb, "vit": vit_cfg})
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
