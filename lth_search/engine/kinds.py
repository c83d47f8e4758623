"""Lineage kinds: IMP with weight rewinding and the baselines a ticket is judged against.

`prune.kind` picks one; each behaves like an IMP lineage (a dense stage and one stage
per round, every stage through the store with the kind in its key inputs, a
`LineageResult` with the same fields), so the CLI, the search and MLflow treat them
alike.

- imp: iterative magnitude pruning with weight rewinding to theta_k (Lineage.run).
- lr_rewind (Renda et al., 2020): iterative; each round prunes the parent's end weights
  and retrains *them* (not theta_k) over steps k..T with the learning-rate schedule
  rewound to k.
- finetune: iterative; like lr_rewind but at the schedule's final learning rate. Under a
  constant schedule that is the same computation as lr_rewind, so it has lr_rewind's
  stage keys and the store trains it once.
- oneshot: the dense end weights magnitude-pruned once to each IMP round's sparsity,
  rewound to theta_k and trained.
- random_prune / random_reinit: the controls of each IMP round (LineageStages.control_job):
  the same per-layer counts at random positions, or the IMP mask on a fresh init.
- snip / grasp / synflow: pruning at theta_k (the initialisation when k = 0) to each
  IMP round's sparsity, then training from theta_k (prune_at_init.py).

The rounds of these six depend only on the IMP lineage, not on each other, so they are
trained as packs (engine/pack_step.py, `resources.pack` at a time).

The last six are trained at the sparsities the IMP lineage reaches, so they run (or
reuse) the IMP lineage first: a comparison is then point by point at equal sparsity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from lth_search.config import KINDS
from lth_search.engine.lineage import DenseCallback, RoundCallback
from lth_search.engine.lineage_stages import STAGE_FORMAT
from lth_search.engine.pack_step import PackJob, run_pack_step
from lth_search.engine.results import LineageResult, RoundResult
from lth_search.engine.probes import attach_probes
from lth_search.engine.prune_at_init import METHODS as PRUNE_AT_INIT
from lth_search.engine.prune_at_init import prune_at_init
from lth_search.engine.pruning import prune_to_sparsity
from lth_search.engine.train import Schedule
from lth_search.store.keys import content_key
from lth_search.store.entry import StageEntry

if TYPE_CHECKING:
    from lth_search.engine.lineage import Lineage

ITERATIVE = ("lr_rewind", "finetune")
CONTROLS = ("random_prune", "random_reinit")
AT_IMP_SPARSITIES = ("oneshot", *CONTROLS, *PRUNE_AT_INIT)
CONTROL_SEED = 1000
"""Added to the experiment seed for the controls: a re-initialisation seeded like the
original network would be the original network."""


def check_kinds(kinds: list[str]) -> list[str]:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        from lth_search.errors import ConfigError

        raise ConfigError(f"kinds: unknown {', '.join(unknown)} (valid: {', '.join(KINDS)})")
    return kinds


class KindLineage:
    """A lineage of `kind` over `lineage`'s dense stage; `run()` and `entries` as Lineage's."""

    def __init__(self, lineage: "Lineage", kind: str | None = None) -> None:
        self.lineage = lineage
        self.kind = check_kinds([kind or lineage.cfg.prune.kind])[0]
        attach_probes(lineage)
        self._entries: list[StageEntry] = []
        self.imp: LineageResult | None = None
        """The IMP lineage the non-iterative kinds were trained against."""

    @property
    def cfg(self) -> Any:
        return self.lineage.cfg

    @property
    def same_as_lr_rewind(self) -> bool:
        """Fine-tuning at the final rate of a constant schedule *is* learning-rate rewinding."""
        return self.kind == "finetune" and Schedule.from_recipe(self.cfg.train, 1).constant

    @property
    def entries(self) -> list[StageEntry]:
        """The stages of the walk so far (the IMP lineage's own, live, for kind imp): callbacks
        read the stage just finished here while the walk runs."""
        return self.lineage.entries if self.kind == "imp" else self._entries

    def run(self, on_round: RoundCallback | None = None, on_dense: DenseCallback | None = None,
            rounds: int | None = None) -> LineageResult:
        """Walk the kind's rounds. `rounds` caps an iterative kind (default `prune.rounds`):
        `compare` passes the IMP lineage's length so every kind stops at its sparsities."""
        lineage = self.lineage
        if self.kind == "imp":
            return lineage.run(on_round, on_dense)
        if self.kind in ITERATIVE:
            dense, reused = lineage.dense_stage()
            imp_entries: list[StageEntry] = []
        else:
            self.imp = lineage.run()
            imp_entries = list(lineage.entries)
            dense, reused = imp_entries[0], bool(self.imp.dense.reused)
        result = lineage.start_result(dense, reused)
        result.kind = self.kind
        if self.imp is not None:  # the IMP lineage (dense stage included) is part of what this kind cost
            result.steps_executed, result.steps_reused = self.imp.steps_executed, self.imp.steps_reused
        self._entries = [dense]
        if on_dense is not None:
            on_dense(result)
        parent = dense
        last_round = len(imp_entries) - 1 if imp_entries else (rounds if rounds is not None else self.cfg.prune.rounds)
        at_sparsity = self._at_sparsity_stages(dense, imp_entries[1:]) if imp_entries else []
        for round_index in range(1, last_round + 1):
            if self.kind in ITERATIVE:
                entry, stage_reused = self._iterative_stage(dense, parent, round_index)
            else:
                entry, stage_reused = at_sparsity[round_index - 1]
            round_result = RoundResult.from_json(
                {**entry.metrics, "round": round_index, "key": entry.key, "reused": int(stage_reused)}
            )
            if lineage.diagnose is not None:
                round_result.diagnostics = lineage.diagnose(dense, entry)
            self._entries.append(entry)
            result.rounds.append(round_result)
            if stage_reused:
                result.steps_reused += round_result.steps
            else:
                result.steps_executed += round_result.steps
            if on_round is not None:
                on_round(round_result, result)
            parent = entry
        return result

    # Stages -------------------------------------------------------------------------------
    def _stored(self, inputs: dict[str, Any], compute: Callable[[str], StageEntry]) -> tuple[StageEntry, bool]:
        key = content_key(inputs)
        return self.lineage.store.get_or_compute(key, lambda: compute(key))

    def _iterative_stage(self, dense: StageEntry, parent: StageEntry, round_index: int) -> tuple[StageEntry, bool]:
        lineage = self.lineage
        inputs = {**lineage.round_inputs(parent.key, round_index), "kind": "lr_rewind"}
        fixed_lr = None
        if self.kind == "finetune" and not self.same_as_lr_rewind:
            schedule = Schedule.from_recipe(self.cfg.train, lineage.data.steps_per_epoch(self.cfg.train.batch_size))
            fixed_lr = schedule.lr_at(lineage.total_steps - 1)
            inputs.update(kind="finetune", fixed_lr=fixed_lr)

        def compute(key: str) -> StageEntry:
            return lineage.train_stage(key, inputs, dense, lineage.next_mask(parent), round_index,
                                       start_weights=parent.weights["end"], fixed_lr=fixed_lr, rescale=False)

        return self._stored(inputs, compute)

    def _at_sparsity_stages(self, dense: StageEntry, tickets: list[StageEntry]) -> list[tuple[StageEntry, bool]]:
        """(stage, reused) at each IMP round's sparsity. The rounds do not depend on each other,
        so they train as packs of `resources.pack` (engine/pack_step.py)."""
        lineage = self.lineage
        jobs = [self._at_sparsity_job(dense, ticket, index) for index, ticket in enumerate(tickets, start=1)]
        size = self.cfg.resources.pack
        stages: list[tuple[StageEntry, bool]] = []
        for start in range(0, len(jobs), size):
            stages += run_pack_step(jobs[start:start + size], lineage.model, self.cfg.train)
        return stages

    def _at_sparsity_job(self, dense: StageEntry, ticket: StageEntry, round_index: int) -> PackJob:
        lineage = self.lineage
        if self.kind in CONTROLS:
            return lineage.control_job(dense, ticket, self.kind, self.cfg.seed + CONTROL_SEED)
        sparsity = float(ticket.metrics["sparsity"])
        inputs: dict[str, Any] = {
            "stage": "kind", "format": STAGE_FORMAT, "kind": self.kind, "dense": dense.key, "round": round_index,
            "sparsity": sparsity, "choices": self.cfg.prune.choices(),
        }
        if self.kind in ("snip", "grasp"):
            inputs["probe_size"] = self.cfg.diagnostics.probe_size
        return lineage.masked_job(content_key(inputs), inputs, dense, lambda: self._mask(dense, sparsity), round_index)

    def _mask(self, dense: StageEntry, sparsity: float) -> dict:
        lineage, prune = self.lineage, self.cfg.prune
        if self.kind == "oneshot":
            return prune_to_sparsity(dense.weights["end"], lineage.groups, sparsity, prune.scope, prune.layer_ratios,
                                     prune.output_ratio)
        start = {n: t.to(lineage.device) for n, t in dense.weights[f"rewind_{prune.rewind_step}"].items()}
        size = self.cfg.diagnostics.probe_size
        split = lineage.data.train
        return prune_at_init(self.kind, lineage.model, start, sorted(lineage.groups), sparsity, split.x[:size],
                             split.y[:size], lineage.data.input_shape)
