"""The cyclic garbage collector, tuned for a server that holds many long-lived objects.

Why (docs/BENCHMARKS.md, "The POST latency tail"): with CPython's default thresholds
(700, 10, 10) every request's short-lived objects that are still alive when a young
collection runs (they are, ~30 ms in flight at 64 connections) are promoted, and once the
promoted count passes a quarter of the old generation a full collection runs: a walk over
every resident wallet, key-cache entry and module object (60k-220k objects) that blocked
the event loop for 35-155 ms of CPU (50-420 ms of wall time on the shared 2-core machine),
every few seconds, with nothing to collect. That was the POST p99 of 167-190 ms.

Two changes, once the service is ready:

- ``gc.freeze()`` after a full collection: what start-up built (modules, the app, warmed
  wallets) moves to the permanent generation and is never walked again. Only live objects
  are frozen; garbage is collected first. Objects freed later by reference counting are
  freed as usual (the freeze only exempts them from the cycle collector).
- A larger young-generation threshold (``gc_gen0_threshold``): the young count is
  allocations minus deallocations, so request objects freed by reference counting no longer
  trigger collections; they run only as the live heap grows (caches filling, cyclic
  garbage), bounded by the threshold: at most that many net new container objects (a few
  MB) between two young collections.
"""

from __future__ import annotations

import gc

__all__ = ["GC_GEN0_THRESHOLD_MAX", "tune_gc"]

# Past this a young collection walks enough objects to be a stall itself.
GC_GEN0_THRESHOLD_MAX = 1_000_000


def tune_gc(gen0_threshold: int) -> int:
    """Collect, freeze what is alive, and raise the young threshold (0 = keep CPython's);
    returns how many objects were frozen."""
    if not 0 <= gen0_threshold <= GC_GEN0_THRESHOLD_MAX:
        raise ValueError(f"gc_gen0_threshold must be 0..{GC_GEN0_THRESHOLD_MAX}")
    gc.collect()
    gc.freeze()
    if gen0_threshold:
        _young, middle, old = gc.get_threshold()
        gc.set_threshold(gen0_threshold, middle, old)
    return gc.get_freeze_count()
