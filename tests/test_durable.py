"""Where a search's results go, decided before anything is written (search/durable.py).

The Ray job itself is tests/test_ray_cluster.py; here each rule of `check_durable` on its own,
with the variable Ray sets for a job's entrypoint set or not.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from lth_search.config import load_config
from lth_search.errors import ConfigError
from lth_search.search.durable import RAY_JOB_ENV, check_durable, result_places


@pytest.fixture
def in_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RAY_JOB_ENV, '{"runtime_env": {}}')
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_outside_a_job_the_default_output_dir_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    check_durable(_cfg())


@pytest.mark.usefixtures("in_job")
@pytest.mark.parametrize("overrides, named", [
    ((), "store.uri nor tracking.uri (or $MLFLOW_TRACKING_URI)"),
    (("store.uri=s3://b/lth/store",), "no tracking.uri (or $MLFLOW_TRACKING_URI) is given"),
    (("tracking.uri=http://mlflow:5000",), "no store.uri is given"),
    (("store.uri=store", "tracking.uri=http://mlflow:5000"), "store.uri: inside a Ray job the relative path store"),
])
def test_a_job_must_be_told_where_results_go(overrides: tuple[str, ...], named: str) -> None:
    with pytest.raises(ConfigError, match="inside a Ray job") as error:
        check_durable(_cfg(*overrides))
    assert named in str(error.value) and "\n" not in str(error.value)


@pytest.mark.usefixtures("in_job")
@pytest.mark.parametrize("overrides", [
    ("output_dir=/srv/lth_runs",),
    ("store.uri=s3://b/lth/store", "tracking.uri=http://mlflow:5000"),
    ("store.uri=/nfs/lth/store", "tracking.enabled=false"),
])
def test_a_job_told_where_results_go_runs(overrides: tuple[str, ...]) -> None:
    check_durable(_cfg(*overrides))


def test_a_job_may_name_mlflow_by_its_variable(in_job: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    check_durable(_cfg("store.uri=s3://b/lth/store"))


def test_rays_temporary_folder_is_refused_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    ray_tmp = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "out"
    with pytest.raises(ConfigError, match=r"^output_dir: the search's stages would go to .*Ray's temporary folder"):
        check_durable(_cfg(f"output_dir={ray_tmp}"))
    with pytest.raises(ConfigError, match=r"^tracking.uri: the search's MLflow would go to"):
        check_durable(_cfg("output_dir=/srv/lth_runs", f"tracking.uri=sqlite:///{ray_tmp}/mlflow.db"))


def test_the_places_line_names_every_result() -> None:
    places = result_places(_cfg("store.uri=s3://b/lth/store", "tracking.uri=http://mlflow:5000"))
    assert places.line() == ("  results: stages s3://b/lth/store; MLflow http://mlflow:5000; resume state "
                             "s3://b/lth/searches; Ray results s3://b/lth/ray")
    assert "MLflow off;" in result_places(_cfg("tracking.enabled=false")).line()
