"""The experiment configuration: one pydantic schema (the only source of defaults) and its loading."""

from lth_search.config.load import apply_override, load_config
from lth_search.config.schema import (
    DATA_SETS,
    MODELS,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    PruneConfig,
    SearchConfig,
    TrainConfig,
    default_output_dir,
    resolve_steps,
    validate_config,
)

__all__ = [
    "DATA_SETS", "MODELS", "DataConfig", "ExperimentConfig", "ModelConfig", "PruneConfig", "SearchConfig",
    "TrainConfig", "apply_override", "default_output_dir", "load_config", "resolve_steps", "validate_config",
]
