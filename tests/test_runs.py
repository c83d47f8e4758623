"""The typed trial record and the Ray-free trial runner: JSON compatibility, attempts, reports."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_config

from lth_search.engine.lineage.results import RoundResult
from lth_search.runs.confirmation import RecipeScore, candidates
from lth_search.runs.record import MatchingRecord, TrialRecord, TrialStatus
from lth_search.runs.trial import run_trial
from lth_search.store.stage_store import StageStore

OLD_RECORD = {  # as the search wrote records before the typed record existed
    "search": "q", "search_id": "q-1", "trial_id": "t1", "optuna_trial": 3, "choices": {"rate": 0.3},
    "config": {"name": "q"}, "status": "stopped",
    "dense": {"val_accuracy": 0.6, "test_accuracy": 0.59, "train_loss": 0.1, "train_steps_per_s": 900.0,
              "reused": 0, "steps": 200, "key": "d" * 64},
    "dense_key": "d" * 64, "round_keys": ["r" * 64],
    "rounds": [{"round": 1, "sparsity": 0.3, "val_accuracy": 0.61, "test_accuracy": 0.6, "train_loss": 0.2,
                "train_steps_per_s": 800.0, "reused": 1, "steps": 180, "key": "r" * 64,
                "layer_sparsity": {"a": 0.3}, "attempt": 2}],
    "matching": {"sparsity": 0.3, "round": 1, "val_accuracy": 0.61, "test_accuracy": 0.6},
    "attempts": [{"attempt": 1, "pid": 5, "node_id": "n", "started_at": 1.0, "restored_round": -1,
                  "executed_keys": [], "steps_executed": 200}],
    "steps_executed": 200, "steps_reused": 180, "updated_at": 2.0,
}


def test_an_old_record_reads_and_writes_back_the_same_json():
    record = TrialRecord.from_json(OLD_RECORD)
    assert record.status is TrialStatus.STOPPED and record.rounds[0].attempt == 2
    assert record.dense_key == "d" * 64 and record.matching == MatchingRecord(0.3, 1, 0.61, 0.6)
    again = record.to_json()
    new_round = {"rescale": {}, "matches": None, "margin": None, "margin_se": None, "diagnostics": None,  # added since
                 "failed": None, "val_loss": None, "test_loss": None}
    new_dense = {"replicates": 1, "replicate_keys": [], "replicate_val_accuracies": [], "baseline_val_accuracy": None,
                 "baseline_test_accuracy": None, "baseline_val_sd": 0.0, "baseline_val_loss": None, "failed": None,
                 "val_loss": None, "test_loss": None}
    new_matching = {"metric": "accuracy", "val_metric": None, "test_metric": None}
    assert {k: again[k] for k in OLD_RECORD} == {**OLD_RECORD, "rounds": [{**OLD_RECORD["rounds"][0], **new_round}],
                                                 "dense": {**OLD_RECORD["dense"], **new_dense},
                                                 "matching": {**OLD_RECORD["matching"], **new_matching}}
    result = record.result(tolerance=0.02)
    assert result.rounds == [RoundResult.from_json(OLD_RECORD["rounds"][0])] and result.best.round == 1


def test_a_broken_record_is_one_error_naming_the_trial():
    broken = {**OLD_RECORD, "dense": {"val_accuracy": 0.6}}
    try:
        TrialRecord.from_json(broken)
    except ValueError as error:
        assert "trial record 't1'" in str(error)
    else:
        raise AssertionError("a record without its dense fields was accepted")


def test_the_runner_records_reports_and_counts_attempts(data_root: Path, tmp_path: Path):
    cfg = tiny_config(data_root, tmp_path)
    store = StageStore.from_config(cfg)
    reports: list[tuple[int, dict]] = []
    record = TrialRecord.open(store, cfg.name, "t0", "s-1", 0, {}, cfg.model_dump(mode="json"))
    result = run_trial(cfg, store, lambda r, key, metrics: reports.append((r, metrics)), record)
    assert [r for r, _ in reports] == [1, 2, 3]
    assert all(m["matching_sparsity"] == result.best.sparsity or r < 3 for r, m in reports)
    saved = TrialRecord.load(store, cfg.name, "t0")
    assert saved.status is TrialStatus.FINISHED and saved.round_keys == [r.key for r in result.rounds]
    assert saved.attempts[0].executed_keys == result.executed_keys and saved.steps_reused == 0

    # a retry after round 2 was reported: nothing retrained, only round 3 reported again
    again: list[int] = []
    retry = TrialRecord.open(store, cfg.name, "t0", "s-1", 0, {}, cfg.model_dump(mode="json"))
    run_trial(cfg, store, lambda r, key, metrics: again.append(r), retry, done=2)
    saved = TrialRecord.load(store, cfg.name, "t0")
    assert again == [3] and [a.attempt for a in saved.attempts] == [1, 2]
    assert saved.attempts[1].executed_keys == [] and saved.attempts[1].restored_round == 2


def test_candidates_are_the_default_then_the_best_distinct_recipes():
    def record(trial_id: str, rate: float, sparsity: float) -> TrialRecord:
        return TrialRecord(search="q", trial_id=trial_id, choices={"rate": rate},
                           matching=MatchingRecord(sparsity, 1, 0.6, 0.6))

    records = [record("a", 0.2, 0.5), record("b", 0.4, 0.8), record("c", 0.4, 0.7), record("d", 0.3, 0.6)]
    assert candidates(records, {"rate": 0.2}, top_k=2) == [{"rate": 0.2}, {"rate": 0.4}, {"rate": 0.3}]
    score = RecipeScore({"rate": 0.2}, True, [1, 2], [0.5, 0.8], [0.0, 0.01])
    assert abs(score.compression - (2.0 * 5.0) ** 0.5) < 1e-9  # geometric mean of 1/(1-s)


def _score(recipe: dict, is_default: bool, sparsities: list[float], seeds=(11, 12, 13)) -> "RecipeScore":
    return RecipeScore(recipe, is_default, list(seeds), sparsities, [0.0] * len(sparsities))


def test_the_default_stays_without_evidence_and_the_gain_is_measured_out_of_sample() -> None:
    from lth_search.runs.confirmation import Confirmation, confirmation_lines

    default = _score({"rate": 0.2}, True, [0.8, 0.8, 0.8])            # 5x on every selection seed
    lucky = _score({"rate": 0.1}, False, [0.95, 0.7, 0.8])           # 20x, 3.3x, 5x: geo-mean 7.4x, one lucky seed
    kept = Confirmation([11, 12, 13], [default, lucky], margin=1.1, confidence=0.8, report_seeds=[21, 22, 23])
    assert kept.selection.gain > 1.1 and kept.selection.low < 1.0   # a big point gain, no evidence
    assert kept.chosen is default and kept.gain == 1.0 and kept.reported is None
    assert any("nothing better than the config's own recipe" in line for line in confirmation_lines(kept.to_json()))

    steady = _score({"rate": 0.1}, False, [0.9, 0.88, 0.9])          # 10x, 8.3x, 10x: better on every seed
    won = Confirmation([11, 12, 13], [default, steady], margin=1.1, confidence=0.8, report_seeds=[21, 22, 23])
    assert won.chosen is steady and won.selection.low > 1.0
    assert won.gain == 1.0  # nothing claimed before the reporting seeds ran
    won.report = [_score({"rate": 0.2}, True, [0.8, 0.75, 0.85], (21, 22, 23)),
                  _score({"rate": 0.1}, False, [0.85, 0.85, 0.8], (21, 22, 23))]
    reported = won.reported
    assert reported.seeds == 3 and reported.wins == 2 and reported.low < reported.gain < reported.high
    assert won.gain == reported.gain != won.selection.gain  # the printed gain is the out-of-sample one
    assert won.to_json()["gain_ci"] == [reported.low, reported.high]


def test_certain_candidates_stay_candidates_whatever_the_running_lineages_end_with():
    """Every way the running lineages can end (a new recipe, or one already ranked, anywhere in
    the ranking, or no matching at all) keeps the certain candidates among the final ones."""
    import itertools
    import random

    from lth_search.runs.confirmation import certain_candidates

    def record(trial_id: str, rate: float, sparsity: float | None) -> TrialRecord:
        matching = None if sparsity is None else MatchingRecord(sparsity, 1, 0.6, 0.6)
        return TrialRecord(search="q", trial_id=trial_id, choices={"rate": rate}, matching=matching)

    generator = random.Random(5)
    rates, levels = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [None, 0.5, 0.6, 0.7, 0.8, 0.9]
    checked = 0
    for _ in range(300):
        ids = generator.sample(range(100), 10)  # trial ids: the running ones may sort before the ended
        ended = [record(f"t{ids.pop():02d}", generator.choice(rates), generator.choice(levels))
                 for _ in range(generator.randint(0, 6))]
        generator.shuffle(ended)
        running, top_k = generator.randint(0, 3), generator.randint(1, 4)
        certain = certain_candidates(ended, running, {"rate": 0.2}, top_k)
        for ends in itertools.islice(itertools.product(rates, levels, repeat=running), 200):
            pairs = list(zip(ends[0::2], ends[1::2]))
            everything = ended + [record(f"t{ids[i]:02d}", r, s) for i, (r, s) in enumerate(pairs)]
            final = candidates(sorted(everything, key=lambda r: r.trial_id), {"rate": 0.2}, top_k)  # as load_all
            assert all(recipe in final for recipe in certain), (ended, pairs, certain, final)
            checked += 1
    assert checked > 1000
    assert certain_candidates([record("a", 0.4, 0.8)], 1, {"rate": 0.2}, 1) == [{"rate": 0.2}]  # the default only
