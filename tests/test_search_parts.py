"""The search's parts on their own: the Optuna space, the Ray lease actor, the summary."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import optuna
import pytest

from lth_search.config import load_config
from lth_search.search.console import SearchConsole
from lth_search.search.ray_leases import RayLeaseService, start_lease_actor
from lth_search.runs.state import results_root
from lth_search.search.space import (
    OPTUNA_TRIAL_KEY, DefineByRunSpace, choices_of, make_sampler, objectives, space_size, startup_trials, trial_budget,
)
from lth_search.engine.lineage.results import DenseResult
from lth_search.runs.record import MatchingRecord, TrialRecord, TrialStatus
from lth_search.runs.summary import summarize, summary_lines

KEY_A, KEY_B = "a" * 64, "b" * 64


def _cfg(*overrides: str):
    return load_config(None, ["prune.rewind_steps=[0, 20]", *overrides])


def test_space_searches_only_the_keys_given_and_fixes_the_rest():
    cfg = _cfg("search.space.rate=[0.2, 0.5]", "search.space.init_scale=[0.0, measured]",
               "search.space.layer_ratios={fc: [0.5, 1.0], output: [1.0, 0.25]}")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    returned = DefineByRunSpace(cfg)(trial)
    assert set(trial.params) == {"rate", "init_scale", "layer_ratios/fc", "layer_ratios/output"}
    assert returned == {OPTUNA_TRIAL_KEY: trial.number}
    # Ray nests "a/b" keys; choices_of flattens them back for with_choices
    ray_config = {"rate": 0.5, "init_scale": "measured", "layer_ratios": {"fc": 0.5, "output": 0.25},
                  OPTUNA_TRIAL_KEY: 0}
    choices = choices_of(ray_config)
    assert choices == {"rate": 0.5, "init_scale": "measured", "layer_ratios/fc": 0.5, "layer_ratios/output": 0.25}
    chosen = cfg.with_choices(choices)
    assert chosen.prune.rate == 0.5 and chosen.prune.init_scale == "measured"
    assert chosen.prune.layer_ratios == {"fc": 0.5, "output": 0.25}
    assert chosen.prune.scope == cfg.prune.scope and chosen.prune.rewind_step == cfg.prune.rewind_step


def test_samplers_and_objectives_follow_the_config():
    # auto: every recipe once when the budget covers the space, else TPE with a sized start-up
    assert isinstance(make_sampler(_cfg()), optuna.samplers.BruteForceSampler)
    large = _cfg("search.num_trials=6", "search.space.rate=[0.1, 0.2, 0.3]", "search.space.scope=[global, layerwise]",
                 "search.space.init_scale=[0.0, 0.5]")
    assert space_size(large) == 12 and trial_budget(large) == 6
    assert isinstance(make_sampler(large), optuna.samplers.TPESampler) and startup_trials(6) == 2
    exhaustive = _cfg("search.num_trials=50", "search.space.rate=[0.1, 0.2]")
    assert isinstance(make_sampler(exhaustive), optuna.samplers.BruteForceSampler) and trial_budget(exhaustive) == 2
    assert isinstance(make_sampler(_cfg("search.sampler=random")), optuna.samplers.RandomSampler)
    two = _cfg("search.objectives=2")
    assert isinstance(make_sampler(two), optuna.samplers.NSGAIISampler)
    assert objectives(two) == (["matching_sparsity", "matching_val_accuracy"], ["max", "max"])
    assert objectives(_cfg()) == ("matching_sparsity", "max")


def test_ray_lease_actor_is_exclusive_expires_and_belongs_to_the_trial(ray_local):
    actor = start_lease_actor("parts-test")
    one, two = RayLeaseService("parts-test"), RayLeaseService("parts-test")
    assert one.acquire(KEY_A, "w1", 30) and not two.acquire(KEY_A, "w2", 30)
    assert one.renew(KEY_A, "w1", 30) and not two.renew(KEY_A, "w2", 30)
    two.release(KEY_A, "w2")  # not the holder: no effect
    assert one.held() == {KEY_A: "w1"}
    one.release(KEY_A, "w1")
    assert two.acquire(KEY_A, "w2", 0.0)  # w2 dies without releasing: a lease of no time has expired
    assert one.acquire(KEY_A, "w1", 30)
    # a retried trial (new process, new holder id) continues its own claim at once
    first = RayLeaseService("parts-test", owner="trial:x")
    retry = RayLeaseService("parts-test", owner="trial:x")
    assert first.acquire(KEY_B, "pid-1", 30) and retry.acquire(KEY_B, "pid-2", 30)
    assert not two.acquire(KEY_B, "w2", 30)
    del actor


def test_the_status_line_counts_trials_waiting_for_a_stage(ray_local):
    """Workers' lines are not forwarded (search/ray_session.py): the driver's status line says who waits."""
    actor = start_lease_actor("waits-test")
    holder, waiter = RayLeaseService("waits-test", owner="trial:a"), RayLeaseService("waits-test", owner="trial:b")
    console = SearchConsole(4, [].append, search_name="waits-test")
    running = [SimpleNamespace(status="RUNNING", last_result=None) for _ in range(2)]
    assert holder.acquire(KEY_A, "p1", 30)
    assert console.status(running) == "0/4 done, 2 running"
    assert not waiter.acquire(KEY_A, "p2", 30) and not waiter.acquire(KEY_A, "p3", 30)  # it polls: one trial
    assert console.status(running) == "0/4 done, 2 running (1 waiting for a stage another trial is computing)"
    holder.release(KEY_A, "p1")  # published: nobody waits any more
    assert console.status(running) == "0/4 done, 2 running"
    del actor


def test_a_large_search_counts_starts_and_ends_in_its_status_line():
    """Above 50 lineages a console line per start and end would be pages long (issue 24 item 5)."""
    lines: list[str] = []
    console = SearchConsole(1000, lines.append, status_every_s=0.0)
    trials = [SimpleNamespace(trial_id=f"t{i}", status="TERMINATED", config={}, path=f"/r/t{i}",
                              last_result={"round": 2, "matching_sparsity": 0.36, "matching_val_accuracy": 0.6})
              for i in range(1000)]
    for trial in trials:
        console.on_trial_start(0, trials, trial)
        console.ended(trial, TrialStatus.FINISHED if trial.trial_id != "t7" else TrialStatus.STOPPED)
    for trial in trials[:15]:
        console.failed(trial)
    assert len(lines) == 10 and all("failed after its retries" in line for line in lines)  # the first 10 failures
    console.on_step_end(0, trials)
    assert len(lines) == 11 and lines[-1].endswith(
        "1000/1000 done, 0 running; best so far 36.0% sparsity (trial None, val 60.0%) "
        "(1000 started, 999 finished, 1 stopped by ASHA, 5 failed since the last status)")
    small = SearchConsole(12, (few := []).append)
    small.on_trial_start(0, trials, trials[0])
    assert few == ["trial t0 started: the config's prune values"]


def test_the_status_line_names_a_loss_metric_and_prefers_its_lower_value():
    """A language model's lineages are judged on perplexity: "val perplexity 12.5", lower wins a tie."""
    console = SearchConsole(3, [].append)
    reports = [{"matching_sparsity": 0.5, "metric": "perplexity", "matching_val_perplexity": ppl, "trial_id": name}
               for name, ppl in (("high", 30.0), ("low", 12.5))]
    trials = [SimpleNamespace(status="TERMINATED", last_result=report) for report in reports]
    assert console.status(trials) == "2/3 done, 0 running; best so far 50.0% sparsity (trial low, val perplexity 12.5)"


def test_a_quiet_console_drops_tunes_slow_loop_hint_and_verbose_shows_it():
    """Under load Tune warns that its own callbacks are slow; not news a user can act on, unless -v."""
    import logging

    from ray.tune.utils.util import warn_if_slow  # noqa: F401  (the logger Tune warns through exists)

    from lth_search.search.console import use_console

    logger = logging.getLogger("ray.tune.utils.util")
    hint = logger.makeRecord(logger.name, logging.WARNING, __file__, 1,
                             "The `callbacks.on_step_end` operation took 1.466 s, which may be a performance bottleneck.",
                             None, None)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "something else", None, None)
    try:
        use_console(0, [].append)
        assert not logger.filter(hint) and logger.filter(other)
        use_console(1, [].append)
        assert logger.filter(hint)
    finally:
        use_console(0, [].append)


def _record(trial_id: str, sparsity: float, val: float, status: str, executed: int, reused: int) -> TrialRecord:
    return TrialRecord(
        search="s", trial_id=trial_id, status=TrialStatus(status), choices={"rate": 0.2},
        dense=DenseResult(0.65, 0.64, 0.1, 1000.0, 0, 200, "k"),
        matching=MatchingRecord(sparsity=sparsity, round=3, val_accuracy=val, test_accuracy=0.6),
        steps_executed=executed, steps_reused=reused,
    )


def test_summary_picks_the_sparsest_match_and_counts_compute():
    records = [
        _record("t1", 0.488, 0.64, "finished", 1000, 0),
        _record("t2", 0.672, 0.63, "stopped", 500, 1000),
        _record("t3", 0.672, 0.645, "finished", 200, 1000),  # tie on sparsity: better val wins
    ]
    summary = summarize(records, "s-1", rounds=5, extra={"wall_s": 12.0, "mlflow_command": "mlflow ui X"})
    assert summary["best"]["trial_id"] == "t3"
    assert (summary["trials"], summary["finished"], summary["stopped_by_asha"]) == (3, 2, 1)
    assert (summary["steps_executed"], summary["steps_reused"]) == (1700, 2000)
    lines = summary_lines(summary)
    assert lines[0].startswith("best ticket: trial t3 round 3: sparsity 67.20%")
    assert "mlflow ui X" in "\n".join(lines)


@pytest.mark.parametrize("records", [[], [_record("t1", 0.0, 0.65, "finished", 1, 0)]])
def test_summary_says_when_nothing_matched(records):
    for record in records:
        record.matching.round = 0
    line = summary_lines(summarize(records, "s", rounds=3))[0]
    assert line.startswith("best ticket: none")


@pytest.mark.parametrize(("store", "expected"), [
    ("s3://bucket/lth/store", "s3://bucket/lth/ray"),
    ("s3://bucket", "s3://bucket/ray"),
    ("gs://bucket/x/", "gs://bucket/ray"),
])
def test_ray_results_live_beside_the_store(store, expected, tmp_path):
    assert results_root(_cfg(f"store.uri={store}")) == expected
    local = _cfg(f"output_dir={tmp_path / 'runs'}", f"store.uri={tmp_path / 'shared' / 'store'}")
    assert results_root(local) == str(tmp_path / "shared" / "ray")  # beside the store, not in output_dir
    assert results_root(_cfg(f"output_dir={tmp_path / 'runs'}")) == str(tmp_path / "runs" / "ray")


def test_the_resume_hint_names_where_the_search_lives_and_the_cluster(tmp_path):
    import shlex

    from lth_search.cli import build_parser
    from lth_search.search.driver import _resume_command

    local = _cfg(f"output_dir={tmp_path}").absolute()
    assert _resume_command(local, None) == f"lth-search resume quickstart --output-dir {tmp_path}"
    remote = _cfg("store.uri=s3://b/lth/store")
    hint = _resume_command(remote, "10.0.0.7:6379")
    assert hint == "lth-search resume quickstart --store-uri s3://b/lth/store --address 10.0.0.7:6379"
    args = build_parser().parse_args(shlex.split(hint)[1:])
    assert (args.name, args.store_uri, args.address) == ("quickstart", "s3://b/lth/store", "10.0.0.7:6379")


def test_the_driver_trains_dense_stages_ahead_only_on_a_cpu_without_cuda_settings():
    """The driver trains the default's dense stages while Ray starts (driver._dense_ahead) only
    where doing so cannot open a CUDA context in it: a trial's fractional GPU or memory cap sets a
    CUDA memory fraction (runs/trial.limit_resources) even with the device on CPU."""
    from lth_search.search.driver import DENSE_AHEAD_STEPS, _dense_ahead_fits

    assert _dense_ahead_fits(_cfg("train.device=cpu"))
    assert not _dense_ahead_fits(_cfg("train.device=cpu", "resources.gpu=0.5"))
    assert not _dense_ahead_fits(_cfg("train.device=cpu", "resources.gpu_memory_fraction=0.5"))
    assert not _dense_ahead_fits(_cfg("train.device=cpu", f"train.steps={DENSE_AHEAD_STEPS + 1}"))


def _optuna_searcher(cfg, sampler, journal: str, study: str):
    """The search's Optuna searcher over `cfg`'s space, its study in the journal file `journal`."""
    from lth_search.search.journal import journal_storage
    from lth_search.search.scheduler import PruningAwareOptunaSearch

    return PruningAwareOptunaSearch(space=DefineByRunSpace(cfg), metric="matching_sparsity", mode="max", cfg=cfg,
                                    sampler=sampler, study_name=study, storage=journal_storage(journal))


def test_a_proposal_repeating_a_running_recipe_is_drawn_again_and_an_ended_one_is_not(tmp_path):
    """A copy of a running trial's recipe would wait for each of its stages and report the same
    bytes: a slot idle for a whole lineage. Random start-up draws with replacement; the seed here
    draws rate 0.5 twice in a row (checked: without the redraw both trials run rate 0.5)."""
    from lth_search.search.scheduler import DUPLICATE_ATTR, RAY_TRIAL_ATTR

    cfg = _cfg("search.space.rate=[0.2, 0.5]", "search.space.rewind_step=null")
    searcher = _optuna_searcher(cfg, optuna.samplers.RandomSampler(seed=1), str(tmp_path / "dup.journal"), "dup")
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert first["rate"] != second["rate"]
    trials = searcher._ot_study.get_trials(deepcopy=False)
    copies = [t for t in trials if t.state is optuna.trial.TrialState.FAIL]
    assert copies and all(t.user_attrs == {DUPLICATE_ATTR: "a"} and t.params == {"rate": first["rate"]} for t in copies)
    running = {t.user_attrs[RAY_TRIAL_ATTR]: t.params["rate"] for t in trials if t.state.name == "RUNNING"}
    assert running == {"a": first["rate"], "b": second["rate"]}

    searcher.on_trial_complete("a", {"matching_sparsity": 0.5, "training_iteration": 1}, error=True)
    again = [searcher.suggest(f"c{i}")["rate"] for i in range(4)]  # "a" ended: its recipe may come back
    assert first["rate"] in again


def test_an_exhaustive_search_whose_every_recipe_runs_draws_a_copy_without_stopping_the_study(tmp_path):
    """Optuna's BruteForceSampler calls `Study.stop` from `after_trial` once no recipe is left
    unexplored, and `stop` raises outside `Study.optimize`: telling a copy FAIL when every recipe
    runs already must still draw (a resumed exhaustive search hit it; CI at ff728b3)."""
    from lth_search.search.scheduler import DUPLICATE_ATTR

    cfg = _cfg("search.space.rate=[0.2, 0.5]", "search.space.rewind_step=null")
    searcher = _optuna_searcher(cfg, optuna.samplers.BruteForceSampler(seed=0), str(tmp_path / "all.journal"),
                                "all-running")
    rates = {searcher.suggest(trial)["rate"] for trial in ("a", "b")}
    assert rates == {0.2, 0.5}
    third = searcher.suggest("c")  # both recipes run: a copy, after the redraws
    assert third["rate"] in rates
    trials = searcher._ot_study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials].count("RUNNING") == 3
    assert all(DUPLICATE_ATTR in t.user_attrs for t in trials if t.state.name == "FAIL")


def test_an_exhaustive_search_ends_its_trials_without_stop_warnings(tmp_path, caplog):
    """Optuna's BruteForceSampler calls `Study.stop` once every recipe ran; Ray's OptunaSearch tells
    outside `Study.optimize`, so `stop` raised and Ray logged it as a warning at each trial's end.
    Nor does the sampler warn that it is experimental (an Optuna matter, not the user's)."""
    from lth_search.search.space import make_sampler, sampler_name

    cfg = _cfg("search.space.rate=[0.2, 0.5]", "search.space.rewind_step=null", "search.num_trials=2")
    assert sampler_name(cfg) == "exhaustive"
    with warnings.catch_warnings():  # nor Optuna's "experimental" warning on the console
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        sampler = make_sampler(cfg)
    searcher = _optuna_searcher(cfg, sampler, str(tmp_path / "ends.journal"), "ends")
    assert {searcher.suggest(trial)["rate"] for trial in ("a", "b")} == {0.2, 0.5}
    with caplog.at_level(logging.WARNING):
        for trial in ("a", "b"):
            searcher.on_trial_complete(trial, {"matching_sparsity": 0.5, "training_iteration": 1}, error=True)
    assert not [r for r in caplog.records if "Study.stop" in r.getMessage()]
    assert [t.state.name for t in searcher._ot_study.get_trials(deepcopy=False)] == ["COMPLETE", "COMPLETE"]


def test_trials_that_ended_after_rays_last_snapshot_count_against_a_resumed_searchs_budget(tmp_path):
    """A killed driver may have started trials after Ray's last snapshot that ended before it died:
    the restored search never had them, and ran as many again. They are lineages of the search
    (their records say so), so the resumed search runs that many fewer; an unfinished one is
    replaced. A search resumed twice does not count them twice."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.search import SearchGenerator

    from lth_search.search.relocation import RelocatedSearchGenerator
    from lth_search.store.stage_store import StageStore

    cfg = _cfg(f"output_dir={tmp_path}", "search.space.rate=[0.2, 0.5]", "search.space.rewind_step=null")
    journal = str(tmp_path / "study.journal")

    def searcher():
        return _optuna_searcher(cfg, optuna.samplers.RandomSampler(seed=0), journal, "s1")

    where = StorageContext(storage_path=str(tmp_path / "ray"), experiment_dir_name="s1")

    def resumed(snapshot) -> RelocatedSearchGenerator:
        generator = RelocatedSearchGenerator(searcher(), where, cfg, journal, "s1")
        generator.restore_from_dir(str(snapshot))
        return generator

    first = SearchGenerator(searcher())
    first.set_state({"counter": 2, "total_samples": 6, "finished": False, "experiment": None})
    first.searcher.suggest("a"), first.searcher.suggest("b")
    first.searcher.on_trial_complete("a", {"matching_sparsity": 0.5, "training_iteration": 1})
    (tmp_path / "snapshot1").mkdir(), (tmp_path / "snapshot2").mkdir()
    first.save_to_dir(str(tmp_path / "snapshot1"), "s")  # Ray's last snapshot: it knows a and b

    store = StageStore.from_config(cfg)
    for trial_id, status in [("a", TrialStatus.FINISHED), ("c", TrialStatus.FINISHED), ("d", TrialStatus.RUNNING),
                             ("e", TrialStatus.ERROR)]:
        TrialRecord(search=cfg.name, trial_id=trial_id, search_id="s1", status=status).save(store)
    TrialRecord(search=cfg.name, trial_id="x", search_id="another", status=TrialStatus.FINISHED).save(store)

    again = resumed(tmp_path / "snapshot1")
    assert again.total_samples == 6 - 2  # c finished and e errored after the snapshot; d is replaced
    again.save_to_dir(str(tmp_path / "snapshot2"), "s")
    assert resumed(tmp_path / "snapshot2").total_samples == 4  # counted once, whatever the resumes
    TrialRecord(search=cfg.name, trial_id="f", search_id="s1", status=TrialStatus.STOPPED).save(store)
    assert resumed(tmp_path / "snapshot2").total_samples == 3  # one more ended before the next kill


def test_a_worker_process_fetches_the_search_data_set_once_and_a_new_one_replaces_it(ray_local, data_root, tmp_path):
    import ray

    from lth_search.engine.data import load_dataset
    from lth_search.search.shared_data import SharedDataset
    from conftest import tiny_config

    cfg = tiny_config(data_root, tmp_path)
    first = load_dataset(cfg.data, cfg.seed, "cpu")
    second = load_dataset(cfg.data, cfg.seed + 1, "cpu")

    @ray.remote(num_cpus=0)
    class Trials:  # one process, as a reused Tune actor runs its trials
        def __init__(self) -> None:
            self.seen = []  # every data set a trial got stays alive: no two can share an id()

        def start(self, shared: SharedDataset) -> tuple[int, str]:
            self.seen.append(shared.get())
            return id(self.seen[-1]), _digest(self.seen[-1].train.x)

    worker = Trials.remote()
    shared_first, shared_second = SharedDataset(first), SharedDataset(second)
    one, two = ray.get([worker.start.remote(shared_first), worker.start.remote(shared_first)])
    assert one[0] == two[0]  # the second trial found the first's data set
    assert one[1] == _digest(first.train.x)
    three = ray.get(worker.start.remote(shared_second))
    assert three[0] != one[0] and three[1] == _digest(second.train.x)
    assert _digest(first.train.x) != _digest(second.train.x)  # the seeds split the data differently
    ray.kill(worker)


def _digest(tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


_MONITOR_FIRST = """
import signal
import ray
from lth_search.search.ray_session import _stop_autoscaler_monitor, ray_session

with ray_session(None):
    processes = ray._private.worker._global_node.all_processes
    monitor, raylet = processes["monitor"][0].process, processes["raylet"][0].process
    assert monitor.poll() is None
    _stop_autoscaler_monitor()
    assert monitor.returncode == -signal.SIGKILL, monitor.returncode
    assert raylet.poll() is None and ray.get(ray.put(7)) == 7  # the rest of Ray is untouched
assert raylet.poll() is not None and not ray.is_initialized()
print("stopped")
"""


def test_a_local_rays_autoscaler_monitor_is_killed_before_the_shutdown_waits_on_it():
    """ray.shutdown gives each head process a second to leave on SIGTERM, and the monitor takes it
    all (ray_session.py): the session kills it first, leaving the rest of Ray to stop as before."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # its own local Ray
    done = subprocess.run([sys.executable, "-c", _MONITOR_FIRST], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "stopped", done.stderr[-2000:]
    assert "autoscaler failed" not in done.stderr


def test_ended_trials_tpe_proposes_exactly_what_tpe_proposes():
    """The search's TPE keeps ended trials' internal values (search/tpe_cache.py): the same
    proposals as Optuna's TPE, ask for ask, with running trials (constant liar), pruned and
    failed ones, a parameter some trials lack, and its pickled state free of the cache."""
    import pickle

    from optuna.samplers._tpe.sampler import TPESampler

    from lth_search.search.tpe_cache import EndedTrialsTPESampler

    assert "_get_internal_repr" in vars(TPESampler), "Optuna renamed the method tpe_cache.py overrides"
    rates = [round(0.05 + 0.01 * i, 2) for i in range(30)]

    def proposals(sampler: optuna.samplers.BaseSampler) -> list[dict]:
        study = optuna.create_study(sampler=sampler, direction="maximize")
        out, running = [], []
        for number in range(70):
            trial = study.ask()
            trial.suggest_categorical("rate", rates)
            trial.suggest_float("scale", 0.0, 1.0)
            trial.suggest_int("rewind", 0, 20)
            if number % 7 == 0:
                trial.suggest_categorical("scope", ["global", "layerwise"])  # only some trials have it
            out.append(dict(trial.params))
            running.append(trial)
            if len(running) > 2:  # two stay running: TPE counts them as liars
                ended = running.pop(0)
                state = [optuna.trial.TrialState.COMPLETE] * 5 + [optuna.trial.TrialState.PRUNED,
                                                                   optuna.trial.TrialState.FAIL]
                chosen = state[ended.number % 7]
                value = (ended.params["rate"] * ended.params["scale"]) if chosen is optuna.trial.TrialState.COMPLETE else None
                study.tell(ended, value, state=chosen)
        return out

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cached = EndedTrialsTPESampler(seed=5, n_startup_trials=10)
    assert proposals(cached) == proposals(TPESampler(seed=5, n_startup_trials=10))
    assert cached._rows and sum(len(rows) for rows in cached._rows.values()) > 50
    assert pickle.loads(pickle.dumps(cached))._rows == {}


def test_a_finished_tuner_lets_go_of_every_trial(ray_local, tmp_path):
    # Tune's console callback and Ray's JSON writer kept every trial Tune ran after `fit`
    # returned, so all of them stayed in the driver through the summary and tracking's finish,
    # where it peaks (issue 24). A real Tuner of a trivial trainable, with the search's writer.
    import gc
    import weakref

    from ray import tune

    from lth_search.search.ended_trials import release_results
    from lth_search.search.result_file import result_files

    seen: list[weakref.ref] = []

    class Seen(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            seen.append(weakref.ref(trial))

    def trainable(config):
        tune.report({"score": config["x"]})

    tuner = tune.Tuner(
        trainable, param_space={"x": tune.grid_search([1, 2, 3])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), callbacks=[Seen(), *result_files()], verbose=1),
    )
    grid = tuner.fit()
    assert len(seen) == 3 and grid.num_errors == 0
    del grid
    gc.collect()
    assert any(ref() is not None for ref in seen)  # the Tuner still held them
    release_results(tuner)
    gc.collect()
    assert [ref() for ref in seen] == [None, None, None]
