"""Pretraining configuration: YAML presets shipped with the package, merged with dotted overrides.

``load_config("tiny", ["masking.strategy=random", "optim.lr=2e-4"])`` reads
``presets/tiny.yaml`` (or a user's YAML file, which may name a preset in ``base:``), applies the
overrides, and validates every key and type. Mistakes are :class:`~smartformer.errors.ConfigError`
with the dotted key in the message.

The sections and their defaults are in :mod:`.schema`; reading, merging and validation in
:mod:`.loader`. Both are re-exported here, so ``from smartformer.config import ...`` is the one
import a caller needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from smartformer.config import preset_files, schema
from smartformer.config.preset_files import PRESET_DIR, available_presets
from smartformer.config.schema import (
    DataConfig,
    LossConfig,
    MaskingConfig,
    OptimConfig,
    PretrainConfig,
    TeacherConfig,
    TrainConfig,
)

if TYPE_CHECKING:
    from smartformer.config import loader
    from smartformer.config.loader import (
        build_model_config,
        config_from_dict,
        load_config,
        parse_override,
        validate_ranges,
    )

#: The loader validates against the model configurations, so it imports the models and torch:
#: it is imported on first use, so that listing the presets (``smartformer --help``) stays torch-free.
_LOADER_NAMES = ("build_model_config", "config_from_dict", "load_config", "parse_override", "validate_ranges")


def __getattr__(name: str) -> Any:
    if name == "loader" or name in _LOADER_NAMES:
        module = importlib.import_module("smartformer.config.loader")
        return module if name == "loader" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*schema.__all__, *preset_files.__all__, *_LOADER_NAMES]
