"""One pack step: the stages several members need, fetched from the store or trained together.

A pack step is where packs (engine/packs.py) meet the store. Each member asks for one
stage (a dense stage, a dense replicate, a round); a stage that is stored is fetched, a
stage another worker is computing is waited for, and the rest are trained as one pack.

Single flight holds as for a lone stage (`StageStore.get_or_compute`): the step takes the
lease of every stage it is about to train *before* training, by nesting one
`get_or_compute` per distinct key, and trains the pack inside the innermost one. So a
second worker that needs one of those stages waits for it instead of training it again,
and a crash releases every lease (each `get_or_compute` releases its own on the way
out). Keys are taken in sorted order, so two workers whose packs overlap cannot each
hold a lease the other waits for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from lth_search.config import TrainConfig
from lth_search.engine.packs import Mode, PackMember, train_pack
from lth_search.engine.train import TrainResult
from lth_search.engine.stage_source import Check, StageSource
from lth_search.store.entry import StageEntry


@dataclass
class PackJob:
    """One member's stage: its key, the store it goes through, and how to train and finish it.

    `member` is called only when the stage has to be trained (it may build a mask from the
    parent's weights); `finish` turns the training result into the stage (evaluation)."""

    key: str
    store: StageSource
    member: Callable[[], PackMember]
    finish: Callable[[TrainResult], StageEntry]
    check: Check | None = None


def run_pack_step(
    jobs: list[PackJob], template: nn.Module, recipe: TrainConfig, mode: Mode = "auto"
) -> list[tuple[StageEntry, bool]]:
    """(stage, reused) for every job, in order; jobs with the same key share one stage.

    A single stage to train is trained alone (`sequential`), exactly as a lone lineage
    trains it: a pack of one gains nothing.
    """
    unique: dict[str, PackJob] = {}
    for job in jobs:
        unique.setdefault(job.key, job)
    order = sorted(unique)
    got: dict[str, tuple[StageEntry, bool]] = {}
    trained: dict[str, StageEntry] = {}
    to_train: list[str] = []

    def train_all() -> None:
        members = [unique[key].member() for key in to_train]
        results = train_pack(template, members, recipe, mode if len(members) > 1 else "sequential")
        for key, result in zip(to_train, results):
            trained[key] = unique[key].finish(result)

    def take(index: int) -> None:
        """Hold the lease of order[index] (if its stage is missing), then of the rest; train at the bottom."""
        if index == len(order):
            if to_train:
                train_all()
            return
        key = order[index]
        descended = False

        def compute() -> StageEntry:
            nonlocal descended
            descended = True
            to_train.append(key)
            take(index + 1)
            return trained[key]

        got[key] = unique[key].store.get_or_compute(key, compute, unique[key].check)
        if not descended:
            take(index + 1)

    take(0)
    return [(got[job.key][0], got[job.key][1] or job is not unique[job.key]) for job in jobs]
