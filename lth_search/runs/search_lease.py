"""One driver per search: a lease on the search's name, taken before anything is written.

Two drivers of one search (a second `run` of a name that is running, or two `resume`s
after a crash) would share one Ray results folder, one Optuna study and one
search.json, and store a wrong result. So a driver holds a lease on its search in the
store's lease machinery (store/leases.py: O_EXCL files on a local store, lease objects
on any other filesystem), renewed from a heartbeat while it runs and released when it
ends. A second driver is refused in one line naming the holder's host and pid. A dead
holder's lease is taken over at once on its own host (its pid is gone) and after the
store's `lease_timeout_s` elsewhere, so a killed driver never blocks `resume`.
"""

from __future__ import annotations

import hashlib
from types import TracebackType

from lth_search.errors import RuntimeFailure
from lth_search.store.leases import Heartbeat, new_holder
from lth_search.store.stage_store import StageStore


class SearchBusy(RuntimeFailure):
    """Another driver runs this search. Exit 1: the command is right, and works once that driver ends."""


def lease_key(name: str) -> str:
    """The lease key of search `name` (lease keys are sha256 digests, see store/leases.py)."""
    return hashlib.sha256(f"lth-search-driver:{name}".encode()).hexdigest()


def describe_holder(holder: str | None) -> str:
    """'pid 123 on host h' of a holder id `host:pid:nonce`."""
    if not holder:
        return "another driver"
    host, _, rest = holder.partition(":")
    return f"pid {rest.partition(':')[0]} on host {host}"


class SearchLease:
    """Context manager: hold search `name`'s driver lease for the block, or raise SearchBusy."""

    def __init__(self, store: StageStore, name: str, command: str = "run") -> None:
        self.store, self.name, self.command = store, name, command
        self.key, self.holder = lease_key(name), new_holder()
        self._heartbeat: Heartbeat | None = None

    def __enter__(self) -> "SearchLease":
        leases, ttl = self.store.leases, self.store.lease_timeout_s
        if not leases.acquire(self.key, self.holder, ttl):
            other = getattr(leases, "holder", lambda _: None)(self.key)
            raise SearchBusy(
                f"search {self.name} is running already, driven by {describe_holder(other)} "
                f"(lease in {self.store.uri}); `{self.command}` again once it ends, or stop that driver first "
                "(a killed driver's lease is taken over)"
            )
        self._heartbeat = Heartbeat(leases, self.key, self.holder, ttl, self.store.heartbeat_s).__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._heartbeat is not None:
            self._heartbeat.__exit__(kind, error, tb)
        try:
            self.store.leases.release(self.key, self.holder)
        except OSError:
            pass  # a store that failed the search: the lease expires, or its dead pid frees it
