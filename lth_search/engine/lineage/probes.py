"""A lineage's diagnostics, round by round: cheap ones from stored weights, probes as stages.

The cheap diagnostics (sign preservation, trajectory alignment, layer health) need no
training: they are recomputed from the stage's stored weights whenever a round is
reported, so a reused round gets them too and turning them on never retrains anything.
The probes that train (linear-mode-connectivity stability, perturbation) are stages of
their own, keyed by the round they probe, so they are computed once and reused like any
stage, and switching them on later does not invalidate the rounds.

Sign preservation compares a round's end weights with the initial weights of its
kind: theta_k, except for random re-initialisation (its own fresh initialisation). So
for LR rewinding and fine-tuning rho says how many signs survived since theta_k across
all their rounds. Stability is defined from theta_k with the mask (Frankle et al.,
2020); for kinds whose rounds do not start there (lr_rewind, finetune, random_reinit)
it is not reported.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from lth_search.engine.diagnostics import (
    error_barrier,
    health_warnings,
    interpolation_errors,
    interpolation_points,
    layer_health,
    perturbed_start,
    probe_gradients,
    sign_preservation,
    trajectory_alignment,
)
from lth_search.engine.lineage import keys
from lth_search.engine.lineage.kinds import kind_of, reinit_state
from lth_search.engine.lineage.results import RoundDiagnostics
from lth_search.engine.packs import PackMember, train_pack
from lth_search.errors import ConfigError
from lth_search.store.entry import StageEntry

if TYPE_CHECKING:
    from lth_search.engine.lineage.walk import Lineage

log = logging.getLogger(__name__)

STABILITY_SEED = 7919
"""Added to the experiment seed for the second copy's data order."""
PERTURBATION_SEED = 104729


def stage_kind(entry: StageEntry) -> str:
    """The lineage kind a stage belongs to (IMP rounds carry none in their inputs)."""
    return str(entry.inputs.get("kind", "imp"))


def rewinds(entry: StageEntry) -> bool:
    """Whether `entry`'s round trained from theta_k with its mask (stability is defined then)."""
    return kind_of(stage_kind(entry)).rewinds


def attach_probes(lineage: "Lineage") -> None:
    """Give `lineage` its round diagnostics when `diagnostics.enabled` and it has none yet.

    A search trial, a trial pack's members and `compare`'s kinds all diagnose their rounds
    this way; a bare `Lineage(cfg).run()` (the science test, benches) stays without them.
    """
    if lineage.diagnose is None and lineage.cfg.diagnostics.enabled:
        lineage.diagnose = RoundProbes(lineage)


GRADIENTS_KEPT = 8
_GRADIENTS: dict[tuple, dict[str, torch.Tensor]] = {}
"""Probe gradients at theta_k (`RoundProbes.gradient`), oldest first. The trials of a search share
their dense stages, and a trial actor walks lineage after lineage: each of them computed the same
gradient again (a forward and backward pass on the probe batch and a copy of the model, ~2 % of a
tiny lineage's fixed cost). The key is the dense stage's (its weights and data) with what else
the gradient depends on; the tensors are read, never changed."""


class RoundProbes:
    """`lineage.diagnose`: the diagnostics of one round stage of `lineage`."""

    def __init__(self, lineage: "Lineage") -> None:
        self.lineage = lineage
        self.settings = lineage.cfg.diagnostics

    # Reference points -------------------------------------------------------------------
    def rewind_state(self, dense: StageEntry) -> dict[str, torch.Tensor]:
        return dense.weights[f"rewind_{self.lineage.cfg.prune.rewind_step}"]

    def reference_state(self, dense: StageEntry, entry: StageEntry) -> dict[str, torch.Tensor]:
        """The initial weights of `entry`'s kind (theta_k, or a random re-initialisation's own)."""
        if stage_kind(entry) == "random_reinit":
            return reinit_state(self.lineage, int(entry.inputs["seed"]))
        return self.rewind_state(dense)

    def gradient(self, dense: StageEntry) -> dict[str, torch.Tensor]:
        """The loss gradient at theta_k on the fixed probe batch, computed once per process for a
        dense stage, rewind step, batch size, layers and device (`_GRADIENTS`)."""
        lineage = self.lineage
        size, names = self.settings.probe_size, sorted(lineage.groups)
        key = (dense.key, lineage.cfg.prune.rewind_step, size, tuple(names), str(lineage.device))
        if key not in _GRADIENTS:
            split = lineage.data.train
            state = {n: t.to(lineage.device) for n, t in self.rewind_state(dense).items()}
            _GRADIENTS[key] = probe_gradients(lineage.model, state, split.x[:size], split.y[:size], names)
            while len(_GRADIENTS) > GRADIENTS_KEPT:
                _GRADIENTS.pop(next(iter(_GRADIENTS)))
        return _GRADIENTS[key]

    # The diagnostics ----------------------------------------------------------------------
    def __call__(self, dense: StageEntry, entry: StageEntry) -> RoundDiagnostics:
        mask = entry.masks["mask"]
        rho = sign_preservation(self.reference_state(dense, entry), entry.weights["end"], mask,
                                dense.weights["end"])
        rows = layer_health(mask, entry.metrics["sparsity"], self.settings.collapse_ratio, self.settings.deviation_bound)
        result = RoundDiagnostics(
            sign_ticket=rho.ticket,
            sign_dense=rho.dense,
            alignment=trajectory_alignment(self.gradient(dense), mask),
            collapsed_layers=[row.name for row in rows if row.collapsed],
            warnings=health_warnings(rows),
        )
        for line in result.warnings:  # a collapse on stderr; a layer off the global target (global
            # pruning spreads sparsity unevenly by design) only in the log and the round's diagnostics
            level = logging.WARNING if " collapsed:" in line else logging.INFO
            log.log(level, "round %s (%s): %s", entry.metrics.get("round", "?"), stage_kind(entry), line)
        if self.settings.stability and rewinds(entry):
            result.barrier = float(self.stability(dense, entry).metrics["barrier"])
        if self.settings.perturbation is not None and rewinds(entry):
            result.perturbed_val_accuracy = float(self.perturbation(dense, entry).metrics["val_accuracy"])
        return result

    # Probes that train (stages of their own) ----------------------------------------------
    def stability(self, dense: StageEntry, entry: StageEntry) -> StageEntry:
        """A second copy of `entry`'s round from theta_k with another data order, and the
        error barrier on the val split between its end weights and the round's."""
        lineage = self.lineage
        points = interpolation_points(self.settings.stability_points)
        inputs = keys.stability_inputs(entry.key, len(points), lineage.cfg.seed + STABILITY_SEED)

        def compute() -> StageEntry:
            job = lineage.masked_job(inputs, dense, lambda: entry.masks["mask"], int(entry.metrics.get("round", 0)),
                                     start_weights=lambda: self.reference_state(dense, entry),
                                     data_seed=inputs["data_seed"])
            copy = lineage.train_now(job)
            return self._barrier_entry(inputs, entry.weights["end"], copy.weights["end"], points)

        return self._stage(inputs, compute)

    def dense_stability(self, dense: StageEntry, step: int) -> StageEntry:
        """The dense probe: two dense copies from theta_step with different data orders."""
        lineage = self.lineage
        if f"rewind_{step}" not in dense.weights:
            raise ConfigError(f"diagnostics.stability_steps: {step} is not a kept rewind step "
                              f"(prune.rewind_steps = {lineage.cfg.prune.rewind_steps})")
        points = interpolation_points(self.settings.stability_points)
        inputs = keys.dense_stability_inputs(dense.key, step, len(points), lineage.cfg.seed + STABILITY_SEED)

        def compute() -> StageEntry:
            start = dense.weights[f"rewind_{step}"]
            members = [PackMember(start, lineage.data, seed, step, lineage.total_steps)
                       for seed in (lineage.cfg.seed, inputs["data_seed"])]
            ends = [result.state for result in train_pack(lineage.model, members, lineage.cfg.train, lineage.mode)]
            return self._barrier_entry(inputs, ends[0], ends[1], points)

        return self._stage(inputs, compute)

    def perturbation(self, dense: StageEntry, entry: StageEntry) -> StageEntry:
        """`entry`'s round retrained from theta_k plus relative Gaussian noise on the kept weights."""
        lineage = self.lineage
        epsilon = float(self.settings.perturbation)
        inputs = keys.perturbation_inputs(entry.key, epsilon, lineage.cfg.seed + PERTURBATION_SEED)

        def compute() -> StageEntry:
            mask = entry.masks["mask"]
            start = perturbed_start(self.reference_state(dense, entry), mask, epsilon, inputs["seed"])
            job = lineage.masked_job(inputs, dense, lambda: mask, int(entry.metrics.get("round", 0)),
                                     start_weights=lambda: start)
            trained = lineage.train_now(job)
            return StageEntry(key=job.key, kind="perturbation", inputs=inputs,
                              metrics={k: trained.metrics[k] for k in ("val_accuracy", "test_accuracy", "steps")},
                              provenance=lineage.provenance)

        return self._stage(inputs, compute)

    # Helpers --------------------------------------------------------------------------------
    def _stage(self, inputs: dict[str, Any], compute: Any) -> StageEntry:
        entry, _ = self.lineage.store.get_or_compute(keys.stage_key(inputs), compute)
        return entry

    def _barrier_entry(self, inputs: dict[str, Any], a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                       points: list[float]) -> StageEntry:
        lineage = self.lineage
        device = lineage.device
        a = {n: t.to(device) for n, t in a.items()}
        b = {n: t.to(device) for n, t in b.items()}
        val = lineage.data.val
        errors = interpolation_errors(lineage.model, a, b, val.x, val.y, points)
        return StageEntry(key=keys.stage_key(inputs), kind="stability", inputs=inputs,
                          metrics={"barrier": error_barrier(points, errors), "errors": errors, "points": points},
                          provenance=lineage.provenance)
