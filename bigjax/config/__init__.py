"""Typed, frozen run configuration and its one strict conversion from a ConfigDict.

Configs are written as `ml_collections.ConfigDict`s (Python files under `configs/`). They are
converted exactly once into frozen dataclasses: unknown keys, wrong types and inconsistent
values fail early with a `ConfigError` that names the key and the fix. Defaults live only in
the dataclasses. Library functions take the narrow sub-config they need.

One job per module: `rules` (the sharding vocabulary), `presets` (model sizes and families),
`schema` (the dataclasses and their choices), `convert` (ConfigDict -> TrainConfig and back),
`validate` (cross-field checks), `load` (a config file plus command-line overrides). None of
them imports JAX, so a config error is reported before any heavy import.
"""

from __future__ import annotations

from bigjax.config.convert import (
    MICRO_BATCH,
    from_configdict,
    load_python_function,
    merge_groups,
    to_dict,
)
from bigjax.config.load import load_config, parse_override, set_path, without
from bigjax.config.presets import (
    FAMILY_DEFAULTS,
    LLAMA32_ROPE,
    MODEL_SIZES,
)
from bigjax.config.rules import (
    DEFAULT_RULES,
    LOGICAL_AXES,
    MESH_AXES,
    full_mesh_shape,
)
from bigjax.config.schema import (
    ATTENTION_IMPLS,
    DTYPES,
    MLPS,
    NORMS,
    OPTIMIZERS,
    POSITIONS,
    REMAT_POLICIES,
    ROPE_SCALINGS,
    SCHEDULES,
    WEIGHT_DECAY_MASKS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    EvalConfig,
    FinetuneConfig,
    MeshConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    PrivacyConfig,
    RobustConfig,
    TrainConfig,
    unknown_choice,
)
from bigjax.config.validate import advice, check_mesh_axes, validate

__all__ = [
    "advice",
    "ATTENTION_IMPLS",
    "CheckpointConfig",
    "ConfigError",
    "DEFAULT_RULES",
    "DTYPES",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "FAMILY_DEFAULTS",
    "FinetuneConfig",
    "LLAMA32_ROPE",
    "LOGICAL_AXES",
    "MESH_AXES",
    "full_mesh_shape",
    "MICRO_BATCH",
    "MLPS",
    "MODEL_SIZES",
    "MeshConfig",
    "MetricsConfig",
    "ModelConfig",
    "NORMS",
    "OPTIMIZERS",
    "OptimConfig",
    "POSITIONS",
    "PrivacyConfig",
    "REMAT_POLICIES",
    "ROPE_SCALINGS",
    "RobustConfig",
    "SCHEDULES",
    "TrainConfig",
    "WEIGHT_DECAY_MASKS",
    "from_configdict",
    "load_config",
    "load_python_function",
    "merge_groups",
    "parse_override",
    "set_path",
    "to_dict",
    "unknown_choice",
    "validate",
    "check_mesh_axes",
    "without",
]
