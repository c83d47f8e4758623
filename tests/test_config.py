"""The config schema: defaults, overrides, validation messages, canonical hashing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lth_search.config import ExperimentConfig, load_config, resolve_steps
from lth_search.store.content_keys import canonical_json, content_key
from lth_search.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert cfg.prune.rewind_step in cfg.prune.rewind_steps


def test_overrides_are_yaml_typed() -> None:
    cfg = load_config(None, ["prune.rate=0.3", "model.widths=[300, 100]", "train.steps=2ep", "prune.init_scale=measured",
                             "search.space.layer_ratios={output: [0.5, 1.0]}", "tracking.enabled=false"])
    assert cfg.prune.rate == 0.3 and cfg.model.widths == [300, 100] and cfg.train.steps == "2ep"
    assert cfg.prune.init_scale == "measured" and cfg.search.space.layer_ratios == {"output": [0.5, 1.0]}
    assert cfg.tracking.enabled is False


def test_steps_resolve_to_iterations() -> None:
    assert resolve_steps("2ep", 30) == 60 and resolve_steps("500it", 30) == 500 and resolve_steps(7, 30) == 7


def test_canonical_json_and_key_are_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "x"]}) == '{"a":[1.5,"x"],"b":1}'
    assert content_key({"a": 1, "b": 2}) == content_key({"b": 2, "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 1.0000001})


def test_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["output_dir=runs", "store.uri=st"]).absolute()
    assert cfg.output_dir == str(tmp_path / "runs") and cfg.store_uri() == str(tmp_path / "st")
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    remote = load_config(None, ["store.uri=s3://bucket/lth"]).absolute()
    assert remote.store_uri() == "s3://bucket/lth"


def test_with_choices_applies_and_validates() -> None:
    cfg = load_config(None, ["prune.rewind_steps=[0, 100]"])
    chosen = cfg.with_choices({"rate": 0.4, "rewind_step": 100, "layer_ratios/output": 0.5, "init_scale": "measured"})
    assert (chosen.prune.rate, chosen.prune.rewind_step, chosen.prune.layer_ratios, chosen.prune.init_scale) == (
        0.4, 100, {"output": 0.5}, "measured")
    with pytest.raises(ConfigError, match="prune.rewind_step"):
        cfg.with_choices({"rewind_step": 50})


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["prune.rate=0"], "prune.rate"),
        (["prune.rate=1"], "prune.rate"),
        (["prune.rounds=-2"], "prune.rounds"),
        (["prune.init_scale=3"], "prune.init_scale"),
        (["train.steps=12 epochs"], "train.steps"),
        (["train.device=tpu"], "train.device"),
        (["search.space.rate=[0.2, 1.2]"], "search.space.rate"),
        (["search.space.rewind_step=[0, 7]"], "search.space.rewind_step"),
        (["prune.rewind_steps=[0, 5000]", "train.steps=1000"], "prune.rewind_steps"),
        (["name=../escape"], "name"),
        (["model.widths=[0]"], "model.widths"),
        (["data.val_size=0"], "data.val_size"),
    ],
)
def test_invalid_values_name_their_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    message = str(error.value)
    assert needle in message and "\n" not in message


def test_defaults_are_the_schema() -> None:
    assert ExperimentConfig().model_dump() == load_config(None).model_dump()


def test_mlflow_environment_sits_below_an_explicit_tracking_config(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    assert cfg.tracking_uri() == "http://mlflow.example:5000" and cfg.experiment_name() == "from-env"
    # absolute() writes what the driver saw into the config, for trials on nodes without that environment
    resolved = cfg.absolute()
    assert (resolved.tracking.uri, resolved.tracking.experiment) == ("http://mlflow.example:5000", "from-env")
    explicit = load_config(None, ["tracking.uri=sqlite:////x/mlflow.db", "tracking.experiment=mine"])
    assert explicit.tracking_uri() == "sqlite:////x/mlflow.db" and explicit.experiment_name() == "mine"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}" and cfg.experiment_name() == cfg.name
