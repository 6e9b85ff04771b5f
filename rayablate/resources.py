"""Process resources: how many CPUs each Ray Train worker reserves (the one formula that ablate,
batch and tune share), and Python's garbage collector during a job's start-up."""
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


def in_driver() -> bool:
    """Whether this process is the Ray driver, not a task or actor inside Ray (a batch's concept
    task, a Tune trial), where runs may sit side by side on the same cores or be stopped from outside."""
    import ray

    return ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE


def sampler_threads(num_actors: int, use_gpu: bool) -> int:
    """Torch threads of each of the data stage's `num_actors` sampler actors: for a data stage the
    driver runs, on CPUs, the smallest node's CPUs shared among them, at most 4. The stage's CLIP
    actor waits for its first batch of 128 rows while the anchor images are drawn, so a one-thread
    sampler left the second of 2 cores idle. One thread on a GPU, and for data stages run inside Ray
    (a batch's concept tasks, Tune's trials), which may run side by side; the evaluation's
    samplers, two actors at once, keep one thread each too."""
    import ray

    if use_gpu or not in_driver():
        return 1
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    return max(1, min(4, int(min(cpus, default=1)) // max(1, num_actors)))


# Python's cyclic garbage collector in a job's processes (the driver, Ray Data's actors, Ray Train's
# workers). Each imports torch, diffusers, DeepSpeed or open_clip and loads a model: millions of
# long-lived objects. With Python's default thresholds (700, 10, 10) a full collection runs each time
# the heap has grown by a quarter, so 8-10 full passes over the whole heap while it loads: 1.1 s of
# a 4 s model load in one process, 1.8-2.1 s in each training worker of the default job (measured
# with gc.callbacks). At (10_000, 10, 10) the same load collected for 0.3 s, at the same peak memory:
# young collections still free short-lived cycles, just every 10,000 allocations instead of 700.
GC_THRESHOLDS = (10_000, 10, 10)
# Set to "1" by `job.init_ray` before it starts a local Ray, whose workers inherit it: a worker
# that imports rayablate then calls `tune_gc` first thing (rayablate/__init__.py).
TUNE_GC_ENV = "RAYABLATE_TUNE_GC"
# Set to "1" by `job.init_ray` in a local Ray it starts (its workers, Tune's trials among them,
# inherit it): the Ray lives and dies with the job's driver (`train.make_trainer` then leaves out
# Ray Train's helpers that guard a long-lived cluster).
OWNED_RAY_ENV = "RAYABLATE_OWNED_RAY"


def tune_gc() -> None:
    """Set `GC_THRESHOLDS` in this process: the CLI's driver (`cli.script`), and each worker of a
    local Ray a job started (`TUNE_GC_ENV`). The in-process API leaves the caller's process as it is."""
    import gc

    gc.set_threshold(*GC_THRESHOLDS)
