"""Typed, frozen configuration for every fedft run, loaded from TOML with ``--set`` overrides.

``sections`` declares the dataclasses (each field's limits beside it, via ``fields.option``);
``loading`` reads TOML, applies ``--set`` overrides, resolves paths and validates. Components
take the section they use (``TrainConfig``, ``LoraConfig``, ...), not the whole config.
"""

from fedft.config.fields import ConfigError, FrozenTable, option
from fedft.config.loading import apply_overrides, config_from_dict, config_to_dict, load_config, parse_override
from fedft.config.sections import (
    DEMO_MODEL,
    PATH_FIELDS,
    ROW_FIELDS,
    SECTIONS,
    DataConfig,
    DpoConfig,
    FedftConfig,
    LoraConfig,
    ModelConfig,
    PrivacyConfig,
    ReportConfig,
    SimulationConfig,
    StrategyConfig,
    TrainConfig,
    demo_model_dir,
)

__all__ = [
    "ConfigError", "FrozenTable", "option", "apply_overrides", "config_from_dict", "config_to_dict", "load_config",
    "parse_override", "DEMO_MODEL", "PATH_FIELDS", "ROW_FIELDS", "SECTIONS", "DataConfig", "DpoConfig", "FedftConfig",
    "LoraConfig", "ModelConfig", "PrivacyConfig", "ReportConfig", "SimulationConfig", "StrategyConfig", "TrainConfig",
    "demo_model_dir",
]
