"""How many CPUs each Ray Train worker reserves: the one formula that ablate, batch and tune share."""
from __future__ import annotations

import math


def cpu_share(total_cpus: float, slots: int) -> float:
    """CPUs per worker when `slots` workers run at once (concepts in flight x workers per concept).

    One CPU always stays free for Ray Data's tasks and 0.5-CPU actors, so a training run that waits
    for its data can never hold the CPUs that data pipeline needs (on 2 cores, whole-CPU workers
    starve Ray Data's read/write tasks and the pipeline hangs); never more than one CPU per worker.
    2 CPUs, 2 slots: 0.49 each. With a single CPU the slots and Ray Data share it equally.
    """
    slots = max(1, int(slots))
    per = (total_cpus - 1.0) / slots - 0.01 if total_cpus > 1.0 else total_cpus / (slots + 1)
    return float(max(0.01, min(1.0, math.floor(per * 100) / 100)))


def actor_resources(use_gpu: bool) -> dict:
    """Ray Data actor resources: a whole GPU, or half a CPU (fractional: see `cpu_share`)."""
    return {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 0.5}
