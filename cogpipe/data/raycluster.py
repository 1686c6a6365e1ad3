"""Ray for the data commands: this machine by default (no cluster to set up), a running cluster with --address.

    connect(address=None)   # ray.init once per process; a Ray already initialised (a test's, a notebook's) is used
"""

from __future__ import annotations

import logging
import os


def local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def connect(address: str | None = None, num_cpus: int | None = None):
    """Ray in this process: the one already initialised, else a cluster at `address` (`ray start --head` prints
    it; "auto" finds the one on this machine), else a local Ray on this machine's cores, without the dashboard and
    with Ray's own logging kept to warnings."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # "local": a new Ray of this process's own, even where `ray start` left a cluster on this machine (which
            # ray.init() would join, refusing num_cpus)
            ray.init(address="local", num_cpus=num_cpus or local_cpus(), include_dashboard=False,
                     logging_level=logging.WARNING)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # cogpipe prints its own progress (clips/s, ETA)
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def gpus() -> int:
    """GPUs of the connected Ray cluster (0 on a CPU machine)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
