"""Ray writes a search's results through a filesystem that replaces files whole (search/ray_storage.py).

CI once saw `lth-search resume` fail because the driver had been killed while Ray copied
its experiment state over the old one: the file was empty and Tune started the search
over. Here a real process is killed mid-write, and Ray's own copy routine writes into the
filesystem; the killed-driver drill in test_search_distributed.py resumes a real search.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from lth_search.search.ray_storage import BUFFERED_UP_TO, PARTIAL_SUFFIX, ray_storage

KILLED_MID_WRITE = """
import os, signal, sys
from lth_search.search.ray_storage import ray_storage
path, fs = ray_storage(sys.argv[1])
stream = fs.open_output_stream(path + "/experiment_state-x.json")
stream.write(b'{"trial_data": [1, 2, ')
stream.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_killed_mid_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    state = tmp_path / "experiment_state-x.json"
    state.write_text('{"trial_data": [1]}')
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path)], capture_output=True)
    assert killed.returncode == -9, killed.stderr
    assert state.read_text() == '{"trial_data": [1]}'
    assert not (tmp_path / ("experiment_state-x.json" + PARTIAL_SUFFIX)).exists()  # held until closed


@pytest.mark.parametrize("form", ["path", "file", "local"])
def test_rays_copy_routine_replaces_each_file_whole(tmp_path: Path, form: str) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "experiment_state-x.json").write_text("old")
    uri = {"path": str(results), "file": f"file://{results}", "local": f"local://{results}"}[form]
    path, fs = ray_storage(uri)
    assert isinstance(fs, pafs.PyFileSystem)
    staging = tmp_path / "staging"
    (staging / "trial_1").mkdir(parents=True)
    (staging / "experiment_state-x.json").write_text('{"trial_data": [1, 2]}')
    (staging / "trial_1" / "result.json").write_text('{"round": 1}\n')
    pafs.copy_files(str(staging), path, destination_filesystem=fs)  # what Ray's sync_up calls
    assert (results / "experiment_state-x.json").read_text() == '{"trial_data": [1, 2]}'
    assert (results / "trial_1" / "result.json").read_text() == '{"round": 1}\n'
    assert not list(results.rglob("*" + PARTIAL_SUFFIX))
    # the next snapshot writes only what changed (a snapshot copies every trial's files)
    written = {p.name: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    (results / "trial_1" / "result.json").unlink()  # a file this filesystem wrote is not checked again
    (staging / "experiment_state-x.json").write_text('{"trial_data": [1, 2, 3]}')
    pafs.copy_files(str(staging), path, destination_filesystem=fs)
    assert (results / "experiment_state-x.json").read_text() == '{"trial_data": [1, 2, 3]}'
    assert (results / "experiment_state-x.json").stat().st_mtime_ns != written["experiment_state-x.json"]
    assert not (results / "trial_1" / "result.json").exists()
    # Ray pickles the filesystem into its trials' storage context: a worker gets the same kind
    assert isinstance(pickle.loads(pickle.dumps(fs)), pafs.PyFileSystem)


def test_object_stores_keep_pyarrows_own_filesystem_and_the_checkpoints() -> None:
    """An object store (pyarrow's in-memory `mock://` here; S3 on moto in test_s3_resume.py) is used through
    its own filesystem, writes and all, except that Ray's deletion of a trial checkpoint is a no-op."""
    path, fs = ray_storage("mock:///bucket/lth/ray")
    assert path == "bucket/lth/ray" and fs.type_name == "py::lth-keep-checkpoints+mock"
    trial = f"{path}/lineage_trial_t1_1"
    for name in ("checkpoint_000000", "scratch"):
        fs.create_dir(f"{trial}/{name}")
        with fs.open_output_stream(f"{trial}/{name}/lineage.json") as out:
            out.write(b"{}")
    fs.delete_dir(f"{trial}/checkpoint_000000")  # what Ray's checkpoint manager calls
    fs.delete_dir(f"{trial}/scratch")
    with fs.open_input_stream(f"{trial}/checkpoint_000000/lineage.json") as kept:
        assert kept.read() == b"{}"
    assert fs.get_file_info(f"{trial}/scratch").type == pafs.FileType.NotFound



def test_an_object_stores_snapshot_writes_only_what_changed(tmp_path: Path) -> None:
    """Every snapshot copies every trial's files: on an object store an unchanged file is not
    uploaded again and a folder is made once (each was a request per trial per snapshot)."""
    path, fs = ray_storage("mock:///bucket/lth/ray")
    inner = fs.handler.fs
    staging = tmp_path / "staging"
    for trial in range(20):  # more files than pyarrow's IO threads
        (staging / f"trial_{trial}").mkdir(parents=True)
        (staging / f"trial_{trial}" / "result.json").write_text(f'{{"trial": {trial}}}\n')
    (staging / "experiment_state-x.json").write_text('{"trial_data": [1]}')
    pafs.copy_files(str(staging), path, destination_filesystem=fs)  # what Ray's sync_up calls
    with inner.open_output_stream(f"{path}/trial_0/result.json") as behind:
        behind.write(b"changed behind its back")  # so a second upload would show
    inner.delete_dir(f"{path}/trial_1")
    (staging / "experiment_state-x.json").write_text('{"trial_data": [1, 2]}')
    (staging / "trial_2" / "result.json").write_text('{"trial": 2}\n{"trial": 2}\n')
    pafs.copy_files(str(staging), path, destination_filesystem=fs)
    read = lambda name: inner.open_input_stream(f"{path}/{name}").read()  # noqa: E731
    assert read("trial_0/result.json") == b"changed behind its back"  # unchanged: not written again
    assert read("trial_2/result.json") == b'{"trial": 2}\n{"trial": 2}\n'
    assert read("experiment_state-x.json") == b'{"trial_data": [1, 2]}'
    assert inner.get_file_info(f"{path}/trial_1/result.json").type == pafs.FileType.NotFound
    assert fs.handler._folders >= {f"{path}/trial_{trial}" for trial in range(20)}  # made once, then known


def test_ray_is_given_an_s3_filesystem_that_writes_in_the_calling_thread() -> None:
    """S3's background writes run on the IO threads a copy runs on: a stream closed inside the
    copy waited on them (a deadlock seen on moto), so Ray's S3 filesystem writes synchronously."""
    path, fs = ray_storage("s3://bucket/lth/ray?endpoint_override=127.0.0.1:9&scheme=http")
    assert path == "bucket/lth/ray"
    _, (options,) = fs.handler.fs.__reduce__()
    assert options["background_writes"] is False and options["endpoint_override"] == "127.0.0.1:9"
    # Ray pickles it into each trial: a worker's copy is the same filesystem, knowing nothing written
    again = pickle.loads(pickle.dumps(fs))
    assert again.type_name == fs.type_name and again.handler.fs.__reduce__()[1][0]["background_writes"] is False
    assert not again.handler._folders


def test_trial_checkpoints_outlive_rays_delete(tmp_path: Path) -> None:
    """Ray deletes round r-1's checkpoint before the state naming round r is saved: a driver
    killed in between left a state naming a deleted checkpoint. They are kept (a few bytes)."""
    trial = tmp_path / "lineage_trial_t1_1"
    for name in ("checkpoint_000000", "checkpoint_000001", "scratch"):
        (trial / name).mkdir(parents=True)
        (trial / name / "lineage.json").write_text("{}")
    _, fs = ray_storage(str(tmp_path))
    fs.delete_dir(str(trial / "checkpoint_000000"))  # what Ray's checkpoint manager calls
    fs.delete_dir(str(trial / "scratch"))
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000000", "checkpoint_000001"]


def test_a_large_file_is_streamed_to_its_partial_file_and_replaces_the_old_one_whole(tmp_path: Path) -> None:
    """The search's state file grows with the trials and changes at every snapshot: it is not held
    in memory and hashed (9 % of the driver's CPU at 300 trials) but streamed aside, then moved."""
    path, fs = ray_storage(str(tmp_path))
    target = tmp_path / "experiment_state-x.json"
    target.write_bytes(b"old")
    big = b"a" * BUFFERED_UP_TO
    stream = fs.open_output_stream(f"{path}/experiment_state-x.json")
    stream.write(big)
    stream.write(b"b")  # past the buffer: on its way to the partial file
    partial = tmp_path / ("experiment_state-x.json" + PARTIAL_SUFFIX)
    assert partial.exists() and target.read_bytes() == b"old"  # the old file stays whole meanwhile
    stream.close()
    assert target.read_bytes() == big + b"b" and not partial.exists()
    with fs.open_output_stream(f"{path}/experiment_state-x.json") as stream:
        stream.write(big + b"b")  # the same bytes again: a large file is always written
    assert target.read_bytes() == big + b"b"
    with fs.open_output_stream(f"{path}/experiment_state-x.json") as stream:
        stream.write(b"small")  # then small: held, written, skipped when unchanged
    target.write_bytes(b"changed behind its back")
    with fs.open_output_stream(f"{path}/experiment_state-x.json") as stream:
        stream.write(b"small")
    assert target.read_bytes() == b"changed behind its back"


def test_a_restarted_trials_rows_stop_at_its_checkpoints_round(tmp_path: Path) -> None:
    """Rows after the checkpoint's round are reported again by the restarted trial
    (search/result_file.py), and a row a killed driver cut short is unreadable: both go."""
    from lth_search.search.result_file import keep_rows_up_to

    rows = tmp_path / "result.json"
    rows.write_text('{"round": 1, "attempt": 1}\n{"round": 2, "attempt": 1}\n{"done": true}\n{"round": 3, "att')
    keep_rows_up_to(rows, 1)
    assert rows.read_text() == '{"round": 1, "attempt": 1}\n{"done": true}\n'
    before = rows.stat().st_mtime_ns
    keep_rows_up_to(rows, 1)  # nothing to drop: the file is not rewritten
    assert rows.stat().st_mtime_ns == before and not list(tmp_path.glob("*.lth-partial"))
