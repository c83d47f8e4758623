"""The driver's heap under glibc: fewer arenas, large blocks as their own mappings, freed pages handed back.

A search's driver holds what grows with its trials only briefly (each snapshot's buffers, Tune's
results at the end), but glibc keeps freed pages resident by default, so its resident memory
grew with the number of trials (issue 24, bench/scale.py). Both calls are glibc's own
(`mallopt`, `malloc_trim`); where there is no glibc (macOS) they return False and change nothing.
"""

from __future__ import annotations

import functools
from typing import Any

MALLOC_ARENAS = 2
"""glibc malloc arenas the driver's threads share (glibc's default: 8 per core)."""
MMAP_THRESHOLD = 512 * 1024
"""Bytes from which glibc serves an allocation with its own mmap, handed back whole when freed."""


@functools.cache
def _glibc() -> Any:
    """The C library, loaded once (finding it runs `ldconfig -p`); None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def cap_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap the driver's glibc malloc arenas (`mallopt(M_ARENA_MAX)`, what MALLOC_ARENA_MAX sets at start).

    The driver's threads (Ray's, pyarrow's IO threads copying each snapshot) each got an arena,
    and each arena kept the largest snapshot buffers it had served: the driver's resident memory
    grew ~0.3 MB per trial over a 300-trial search while its Python heap grew ~40 KB; with two
    arenas it grew ~0.1 MB (bench/scale.py, issue 24). Arenas made before the call stay, so it
    runs before Ray starts. It also fixes the mmap threshold (`M_MMAP_THRESHOLD`): glibc raises
    it after each freed large block, up to 32 MB, so the snapshot buffers that grow with the
    number of trials (the search state's JSON, ~11 KB a trial) came from the arenas and their
    pages stayed resident after the snapshot; from `MMAP_THRESHOLD` on, a block is its own
    mapping, given back when freed. False where there is no glibc or the call fails.
    """
    libc = _glibc()
    try:
        # M_ARENA_MAX is -8, M_MMAP_THRESHOLD -3 in glibc's malloc.h
        return libc is not None and bool(libc.mallopt(-8, arenas)) and bool(libc.mallopt(-3, MMAP_THRESHOLD))
    except AttributeError:
        return False


def give_back_free_memory(collect: bool = True) -> bool:
    """Return the driver's freed heap to the system (glibc `malloc_trim`), after a collection (`collect`).

    At its end Tune reads every trial's result.json into a pandas DataFrame for the ResultGrid
    (~25 KB a trial): let go of by `release_results` (ended_trials.py), those pages stayed
    resident, and the finish's own memory (tracking's plots and model) came on top of them, so
    the driver's peak grew with the number of trials (issue 24). False where there is no glibc.
    """
    import gc

    if collect:
        gc.collect()
    libc = _glibc()
    try:
        return libc is not None and bool(libc.malloc_trim(0))
    except AttributeError:
        return False
