"""A search of N trivial trials with everything on S3 (moto's server on loopback), its driver killed
half-way and resumed (issue 24, acceptance 3): it finishes, and its journal writes stay constant per trial.

The search is bench/scale.py's (N trivial lineages, `trivial_overrides`) with `store.uri` on S3,
so the store, the trial records, the Optuna journal (search/journal.py, one object per append)
and Ray's results all live in moto's S3. `lth-search run` is SIGKILLed once half the trials have
finished (with its Ray's processes, as tests/test_s3_resume.py does), then `lth-search resume`
continues it from another folder. Printed: the trials at the kill and at the end, whether the
search finished with N trials and no stage stored at the kill trained again, and the journal's
objects and bytes per trial before the kill and after it (append-only: bytes stored = bytes written).

    python bench/s3_scale.py [--n 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # moto's server and the Ray process finder, as the tests use them

import pyarrow.fs as pafs  # noqa: E402
from conftest import LTH_SEARCH, wait_for  # noqa: E402
from s3_helpers import BUCKET, moto_s3  # noqa: E402
from scale import trivial_overrides  # noqa: E402
from fault_helpers import kill_with_its_ray  # noqa: E402

from lth_search.store.stage_store import StageStore  # noqa: E402

NAME = "scale"


def journal_objects(store_uri: str) -> tuple[int, int, int]:
    """(objects, bytes, trials created) of the search's journal folder on S3."""
    from optuna.storages.journal._storage import JournalOperation

    fs, root = pafs.FileSystem.from_uri(store_uri)
    folder = f"{root.rsplit('/', 1)[0]}/searches/{NAME}/optuna.journal.d"
    infos = [i for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)) if i.type == pafs.FileType.File]
    trials = 0
    for info in infos:  # the small objects (one per append) hold every log once; chunks repeat them
        first, end = (int(n) for n in info.base_name.removesuffix(".jsonl").split("-"))
        if end - first < 1000:
            with fs.open_input_stream(info.path) as stream:
                trials += sum(json.loads(line)["op_code"] == JournalOperation.CREATE_TRIAL
                              for line in stream.read().decode().splitlines())
    return len(infos), sum(i.size for i in infos), trials


def stored_keys(store_uri: str) -> set[str]:
    fs, root = pafs.FileSystem.from_uri(store_uri)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/stages", recursive=True, allow_not_found=True))
    return {info.path.rsplit("/", 2)[-2] for info in infos if info.base_name == "manifest.json"}


def drill(n: int, folder: Path, env: dict[str, str]) -> bool:
    store_uri = f"s3://{BUCKET}/{NAME}/store"
    command = [LTH_SEARCH, "run", str(REPO / "configs" / "quickstart.yaml")]
    command += [a for item in trivial_overrides(n, folder / "out", store_uri) for a in ("--set", item)]
    marker = f"LTH_TEST_DRIVER={folder}"
    env = {**os.environ, **env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    store = StageStore(store_uri)
    began = time.time()
    with open(folder / "run.log", "w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,
                                  env={**env, "LTH_TEST_DRIVER": str(folder)})
        try:
            def half_done() -> bool:
                assert driver.poll() is None, (folder / "run.log").read_text()[-3000:]
                records = store.records(f"search-{NAME}")
                return sum(r["status"] == "finished" for r in records.values()) >= n // 2

            wait_for(half_done, 6 * 3600, "half the trials to finish", poll=30)  # reads every record
            kill_with_its_ray(driver, marker)
        finally:
            if driver.poll() is None:
                driver.kill()
    at_kill, stored = store.records(f"search-{NAME}"), stored_keys(store_uri)
    objects, size, trials = journal_objects(store_uri)
    print(f"killed after {time.time() - began:.0f} s: {sum(r['status'] == 'finished' for r in at_kill.values())} "
          f"trials finished, {len(at_kill)} records; journal {objects} objects, {size} B for {trials} trials "
          f"({size / max(trials, 1):.0f} B/trial); load {os.getloadavg()[0]:.2f}", flush=True)

    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    began = time.time()
    # LTH_SEARCH_DEBUG: a failed resume prints its traceback here (a bench's output is for the developer)
    resumed = subprocess.run([LTH_SEARCH, "resume", NAME, "--store-uri", store_uri, "--json"], cwd=elsewhere,
                             env={**env, "LTH_SEARCH_DEBUG": "1"},
                             capture_output=True, text=True, timeout=6 * 3600)
    if resumed.returncode != 0:
        print(f"resume failed (exit {resumed.returncode}):\n{resumed.stderr[-3000:]}")
        return False
    summary = json.loads(resumed.stdout)
    after = store.records(f"search-{NAME}")
    retrained = [t for t, r in after.items() for a in r["attempts"][len(at_kill.get(t, {}).get("attempts", [])):]
                 if set(a["executed_keys"]) & stored]
    objects2, size2, trials2 = journal_objects(store_uri)
    print(f"resumed in {time.time() - began:.0f} s: status {summary['status']}, {summary['trials']} trials "
          f"({summary['finished']} finished, {summary.get('abandoned', 0)} abandoned by the kill); "
          f"{len(retrained)} trials trained a stage stored at the kill again; journal {objects2} objects, {size2} B "
          f"for {trials2} trials: {(size2 - size) / max(trials2 - trials, 1):.0f} B/trial after the kill vs "
          f"{size / max(trials, 1):.0f} before; load {os.getloadavg()[0]:.2f}")
    return summary["status"] == "finished" and summary["trials"] >= n and not retrained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lth-s3-scale-") as tmp, moto_s3(Path(tmp)) as env:
        held = drill(args.n, Path(tmp), env)
    print(f"{args.n}-trial search on S3 (moto), killed and resumed: {'held' if held else 'NOT held'}")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
