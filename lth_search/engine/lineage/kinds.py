"""Lineage kinds: IMP with weight rewinding and the baselines a ticket is judged against.

A kind says only how its round r is trained: the walk (walk.py) does the rest for every
kind alike: the dense stage and its replicates, the paired verdict, patience, target
sparsity, stopping and step counting. The registry `KINDS` is the one list of kinds
(config/prune.py's `KINDS`, the vocabulary the schema validates, is kept equal to it by
tests/engine/test_keys.py; the config sits below the engine and cannot import it).

- imp: iterative magnitude pruning with weight rewinding to theta_k.
- lr_rewind (Renda et al., 2020): iterative; each round prunes the parent's end weights
  and retrains *them* over steps k..T with the learning-rate schedule rewound to k.
- finetune: iterative; like lr_rewind at the schedule's final learning rate. Under a
  constant schedule that is lr_rewind's computation, so it has lr_rewind's keys.
- oneshot: the dense end weights magnitude-pruned once to each IMP round's sparsity,
  rewound to theta_k and trained.
- random_prune / random_reinit: the controls of each IMP round: the same per-layer counts
  at random positions, or the IMP mask on a fresh initialisation.
- snip / grasp / synflow: pruning at theta_k to each IMP round's sparsity (prune_at_init.py).

The last six train at the sparsities the IMP lineage reaches (`at_imp_sparsities`): the
walk computes (or fetches) the IMP round first, so a comparison is point by point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from lth_search.engine.lineage import keys
from lth_search.engine.models import build_model
from lth_search.engine.prune_at_init import prune_at_init
from lth_search.engine.pruning import Mask, prune_to_sparsity, random_mask_like
from lth_search.engine.train import Schedule
from lth_search.errors import ConfigError
from lth_search.store.entry import StageEntry

if TYPE_CHECKING:
    from lth_search.engine.lineage.stages import StageJob, Stages

CONTROL_SEED = 1000
"""Added to the experiment seed for the controls: a re-initialisation seeded like the
original network would be the original network."""

RoundJob = Callable[["Stages", StageEntry, StageEntry, int], "StageJob"]
"""(stages, dense, previous, round) -> the round's job. `previous` is the kind's own last stage
for an iterative kind, the IMP lineage's round r for one trained at IMP's sparsities."""


@dataclass(frozen=True)
class Kind:
    """What a lineage kind is, and how its round r is trained."""

    name: str
    round_job: RoundJob
    iterative: bool
    """Round r prunes round r-1 of the same kind (imp, lr_rewind, finetune)."""
    rewinds: bool
    """Rounds train from theta_k with their mask (stability and perturbation are defined)."""
    prune_at_init: bool = False
    """The mask is chosen by a score at theta_k (snip, grasp, synflow)."""

    @property
    def at_imp_sparsities(self) -> bool:
        """Trained at the sparsity of each IMP round (needs the IMP lineage's rounds)."""
        return not self.iterative


# Round jobs -------------------------------------------------------------------------------
def _imp(stages: "Stages", dense: StageEntry, parent: StageEntry, r: int) -> "StageJob":
    inputs = keys.round_inputs(parent.key, r, stages.cfg.prune.choices())
    return stages.masked_job(inputs, dense, lambda: stages.next_mask(parent), r)


def finetune_rate(stages: "Stages") -> float | None:
    """Fine-tuning's constant rate: the schedule's last; None under a constant schedule, where
    fine-tuning *is* learning-rate rewinding (same computation, same keys, trained once)."""
    schedule = Schedule.from_recipe(stages.cfg.train, stages.data.steps_per_epoch(stages.cfg.train.batch_size))
    return None if schedule.constant else schedule.lr_at(stages.total_steps - 1)


def _retrain_end(kind: str) -> RoundJob:
    """lr_rewind / finetune: prune the parent's end weights and retrain them, no rewind."""

    def job(stages: "Stages", dense: StageEntry, parent: StageEntry, r: int) -> "StageJob":
        fixed_lr = finetune_rate(stages) if kind == "finetune" else None
        inputs = keys.round_inputs(parent.key, r, stages.cfg.prune.choices(),
                                   kind="finetune" if fixed_lr is not None else "lr_rewind", fixed_lr=fixed_lr)
        return stages.masked_job(inputs, dense, lambda: stages.next_mask(parent), r,
                                 start_weights=lambda: parent.weights["end"], rescale=False, fixed_lr=fixed_lr)

    return job


def _at_sparsity(kind: str) -> RoundJob:
    """oneshot / snip / grasp / synflow at the IMP round's sparsity, trained from theta_k."""

    def job(stages: "Stages", dense: StageEntry, ticket: StageEntry, r: int) -> "StageJob":
        cfg = stages.cfg
        target = float(ticket.metrics["sparsity"])
        probe_size = cfg.diagnostics.probe_size if kind in ("snip", "grasp") else None
        inputs = keys.at_sparsity_inputs(kind, dense.key, r, target, cfg.prune.choices(), probe_size)

        def mask() -> Mask:
            if kind == "oneshot":
                return prune_to_sparsity(dense.weights["end"], stages.groups, target, cfg.prune.scope,
                                         cfg.prune.layer_ratios, cfg.prune.output_ratio)
            start = {n: t.to(stages.device) for n, t in dense.weights[f"rewind_{cfg.prune.rewind_step}"].items()}
            size, split = cfg.diagnostics.probe_size, stages.data.train
            return prune_at_init(kind, stages.model, start, sorted(stages.groups), target, split.x[:size],
                                 split.y[:size], stages.data.input_shape)

        return stages.masked_job(inputs, dense, mask, r)

    return job


def _random_prune(stages: "Stages", dense: StageEntry, ticket: StageEntry, r: int) -> "StageJob":
    seed = stages.cfg.seed + CONTROL_SEED
    inputs = keys.control_inputs(ticket.key, "random_prune", seed)
    return stages.masked_job(inputs, dense, lambda: random_mask_like(ticket.masks["mask"], seed), r)


def reinit_state(stages: "Stages", seed: int) -> dict:
    """A fresh initialisation of the config's model (random_reinit's start, and its reference)."""
    return build_model(stages.cfg.model, stages.data.input_shape, stages.data.num_classes, seed).state_dict()


def _random_reinit(stages: "Stages", dense: StageEntry, ticket: StageEntry, r: int) -> "StageJob":
    seed = stages.cfg.seed + CONTROL_SEED
    inputs = keys.control_inputs(ticket.key, "random_reinit", seed)
    return stages.masked_job(inputs, dense, lambda: ticket.masks["mask"], r,
                             start_weights=lambda: reinit_state(stages, seed))


KINDS: dict[str, Kind] = {
    kind.name: kind for kind in (
        Kind("imp", _imp, iterative=True, rewinds=True),
        Kind("lr_rewind", _retrain_end("lr_rewind"), iterative=True, rewinds=False),
        Kind("finetune", _retrain_end("finetune"), iterative=True, rewinds=False),
        Kind("oneshot", _at_sparsity("oneshot"), iterative=False, rewinds=True),
        Kind("random_prune", _random_prune, iterative=False, rewinds=True),
        Kind("random_reinit", _random_reinit, iterative=False, rewinds=False),
        Kind("snip", _at_sparsity("snip"), iterative=False, rewinds=True, prune_at_init=True),
        Kind("grasp", _at_sparsity("grasp"), iterative=False, rewinds=True, prune_at_init=True),
        Kind("synflow", _at_sparsity("synflow"), iterative=False, rewinds=True, prune_at_init=True),
    )
}


def kind_of(name: str) -> Kind:
    """The registered kind `name`, or a one-line error listing the valid ones."""
    if name not in KINDS:
        raise ConfigError(f"kind: unknown {name!r} (valid: {', '.join(KINDS)})")
    return KINDS[name]


def check_kinds(names: list[str]) -> list[str]:
    """`names` if every one is a registered kind, else a one-line error naming the unknown."""
    unknown = [k for k in names if k not in KINDS]
    if unknown:
        raise ConfigError(f"kinds: unknown {', '.join(unknown)} (valid: {', '.join(KINDS)})")
    return names
