"""One bounded local Ray instance for a test module (2 CPUs, a small object store, the dashboard on)."""
from __future__ import annotations


def start_local_ray(object_store_mb: int = 200):
    """ray.init for tests. The dashboard stays on: Ray Train V2's placement-group cleaner queries the
    controller through its state API. On a starved machine the raylet can miss its start-up deadline
    once; one retry covers that."""
    import os

    import ray

    from rayablate.job import LOCAL_RAY_TRAIN_ENV

    # Ray Train's settings of a local job's Ray (job.init_ray), so a test's fits run as a user's do:
    # no preemption watcher actor, no metrics, a 0.25 s controller poll. Not job.LOCAL_TRAIN_ENV's
    # owned-Ray flag: a module's Ray outlives a failed fit, so the placement-group cleaner stays.
    for key, value in LOCAL_RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    for attempt in range(2):
        try:
            ray.init(num_cpus=2, object_store_memory=object_store_mb * 1024**2, include_dashboard=True)
            return ray
        except Exception:
            ray.shutdown()
            if attempt == 1:
                raise
