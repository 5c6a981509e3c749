"""retinagen data package."""

from __future__ import annotations

import os


def default_workers(cap: int = 2) -> int:
    """Worker processes for a data job when the caller leaves it to us: the CPUs this process may use, at most
    ``cap``, and no more than its OpenMP thread budget when one is set (``OMP_NUM_THREADS=1``, as a shared
    machine or a test worker sets it, means one process: extra processes would only queue for the same core)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    budget = os.environ.get("OMP_NUM_THREADS", "").strip()
    if budget.isdigit() and int(budget) > 0:
        cpus = min(cpus, int(budget))
    return max(1, min(cap, cpus))
