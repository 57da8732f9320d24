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

from smartformer.config import loader, schema
from smartformer.config.loader import (
    PRESET_DIR,
    available_presets,
    build_model_config,
    config_from_dict,
    load_config,
    parse_override,
    validate_ranges,
)
from smartformer.config.schema import (
    DataConfig,
    LossConfig,
    MaskingConfig,
    OptimConfig,
    PretrainConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [*schema.__all__, *loader.__all__, "PRESET_DIR"]
