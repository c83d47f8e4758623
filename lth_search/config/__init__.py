"""The experiment configuration: one pydantic schema (the only source of defaults) and its loading.

schema.py is the top (ExperimentConfig, validation); each YAML section has a module of
its own beside it (data.py, model.py, train.py, prune.py, diagnostics.py, search.py,
runtime.py); load.py reads YAML and `--set` overrides.
"""

from lth_search.config.data_section import DataConfig
from lth_search.config.diagnostics_section import DiagnosticsConfig
from lth_search.config.load import apply_override, load_config
from lth_search.config.model import ModelConfig
from lth_search.config.prune import KINDS, PruneConfig
from lth_search.config.schema import ExperimentConfig, default_output_dir, validate_config
from lth_search.config.search import SearchConfig
from lth_search.config.train_section import TrainConfig, resolve_steps

__all__ = [
    "KINDS", "DataConfig", "DiagnosticsConfig", "ExperimentConfig", "ModelConfig", "PruneConfig", "SearchConfig",
    "TrainConfig", "apply_override", "default_output_dir", "load_config", "resolve_steps", "validate_config",
]
