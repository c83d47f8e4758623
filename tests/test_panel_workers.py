"""The confirmation's warm workers on a real local Ray: packs, dense stages trained ahead, failures."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import ray
from conftest import wait_for
from search_helpers import manifests, search_config

from lth_search.runs.record import TrialRecord
from lth_search.search.confirm import run_panel
from lth_search.search.panel_runs import ROLE, run_id
from lth_search.search.panel_workers import Panel, PanelWorkers
from lth_search.search.warm_panels import WarmPanels
from lth_search.search.ray_leases import RayLeaseService, actor_name, start_lease_actor
from lth_search.store.stage_store import StageStore


def _records(cfg, search_id: str) -> dict[str, TrialRecord]:
    return {r.trial_id: r for r in TrialRecord.load_all(StageStore.from_config(cfg), cfg.name, search_id, role=ROLE)}


@contextmanager
def _started(cfg) -> Iterator[PanelWorkers]:
    """Both workers started (their imports done) before the test deals them anything; closed after."""
    workers = PanelWorkers(cfg)
    try:
        workers.warm()
        wait_for(lambda: workers.started_idle() == 2, 120, "both workers' start")
        yield workers
    finally:
        workers.close()


def test_a_panel_reuses_the_dense_stages_a_worker_trained_ahead(ray_local, data_root, tmp_path):
    # one worker: the dense stage trained ahead ends before its first pack starts
    cfg = search_config(data_root, tmp_path, {"search.space.rewind_step": "null", "search.max_concurrent": 1})
    workers = PanelWorkers(cfg)
    lines: list[str] = []
    try:
        workers.warm()
        workers.prefetch([7, 8], "confirm")
        workers.prefetch([7, 8], "confirm")  # once per seed: nothing more to do
        recipes = [cfg.default_recipe(), {"rate": 0.5}]
        runs = [(index, seed) for index in range(2) for seed in (7, 8)]
        workers.run(Panel("confirm", recipes, runs), "s1", lines.append)
        for spread in (False, True):  # an idle worker, the seeds done already: nothing to do
            workers.prefetch([7, 8], "confirm", spread=spread)
        workers.run(Panel("confirm", recipes, []), "s1", lines.append)  # returns: nothing in flight
    finally:
        workers.close()
    assert lines == []
    records = _records(cfg, "s1")
    assert sorted(records) == sorted(run_id("s1", recipes[index], seed) for index, seed in runs)
    assert all(r.status.final for r in records.values())
    # seed 7's dense stage, trained ahead (one seed at a time on an idle worker), was stored
    # before its runs began; seed 8's was trained by its first run and reused by the other.
    # No pack was tried twice (a retry finds every stage stored, and so hid a lease actor that
    # had died with the prefetch that started it)
    assert all(len(r.attempts) == 1 for r in records.values())
    reused = {seed: sorted(bool(records[run_id("s1", recipe, seed)].dense.reused) for recipe in recipes)
              for seed in (7, 8)}
    assert reused == {7: [True, True], 8: [False, True]}
    dense = [m for m in manifests(tmp_path / "store") if m["kind"] == "dense"]
    seeds = sorted(m["inputs"]["seed"] for m in dense)
    assert seeds == sorted(set(seeds)) and {7, 8} <= set(seeds)


def test_a_spread_gives_seeds_to_a_worker_busy_with_dense_stages_too(ray_local, data_root, tmp_path):
    """A panel that starts while one worker trains a seed ahead and the other is idle: the seeds
    left are dealt to both (the busy one's queue behind its seed), not all to the idle one, whose
    packs would then wait for them (the report's start, quickstart seed 7: 3.7 s of one core).

    Seeds 7 and 8 are reused by the runs whatever the timing: seed 7's prefetch holds its lease
    before the panel starts, and seed 8's worker ends its prefetch before it takes a pack. Seed 9
    is queued behind seed 7: a pack may reach it first (the other worker's 3000 steps ending
    before seed 7's did, under the suite's load) and train it, once."""
    cfg = search_config(data_root, tmp_path, {"search.space.rewind_step": "null", "train.steps": 3000})
    lines: list[str] = []
    runs = [(0, seed) for seed in (7, 8, 9)]
    with _started(cfg) as workers:
        workers.prefetch([7], "confirm")  # one seed ahead, on one worker
        wait_for(lambda: "confirm:dense:7" in _held(cfg.name).values(), 120, "seed 7's dense lease")
        workers.prefetch([7, 8, 9], "confirm", spread=True)  # as a panel's start does
        given: dict[int, list[str]] = {}
        for work in workers._work.values():
            given.setdefault(id(work.actor), []).append(work.what)
        assert sorted(map(sorted, given.values())) == [
            ["the dense stages of seeds [7]", "the dense stages of seeds [9]"], ["the dense stages of seeds [8]"]]
        workers.run(Panel("confirm", [cfg.default_recipe()], runs), "s11", lines.append)
    records = _records(cfg, "s11")
    assert lines == [] and len(records) == 3 and all(r.status.final for r in records.values())
    assert records[run_id("s11", cfg.default_recipe(), 7)].dense.reused
    assert records[run_id("s11", cfg.default_recipe(), 8)].dense.reused
    executed = [key for r in records.values() for a in r.attempts for key in a.executed_keys]
    assert len(executed) == len(set(executed))  # seed 9's dense too: trained once


def test_a_pack_that_keeps_failing_is_one_line_and_the_other_packs_finish(ray_local, data_root, tmp_path):
    cfg = search_config(data_root, tmp_path, {"search.space.rewind_step": "null", "search.max_failures": 1})
    workers = PanelWorkers(cfg)
    lines: list[str] = []
    recipes = [cfg.default_recipe(), {"rate": 7.0}]  # no valid config: every attempt of its pack raises
    try:  # through confirm.py's panel runner: a pack each (2 workers)
        done = run_panel(cfg, "s2", workers, Panel("confirm", recipes, [(0, 7), (1, 7)]), lines.append)
    finally:
        workers.close()
    assert len(lines) == 2 and "\n" not in lines[0]
    assert lines[0].startswith("confirm pack 1 failed, left out:") and "rate" in lines[0]
    # the verdict is told what it lost, whatever lost it (a run given up by a pack and never walked did)
    assert lines[1] == "confirm: 1 of 2 runs did not end; the verdict pairs only the seeds whose runs did"
    assert [(index, seed) for index, seed, _ in done] == [(0, 7)]
    records = _records(cfg, "s2")
    default = run_id("s2", recipes[0], 7)
    assert list(records) == [default] and records[default].status.final


def test_a_worker_killed_mid_pack_is_restarted_and_its_pack_ends_from_the_store(ray_local, data_root, tmp_path):
    cfg = search_config(data_root, tmp_path, {"search.space.rewind_step": "null", "search.max_concurrent": 1,
                                              "search.max_failures": 2, "train.steps": 1500})
    workers = PanelWorkers(cfg)
    lines: list[str] = []
    killed: dict[str, int] = {}

    def kill_after_round_one() -> None:
        def round_one():
            record = _records(cfg, "s3").get(run_id("s3", cfg.default_recipe(), 7))
            return record if record is not None and len(record.rounds) >= 1 else None

        record = wait_for(round_one, 300, "round 1 of the pack")
        killed["pid"], killed["rounds"] = record.attempts[-1].pid, len(record.rounds)
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_after_round_one, daemon=True)
    killer.start()
    try:
        workers.run(Panel("confirm", [cfg.default_recipe()], [(0, 7)]), "s3", lines.append)
    finally:
        workers.close()
    killer.join(timeout=10)
    assert "pid" in killed and lines == []
    record = _records(cfg, "s3")[run_id("s3", cfg.default_recipe(), 7)]
    assert record.status.final and len(record.rounds) == cfg.prune.rounds
    first, second = record.attempts
    assert first.pid == killed["pid"] and second.pid != killed["pid"]
    # the restarted worker walked the lineage again, and what was stored at the kill (the dense
    # stage, round 1) came from the store: it trained only the rounds after
    assert 0 < second.steps_executed <= (cfg.prune.rounds - killed["rounds"]) * cfg.train.steps


def test_the_workers_start_in_the_search_tail_and_stop_when_a_lineage_must_run_again(ray_local, data_root, tmp_path):
    from ray.tune.experiment import Trial

    cfg = search_config(data_root, tmp_path, {"search.max_concurrent": 1, "name": "tail", "train.steps": 5000})
    leases = start_lease_actor(cfg.name)  # as the driver does: it outlives the workers
    service = RayLeaseService(cfg.name)
    workers = PanelWorkers(cfg)
    asked: list[tuple[list[str], int]] = []

    def ahead(ended: list[str], running: int) -> Panel:
        asked.append((ended, running))
        return Panel("confirm", [cfg.default_recipe()], [(0, 7)])

    warm = WarmPanels(workers, budget=2, search_id="s4", ahead=ahead)
    ended, running = Trial("lineage", stub=True), Trial("lineage", stub=True)
    ended.set_status(Trial.TERMINATED)
    running.set_status(Trial.RUNNING)
    try:
        warm.on_trial_complete(0, [ended], ended)  # one lineage of two started: not the tail yet
        assert workers.started == 0 and not asked
        warm.on_trial_complete(0, [ended, running], ended)  # all started and one ended: the tail
        assert workers.started == 1
        wait_for(workers.started_idle, 120, "the worker's start")  # runs ahead only on a started worker
        warm.on_step_end(0, [ended, running])  # Tune's next step
        assert asked == [([ended.trial_id], 1)]
        wait_for(lambda: [h for h in service.held().values() if h == "confirm:s4:ahead1"], 120, "the run ahead's lease")
        warm.on_trial_recover(0, [ended, running], running)  # a lineage wants a slot again
        assert workers.started == 0
        # the stage the stopped run ahead was training is not left leased to it for 120 s
        assert not [h for h in service.held().values() if h == "confirm:s4:ahead1"]
    finally:
        workers.close()
        ray.kill(leases)


def test_runs_started_ahead_are_not_run_again_and_the_rest_fill_the_free_worker(ray_local, data_root, tmp_path):
    """A run started in the search's tail is the panel's run (named by its recipe, not its place
    in the panel's list); the panel starts only the others."""
    cfg = search_config(data_root, tmp_path, {"search.space.rewind_step": "null"})
    workers = PanelWorkers(cfg)
    lines: list[str] = []
    tried, default = {"rate": 0.5}, cfg.default_recipe()
    try:
        workers.warm()
        wait_for(workers.started_idle, 120, "the workers' start")
        workers.start_ahead(Panel("confirm", [tried], [(0, 7)]), "s5")  # top 1 while the search ends
        workers.start_ahead(Panel("confirm", [tried], [(0, 7)]), "s5")  # started already: nothing more
        workers.run(Panel("confirm", [default, tried], [(0, 7), (1, 7), (0, 8), (1, 8)]), "s5", lines.append)
    finally:
        workers.close()
    assert lines == []
    records = _records(cfg, "s5")
    assert sorted(records) == sorted(run_id("s5", recipe, seed) for recipe in (default, tried) for seed in (7, 8))
    assert all(r.status.final for r in records.values())
    executed = [key for r in records.values() for a in r.attempts for key in a.executed_keys]
    assert len(executed) == len(set(executed))  # no stage trained twice (a run handed on is walked on)
    ahead = records[run_id("s5", tried, 7)]
    assert ahead.choices == tried and ahead.config["seed"] == 7


def test_packs_that_start_together_find_their_shared_dense_stages_trained_a_share_per_worker(
        ray_local, data_root, tmp_path):
    """Both packs start from the dense stages of seeds 7 and 8: the two workers train one seed's
    each before their packs, instead of one pack training both while the other waits."""
    cfg = search_config(data_root, tmp_path, {"search.space.rewind_step": "null"})
    lines: list[str] = []
    recipes = [cfg.default_recipe(), {"rate": 0.5}]
    with _started(cfg) as workers:
        workers.run(Panel("confirm", recipes, [(0, 7), (1, 7), (0, 8), (1, 8)]), "s6", lines.append)
    records = _records(cfg, "s6")
    assert lines == [] and len(records) == 4 and all(r.status.final for r in records.values())
    assert all(r.dense.reused for r in records.values())  # every pack found them stored


def test_runs_ahead_beyond_a_workers_share_are_waited_for_and_shared_never_stopped(
        ray_local, data_root, tmp_path):
    """Three of four runs went ahead on one of two workers (its even share is two), and the panel
    starts before they did a run's worth of stages. They are not stopped and dealt again (that
    killed their worker: its round in hand lost, a new process importing torch again, and Ray's
    `run_pack failed ... killed by ray.kill` line on the console): the fourth run goes to the
    other worker, which then takes runs from the pack between its rounds. The ahead panel lists the
    recipes in another order than the panel (SelectionAhead's may): the runs the pack gives up are
    walked on as their own recipe's (read by the panel's indices, they were not walked at all).
    Every stage is trained once, and the two workers' processes are all there ever were.

    The fourth run is walked to its end before, so its worker is free the moment the panel starts,
    while the pack still has its dense stage and 8 rounds of 3 lineages to walk: the steal is then
    a matter of order, not of speed. (Walked in the panel, the lone run's rounds of 200 steps took
    about as long as the pack's, and under a loaded machine the pack once ended first.)"""
    cfg = search_config(data_root, tmp_path, {"search.space.rewind_step": "null", "prune.rounds": 8})
    recipes = [cfg.default_recipe(), {"rate": 0.5}]
    runs = [(0, 7), (1, 7), (0, 8), (1, 8)]
    lines: list[str] = []
    with _started(cfg) as workers:
        workers.run(Panel("confirm", recipes, runs[3:]), "s7", lines.append)
        # the ahead panel lists the recipes in another order (as SelectionAhead's may): runs[:3]
        workers.start_ahead(Panel("confirm", recipes[::-1], [(1, 7), (0, 7), (1, 8)]), "s7")
        workers.run(Panel("confirm", recipes, runs), "s7", lines.append)
    records = _records(cfg, "s7")
    assert lines == [] and len(records) == 4
    assert all(r.status.final and len(r.rounds) == cfg.prune.rounds for r in records.values())
    ahead = [records[run_id("s7", recipes[index], seed)] for index, seed in runs[:3]]
    assert len({r.attempts[0].pid for r in ahead}) == 1  # the three ahead began on one worker, none again
    assert len({a.pid for r in records.values() for a in r.attempts}) == 2  # no worker replaced
    assert any(len(r.attempts) > 1 for r in records.values())  # the idle worker took runs from the pack
    executed = [key for r in records.values() for a in r.attempts for key in a.executed_keys]
    assert len(executed) == len(set(executed))  # every stage trained once


def test_workers_closed_while_a_pack_trains_a_stage_leave_the_lease_service_to_the_others(
        ray_local, data_root, tmp_path):
    """The workers are stopped (`close`, as when Tune recovers a trial: WarmPanels) while a pack
    ahead holds seed 7's dense lease. The lease goes back at once, not after `store.lease_timeout_s`,
    in the lease actor the driver holds (run_search's), which the stop leaves to the others; the
    workers started again train that stage under it."""
    cfg = search_config(data_root, tmp_path, {"search.space.rewind_step": "null", "train.steps": 3000,
                                              "name": "stopped-lease"})
    recipes = [cfg.default_recipe(), {"rate": 0.5}]
    runs = [(0, 7), (1, 7), (0, 8), (1, 8)]
    lines: list[str] = []
    marker = "f" * 64  # a lease of this test's, in the lease actor the workers use
    driver_leases = start_lease_actor(cfg.name)  # held as run_search holds it
    with _started(cfg) as workers:
        workers.start_ahead(Panel("confirm", recipes, runs[:3]), "s10")
        wait_for(lambda: any(h.endswith("ahead1") for h in _held(cfg.name).values()), 120, "the pack's lease")
        assert RayLeaseService(cfg.name).acquire(marker, "test", 600.0)
        workers.close()  # stops the pack mid-stage
        assert _held(cfg.name) == {marker: "test"}  # the same lease actor, the stopped pack's lease given back
        workers.run(Panel("confirm", recipes, runs), "s10", lines.append)  # new workers
        held = _held(cfg.name)
    records = _records(cfg, "s10")
    assert lines == [] and len(records) == 4 and all(r.status.final for r in records.values())
    assert held == {marker: "test"}
    del driver_leases


def _held(search_name: str) -> dict[str, str]:
    """The live leases, without starting a lease actor here (RayLeaseService would, and own it)."""
    try:
        return ray.get(ray.get_actor(actor_name(search_name)).held.remote())
    except ValueError:  # not started yet
        return {}


def test_a_worker_left_idle_takes_runs_from_a_busy_pack_between_its_rounds(ray_local, data_root, tmp_path):
    """Four runs walk as one pack on one of two workers (started ahead); the other, with nothing
    to do, asks for some: the pack gives up the second half of its runs between two rounds and
    the idle worker walks them on from the store (and so on, while a pack walks two or more).
    No stage is trained twice, and no run is walked again from its start."""
    cfg = search_config(data_root, tmp_path, {"search.space.rewind_step": "null", "prune.rounds": 8})
    recipes = [cfg.default_recipe(), {"rate": 0.5}]
    runs = [(0, 7), (1, 7), (0, 8), (1, 8)]
    lines: list[str] = []
    with _started(cfg) as workers:
        workers.start_ahead(Panel("confirm", recipes, runs), "s9")
        workers.run(Panel("confirm", recipes, runs), "s9", lines.append)
    records = _records(cfg, "s9")
    assert lines == [] and len(records) == 4
    assert all(r.status.final and len(r.rounds) == cfg.prune.rounds for r in records.values())
    assert len({r.attempts[0].pid for r in records.values()}) == 1  # all began in the pack ahead
    handed = [r for r in records.values() if len(r.attempts) > 1]
    assert handed, [[a.pid for a in r.attempts] for r in records.values()]
    for record in handed:
        pids = [a.pid for a in record.attempts]
        assert all(a != b for a, b in zip(pids, pids[1:])), pids  # each time to the other worker
        whole = (cfg.prune.rounds + cfg.prune.dense_replicates) * cfg.train.steps  # the lineage from its start
        assert all(a.steps_executed < whole for a in record.attempts[1:])  # walked on, not again
    executed = [key for r in records.values() for a in r.attempts for key in a.executed_keys]
    assert len(executed) == len(set(executed))  # every stage trained once
