"""The objective: the paired verdict, the unbroken matching run with patience, and lineages
that prune until they stop matching (issue 9, criteria 4 and 5, engine side)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from lth_search.engine.lineage.walk import Lineage
from lth_search.engine.lineage.stages import MemoryStages
from lth_search.engine.lineage.results import DenseResult, LineageResult
from lth_search.config import load_config
from lth_search.errors import ConfigError, TrackingError
from lth_search.engine.lineage.objective import (
    lm_training_failure,
    matching,
    pack_correct,
    paired_verdict,
    run_ended,
    unbroken_run,
    unpack_correct,
)


@dataclass
class Round:
    round: int
    sparsity: float
    val_accuracy: float
    matches: bool | None = None


def curve(vals: list[float], rate: float = 0.2) -> list[Round]:
    """Rounds 1..len(vals) of a pruner at `rate` with these val accuracies (unpaired verdicts)."""
    return [Round(r, 1 - (1 - rate) ** r, v) for r, v in enumerate(vals, start=1)]


# The unbroken run ---------------------------------------------------------------------------
DENSE, TOL = 0.65, 0.01
PASS, MISS = 0.65, 0.60


def test_a_pass_after_a_miss_within_patience_continues_the_run() -> None:
    rounds = curve([PASS, PASS, MISS, PASS, PASS, MISS, MISS])
    best = matching(DENSE, rounds, TOL, patience=2)
    assert best.round == 5 and best.sparsity == pytest.approx(1 - 0.8**5)


def test_a_pass_after_misses_beyond_patience_does_not_count() -> None:
    rounds = curve([PASS, PASS, MISS, MISS, PASS, PASS])
    assert matching(DENSE, rounds, TOL, patience=2).round == 2
    assert matching(DENSE, rounds, TOL, patience=3).round == 6  # two misses are within a patience of 3
    assert matching(DENSE, rounds, TOL, patience=1).round == 2
    assert matching(DENSE, curve([MISS, PASS, PASS]), TOL, patience=1).round == 0  # the dense network


def test_the_old_max_over_scattered_passes_is_gone() -> None:
    """Seed 2 of issue 9: round 1 fails, rounds 2-3 pass; with no patience that is no ticket."""
    rounds = curve([MISS, PASS, PASS, MISS, MISS, MISS])
    assert matching(DENSE, rounds, TOL, patience=1).sparsity == 0.0
    assert matching(DENSE, rounds, TOL, patience=2).round == 3


def test_paired_verdicts_override_the_unpaired_rule() -> None:
    rounds = [Round(1, 0.2, 0.10, matches=True), Round(2, 0.36, 0.99, matches=False), Round(3, 0.49, 0.99, matches=False)]
    assert matching(DENSE, rounds, TOL, patience=2).round == 1


def test_run_end_and_unbroken_run_agree() -> None:
    passes = [True, False, True, False, False, True]
    assert [run_ended(passes[:i], 2) for i in range(1, 7)] == [False, False, False, False, True, True]
    assert unbroken_run(passes, 2) == 3 and unbroken_run(passes, 3) == 6 and unbroken_run([], 2) == 0


def test_the_score_is_fair_at_any_round() -> None:
    """What a trial reports after round r only depends on rounds 1..r, and never drops a
    ticket it has earned while the run is unbroken."""
    dense = DenseResult(val_accuracy=DENSE, test_accuracy=DENSE, train_loss=0.0, train_steps_per_s=0.0, reused=0,
                        steps=0, key="dense")
    result = LineageResult(dense=dense, rounds=curve([PASS, MISS, PASS, MISS, MISS, PASS]),
                           steps_executed=0, steps_reused=0, tolerance=TOL, patience=2)
    assert [result.score(r).round for r in range(0, 7)] == [0, 1, 1, 3, 3, 3, 3]
    assert result.best == result.score(6)
    assert result.should_stop() == "run_ended"


def test_a_slow_pruner_is_scored_by_the_sparsity_it_reaches_matching() -> None:
    """A fast pruner that stops matching early scores below a slow one that keeps matching."""
    fast = curve([PASS, PASS, MISS, MISS], rate=0.4)       # matches to 64 %
    slow = curve([PASS] * 8 + [MISS, MISS], rate=0.2)      # matches to 83 %
    assert matching(DENSE, slow, TOL, 2).sparsity > matching(DENSE, fast, TOL, 2).sparsity


# The paired verdict -------------------------------------------------------------------------
def test_correctness_packs_to_bits_and_back() -> None:
    vector = np.random.default_rng(0).random(1001) < 0.6
    packed = pack_correct(vector)
    assert len(packed) <= math.ceil(1001 / 8 / 3) * 4
    assert np.array_equal(unpack_correct(packed, 1001), vector)
    with pytest.raises(ValueError):
        unpack_correct(packed, 1100)


def test_paired_verdict_on_constructed_predictions() -> None:
    n = 1000
    dense_a = np.zeros(n, bool)
    dense_a[:600] = True                       # 60.0 %
    dense_b = np.zeros(n, bool)
    dense_b[40:680] = True                     # 64.0 %: the replicates' mean is 62.0 %
    ticket = np.zeros(n, bool)
    ticket[:610] = True                        # 61.0 %
    verdict = paired_verdict(ticket, [dense_a, dense_b], tolerance=0.01, confidence=0.5)
    assert verdict.margin == pytest.approx(-0.01) and verdict.dense_mean == pytest.approx(0.62)
    assert verdict.matches                     # exactly at the tolerance
    assert not paired_verdict(ticket, [dense_a, dense_b], tolerance=0.0099, confidence=0.5).matches
    assert not paired_verdict(ticket, [dense_b], tolerance=0.02, confidence=0.5).matches  # one lucky dense run sets a higher bar
    diff = ticket.astype(float) - (dense_a.astype(float) + dense_b) / 2
    assert verdict.se_paired == pytest.approx(diff.std(ddof=1) / math.sqrt(n))
    # the replicates disagree by 4 pp: seed noise that pairing cannot remove, added to the error
    assert verdict.seed_sd == pytest.approx(0.04 / math.sqrt(2))
    assert verdict.se == pytest.approx(math.sqrt(verdict.se_paired**2 + verdict.seed_sd**2 * 1.5))


def test_pairing_cancels_what_ticket_and_dense_share() -> None:
    """The same accuracies, but a ticket that errs where dense errs has a much smaller
    standard error than one whose errors are unrelated: that is the point of pairing."""
    rng = np.random.default_rng(1)
    n = 4000
    dense = rng.random(n) < 0.62
    similar = dense.copy()
    similar[np.flatnonzero(dense)[:40]] = False          # 40 examples lost: -1 pp
    unrelated = np.zeros(n, bool)
    unrelated[rng.permutation(n)[: int(similar.sum())]] = True
    paired, unpaired = paired_verdict(similar, [dense], 0.02, 0.9), paired_verdict(unrelated, [dense], 0.02, 0.9)
    assert paired.margin == pytest.approx(unpaired.margin)
    assert paired.se_paired < unpaired.se_paired / 5 and paired.seed_sd == 0.0


def test_a_loss_verdict_judges_lower_as_better() -> None:
    """search.metric loss or perplexity: per-example losses, lower is better; the margin is
    signed so that positive is better, the tolerance is in nats, and the noise terms are kept."""
    rng = np.random.default_rng(3)
    n = 2000
    hard = rng.gamma(2.0, 1.0, n)                              # per-example difficulty both models share
    dense = [hard + rng.normal(0, 0.05, n) for _ in range(3)]  # three replicates, about as good as each other
    lower = hard - 0.05 + rng.normal(0, 0.05, n)               # a ticket with a lower loss
    higher = hard + 0.30 + rng.normal(0, 0.05, n)              # a ticket clearly worse: 0.3 nats higher
    bar = np.mean([d.mean() for d in dense])
    better = paired_verdict(lower, dense, tolerance=0.02, confidence=0.9, higher_is_better=False)
    assert better.matches and better.margin == pytest.approx(bar - lower.mean()) and better.margin > 0
    assert better.dense_mean == pytest.approx(bar) and better.seed_sd > 0
    assert better.se == pytest.approx(math.sqrt(better.se_paired**2 + better.seed_sd**2 * (1 + 1 / 3)))
    worse = paired_verdict(higher, dense, tolerance=0.02, confidence=0.9, higher_is_better=False)
    assert not worse.matches and worse.margin == pytest.approx(bar - higher.mean()) and worse.margin < -0.25
    assert paired_verdict(higher, dense, tolerance=0.4, confidence=0.9, higher_is_better=False).matches  # in nats
    # read the wrong way round, the worse ticket would have passed: the direction decides
    assert paired_verdict(higher, dense, tolerance=0.02, confidence=0.9).matches
    nan = higher.copy()
    nan[5] = np.nan
    assert not paired_verdict(nan, dense, tolerance=0.4, confidence=0.9, higher_is_better=False).matches


def test_a_language_model_fails_against_the_uniform_prediction_not_chance() -> None:
    assert lm_training_failure(2.0, 4.0, 256) is None                       # log 256 = 5.55 nats
    assert "no better than predicting all 256 tokens" in lm_training_failure(2.0, 5.6, 256)
    assert lm_training_failure(float("nan"), 1.0, 256) == "training loss is nan"
    assert lm_training_failure(2.0, float("inf"), 256) == "val loss is inf"


def test_the_best_ticket_respects_the_metric_direction() -> None:
    """Ties in sparsity go to the better value: higher accuracy, lower loss (runs/best.py), and
    `best --min-sparsity` picks the lowest loss (tickets.py `select_ticket`)."""
    from lth_search.runs.best import TrialTicket, best_trial_ticket
    from lth_search.tickets import select_ticket

    low, high = (TrialTicket(name, 2, 0.36, 0.0, val_value=value, higher_is_better=False)
                 for name, value in (("low", 2.1), ("high", 2.5)))
    assert best_trial_ticket([high, low]).trial_id == "low"
    assert best_trial_ticket([TrialTicket("a", 2, 0.36, 0.61), TrialTicket("b", 2, 0.36, 0.64)]).trial_id == "b"
    rows = [{"trial_id": trial, "run_id": trial, "round": 1, "sparsity": 0.2, "val_accuracy": 0.0, "test_accuracy": 0.0,
             "dense_val_accuracy": 0.0, "tolerance": 0.05, "matching": True, "margin": 0.0, "matching_round": 1,
             "metric": "perplexity", "val_perplexity": ppl, "dense_val_perplexity": 10.0, "params": {}}
            for trial, ppl in (("a", 9.0), ("b", 12.0), ("c", 10.4))]
    assert select_ticket(rows, min_sparsity=0.1)["trial_id"] == "a"
    assert select_ticket(rows)["trial_id"] == "a"
    # within 0.05 nats of dense: exp(0.05) = 1.051, so perplexity 10.4 is in and 12.0 is out
    assert select_ticket([rows[2]], max_accuracy_drop=0.05)["trial_id"] == "c"
    with pytest.raises(TrackingError, match="closest drops"):
        select_ticket([rows[1]], max_accuracy_drop=0.05)


def test_search_metric_is_one_config_field() -> None:
    assert load_config(None, []).verdict_metric() == "accuracy"
    assert load_config(None, ["data.name=text_lm"]).verdict_metric() == "perplexity"
    assert load_config(None, ["data.name=text_lm", "search.metric=loss"]).verdict_metric() == "loss"
    with pytest.raises(ConfigError, match=r"search.metric: Input should be 'auto', 'accuracy', 'loss' or 'perplexity'"):
        load_config(None, ["search.metric=mse"])
    with pytest.raises(ConfigError, match=r"search.tolerance: Input should be less than 1"):
        load_config(None, ["search.metric=loss", "search.tolerance=1.5"])


def test_paired_verdict_rejects_mismatched_vectors() -> None:
    with pytest.raises(ValueError, match="one shared length"):
        paired_verdict(np.ones(10, bool), [np.ones(11, bool)], 0.01, 0.9)
    with pytest.raises(ValueError, match="at least one"):
        paired_verdict(np.ones(10, bool), [], 0.01, 0.9)


# Real lineages ------------------------------------------------------------------------------
def test_stop_rule_does_not_change_stage_keys(data_root: Path, tmp_path: Path) -> None:
    base = Lineage(tiny_config(data_root, tmp_path, prune__rounds=6)).stage_keys()
    other = Lineage(tiny_config(data_root, tmp_path, prune__rounds=9, prune__patience=1, prune__target_sparsity=0.5,
                                prune__dense_replicates=3, search__tolerance=0.05)).stage_keys()
    assert other[:7] == base


def test_rate_02_lineage_matches_past_8_rounds_then_stops_within_patience(data_root: Path, tmp_path: Path) -> None:
    """Criterion 5: no cap below prune.rounds; the walk ends `patience` misses after the run breaks.

    Widths [32], 200 steps, two dense replicates (val 48.7 / 47.0 %), as measured when
    this test was written: margins -0.7 pp at round 7 (79 %), -6.2 pp at round 8, -10.3 pp
    at round 9 (87 %), -13.1 pp at round 10 and worse after. A tolerance of 11.5 pp puts the
    first miss at round 10, over 1 pp from either side of the bar.
    """
    patience, tolerance = 2, 0.115
    cfg = tiny_config(data_root, tmp_path, prune__rate=0.2, prune__rounds=20, prune__patience=patience,
                      prune__dense_replicates=2, search__tolerance=tolerance, search__confidence=0.5)
    lineage = Lineage(cfg, MemoryStages())  # confidence 0.5: the point estimate these margins were measured with
    reported: list[int] = []
    result = lineage.run(on_round=lambda r, res: reported.append(res.score(r.round).round))
    passes = [r.matches for r in result.rounds]
    assert len(lineage.replicates) == 2 and result.dense.replicates == len(result.dense.replicate_keys) == 2
    first_miss = passes.index(False) + 1
    assert first_miss > 8 and result.best.round == first_miss - 1 > 8, passes
    assert result.best.sparsity == pytest.approx(1 - 0.8 ** result.best.round, abs=0.005)
    # stops within `patience` rounds of its first miss, well before the cap of 20 rounds
    assert result.stop_reason == "run_ended" and len(result.rounds) == first_miss + patience - 1 < cfg.prune.rounds
    assert passes[first_miss - 1:] == [False] * patience
    assert reported == [result.score(r).round for r in range(1, len(result.rounds) + 1)]
    for r in result.rounds:  # each round carries its verdict and the margin against the replicates' mean
        assert r.matches == (r.margin >= -tolerance - 1e-12) and r.margin_se > 0


def test_target_sparsity_stops_the_walk(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data_root, tmp_path, prune__rounds=10, prune__target_sparsity=0.5, search__tolerance=0.99)
    result = Lineage(cfg).run()
    assert [r.round for r in result.rounds] == [1, 2, 3, 4] and result.stop_reason == "target_sparsity"
    assert result.best.round == 4


def test_a_pack_walks_like_a_lone_lineage(data_root: Path, tmp_path: Path) -> None:
    """Packs train the same dense replicates, judge rounds the same way and stop members alike."""
    from lth_search.engine.lineage.walk import walk

    settings = dict(prune__rate=0.2, prune__rounds=20, prune__patience=2, prune__dense_replicates=2,
                    search__tolerance=0.115, train__device="cpu")
    alone = Lineage(tiny_config(data_root, tmp_path, **settings), MemoryStages()).run()
    packed = walk([Lineage(tiny_config(data_root, tmp_path, **settings), MemoryStages()),
                   Lineage(tiny_config(data_root, tmp_path, **{**settings, "prune__rounds": 3}), MemoryStages())])
    assert packed[0].dense.replicate_keys == alone.dense.replicate_keys
    assert [r.matches for r in packed[0].rounds] == [r.matches for r in alone.rounds]
    assert packed[0].stop_reason == alone.stop_reason == "run_ended" and packed[0].best.round == alone.best.round
    assert len(packed[1].rounds) == 3 and packed[1].stop_reason == "cap"
