"""megamft's one typed config tree: YAML plus dotted ``key=value`` overrides.

- ``schema``: the sections megamft owns (``model``, ``parallel``, ``data``, ``train``,
  ``loss``, ``lora``, ``checkpoint``, ``eval``), a dataclass each with a docstring per field;
- ``loading``: YAML files and overrides; unknown keys and wrong types are errors, and
  megatron-core's own sections (``optimizer``, ``ddp``, ``transformer``) are checked
  against megatron's dataclasses;
- ``validation``: cross-section rules (divisibility, world size), checked before any
  process group starts.
"""

from megamft.config.loading import apply_override, from_dict, load_config, to_dict
from megamft.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoraConfig,
    LossConfig,
    MegamftConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from megamft.config.validation import data_parallel_size, validate

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "LossConfig",
    "MegamftConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "apply_override",
    "data_parallel_size",
    "from_dict",
    "load_config",
    "to_dict",
    "validate",
]
