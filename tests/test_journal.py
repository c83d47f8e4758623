"""The Optuna journal on a store URI is append-only: each append a new object, nothing rewritten (issue 24)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

import lth_search.search.journal as journal
from lth_search.search.journal import StoreJournalBackend, journal_storage


def _objects(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


def _trial(study: optuna.Study) -> None:
    trial = study.ask()
    trial.suggest_categorical("rate", [0.1, 0.2])
    trial.report(0.5, 1)
    study.tell(trial, 0.9)


def test_appends_add_objects_of_constant_size_and_read_back_in_order(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "CHUNK_LOGS", 20)
    uri = f"local://{tmp_path}/searches/s/optuna.journal"
    folder = tmp_path / "searches" / "s" / "optuna.journal.d"
    study = optuna.create_study(study_name="s", storage=journal_storage(uri))
    written = []
    for _ in range(40):
        before = _objects(folder)
        _trial(study)
        after = _objects(folder)
        assert all(after[name] == data for name, data in before.items())  # nothing rewritten
        written.append(sum(len(data) for name, data in after.items() if name not in before))
    # bytes written per trial do not grow with the study (chunks included): trials 30-39 write
    # what trials 10-19 wrote (the first 10 are TPE's random start, which logs less)
    assert min(written) > 0 and sum(written[30:]) <= 1.05 * sum(written[10:20])
    assert not (tmp_path / "searches" / "s" / "optuna.journal").exists()  # never one object rewritten whole
    reader = StoreJournalBackend(uri)  # another process's view: only what is in the store
    logs = list(reader.read_logs(0))
    assert logs == list(study._storage._backend.read_logs(0))
    assert list(reader.read_logs(5)) == logs[5:]
    loaded = optuna.load_study(study_name="s", storage=journal_storage(uri))
    assert len(loaded.trials) == 40 and all(t.value == 0.9 for t in loaded.trials)


def test_an_earlier_whole_journal_is_continued_and_a_gap_ends_the_log(tmp_path: Path) -> None:
    uri = f"local://{tmp_path}/optuna.journal"
    first = optuna.create_study(study_name="old", storage=journal_storage(f"local://{tmp_path}/seed.journal"))
    _trial(first)
    whole = list(first._storage._backend.read_logs(0))
    (tmp_path / "optuna.journal").write_text("".join(json.dumps(log) + "\n" for log in whole))
    study = optuna.load_study(study_name="old", storage=journal_storage(uri))
    _trial(study)
    assert len(optuna.load_study(study_name="old", storage=journal_storage(uri)).trials) == 2
    # an object missing in the middle (a write that never landed): readers stop before it
    names = sorted(p.name for p in (tmp_path / "optuna.journal.d").iterdir())
    (tmp_path / "optuna.journal.d" / names[1]).unlink()
    assert len(list(StoreJournalBackend(uri).read_logs(0))) == int(names[1].split("-")[0])


def test_a_local_journal_appends_without_fsync_and_optuna_reads_it(tmp_path: Path, monkeypatch) -> None:
    import os

    path = tmp_path / "optuna.journal"
    study = optuna.create_study(storage=journal_storage(str(path)), study_name="s")
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    study.optimize(lambda trial: trial.suggest_float("a", 0, 1), n_trials=3)
    assert synced == []  # appends go to the OS cache: a killed driver loses none of them
    stock = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    loaded = optuna.load_study(study_name="s", storage=stock)
    assert [t.params["a"] for t in loaded.trials] == [t.params["a"] for t in study.trials]
