"""Ray's saved state survives a driver killed mid-write (search/ray_state.py).

Real files in the layout Tune writes; the killed-driver drill in
test_search_distributed.py runs the same repair on a real search's state.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from lth_search.errors import RuntimeFailure
from lth_search.search.ray_state import BACKUP_DIR, DAMAGED_DIR, StateKeeper, is_whole, repair

S1, S2 = "2026-11-26_10-00-00", "2026-11-26_11-00-00"


def _write_session(folder: Path, session: str, trials: int) -> dict[str, bytes]:
    files = {
        f"experiment_state-{session}.json": json.dumps({"trial_data": list(range(trials))}).encode(),
        f"searcher-state-{session}.pkl": pickle.dumps({"trials": trials}),
        f"search_gen_state-{session}.json": pickle.dumps({"counter": trials}),  # a pickle, as Ray writes it
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_wholeness_is_read_without_running_anything():
    state = json.dumps({"a": [1, 2]}).encode()
    searcher = pickle.dumps({"study": "x", "values": list(range(50))})
    assert is_whole("experiment_state-s.json", state)
    assert not is_whole("experiment_state-s.json", state[:-3])
    assert not is_whole("experiment_state-s.json", b"")
    assert is_whole("searcher-state-s.pkl", searcher)
    assert not is_whole("searcher-state-s.pkl", searcher[: len(searcher) // 2])
    assert not is_whole("searcher-state-s.pkl", b"")
    assert is_whole("search_gen_state-s.json", searcher)  # Ray pickles this one despite its name
    assert not is_whole("search_gen_state-s.json", state)


def test_a_cut_state_file_is_replaced_by_the_last_whole_copy(tmp_path):
    kept = _write_session(tmp_path, S1, trials=3)
    keeper = StateKeeper(str(tmp_path))
    keeper.keep()
    assert {p.name: p.read_bytes() for p in (tmp_path / BACKUP_DIR).iterdir()} == kept
    # Ray writes a newer state; the driver dies half-way through the file
    newer = _write_session(tmp_path, S1, trials=4)
    cut = newer[f"experiment_state-{S1}.json"][:10]
    (tmp_path / f"experiment_state-{S1}.json").write_bytes(cut)
    keeper.keep()  # a half-written state is never copied over the whole one
    assert (tmp_path / BACKUP_DIR / f"experiment_state-{S1}.json").read_bytes() == kept[f"experiment_state-{S1}.json"]

    lines: list[str] = []
    repair(str(tmp_path), lines.append)
    # the whole session comes back from the copy, so its files agree with each other
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    assert (tmp_path / DAMAGED_DIR / f"experiment_state-{S1}.json").read_bytes() == cut
    assert len(lines) == 1 and f"experiment_state-{S1}.json" in lines[0]
    repair(str(tmp_path), lines.append)  # whole now: nothing to do
    assert len(lines) == 1


def test_a_damaged_newer_session_falls_back_to_the_older_whole_one(tmp_path):
    first = _write_session(tmp_path, S1, trials=4)
    _write_session(tmp_path, S2, trials=4)
    (tmp_path / f"searcher-state-{S2}.pkl").write_bytes(b"")  # killed in the resumed run's first write
    repair(str(tmp_path), lambda line: None)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == first
    assert len(list((tmp_path / DAMAGED_DIR).iterdir())) == 3


def test_damage_without_a_whole_copy_is_one_clear_error(tmp_path):
    _write_session(tmp_path, S1, trials=2)
    (tmp_path / f"experiment_state-{S1}.json").write_bytes(b"")
    with pytest.raises(RuntimeFailure, match=rf"experiment_state-{S1}\.json is cut short .* `lth-search run`"):
        repair(str(tmp_path), lambda line: None)
    assert (tmp_path / f"experiment_state-{S1}.json").exists()  # nothing moved when nothing can be restored


def test_a_missing_results_folder_is_not_damage(tmp_path):
    repair(str(tmp_path / "never-started"), lambda line: None)
    StateKeeper(str(tmp_path / "never-started")).keep()
    assert not (tmp_path / "never-started").exists()
