"""Work stealing between the confirmation's workers: a pack hands runs to an idle worker.

A panel's packs are dealt evenly, but a pack walks in lockstep until its longest lineage
stops, and lineage length is not known ahead: the same recipe walked 4, 8 and 10 rounds on
three seeds. So a worker could end its pack while the other's still walked several
lineages, and wait for them.

Now a worker left with nothing to do asks a busy pack for some of its runs (`HandoverBoard`,
a Ray actor the driver owns). The pack answers between two rounds, where every stage so far
is published in the store and every record saved: it gives up the second half of the runs
still walking and walks on with the rest (engine/lineage/walk.py `handover`). The idle
worker walks the runs it got as a new pack: their records are continued, their stored
stages fetched, not trained again (one stage key, one result: the bytes do not depend on
the pack). A pack that is down to one run says so and is not asked again: a lone lineage
cannot be split, so a panel still ends with its longest lineage (the quickstart's usual
tail: on seed 7 the last 3-4 rounds of one lineage, ~8 s of one core at the report's end).
Measured on the quickstart against the same code without it, paired: seed 3 1.22 -> 1.18
(bench/search_overhead.py), seeds 0, 5 and 7 unchanged (their tails were one lineage).

Why an actor and not a file in the store: the driver waits for the answer beside its packs'
ends (`ray.wait` on one list), and a pack asks at every round, which must cost nothing when
no one wants its runs (one local actor call, ~1 ms, against rounds of seconds).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

RunList = list[list[int]]
"""[[recipe index, seed], ...]: runs as a pack's task receives them."""


@ray.remote(num_cpus=0)
class HandoverBoard:
    """Asks from idle workers (through the driver) and the packs' answers, by pack owner."""

    def __init__(self) -> None:
        self._asks: dict[str, asyncio.Future] = {}
        self._given: dict[str, RunList] = {}

    async def ask(self, owner: str) -> RunList:
        """The runs the pack `owner` gives up at its next round; [] when it walks one run only
        or ends first (`cancel`)."""
        future = asyncio.get_running_loop().create_future()
        self._asks[owner] = future
        return await future

    def offer(self, owner: str, walking: RunList) -> RunList:
        """From the pack `owner` between rounds, with the runs it still walks: those to leave."""
        future = self._asks.pop(owner, None)
        if future is None or future.done():
            return []
        give = walking[len(walking) - len(walking) // 2:] if len(walking) > 1 else []
        self._given.setdefault(owner, []).extend(give)
        future.set_result(give)
        return give

    def cancel(self, owner: str) -> None:
        """The pack `owner` has ended: an ask waiting for it gets nothing."""
        future = self._asks.pop(owner, None)
        if future is not None and not future.done():
            future.set_result([])

    def given(self, owner: str) -> RunList:
        """The runs `owner` gave up before (a retried pack leaves them to whoever took them)."""
        return list(self._given.get(owner, []))


class PackHandover:
    """The pack's side (in the worker): maps the walk's lineage indices to runs and back."""

    def __init__(self, board: Any, owner: str, runs: list[tuple[int, int]]) -> None:
        self.board, self.owner, self.runs = board, owner, runs

    def __call__(self, walking: list[int]) -> list[int]:
        try:
            give = ray.get(self.board.offer.remote(self.owner, [list(self.runs[i]) for i in walking]))
        except ray.exceptions.RayError:  # no board (the driver is stopping): walk on with every run
            return []
        leaving = {tuple(run) for run in give}
        return [i for i in walking if self.runs[i] in leaving]


def given_runs(board: Any | None, owner: str) -> set[tuple[int, int]]:
    """The runs a pack of `owner` gave away in an earlier attempt (none without a board)."""
    if board is None:
        return set()
    try:
        return {(int(index), int(seed)) for index, seed in ray.get(board.given.remote(owner))}
    except ray.exceptions.RayError:
        return set()
