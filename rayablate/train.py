"""Ray Train + DeepSpeed ZeRO: the method of `rayablate.method` on many workers.

`train_loop_per_worker(config)` is the plain function `TorchTrainer` runs on every worker. It
builds the same `method.Ablation` the in-process API uses and adds only what Ray and DeepSpeed
bring: one DeepSpeed engine each for the matcher and the discriminator (`EngineOptimizers`), the
data shard from `ray.train.get_dataset_shard("train")` (kept in memory in the core's canonical
order, see docs/design.md#determinism-and-resume), the all-rank checks that keep workers in
lockstep, metric reports and checkpoints (matcher delta + both engines' DeepSpeed state) through
`ray.train.report`. `run_training` is the driver side.

Training rows (a Ray Dataset, docs/design.md#training-rows): `image` (PNG bytes at the pipeline's
resolution), `target_caption` (c*), `anchor_caption` (c; equal to c* on preservation rows), `mask`
(1 = ablation row, 0 = preservation row) and `seed`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .config import AblationConfig, config_from_dict, to_dict
from .files import atomic, write_json
from .method import TERMS, Ablation, Position, ShardCache, epoch_seed, mean_metrics, step_batches, train_step
from .pipeline import delta_digest, load_pipeline
from .resources import OWNED_RAY_ENV, cpu_share, in_driver

DELTA_NAME = "matcher_delta.safetensors"
STATE_NAME = "train_state.json"
METRICS_NAME = "train_metrics.json"
SNAPSHOT_NAME = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints

__all__ = ["DELTA_NAME", "METRICS_NAME", "STATE_NAME", "TERMS", "run_training", "make_trainer",
           "train_loop_per_worker", "EngineOptimizers", "weights_only_load"]

# A worker keeps its data shard in memory when it is at most this large (RAYABLATE_SHARD_CACHE_MB;
# 0 = never): each epoch then shuffles and batches in memory instead of running the Ray Data
# pipeline again (read, re-mask, split). On the toy world that restart cost ~5 s an epoch, and an
# epoch is 6 steps: it was most of the training time.
SHARD_CACHE_MB = float(os.environ.get("RAYABLATE_SHARD_CACHE_MB", "1024"))


# DeepSpeed's default ZeRO-1/2 reduce and all-gather buckets hold 5e8 elements, allocated and zeroed
# up front: 2 GB a rank on CPU. For the toy UNet's full group (3.9 M parameters) that took 47 s of
# engine set-up on this 2-core machine, 2 s with a bucket the size of the parameters. A bucket no
# smaller than the parameters still holds them all, so reductions (and results) are the same. (Its
# size must be a multiple of DeepSpeed's start alignment, 2 elements here: we round up to 4096.)
DEFAULT_BUCKET = int(5e8)


def deepspeed_config(cfg: AblationConfig, params=None) -> dict:
    """The DeepSpeed config of an engine (each gets its own optimizer). With `params`, the ZeRO-1/2
    buckets are no larger than those parameters need."""
    from .method import GRADIENT_CLIPPING

    zero: dict = {"stage": cfg.zero_stage}
    if params is not None and cfg.zero_stage in (1, 2):
        n = sum(p.numel() for p in params)
        bucket = min(DEFAULT_BUCKET, -(-max(n, 1) // 4096) * 4096)  # a multiple of DeepSpeed's alignment
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": GRADIENT_CLIPPING,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# --- DeepSpeed engines ----------------------------------------------------------------------------

def skip_shm_collective() -> None:
    """Tell DeepSpeed not to build its CPU shared-memory collective in this process. Its first
    `deepspeed.initialize` JIT-compiles that op (`~/.cache/torch_extensions`, 30-40 s on 2 cores,
    again for every new virtual environment: a new user's first job), yet only its inference
    all-reduce uses it; ZeRO's gradient reductions go through torch.distributed (gloo on CPUs).
    DeepSpeed reads its op table (`deepspeed.ops.__compatible_ops__`, probed once per process and
    kept) before building an op; an op marked incompatible is not built."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


@contextlib.contextmanager
def no_compile_on_import():
    """Run DeepSpeed's engine set-up with TorchDynamo off (TORCHDYNAMO_DISABLE=1), unless the user set it.

    With ZeRO on, `deepspeed.initialize` checks the client optimizer against its supported list, and
    that check imports DeepSpeed's Muon optimizer, whose module-level `@torch.compile` decorators import
    TorchInductor: 1.1 of the 1.5 s a worker's two engines took on this 2-core machine, in every
    training worker of every job. Nothing here uses Muon or torch.compile; with Dynamo off the
    decorators return the plain functions and nothing is imported. The variable is restored after,
    so the process's own torch.compile calls (none in rayablate) behave as before; only the
    decorators that ran meanwhile stay plain."""
    key = "TORCHDYNAMO_DISABLE"
    if key in os.environ:
        yield
        return
    os.environ[key] = "1"
    try:
        yield
    finally:
        os.environ.pop(key, None)


class EngineOptimizers:
    """The core's optimizers as DeepSpeed engines: the matcher's AdamW and the discriminator's Adam,
    each in its own engine (ZeRO stage and precision from the config). Same `step(out)` as
    `method.PlainOptimizers`; the engines also become the ablation's forward callables."""

    def __init__(self, ablation: Ablation):
        import deepspeed

        cfg = ablation.cfg
        trainable = ablation.trainable_parameters()
        opt = torch.optim.AdamW(trainable, lr=cfg.lr_matcher)
        if ablation.device.type != "cuda":
            skip_shm_collective()
        with no_compile_on_import():
            self.matcher, _, _, _ = deepspeed.initialize(model=ablation.student, model_parameters=trainable,
                                                         optimizer=opt, config=deepspeed_config(cfg, trainable))
        _load_weights_only(self.matcher)
        ablation.student_fn = self.matcher
        self.disc = None
        if ablation.disc is not None:
            ablation.disc.to(ablation.compute_dtype)  # DeepSpeed casts parameters only; spectral norm's buffers too
            dparams = list(ablation.disc.parameters())
            dopt = torch.optim.Adam(dparams, lr=cfg.lr_disc, betas=(0.5, 0.999))
            with no_compile_on_import():
                self.disc, _, _, _ = deepspeed.initialize(model=ablation.disc, model_parameters=dparams,
                                                          optimizer=dopt, config=deepspeed_config(cfg, dparams))
            _load_weights_only(self.disc)
            ablation.disc_fn = self.disc

    def step(self, out: dict) -> float | None:
        """Backward and step of both engines; the matcher's global gradient norm."""
        self.matcher.backward(out["total"])
        self.matcher.step()
        if self.disc is not None and out["disc"] is not None:
            self.disc.backward(out["disc"])
            self.disc.step()
        gn = self.matcher.get_global_grad_norm()
        return None if gn is None else float(gn)

    @staticmethod
    def full_param(p):
        """A parameter's full fp32 master value (gathered under ZeRO-3; a collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)

    def save_state(self, directory: str, tag: str) -> None:
        self.matcher.save_checkpoint(os.path.join(directory, "ds_matcher"), tag=tag, exclude_frozen_parameters=True)
        if self.disc is not None:
            self.disc.save_checkpoint(os.path.join(directory, "ds_disc"), tag=tag)

    def load_state(self, directory: str, tag: str) -> None:
        try:
            path, _ = self.matcher.load_checkpoint(os.path.join(directory, "ds_matcher"), tag=tag,
                                                   load_module_strict=False)
            if path is None:
                raise FileNotFoundError(os.path.join(directory, "ds_matcher", tag))
            if self.disc is not None:
                if not os.path.isdir(os.path.join(directory, "ds_disc", tag)):
                    print("[rayablate.train] checkpoint has no discriminator state (w_adv was 0); "
                          "the discriminator starts fresh", flush=True)
                else:
                    self.disc.load_checkpoint(os.path.join(directory, "ds_disc"), tag=tag)
        except Exception as e:
            raise RuntimeError(f"could not restore the DeepSpeed state of checkpoint {directory} (tag {tag}): {e}. "
                               "Resuming needs the same num_workers, zero_stage, precision and param_group as "
                               "the run that wrote it; start a fresh run (resume=False) otherwise.") from e


def weights_only_load(path, map_location=None):
    """torch.load(weights_only=True) of a DeepSpeed checkpoint file: tensors and plain containers,
    plus only DeepSpeed's own state records (loss scaler, ZeRO stage, fragment addresses). A pickle
    that names anything else is refused, so a tampered checkpoint cannot run code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _load_weights_only(engine) -> None:
    """DeepSpeed's torch checkpoint engine loads with weights_only=False; make it load with True."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is not None:
        ckpt_engine.load = weights_only_load


# --- the Ray Train worker function ------------------------------------------------------------------

def _all_ranks_true(flag: bool, device, world_size: int) -> bool:
    """True when `flag` holds on every rank (a collective: every rank must call it)."""
    if world_size <= 1:
        return flag
    import torch.distributed as dist

    v = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(v, op=dist.ReduceOp.MIN)
    return bool(v.item() > 0.5)


def _device(cfg: AblationConfig) -> torch.device:
    if cfg.use_gpu:
        import ray.train.torch

        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def _quiet_deepspeed() -> None:
    import logging

    try:
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
    except Exception:
        pass


class _Worker:
    """One rank's run: the core's ablation + engines, its shard, its position, reports and checkpoints."""

    def __init__(self, config: dict):
        import ray.train

        self.config = config
        self.cfg = cfg = config_from_dict(config["ablation"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = _device(cfg)
        from .console import WorkerLog

        self._log = WorkerLog(self.rank, config.get("board"), config.get("log_dir"), bool(config.get("verbose", True)))
        self.faults = config.get("faults")  # tests only: see rayablate/faults.py
        self.attempt = self._count_attempt(config.get("attempt_counter"))
        if self.faults is not None:
            self.faults.started(self.rank)
        t0 = time.time()
        pipe = load_pipeline(config["model_path"])
        t_load = time.time()
        self.ablation = Ablation(pipe, cfg, self.device, self.rank, int(config.get("disc_width", 64)))
        t_models = time.time()
        self.optim = EngineOptimizers(self.ablation)
        t_engines = time.time()
        self.pos, self.history = Position(), []
        self._restore()
        self.start_step = self.pos.step
        self.log(f"rank {self.rank} of {self.world}: setup {time.time() - t0:.1f} s (load {t_load - t0:.1f}, models "
                 f"{t_models - t_load:.1f}, engines {t_engines - t_models:.1f}, restore {time.time() - t_engines:.1f}); "
                 f"training {cfg.param_group} "
                 f"({len(self.ablation.trainable_names)} tensors) for {cfg.steps} steps, ZeRO-{cfg.zero_stage}, "
                 f"{cfg.precision}")
        self.window: list[dict] = []
        self.t_last, self.reported_step = time.time(), self.pos.step

    def _count_attempt(self, counter) -> int:
        import ray

        return ray.get(counter.increment.remote()) if counter is not None and self.rank == 0 else 1

    def log(self, msg: str) -> None:
        """Rank 0's lines reach the console once (via the driver's board when quiet); every rank's go to its log file."""
        self._log(f"[rayablate.train] {msg}")

    def agree(self, flag: bool) -> bool:
        return _all_ranks_true(flag, self.device, self.world)

    def _restore(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            state = json.loads(Path(d, STATE_NAME).read_text())
            self.optim.load_state(d, state["tag"])
            self._restore_attacker(d)
        self.pos = Position(state["step"], state["epoch"], state["batch_in_epoch"])
        self.history = state["history"]
        self.log(f"resumed from step {self.pos.step} (epoch {self.pos.epoch}, batch {self.pos.batch_in_epoch})")

    def _restore_attacker(self, d: str) -> None:
        """Robust mode: this rank's inner attacker as the checkpoint left it (resume stays exact)."""
        from .robust import STATE_FILE

        if self.ablation.robust is None:
            return
        path = Path(d, STATE_FILE.format(self.rank))
        if not path.exists():
            raise RuntimeError(f"checkpoint {d} has no inner-attacker state for rank {self.rank} ({path.name}): "
                               "it was written by a run without robust: true; start a fresh run (--no-resume)")
        self.ablation.robust.load_state(torch.load(path, map_location="cpu", weights_only=True))

    def epoch_batches(self):
        """epoch -> that epoch's batches: from the in-memory shard (one pass over the Ray Data
        pipeline first), or streamed with a seeded local shuffle when the shard is over the limit."""
        import ray.train

        cfg = self.cfg
        shuffle = int(self.config.get("shuffle_buffer", 4 * cfg.batch_size))
        local = self.config.get("local_shards")
        if local is not None:  # data.LocalShards: this rank's rows, read from the folder itself
            shard, cache = None, ShardCache.of_ordered(local.rank_rows(self.rank, self.world))
            if cache.columns is None:
                return lambda epoch: iter(())  # no row for this rank: step_batches says so
        else:
            shard = ray.train.get_dataset_shard("train")
            cache = ShardCache(float(self.config.get("shard_cache_mb", SHARD_CACHE_MB)) * 2**20)
            if cache.ok:
                for raw in shard.iter_batches(batch_size=256, batch_format="numpy"):
                    cache.add(raw)
                cache.finish()

        def batches(epoch: int):
            seed = epoch_seed(cfg.seed, self.rank, epoch)
            if cache.columns is not None:
                return cache.batches(cfg.batch_size, seed if shuffle > 0 else None)
            kwargs = dict(batch_size=cfg.batch_size, batch_format="numpy", drop_last=False)
            if shuffle > 0:
                kwargs.update(local_shuffle_buffer_size=shuffle, local_shuffle_seed=seed)
            return shard.iter_batches(**kwargs)

        return batches

    def run(self) -> None:
        cfg = self.cfg
        for raw in step_batches(cfg, self.epoch_batches(), self.pos, self.agree, self.rank):
            if self.faults is not None:
                self.faults.before_step(self.pos.step + 1, self.rank, self.attempt)
            self.window.append(train_step(self.ablation, self.optim, raw, self.pos.step + 1, self.agree))
            self.pos.step += 1
            self._log.step(self.pos.step)
            if self.pos.step % cfg.checkpoint_every == 0 or self.pos.step == cfg.steps:
                self.report(with_checkpoint=True)
                if self.faults is not None:
                    self.faults.after_checkpoint(self.pos.step)
            elif self.pos.step % cfg.report_every == 0:
                self.report(with_checkpoint=False)

    def report(self, with_checkpoint: bool) -> None:
        import ray.train

        step = self.pos.step
        metrics = {"step": step, "epoch": self.pos.epoch, **mean_metrics(self.window)}
        metrics["s_per_step"] = (time.time() - self.t_last) / max(1, step - self.reported_step)
        self.history.append(metrics)
        shown = TERMS + (("uncond",) if self.cfg.w_uncond > 0 else ())
        shown += (("robust", "inner_loss") if self.cfg.robust else ()) + ("disc",)
        terms = " ".join(f"{k} {metrics.get(k, 0.0):.4g}" for k in shown)
        self.log(f"step {step}/{self.cfg.steps} loss {metrics.get('loss', float('nan')):.4g} ({terms}) "
                 f"{metrics['s_per_step']:.2f} s/step")
        if not with_checkpoint:
            ray.train.report(metrics)
        else:
            self._checkpoint(metrics)
        self.window, self.t_last, self.reported_step = [], time.time(), step

    def _checkpoint(self, metrics: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        step, tag = self.pos.step, f"step{self.pos.step:07d}"
        tmp = tempfile.mkdtemp(prefix=f"rayablate-ckpt-{step}-r{self.rank}-")
        try:
            self.optim.save_state(tmp, tag)
            self.ablation.sync_shadow(self.optim.full_param)  # every rank: ZeRO gathers are collective
            if self.ablation.robust is not None:  # each rank's own attacker state
                from .robust import STATE_FILE

                torch.save(self.ablation.robust.state(), os.path.join(tmp, STATE_FILE.format(self.rank)))
            if self.rank == 0:
                self.ablation.write_delta(os.path.join(tmp, DELTA_NAME), step)
                state = {"step": step, "epoch": self.pos.epoch, "batch_in_epoch": self.pos.batch_in_epoch,
                         "tag": tag, "world_size": self.world, "history": self.history,
                         "ablation": self.config["ablation"]}
                Path(tmp, STATE_NAME).write_text(json.dumps(state, indent=1))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"checkpoint_{tag}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def draw_after_images(self) -> dict | None:
        """The evaluation's after-images (`config["after_images"]`, `evaluation.after_image_plan`),
        and the before-images of the plan's "before" rows (those the base-image cache lacks), drawn by
        every rank once training has finished, so the evaluation starts no sampler of its own (on 2
        cores the two sampler actors' start-up and pipeline loads were ~9 s of CPU). Each rank writes
        the final delta from its synced shadow, exactly as the final checkpoint did, and draws its
        share of the evaluation's batches through the same `Sampler` the evaluation's actors use: the
        base model's first (that pipeline is dropped before the delta's is loaded), then the delta's.
        Rank 0 gets {"pngs" (in the plan's order), "before" ({row index: PNG}), "key" (the plan's),
        "delta_digest", "seconds"}; other ranks None. None everywhere when there is no plan or this
        attempt did not train to the end (a resumed finished run): the evaluation then draws them itself."""
        plan = self.config.get("after_images")
        if not plan or self.start_step >= self.cfg.steps or self.pos.step != self.cfg.steps:
            return None
        import numpy as np

        from .sampling import Sampler, balanced_batch_size

        t0 = time.time()
        n, size = len(plan["prompts"]), max(1, int(plan["batch_size"]))
        before_rows = [int(i) for i in plan.get("before") or []]

        def draw(deltas: dict, rows: list[int], batch: int) -> dict:
            """{row index: PNG} of this rank's share of `rows`' batches, drawn with `deltas`' one column."""
            (column,), sampler, got = deltas, Sampler(self.config["model_path"], deltas, steps=int(plan["steps"]),
                                                      guidance=float(plan["guidance"]), use_gpu=self.cfg.use_gpu,
                                                      precision=plan["precision"]), {}
            for idx in [rows[i:i + batch] for i in range(0, len(rows), batch)][self.rank::self.world]:
                out = sampler({"prompt": np.array([plan["prompts"][i] for i in idx], dtype=object),
                               "seed": np.array([int(plan["seeds"][i]) for i in idx])})
                got.update(zip(idx, (bytes(p) for p in out[column])))
            return got

        mine, mine_before, digest = None, None, None
        tmp = tempfile.mkdtemp(prefix=f"rayablate-after-r{self.rank}-")
        try:  # a failure here must not fail a finished run: the evaluation then draws them itself
            if before_rows:
                mine_before = draw({"before": None}, before_rows,
                                   balanced_batch_size(len(before_rows), self.world, size))
            path = os.path.join(tmp, DELTA_NAME)
            self.ablation.write_delta(path, self.pos.step)  # the shadow the final checkpoint synced
            digest = delta_digest(path)
            mine = draw({"after": path}, list(range(n)), size)
        except Exception as e:
            self.log(f"WARNING: rank {self.rank} could not draw its after-images ({e})")
            mine = None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        gathered: list = [(mine, mine_before, digest)]
        if self.world > 1:  # every rank reaches this collective, failed or not
            import torch.distributed as dist

            gathered = [None] * self.world
            dist.all_gather_object(gathered, (mine, mine_before, digest))
        if self.rank != 0:
            return None
        pngs: dict = {}
        before: dict = {}
        for part, part_before, _ in gathered:
            pngs.update(part or {})
            before.update(part_before or {})
        if any(part is None for part, _, _ in gathered) or len({d for _, _, d in gathered}) != 1 or len(pngs) != n \
                or len(before) != len(before_rows):
            self.log("WARNING: the ranks' after-images are incomplete or from different deltas; "
                     "the evaluation draws its own")
            return None
        seconds = time.time() - t0
        self.log(f"drew the evaluation's {n} after-images" + (f" and {len(before)} before-images" if before else "")
                 + f" on {self.world} ranks in {seconds:.1f} s")
        return {"pngs": [pngs[i] for i in range(n)], "before": before, "key": plan["key"], "delta_digest": digest,
                "seconds": seconds}

    def result(self) -> dict | None:
        """Every rank's replica hash and Ray node id, gathered on all (all_gather_object is a collective)."""
        import ray

        mine = (self.ablation.replica_hash(), ray.get_runtime_context().get_node_id())
        gathered: list = [mine]
        if self.world > 1:
            import torch.distributed as dist

            gathered = [None] * self.world
            dist.all_gather_object(gathered, mine)
        hashes = [h for h, _ in gathered]
        if len(set(hashes)) > 1:
            self.log(f"WARNING: matcher replicas differ across ranks: {hashes}")
        if self.rank != 0:
            return None
        return {"history": self.history, "start_step": self.start_step, "final_step": self.pos.step,
                "replica_hashes": hashes, "worker_node_ids": [n for _, n in gathered], "attempt": self.attempt}


def train_loop_per_worker(config: dict) -> dict | None:
    """The function `TorchTrainer` runs on each worker (see the module docstring).

    `config`: "ablation" (`to_dict(AblationConfig)`), "model_path" (a local diffusers folder);
    optional "torch_threads" (1), "disc_width" (64), "shuffle_buffer" (rows; 4 x batch_size, 0 =
    canonical order; also the local shuffle of a streamed shard), "shard_cache_mb" (SHARD_CACHE_MB:
    keep a shard up to this size in memory, 0 = stream every epoch), "attempt_counter" (an actor
    counting starts, set by `run_training`: the console's board), "faults" (a `faults.Faults`: fault injection, tests only).

    Reported metrics (rank 0's, averaged since the last report): step, epoch, loss (the matcher's
    weighted total), match, reg, pres, con, adv (0 when the term's weight is 0), disc,
    grad_norm, ablation_rows (share of mask-1 rows), s_per_step.
    Rank 0 returns {"history", "start_step", "final_step", "replica_hashes", "worker_node_ids" (the Ray
    node of each rank), "attempt"}.
    """
    torch.set_num_threads(int(config.get("torch_threads", 1)))
    _quiet_deepspeed()
    worker = _Worker(config)
    worker.run()
    after = worker.draw_after_images()
    result = worker.result()
    if result is not None and after is not None:
        result["after_images"] = after
    return result


# --- driver side --------------------------------------------------------------------------------

def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def make_trainer(cfg: AblationConfig, train_ds, model_path: str, storage_path: str, run_name: str = "ablate", *,
                 max_failures: int = 0, cpus_per_worker: float | None = None, callbacks: list | None = None,
                 extra_loop_config: dict | None = None, worker_resources: dict | None = None):
    """The `TorchTrainer` of one ablation run (Tune builds its trials from this, adding callbacks).

    `storage_path`: a folder or an s3:// / gs:// URI (an S3 endpoint from AWS_ENDPOINT_URL_S3 is
    honoured, see `storage.py`). `worker_resources`: custom Ray resources each worker needs on top of
    its CPU/GPU, e.g. one that only some node types offer.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cpus_per_worker is None:
        if cfg.use_gpu:
            cpus_per_worker = 1.0
        else:
            if not ray.is_initialized():
                ray.init()
            cpus_per_worker = cpu_share(ray.cluster_resources().get("CPU", 1.0), cfg.num_workers)
    resources = {"CPU": cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    resources.update(worker_resources or {})
    loop_config = {"ablation": to_dict(cfg), "model_path": str(model_path),
                   "torch_threads": max(1, int(cpus_per_worker)), "shard_cache_mb": SHARD_CACHE_MB}
    from .data import LocalShards

    datasets = {"train": train_ds}
    if isinstance(train_ds, LocalShards):  # each worker reads its rows itself (data.training_source)
        loop_config["local_shards"], datasets = train_ds, None
    loop_config.update(extra_loop_config or {})
    from ray.data import DataContext

    exec_opts = copy.deepcopy(DataContext.get_current().execution_options)
    exec_opts.preserve_order = True  # the same rows in the same order on rerun: resumes are exact
    from .storage import train_storage

    storage_path, storage_filesystem = train_storage(str(storage_path))
    owned = os.environ.get(OWNED_RAY_ENV) == "1" and in_driver()
    trainer_cls = _owned_ray_trainer() if owned else TorchTrainer
    return trainer_cls(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=exec_opts),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


def _owned_ray_trainer():
    """`TorchTrainer` without two helper actors, for a fit started by the driver of a Ray that the
    driver started itself (`job.init_ray`; `resources.OWNED_RAY_ENV`):

    - the placement-group cleaner, a detached actor that asks the dashboard's state API every second
      whether the controller is still alive, to free the workers' placement group after a
      controller dies without its driver. Here the driver waits on the fit, and the Ray, placement
      groups and all, ends with the driver. Fits started inside Ray (Tune's trials, a batch's
      concept tasks) keep it: Tune stops trials;
    - the dataset manager, an actor that splits `datasets` for the workers, when there are none
      (`data.LocalShards`: each worker reads its own shards).

    Each is one more process start, 1.2-1.6 s of CPU on the cores the job's own work needs. The hook
    (`_create_default_callbacks`) is private to Ray Train V2 as pinned (ray 2.60);
    tests/test_train.py checks which helpers a fit gets."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class OwnedRayTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            drop = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, drop)]

    return OwnedRayTrainer


def _raise_worker_error(err: Exception) -> None:
    """Re-raise a failed fit's cause: a FloatingPointError from a worker stays a FloatingPointError."""
    failures = getattr(err, "worker_failures", None) or {}
    for e in list(failures.values()) + [err]:
        m = re.search(r"non-finite loss at step \d+[^\n]*", str(e))
        if isinstance(e, FloatingPointError) or m:
            raise FloatingPointError(m.group(0) if m else str(e)) from err
    raise err


def run_training(cfg: AblationConfig, train_ds, model_path: str, output_dir: str, run_name: str = "ablate",
                 resume: bool = True, *, max_failures: int = 0, cpus_per_worker: float | None = None,
                 callbacks: list | None = None, worker_resources: dict | None = None, faults=None,
                 after_images: dict | None = None) -> dict:
    """Train the matcher on `train_ds` with Ray Train; write `<output_dir>/matcher_delta.safetensors`.

    With `resume`, a run whose `storage_path`/`run_name` folder already holds checkpoints continues
    from its latest one (Ray Train V2 restores a run by name and storage path); without it that
    folder is cleared first. Ray retries node preemptions by itself; `max_failures` counts other
    worker errors to retry (deterministic ones, such as a non-finite loss, would only repeat).
    `faults`: a `rayablate.faults.Faults` (fault injection; only tests pass one). `after_images`:
    `evaluation.after_image_plan`, drawn by the workers once trained (`_Worker.draw_after_images`).

    Returns {"delta_path", "metrics" (history), "metrics_path", "checkpoint_path", "run_path",
    "start_step" (of the last attempt: > 0 when it resumed), "final_step", "wall_s", "worker_restarts",
    "replica_hashes" (one per rank: equal when the matcher replicas agree), "worker_node_ids" (the
    Ray node id of each rank), "after_images" (the workers' {"pngs", "key", "delta_digest", "seconds"}, or None)}.
    """
    import ray
    from ray.train.v2.api.exceptions import TrainingFailedError

    output_dir = Path(output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    storage, run_name = _run_storage(cfg, output_dir, run_name, resume)
    if resume and faults is None and _is_local(storage):
        done = _finished_run(Path(storage) / run_name, cfg, output_dir)
        if done is not None:
            return done
    if not ray.is_initialized():
        ray.init()
    from . import console

    board = console.board_cls().remote()  # it also counts the worker group's starts
    extra = {"attempt_counter": board, "faults": faults, "board": board, "verbose": console.is_verbose(),
             "log_dir": str(output_dir / console.LOG_DIR), "after_images": after_images}
    trainer = make_trainer(cfg, train_ds, model_path, storage, run_name, max_failures=max_failures,
                           cpus_per_worker=cpus_per_worker, callbacks=callbacks, extra_loop_config=extra,
                           worker_resources=worker_resources)
    t0 = time.time()
    try:
        try:
            # Ray Train's own Ctrl-C handler ends the process with exit status 0, as if the run had
            # succeeded; without it Ctrl-C raises KeyboardInterrupt, which the CLI turns into a clean stop.
            trainer._register_sigint_handler = lambda controller: None
            with console.Follower(board, cfg.steps, "training"):
                result = trainer.fit()
        except TrainingFailedError as e:
            _raise_worker_error(e)
        if result.error is not None:
            _raise_worker_error(result.error)
        attempts = ray.get(board.count.remote())
    finally:
        ray.kill(board)
    wall = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    return _fit_outputs(result, output_dir, wall, attempts)


def _run_storage(cfg: AblationConfig, output_dir: Path, run_name: str, resume: bool) -> tuple[str, str]:
    """(storage path, run name): a local run folder is cleared when not resuming; a remote run gets a
    fresh, time-stamped name instead."""
    storage = cfg.storage_path or str(output_dir / "ray")
    if _is_local(storage):
        storage = str(Path(storage.removeprefix("file://")).expanduser().resolve())
        run_dir = Path(storage) / run_name
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
    elif not resume:
        run_name = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return storage, run_name


# Settings a finished run's training does not depend on (a rerun may change them and keep the run).
_NOT_TRAINING = ("eval_images", "eval_steps", "eval_seed", "storage_path", "report_every")


def read_snapshot(run_dir: str | Path) -> dict | None:
    """A local Ray Train run folder's checkpoint snapshot (which checkpoints it registered), or None."""
    try:
        return json.loads(Path(run_dir, SNAPSHOT_NAME).read_text())
    except (OSError, ValueError):
        return None


def _finished_run(run_dir: Path, cfg: AblationConfig, output_dir: Path) -> dict | None:
    """`run_training`'s outputs, without starting a worker group, when the run's latest registered
    checkpoint already ends at `cfg.steps` with the same training settings (a rerun of a finished
    job, Tune's last rung); None otherwise (Ray Train then resumes or starts the run)."""
    try:
        ckpt = run_dir / read_snapshot(run_dir)["latest_checkpoint_result"]["checkpoint_dir_name"]
        state = json.loads((ckpt / STATE_NAME).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mine = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_TRAINING}
    theirs = {k: v for k, v in (state.get("ablation") or {}).items() if k not in _NOT_TRAINING}
    if state.get("step") != cfg.steps or mine != theirs or not (ckpt / DELTA_NAME).exists():
        return None
    return {**_copy_outputs(ckpt, output_dir, state.get("history", [])), "checkpoint_path": str(ckpt),
            "run_path": str(run_dir), "start_step": cfg.steps, "final_step": cfg.steps, "wall_s": 0.0,
            "worker_restarts": 0, "replica_hashes": [], "worker_node_ids": [], "already_trained": True}


def _copy_outputs(ckpt_dir: str | Path, output_dir: Path, history: list[dict]) -> dict:
    """A checkpoint's delta copied to `output_dir` and the metric history written beside it."""
    delta_path = output_dir / DELTA_NAME
    with atomic(delta_path) as tmp:
        shutil.copyfile(Path(ckpt_dir, DELTA_NAME), tmp)
    return {"delta_path": str(delta_path), "metrics": history,
            "metrics_path": str(write_json(output_dir / METRICS_NAME, history))}


def _fit_outputs(result, output_dir: Path, wall: float, attempts: int) -> dict:
    """Copy the final checkpoint's delta and write the metric history; `run_training`'s return value."""
    ret = result.return_value or {}
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, STATE_NAME).read_text())
        outputs = _copy_outputs(d, output_dir, ret.get("history") or state.get("history", []))
    after = ret.get("after_images")
    if after is not None and delta_digest(outputs["delta_path"]) != after["delta_digest"]:
        after = None  # drawn from another delta than the one the run's checkpoint holds: not used
    return {
        **outputs,
        "after_images": after,
        "checkpoint_path": result.checkpoint.path,
        "run_path": result.path,
        "start_step": ret.get("start_step"),
        "final_step": ret.get("final_step", state["step"]),
        "wall_s": wall,
        "worker_restarts": max(0, attempts - 1),
        "replica_hashes": ret.get("replica_hashes", []),
        "worker_node_ids": ret.get("worker_node_ids", []),
    }
