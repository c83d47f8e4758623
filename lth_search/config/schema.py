"""The experiment configuration: one pydantic schema that validates, documents and hashes.

Like open_lth's hyperparameter dataclasses, the schema is the single source of truth:
defaults live in it and nowhere else, `--set a.b=value` overrides address its fields by
dotted path, and the canonical JSON of (parts of) it is what stage keys are hashed from.
Unlike open_lth, every field is hashed (not only non-default ones), so changing a
default can never silently alias an old stored stage with a new meaning.

This module is its top: `ExperimentConfig`, the rules that span sections, and
validation with one-line errors. Each section is a module beside it, named as in the
YAML: data.py, model.py, train.py, prune.py, diagnostics.py, search.py, and runtime.py
(resources, store, tracking); section.py holds what they share.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from lth_search.config.data_section import DataConfig
from lth_search.config.diagnostics_section import DiagnosticsConfig
from lth_search.config.model import ModelConfig
from lth_search.config.names import check_location, check_name, quote
from lth_search.config.prune import PruneConfig
from lth_search.config.runtime import ResourcesConfig, StoreConfig, TrackingConfig
from lth_search.config.search import SearchConfig
from lth_search.config.section import Section
from lth_search.config.train_section import TrainConfig
from lth_search.errors import ConfigError, first_line

MAX_SEED = 2**32 - 1


class ExperimentConfig(Section):
    """A whole experiment: what `lth-search run`, `lineage` and the store agree on."""

    name: str = Field("quickstart", description="search name: MLflow experiment and resume handle")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds data split, batch order, model init and the sampler")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    search: SearchConfig = SearchConfig()
    resources: ResourcesConfig = ResourcesConfig()
    store: StoreConfig = StoreConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = Field("./lth_runs", description="mlflow.db, store/, ray/ go here (made absolute at start)")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return check_name(name, "name", ValueError, max_len=100)

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, output_dir: str) -> str:
        return check_location(output_dir, "output_dir", ValueError)

    @model_validator(mode="after")
    def _space_within_kept(self) -> "ExperimentConfig":
        steps = self.search.space.rewind_step
        if steps is not None:
            missing = sorted(set(steps) - set(self.prune.rewind_steps))
            if missing:
                raise ValueError(
                    f"search.space.rewind_step: {missing} not kept by the dense stage "
                    f"(prune.rewind_steps = {self.prune.rewind_steps}); add them there"
                )
        if isinstance(self.train.steps, int):
            late = [s for s in self.prune.rewind_steps if s >= self.train.steps]
            if late:
                raise ValueError(f"prune.rewind_steps: {late} must be < train.steps ({self.train.steps})")
        for key, candidates in self.searched_values().items():
            repeated = sorted({repr(v) for v in candidates if candidates.count(v) > 1})
            if repeated:
                raise ValueError(
                    f"search.space.{key.replace('/', '.')}: {', '.join(repeated)} listed more than once; "
                    "each value is one recipe, list it once"
                )
        if self.search.objectives == 2 and self.verdict_metric() != "accuracy":
            raise ValueError(
                f"search.objectives: 2 (sparsity and val accuracy) needs search.metric accuracy, not "
                f"{self.verdict_metric()}; use search.objectives: 1 (matching sparsity, judged on {self.verdict_metric()})"
            )
        return self

    def check_search_space(self) -> None:
        """The search space holds the default recipe (it is a trial of every search); ConfigError if not.

        Only a search asks: a lineage (`lth-search lineage`, compare) searches nothing, so
        its prune values need not be among the space's candidates.
        """
        for key, value in self.default_recipe().items():
            candidates = self.searched_values()[key]
            if value not in candidates:
                raise ConfigError(
                    f"search.space.{key.replace('/', '.')}: {candidates} must include the default recipe's "
                    f"{value!r} (prune.{key.split('/')[0]}): the default recipe is a trial of every search"
                )

    # The search space --------------------------------------------------------------------
    def searched_values(self) -> dict[str, list[Any]]:
        """Each searched choice name ("rate", "layer_ratios/output", ...) with its candidates."""
        space = self.search.space
        values: dict[str, list[Any]] = {}
        for key in ("kind", "rewind_step", "rate", "scope", "init_scale", "structure"):
            candidates = getattr(space, key)
            if candidates is not None:
                values[key] = list(candidates)
        for group, candidates in (space.layer_ratios or {}).items():
            values[f"layer_ratios/{group}"] = list(candidates)
        return values

    def default_recipe(self) -> dict[str, Any]:
        """The config's own prune values for every searched choice: plain IMP as configured.

        It is enqueued as a trial of every search and confirmed beside the search's best,
        so a summary can say what searching gained over not searching.
        """
        recipe: dict[str, Any] = {}
        for key in self.searched_values():
            if key.startswith("layer_ratios/"):
                recipe[key] = self.prune.layer_ratios.get(key.split("/", 1)[1], 1.0)
            else:
                recipe[key] = getattr(self.prune, key)
        return recipe

    @model_validator(mode="after")
    def _stability_steps_kept(self) -> "ExperimentConfig":
        missing = sorted(set(self.diagnostics.stability_steps) - set(self.prune.rewind_steps))
        if missing:
            raise ValueError(
                f"diagnostics.stability_steps: {missing} not kept by the dense stage "
                f"(prune.rewind_steps = {self.prune.rewind_steps}); add them there"
            )
        return self

    def verdict_metric(self) -> str:
        """`search.metric` with `auto` resolved: perplexity for causal language modelling
        (data.name text_lm, the one data set whose `Dataset.task` is causal_lm), accuracy for
        every other data set. The one place the default is decided: the engine's verdict,
        MLflow's names and the ticket readers all ask here (engine/lineage/metric.py)."""
        if self.search.metric != "auto":
            return self.search.metric
        return "perplexity" if self.data.name == "text_lm" else "accuracy"

    # Paths -------------------------------------------------------------------------------
    def output_path(self) -> Path:
        return resolved(self.output_dir, "output_dir")

    def store_uri(self) -> str:
        return self.store.uri or str(self.output_path() / "store")

    def tracking_uri(self) -> str:
        """`tracking.uri`, else MLflow's own `MLFLOW_TRACKING_URI`, else the sqlite file in output_dir.

        The one place the tracking URI is decided: an explicit config value wins over the
        environment, as MLflow's conventions have it, and every command reads it here.
        """
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.output_path() / 'mlflow.db'}"

    def experiment_name(self) -> str:
        """`tracking.experiment`, else MLflow's `MLFLOW_EXPERIMENT_NAME`, else the config name."""
        return self.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.name

    def absolute(self) -> "ExperimentConfig":
        """A copy whose paths are absolute and whose tracking target is resolved.

        Ray trials chdir into their own folders, and on a cluster they run on nodes that do
        not share the driver's environment: the MLflow URI and experiment the driver sees
        (config, else MLFLOW_* variables) are written into the copy so that every trial,
        and a resumed search, logs to the same place.
        """
        copy = self.model_copy(deep=True)
        copy.tracking.uri = self.tracking_uri()
        copy.tracking.experiment = self.experiment_name()
        copy.output_dir = str(self.output_path())
        copy.data.root = str(resolved(self.data.root, "data.root"))
        if copy.store.uri and "://" not in copy.store.uri:
            copy.store.uri = str(resolved(copy.store.uri, "store.uri"))
        return copy

    def with_choices(self, choices: dict[str, Any]) -> "ExperimentConfig":
        """A copy with search choices (keys of PruneConfig) applied, validated again."""
        data = self.model_dump()
        prune = data["prune"]
        for key, value in choices.items():
            if key.startswith("layer_ratios/"):
                prune["layer_ratios"][key.split("/", 1)[1]] = value
            else:
                prune[key] = value
        return validate_config(data, source="search choices")


def resolved(path: str, what: str) -> Path:
    """`path` made absolute with its symlinks resolved; ConfigError naming `what` for a symlink loop."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as error:  # Python 3.11 raises RuntimeError("Symlink loop ...")
        raise ConfigError(f"{what} {quote(path)} cannot be resolved ({first_line(error)}); a symlink loop?") from None


# Validation ---------------------------------------------------------------------------------
def _format_error(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-after"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] in ("literal_error", "value_error") or "got" in message or isinstance(item.get("input", {}), dict):
            pass
        else:
            message += f" (got {quote(item['input'])})"
        key = key if len(key) <= 100 else key[:100] + "..."
        parts.append(f"{key}: {message}" if key and not message.startswith(key) else message)
    more = f"; and {len(parts) - 5} more" if len(parts) > 5 else ""
    return f"{source}: " + "; ".join(parts[:5]) + more


def validate_config(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dict, raising ConfigError with one line naming each bad key."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_error(error, source)) from None


def default_output_dir() -> str:
    """The schema's `output_dir` default, for commands that name a search instead of a config."""
    return ExperimentConfig.model_fields["output_dir"].default
