"""Issue 21, acceptance 2: a search whose store is on S3 (`store.uri=s3://...`) survives a killed
driver: `lth-search resume` finishes it and no stage stored at the kill is trained again.

S3 is moto's standalone server on loopback (a real S3 API over HTTP; pyarrow and Ray's storage
reach it through `AWS_ENDPOINT_URL`), so the store, the trial records, the resume state and
Ray's results and checkpoints all go through pyarrow's S3 filesystem, where Ray's deletion of
round r-1's checkpoint (before the state naming round r is saved) once left a trial that
could not be restored (search/ray_storage.py keeps them). `python bench/s3_drill.py` runs
this drill N times and prints how many held.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import LTH_SEARCH, wait_for
from s3_helpers import BUCKET, moto_s3
from search_helpers import search_overrides
from fault_helpers import kill_with_its_ray

from lth_search.store.stage_store import StageStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server on 127.0.0.1 with one bucket (s3_helpers.py)."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as env:
        yield env


def _stored_keys(store_uri: str) -> set[str]:
    """Every published stage (its manifest is written last) in an S3 store."""
    fs, root = pafs.FileSystem.from_uri(store_uri)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/stages", recursive=True, allow_not_found=True))
    return {info.path.rsplit("/", 2)[-2] for info in infos if info.base_name == "manifest.json"}


def killed_driver_drill(s3_env: dict[str, str], data_root: Path, folder: Path, name: str) -> None:
    """One drill: run, SIGKILL the driver with a trial half-way, resume from another folder, check."""
    store_uri = f"s3://{BUCKET}/{name}/store"
    settings = {"name": name, "store.uri": store_uri, "search.num_trials": 2, "search.max_concurrent": 1,
                "search.asha.enabled": "false", "search.space.rewind_step": "null", "train.steps": 400,
                "prune.rounds": 2}
    command = [LTH_SEARCH, "run", str(folder / f"{name}.yaml")]
    (folder / f"{name}.yaml").write_text(f"name: {name}\n")
    command += [a for item in search_overrides(data_root, folder / "out", settings) for a in ("--set", item)]
    env = {**os.environ, **s3_env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "LTH_TEST_DRIVER": str(folder)}
    store = StageStore(store_uri)
    marker = f"LTH_TEST_DRIVER={folder}"
    with open(folder / "run.log", "w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,
                                  env=env)
        try:
            def half_way() -> bool:
                assert driver.poll() is None, (folder / "run.log").read_text()[-3000:]
                return any(r["status"] == "running" and r["rounds"] for r in store.records(f"search-{name}").values())

            wait_for(half_way, 300, "a trial half-way through its rounds", poll=0.3)
            kill_with_its_ray(driver, marker)
        finally:
            if driver.poll() is None:
                driver.kill()
    at_kill, stored = store.records(f"search-{name}"), _stored_keys(store_uri)

    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    resumed = subprocess.run([LTH_SEARCH, "resume", name, "--store-uri", store_uri, "--json"], cwd=elsewhere,
                             env={k: v for k, v in env.items() if k != "LTH_TEST_DRIVER"}, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert json.loads(resumed.stdout)["status"] == "finished"
    fs, root = pafs.FileSystem.from_uri(f"s3://{BUCKET}/{name}/searches/{name}/search.json")
    with fs.open_input_stream(root) as state:
        assert json.loads(state.read())["status"] == "finished"
    after = store.records(f"search-{name}")
    assert sum(r["status"] == "finished" for r in after.values()) == 2
    for trial_id, record in after.items():
        old = len(at_kill.get(trial_id, {}).get("attempts", []))
        trained = {key for attempt in record["attempts"][old:] for key in attempt["executed_keys"]}
        assert not trained & stored, f"trial {trial_id} trained a stage stored at the kill again"
    assert not list(elsewhere.iterdir())


def test_killed_driver_with_the_store_on_s3_resumes_without_training_a_stored_stage(
        s3_env: dict[str, str], data_root: Path, tmp_path: Path) -> None:
    killed_driver_drill(s3_env, data_root, tmp_path, "s3drill")
