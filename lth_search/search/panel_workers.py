"""The confirmation's workers: one warm Ray actor per concurrent slot, kept for every panel.

The selection panel (candidates x selection seeds) and the reporting panel (the chosen and
the default x reporting seeds) used to be two Tune runs after the search's. Each started a
Tuner and a new actor per slot, each actor importing torch and the engine again (~2-5 s on
2 cores), with the slots idle meanwhile: ~6 s of the quickstart's 115 s went to these
gaps (issue 24, `bench/search_overhead.py`). A panel needs none of Tune's parts (no
searcher, no scheduler, no per-round reports: its lineages' records are its results), so
plain actors run it:

- `PanelWorkers` starts `search.max_concurrent` actors with the trials' resources and keeps
  them for both panels. `warm()` may start them early: `WarmPanels` (warm_panels.py) does
  when the search has started its last lineage and a slot has come free, so their start
  overlaps the search's tail instead of following it; a worker that has started then takes the
  selection runs already certain (`start_ahead`), which no longer wait for the search's
  last lineage (quickstart seed 3: the selection ended 4 s sooner).
- The packs go to whichever worker is free next, so a slow pack does not hold the next
  one behind it, and a worker with no pack left takes runs from a busy one between two of
  its rounds (panel_board.py): a pack walks until its longest lineage stops.
- A worker whose process dies is restarted and runs its pack again, and a pack that raises
  runs again, up to `search.max_failures` times (Ray's `max_restarts`, `max_task_retries`,
  `retry_exceptions`), as Tune's FailureConfig did; every stored stage is reused. A pack
  that still fails is reported and left out, as an errored Tune trial was.

Warm workers hold a slot's CPUs and GPUs. If the search must start a lineage again (a
trial recovered after a failure) while they hold them, `WarmPanels` stops them, so the
search never waits on a worker that waits on the search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from lth_search.config import ExperimentConfig
from lth_search.runs.confirmation import pack_runs
from lth_search.search.panel_board import HandoverBoard
from lth_search.search.panel_runs import recipe_tag, run_pack, train_dense
from lth_search.search.ray_leases import RayLeaseService, start_lease_actor

Run = tuple[int, int]
"""(recipe index, seed): `recipes[index]` on `seed`."""
RunKey = tuple[str, int]
"""(recipe tag, seed): a run whatever its recipe's place in a panel's list."""


@ray.remote
class _PanelWorker:
    """One slot: imports the engine once, then walks the packs it is given."""

    def ready(self) -> bool:
        """Answered once the actor has started: its process imported this module, and with it
        torch, the engine and the store (the warm-up)."""
        return True

    def run_pack(self, base: dict[str, Any], recipes: list[dict[str, Any]], pack: list[Run], search_id: str,
                 owner: str, board: Any) -> None:
        run_pack(base, recipes, pack, search_id, owner, board)

    def train_dense(self, base: dict[str, Any], seeds: list[int], owner: str) -> None:
        train_dense(base, seeds, owner)


@dataclass(frozen=True)
class Panel:
    """A panel's runs: `recipes[index]` on `seed` for each (index, seed)."""

    phase: str
    recipes: list[dict[str, Any]]
    runs: list[Run]

    def keys(self) -> dict[RunKey, Run]:
        return {(recipe_tag(self.recipes[index]), seed): (index, seed) for index, seed in self.runs}


@dataclass
class _Work:
    actor: Any
    what: str
    """What a failure line names: `confirm pack 1`, `the dense stages of seeds [...]`."""
    owner: str
    """Whom its stage leases belong to."""
    runs: frozenset[RunKey] = field(default_factory=frozenset)
    """The panel runs it walks, when started ahead of its panel (`start_ahead`)."""
    walking: int = 0
    """How many runs a pack of runs may still hand over (panel_board.py); 0: none, or not a pack."""
    dense: bool = False
    """Dense stages trained ahead (`prefetch`), not a panel's runs."""
    recipes: list[dict[str, Any]] = field(default_factory=list)
    """The recipes its runs' indices refer to (a pack's): a pack ahead's list is the ahead panel's,
    whose order need not be its panel's."""


class PanelWorkers:
    """The confirmation's actors, started at the first `warm()` or `run()`, stopped by `close()`.

    Work ahead of a panel: in the search's tail the selection runs already certain
    (`start_ahead`, from `WarmPanels`), and in the selection's tail the dense stages of the
    reporting seeds (`prefetch`: a dense stage's key holds no recipe; if the default recipe is
    chosen, no report runs and that work stops with the workers). A panel whose packs all
    start at once first spreads the dense stages they share over the idle workers.

    Measured whole-lineage work ahead too: the default's reporting runs in the selection's
    tail. The reporting panel then ended later, not sooner (54 s against 51 s on the
    quickstart): its length is that of one pack after the selection, and the chosen
    recipe's runs alone made a pack that started no earlier.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.base = cfg.model_dump(mode="json")
        self._actors: list[Any] = []
        self._ready: list[Any] = []
        """Per actor, the ref that resolves once it has started (imports done)."""
        self._work: dict[Any, _Work] = {}
        """In flight: object ref -> its worker and what it is."""
        self._prefetched: set[int] = set()
        self._ahead: set[RunKey] = set()
        """The panel runs started ahead (`start_ahead`), not to start again."""
        self._board: Any = None
        """The packs' `HandoverBoard` (panel_board.py), started with the workers."""
        self._leases: Any = None
        """The search's lease actor (ray_leases.py), held from `warm()` to `close()` so this process owns it."""

    def warm(self) -> None:
        """Start the workers now (no-op when they run): their imports overlap whatever comes next."""
        if self._actors:
            return
        # the workers' stage leases live in an actor this process owns (found, if the driver
        # started it): one a worker created would die with that worker, and a stopped pack
        # would take every other pack's leases with it
        self._leases = start_lease_actor(self.cfg.name)
        self._actors = [self._new_actor() for _ in range(self.cfg.search.max_concurrent)]
        self._ready = [actor.ready.remote() for actor in self._actors]
        self._board = HandoverBoard.remote()

    def _new_actor(self) -> Any:
        retries = self.cfg.search.max_failures
        return _PanelWorker.options(num_cpus=self.cfg.resources.cpu, num_gpus=self.cfg.resources.gpu,
                                    max_restarts=retries, max_task_retries=retries).remote()

    @property
    def started(self) -> int:
        """How many workers run (or are starting)."""
        return len(self._actors)

    def close(self) -> None:
        """Stop the workers (their CPUs and GPUs go back to Ray); `warm()` starts new ones.

        Work in flight stops with them: a stage is published whole or not at all, and the
        stage leases it held go back now, not after `store.lease_timeout_s` (120 s), so a
        panel that needs those stages later trains them at once."""
        stopped = {work.owner for work in self._work.values()}
        for actor in [*self._actors, *([self._board] if self._board is not None else [])]:
            ray.kill(actor)
        self._actors, self._ready, self._work, self._board = [], [], {}, None
        self._prefetched, self._ahead = set(), set()  # what was stopped is to do again
        self._release(stopped)
        self._leases = None  # the lease actor, if this process started it, stops with the workers

    def _release(self, owners: set[str]) -> None:
        """Give back the stage leases that stopped work held."""
        if not owners:
            return
        try:
            leases = RayLeaseService(self.cfg.name)
            for key, holder in leases.held().items():
                if holder in owners:
                    leases.release(key, holder)
        except ray.exceptions.RayError:  # no lease actor left: no lease is held either
            pass

    def prefetch(self, seeds: list[int], phase: str, spread: bool = False) -> None:
        """Train the dense stages of `seeds` (once per seed): with `spread`, split over every idle
        worker and every worker busy with dense stages only (a seed given to one queues behind
        them); else one seed on an idle worker, if one is idle. One seed at a time, so a panel
        that starts meanwhile spreads the seeds not taken yet over its workers instead of
        waiting for one worker to train them all (quickstart seed 7: the report's first pack
        waited 5 s for the three seeds the other worker was training).

        Why the busy ones too: the report began with one worker idle and the other finishing a
        seed ahead; the idle one took both seeds left and the other, free 0.6 s later, waited
        3.7 s for them in its first pack. A seed queued on a busy worker costs nothing if a pack
        trains it first: its turn finds the stages stored."""
        seeds = [seed for seed in seeds if seed not in self._prefetched]
        idle = self._idle() + (self._dense_only() if spread else [])
        idle = idle[:len(seeds) if spread else 1] if seeds else []
        for number, actor in enumerate(idle):
            chunk = seeds[number::len(idle)] if spread else seeds[:1]
            self._prefetched.update(chunk)
            call = actor.train_dense.options(max_task_retries=0, retry_exceptions=False)
            owner = f"{phase}:dense:{chunk[0]}"
            self._work[call.remote(self.base, chunk, owner)] = _Work(actor, f"the dense stages of seeds {chunk}", owner,
                                                                      dense=True)

    def _dense_only(self) -> list[Any]:
        """The busy workers whose every work in flight is dense stages ahead."""
        dense: dict[int, bool] = {}
        for work in self._work.values():
            dense[id(work.actor)] = dense.get(id(work.actor), True) and work.dense
        return [actor for actor in self._actors if dense.get(id(actor), False)]

    def _idle(self, started_only: bool = False) -> list[Any]:
        """The workers with nothing to do, the started ones first: a worker started in the
        search's tail takes the first (longest) pack while the one still importing takes the next."""
        busy = {id(work.actor) for work in self._work.values()}
        started = set(ray.wait(self._ready, num_returns=len(self._ready), timeout=0)[0]) if self._ready else set()
        idle = [(ref not in started, i) for i, (actor, ref) in enumerate(zip(self._actors, self._ready))
                if id(actor) not in busy and (ref in started or not started_only)]
        return [self._actors[i] for _, i in sorted(idle)]

    def started_idle(self) -> int:
        """How many workers that have started have nothing to do (truthy: one at least)."""
        return len(self._idle(started_only=True))

    def start_ahead(self, panel: Panel, search_id: str) -> None:
        """Start the runs of `panel` not started yet, as one pack (at most `resources.pack`) on an
        idle worker that has started, if there is one: runs known before their panel is (the
        search's tail). Not on a worker still starting: its pack would begin no sooner than the
        panel, and as one worker's bigger share of it (the quickstart's seed 5 ended its search
        just after the tail began: a pack of 8 ahead left 4 runs to the other worker, 34 s
        against 6 and 6 in 24 s)."""
        keys = panel.keys()
        todo = [run for key, run in keys.items() if key not in self._ahead][:max(self.cfg.resources.pack, 1)]
        idle = self._idle(started_only=True)
        if not todo or not idle:
            return
        started = frozenset(key for key, run in keys.items() if run in todo)
        self._ahead |= started
        number = sum(1 for work in self._work.values() if work.runs) + 1
        owner = f"{panel.phase}:{search_id}:ahead{number}"
        ref = self._pack_call(idle[0]).remote(self.base, panel.recipes, [list(run) for run in todo], search_id, owner,
                                              self._board)
        self._work[ref] = _Work(idle[0], f"{panel.phase} pack ahead {number}", owner, started, len(todo),
                                recipes=panel.recipes)

    def _pack_call(self, actor: Any) -> Any:
        retries = self.cfg.search.max_failures
        return actor.run_pack.options(max_task_retries=retries, retry_exceptions=retries > 0)

    def run(self, panel: Panel, search_id: str, on_failure: Callable[[str], None],
            then_prefetch: list[int] | None = None) -> None:
        """Every run of `panel`, in packs on the next free workers; returns when all have ended
        (their records are the results). Runs started ahead are waited for, not started again,
        and the rest are dealt over the workers those leave free. A worker left without a pack
        meanwhile takes runs from a busy pack (panel_board.py), else trains the dense stages of
        `then_prefetch`, the next panel's seeds.

        Runs ahead beyond a worker's even share are never stopped to be dealt again. They were,
        by killing their worker, when they had not yet done that surplus's stages: the pack's
        round in hand was lost, a new process imported torch and the engine again (~2 core-s
        on 2 cores), and Ray printed `Task _PanelWorker.run_pack failed ... killed by ray.kill`
        on the quickstart's console. A worker left idle now takes the surplus between two of
        the pack's rounds instead, with nothing trained twice."""
        self.warm()
        keys = panel.keys()
        ahead = {ref for ref, work in self._work.items() if work.runs & keys.keys()}
        covered = set().union(*(self._work[ref].runs for ref in ahead))
        mine = set(ahead)
        ended, _ = ray.wait(list(self._work), num_returns=len(self._work), timeout=0) if self._work else ([], [])
        for ref in ended:  # work that ended before this panel (a prefetch, a pack ahead) frees its worker first
            self._settle(ref, on_failure)
            mine.discard(ref)
        busy = {id(self._work[ref].actor) for ref in mine}
        remaining = [run for key, run in keys.items() if key not in covered]
        if not mine and self._idle() and len(self._actors) > 1:  # packs started together would all
            # begin with the same dense stages, one worker training them and the others waiting
            # for it (4 s of one core at the quickstart's seed 5): the idle workers train a share
            # each first (a worker still training the previous panel's prefetch does its seed)
            self.prefetch(list(dict.fromkeys(seed for _, seed in remaining)), panel.phase, spread=True)
        packs = pack_runs(remaining, max(self.cfg.search.max_concurrent - len(busy), 1), self.cfg.resources.pack)
        queue = list(range(len(packs)))
        asks: dict[Any, tuple[Any, list[dict[str, Any]]]] = {}  # an idle worker's ask for runs
        # (panel_board.py) -> the pack asked, and the recipes its runs' indices refer to
        while queue or mine or asks:
            for actor in self._idle():
                if queue:
                    index = queue.pop(0)
                    # the owner names the pack, so a retried pack continues its own stage leases
                    owner = f"{panel.phase}:{search_id}:pack{index}"
                    ref = self._pack_call(actor).remote(self.base, panel.recipes, [list(run) for run in packs[index]],
                                                        search_id, owner, self._board)
                    self._work[ref] = _Work(actor, f"{panel.phase} pack {index}", owner, walking=len(packs[index]),
                                            recipes=panel.recipes)
                    mine.add(ref)
            for _ in range(len(self._idle()) - len(asks)):  # nothing queued: take runs from a busy pack
                asked = {victim for victim, _ in asks.values()}
                victim = max((ref for ref in mine if self._work[ref].walking > 1 and ref not in asked),
                             key=lambda ref: self._work[ref].walking, default=None)
                if victim is not None:
                    asks[self._board.ask.remote(self._work[victim].owner)] = (victim, self._work[victim].recipes)
                elif then_prefetch:
                    self.prefetch(then_prefetch, panel.phase)
                    break
            if self._work or asks:  # the next end of anything, or a pack's answer, frees or feeds a worker
                [ref], _ = ray.wait([*self._work, *asks], num_returns=1)
                if ref in asks:
                    self._handed(ref, *asks.pop(ref), keys, packs, queue)
                    continue
                owner = self._work[ref].owner
                self._settle(ref, on_failure)
                mine.discard(ref)
                if ref in {victim for victim, _ in asks.values()}:  # it ended before its next round: the ask gets nothing
                    self._board.cancel.remote(owner)

    def _handed(self, ask: Any, victim: Any, recipes: list[dict[str, Any]], keys: dict[RunKey, Run],
                packs: list[list[Run]], queue: list[int]) -> None:
        """A pack's answer to an ask: the runs it gave up become a pack of their own, queued;
        a pack down to one run (or ended) is not asked again.

        The pack names its runs by its own recipes' indices; the queued pack by the panel's
        (`keys`). A pack ahead got the ahead panel's list, in another order: read as the panel's,
        its runs went to the wrong recipes, and the runs it gave up were never walked."""
        given = [(recipe_tag(recipes[int(index)]), int(seed)) for index, seed in ray.get(ask)]
        work = self._work.get(victim)
        if work is not None:
            work.walking = work.walking - len(given) if given else 0
        runs = [keys[key] for key in given if key in keys]  # a pack ahead walks only its panel's runs
        if runs:
            packs.append(runs)
            queue.append(len(packs) - 1)

    def _settle(self, ref: Any, on_failure: Callable[[str], None]) -> None:
        """Forget ended work, its worker free again; a failure is one line to `on_failure`."""
        work = self._work.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as error:
            on_failure(f"{work.what} failed, left out: {_last_line(error)}")


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
