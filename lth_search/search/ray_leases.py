"""A cluster-wide lease service: one Ray named actor per search holds every stage lease.

File leases need a filesystem with exclusive create shared by all workers; an object
store has none. An actor is a single serial point every node reaches, with one clock,
so acquire / renew / release are exact. Stage data stays on the store's filesystem.

The driver creates the actor (so it lives as long as the search's Ray job and leaves no
stale lease behind a killed driver); trials look it up by name. Each trial claims
leases under its own trial id rather than its process: when Ray retries a trial whose
worker died, the retry continues its own claim at once instead of waiting out the
dead worker's time-out. (A lost or doubled lease only costs compute: stages are
published atomically under content keys.)
"""

from __future__ import annotations

import time

import ray

from lth_search.store.content_keys import check_key


WAITING_FRESH_S = 5.0
"""A holder that asked for a held lease this recently still waits for that stage (waiters ask
again every `StageStore.poll_s`, a quarter second)."""


@ray.remote(num_cpus=0, max_restarts=-1)
class _LeaseActor:
    """key -> (holder, monotonic expiry). Serial: one call at a time, so no races.

    It also remembers who asked for a lease someone else held (a trial waiting for a
    stage another trial computes), so the driver's status line can say so instead of
    each waiting worker printing it.
    """

    def __init__(self) -> None:
        self._leases: dict[str, tuple[str, float]] = {}
        self._waiters: dict[str, tuple[str, float]] = {}
        """holder -> (key, monotonic time of its last refused acquire)"""

    def acquire(self, key: str, holder: str, ttl_s: float) -> bool:
        now = time.monotonic()
        current = self._leases.get(key)
        if current is not None and current[0] != holder and current[1] >= now:
            self._waiters[holder] = (key, now)
            return False
        self._waiters.pop(holder, None)
        self._leases[key] = (holder, now + ttl_s)
        return True

    def waiting(self) -> dict[str, str]:
        """Holders waiting for a stage another holder computes (holder -> key)."""
        now = time.monotonic()
        self._waiters = {h: (k, at) for h, (k, at) in self._waiters.items()
                         if now - at <= WAITING_FRESH_S and k in self._leases}
        return {holder: key for holder, (key, _) in self._waiters.items()}

    def renew(self, key: str, holder: str, ttl_s: float) -> bool:
        current = self._leases.get(key)
        if current is None or current[0] != holder:
            return False
        self._leases[key] = (holder, time.monotonic() + ttl_s)
        return True

    def release(self, key: str, holder: str) -> None:
        current = self._leases.get(key)
        if current is not None and current[0] == holder:
            del self._leases[key]
            self._waiters = {h: w for h, w in self._waiters.items() if w[0] != key}  # the stage is there

    def held(self) -> dict[str, str]:
        """Live leases (key -> holder), for inspection and tests."""
        now = time.monotonic()
        return {key: holder for key, (holder, expires) in self._leases.items() if expires >= now}


def actor_name(search_name: str) -> str:
    return f"lth-leases-{search_name}"


def waiting_trials(search_name: str, timeout_s: float = 2.0) -> int | None:
    """How many trials of the search wait for a stage another trial computes (None: unknown)."""
    try:
        actor = ray.get_actor(actor_name(search_name))
        return len({holder for holder in ray.get(actor.waiting.remote(), timeout=timeout_s)})
    except Exception:  # noqa: BLE001 - a status line never fails a search
        return None


def start_lease_actor(search_name: str) -> ray.actor.ActorHandle:
    """Create (or find) the search's lease actor; call from the driver so the driver owns it."""
    return _LeaseActor.options(name=actor_name(search_name), get_if_exists=True).remote()


class RayLeaseService:
    """The `LeaseService` protocol over the named actor (blocking `ray.get` calls).

    `owner` replaces every holder id: leases belong to a trial, not to one of its
    processes (see the module docstring).
    """

    def __init__(self, search_name: str, owner: str | None = None) -> None:
        self.name = actor_name(search_name)
        self.owner = owner
        try:
            self._actor = ray.get_actor(self.name)
        except ValueError:  # the driver did not create it (a lineage run outside `run_search`)
            self._actor = start_lease_actor(search_name)  # lives while this handle does

    def _holder(self, holder: str) -> str:
        return self.owner or holder

    def acquire(self, key: str, holder: str, ttl_s: float) -> bool:
        return ray.get(self._actor.acquire.remote(check_key(key), self._holder(holder), ttl_s))

    def renew(self, key: str, holder: str, ttl_s: float) -> bool:
        return ray.get(self._actor.renew.remote(check_key(key), self._holder(holder), ttl_s))

    def release(self, key: str, holder: str) -> None:
        ray.get(self._actor.release.remote(check_key(key), self._holder(holder)))

    def held(self) -> dict[str, str]:
        return ray.get(self._actor.held.remote())
