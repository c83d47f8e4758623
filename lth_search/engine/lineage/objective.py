"""The search objective: matching sparsity, selected on the validation split.

Two parts, both pure (no Ray, no MLflow):

- The verdict: does one round's ticket match the dense network? It is decided example
  by example on the validation split (paired), against the mean of several dense
  networks trained with different seeds on the same split (a replicated baseline), so
  neither the luck of one validation sample nor the luck of one dense run sets the bar.
  The per-example values are those of the lineage's metric (metric.py): correctness for
  accuracy (higher is better), per-example losses for loss and perplexity (lower is
  better). The margin is the ticket's mean minus the dense replicates' mean, signed so
  that positive is better (for a loss: dense minus ticket); its standard error comes from
  the per-example differences (ticket minus the mean of the replicates on that example),
  which is what makes the comparison paired: what both get right, or both find easy,
  cancels. What pairing cannot remove is the seed noise of training itself (the
  ticket's and the replicates'); the spread of the replicates' means on the same split
  measures it, and the verdict's `se` adds it. The tolerance is in the metric's units.
- Failure: a stage whose training loss is not finite did not train. Nor did a classifier
  whose val accuracy is no better than always answering the most common class, or a
  language model whose mean val loss per token is no better than predicting every token
  of the vocabulary as equally likely (log V nats). Such a round never matches (it would
  otherwise "match" a dense network that failed too), and a dense network that failed
  stops its lineage: there is nothing to be a ticket of.
- The score: the sparsity of the last round of the lineage's unbroken matching run.
  A lineage may miss `patience - 1` rounds in a row and continue its run with a later
  pass; `patience` misses in a row end the run, and no pass after that counts. The
  score only looks at completed rounds, so it is fair at any round: a lineage stopped
  early has a score it really earned, and the run's end is known as soon as it happens.
"""

from __future__ import annotations

import base64
import math
from statistics import NormalDist
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np

_EPS = 1e-12
"""Absorbs float noise in accuracies that are ratios of the same split size."""


class _RoundLike(Protocol):
    round: int
    sparsity: float
    val_accuracy: float


@dataclass(frozen=True)
class Matching:
    """The last round of the unbroken matching run (round 0 stands for the dense network)."""

    sparsity: float
    val_accuracy: float
    round: int


@dataclass(frozen=True)
class Verdict:
    """One round judged against the replicated dense baseline on the same val examples."""

    matches: bool
    """The one-sided lower confidence bound of the margin is at least -tolerance."""
    margin: float
    """Ticket val metric minus the dense replicates' mean, signed so that negative is worse
    (accuracy: ticket - dense; loss: dense - ticket), in the metric's units."""
    se: float
    """Standard error of `margin` as an estimate of the ticket's true gap to dense:
    sqrt(se_paired^2 + seed_sd^2 (1 + 1/k)) for k replicates (seed noise of the ticket
    and of the replicates' mean). Keep the tolerance at least twice this."""
    se_paired: float
    """The val-sampling part: from the paired per-example differences."""
    seed_sd: float
    """Standard deviation of the replicates' val means (training-seed noise; 0 with one)."""
    dense_mean: float
    """The replicates' mean val value (accuracy or loss): the bar the margin is measured from."""
    lower_bound: float = 0.0
    """margin - z * se, z the normal quantile of the verdict's confidence."""


# Per-example correctness, packed for the stage metrics (JSON, no pickles) -----------------
def pack_correct(correct: np.ndarray) -> str:
    """A bool vector as base64 of its packed bits (1 bit per example, ~840 chars per 5000)."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def unpack_correct(packed: str, n: int) -> np.ndarray:
    """The bool vector `pack_correct` packed, given its length."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(packed), dtype=np.uint8))
    if bits.size < n or bits[n:].any():
        raise ValueError(f"packed correctness holds {bits.size} bits, expected {n}")
    return bits[:n].astype(bool)


# The verdict ------------------------------------------------------------------------------
def is_matching(val_accuracy: float, dense_val_accuracy: float, tolerance: float) -> bool:
    """The unpaired rule (one accuracy against one dense accuracy), for rows without predictions."""
    return val_accuracy >= dense_val_accuracy - tolerance - _EPS


def paired_verdict(ticket: np.ndarray, dense: Sequence[np.ndarray], tolerance: float, confidence: float,
                   higher_is_better: bool = True) -> Verdict:
    """Judge a ticket against dense replicates from per-example values on the same val split:
    correctness (accuracy, `higher_is_better`) or losses (loss and perplexity, lower is better).

    A non-inferiority test: matches when the one-sided lower confidence bound of the margin
    (ticket minus the replicates' mean, signed so that positive is better), margin - z * se,
    is at least -tolerance (in the values' units: a fraction of examples, or nats),
    z the normal quantile of `confidence`. So a ticket whose true margin is -tolerance or
    worse passes with probability at most 1 - confidence, and one as good as dense passes
    with probability Phi(tolerance / se - z): size the tolerance to about (z + 1.645) * se
    for 95 % (bench/verdict_calibration.py measures both rates; confidence 0.5 is the
    bare point estimate).
    """
    if not dense:
        raise ValueError("paired_verdict needs at least one dense replicate")
    t = np.asarray(ticket, dtype=np.float64)
    d = np.stack([np.asarray(x, dtype=np.float64) for x in dense])
    if d.shape[1:] != t.shape or t.ndim != 1 or t.size == 0:
        raise ValueError(f"per-example vectors must have one shared length, got {t.shape} and {d.shape[1:]}")
    if not (np.isfinite(t).all() and np.isfinite(d).all()):
        return Verdict(False, -math.inf, math.inf, math.inf, math.inf, float(d.mean()), -math.inf)
    bar = d.mean(axis=0)
    diff = (t - bar) if higher_is_better else (bar - t)
    margin = float(diff.mean())
    se_paired = float(diff.std(ddof=1) / math.sqrt(t.size)) if t.size > 1 else float("inf")
    k = d.shape[0]
    seed_sd = float(d.mean(axis=1).std(ddof=1)) if k > 1 else 0.0
    se = math.sqrt(se_paired**2 + seed_sd**2 * (1 + 1 / k))
    lower = margin - NormalDist().inv_cdf(confidence) * se if math.isfinite(se) else -math.inf
    return Verdict(lower >= -tolerance - _EPS, margin, se, se_paired, seed_sd, float(bar.mean()), lower)


# Failed training ---------------------------------------------------------------------------
def chance_level(labels: np.ndarray) -> float:
    """The val accuracy of always answering the most common class (0 for an empty split)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0.0
    return float(np.bincount(labels.astype(np.int64).ravel()).max() / labels.size)


CHANCE_MIN_EXAMPLES = 100
"""Below this many val examples, chance-level accuracy cannot be told from noise: not judged."""


def training_failure(train_loss: float, val_accuracy: float, chance: float, n: int) -> str | None:
    """Why a stage did not train (None if it did): a non-finite loss, or val accuracy no better
    than chance, i.e. not two standard errors of a chance-level classifier above it (judged on
    val splits of at least `CHANCE_MIN_EXAMPLES`)."""
    if not math.isfinite(train_loss):
        return f"training loss is {train_loss}"
    if n < CHANCE_MIN_EXAMPLES:
        return None
    bar = chance + 2 * math.sqrt(max(chance * (1 - chance), 0.0) / max(n, 1))
    if not math.isfinite(val_accuracy) or val_accuracy <= bar:
        return f"val accuracy {100 * val_accuracy:.2f}% is no better than chance ({100 * chance:.2f}%, the most common class)"
    return None


def lm_training_failure(train_loss: float, val_loss: float, vocab_size: int) -> str | None:
    """Why a language model's stage did not train (None if it did): a non-finite loss, or a
    mean val loss per token no better than log(vocab_size), the loss of predicting every token
    the model can output as equally likely (`vocab_size`: its logits, walk.py `Lineage.outputs`).

    The chance test of classifiers does not apply: a causal LM's accuracy (every target token
    right) is near 0 for any model. The uniform predictor is the untrained reference instead:
    its loss is exactly log V on every token (no noise to allow for), a fresh random model
    scores about that, a pretrained one far below, and a diverged one above.
    """
    if not math.isfinite(train_loss):
        return f"training loss is {train_loss}"
    if not math.isfinite(val_loss):
        return f"val loss is {val_loss}"
    uniform = math.log(max(vocab_size, 1))
    if vocab_size > 1 and val_loss >= uniform:
        return (f"val loss {val_loss:.4f} is no better than predicting all {vocab_size} tokens as equally likely "
                f"(log V = {uniform:.4f})")
    return None


# The score --------------------------------------------------------------------------------
def verdicts(dense_val_accuracy: float, rounds: Iterable[_RoundLike], tolerance: float) -> list[bool]:
    """Each round's verdict: its own paired `matches` when it has one, else the unpaired rule."""
    out = []
    for item in rounds:
        judged = getattr(item, "matches", None)
        out.append(bool(judged) if judged is not None else is_matching(item.val_accuracy, dense_val_accuracy, tolerance))
    return out


def run_ended(passes: Sequence[bool], patience: int) -> bool:
    """Whether `patience` rounds in a row have failed (anywhere): the unbroken run is over."""
    misses = 0
    for passed in passes:
        misses = 0 if passed else misses + 1
        if misses >= patience:
            return True
    return False


def unbroken_run(passes: Sequence[bool], patience: int) -> int:
    """Index (1-based round) of the last pass of the unbroken matching run; 0 if none.

    A pass after fewer than `patience` consecutive misses continues the run; after
    `patience` misses in a row the run is over and later passes do not count.
    """
    last, misses = 0, 0
    for index, passed in enumerate(passes, start=1):
        if passed:
            last, misses = index, 0
            continue
        misses += 1
        if misses >= patience:
            break
    return last


def matching(
    dense_val_accuracy: float, rounds: Iterable[_RoundLike], tolerance: float, patience: int = 1
) -> Matching:
    """The score: the last round of the unbroken matching run (the dense network if none)."""
    rounds = list(rounds)
    last = unbroken_run(verdicts(dense_val_accuracy, rounds, tolerance), patience)
    if last == 0:
        return Matching(0.0, dense_val_accuracy, 0)
    item = rounds[last - 1]
    return Matching(item.sparsity, item.val_accuracy, item.round)
