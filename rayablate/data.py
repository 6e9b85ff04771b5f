"""Ray Data: anchor images (the `sampling.Sampler` actor pool), user image-text pairs, CLIP masks, parquet shards.

Row schema of the training data (what `train.py` reads through `get_dataset_shard`):
  image (PNG bytes), target_caption (c*), anchor_caption (c), mask (1 ablation / 0 preservation),
  seed, source ("generated" | "user"), clip_sim (the caption's similarity to the concept),
  anchor_if_ablated (the anchor caption the row takes when a threshold masks it in: with clip_sim,
  the mask can be recomputed for another threshold without generating anything again).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from .config import AblationConfig, ConfigError
from .images import ImageDecodeError, decode_png, encode_png

USER_COLUMNS = ("image", "caption")


class DataError(ValueError):
    """User-supplied data that cannot be used; the message names the file, row or column."""


class ClipMasker:
    """Ray Data callable class: mask = cos_sim(caption [, image], concept) > threshold.

    `concept_texts` is one list of texts (their mean embedding is the concept) or several lists (a
    category: a row scores its similarity to the closest one). `guard`: word groups a caption must
    name one word of each (`PromptWorld.mask_guard`); other rows score -1, so no threshold masks them in.
    `protect`: (neighbour words, target words) (`PromptWorld.mask_protect`): a row naming a neighbour
    and not the target scores -1 too.
    `replicas`: (reference image, uint8 HxWx3; SSIM threshold) of a memorized image (kind memorized,
    `memorized.replica_filter`): rows whose image replicates it are dropped (`memorized.drop_replicas`).
    """

    def __init__(self, clip_name: str, concept_texts: list, threshold: float, image_weight: float = 0.0,
                 guard: list[list[str]] | None = None, replicas: tuple[np.ndarray, float] | None = None,
                 protect: tuple[list[str], list[str]] | None = None):
        import torch

        from .clip import ClipScorer

        torch.set_num_threads(1)
        self.scorer = ClipScorer.load(clip_name)
        groups = concept_texts if concept_texts and not isinstance(concept_texts[0], str) else [concept_texts]
        self.groups, self.threshold, self.image_weight = [list(g) for g in groups if g], threshold, image_weight
        self.guard = [[w.lower() for w in g] for g in guard or []]
        self.replicas = replicas
        self.protect = protect

    def _names_all(self, caption: str) -> bool:
        from .prompts import names_word

        return all(any(names_word(caption, w) for w in g) for g in self.guard)

    def _protected(self, caption: str) -> bool:
        from .prompts import names_word

        neighbours, target = self.protect
        return any(names_word(caption, w) for w in neighbours) and not any(names_word(caption, w) for w in target)

    def __call__(self, batch: dict) -> dict:
        if self.replicas is not None:
            from .memorized import drop_replicas

            batch = drop_replicas(batch, *self.replicas)
            if not len(batch["image"]):
                return {**batch, "clip_sim": np.zeros(0, np.float32), "mask": np.zeros(0, np.int64)}
        caps = [str(c) for c in batch["target_caption"]]
        imgs = np.stack([decode_png(b) for b in batch["image"]]) if self.image_weight > 0 else None
        sim = np.max([self.scorer.row_similarity(caps, g, imgs, self.image_weight) for g in self.groups], axis=0)
        if self.guard:
            sim = np.where([self._names_all(c) for c in caps], sim, -1.0)
        if self.protect:
            sim = np.where([self._protected(c) for c in caps], -1.0, sim)
        batch["clip_sim"] = sim.astype(np.float32)
        return apply_threshold(batch, self.threshold)


def masker_kwargs(cfg: AblationConfig, world, clip_name: str, image_weight: float = 0.0) -> dict:
    """`ClipMasker`'s arguments for a concept: what the Ray data stage, the in-process API
    (`api.training_rows`) and benchmarks mask its rows with."""
    from .memorized import replica_filter

    spec = cfg.concept
    return dict(clip_name=clip_name, concept_texts=world.mask_texts(spec), threshold=cfg.clip_threshold,
                image_weight=image_weight, guard=world.mask_guard(spec), replicas=replica_filter(spec),
                protect=world.mask_protect(spec))


def apply_threshold(batch: dict, threshold: float) -> dict:
    """mask = clip_sim > threshold. Rows the mask leaves out are preservation rows: their anchor
    caption is their own caption. Shards keep clip_sim and anchor_if_ablated, so this re-masks
    written data for another threshold (Ray Tune) without generating anything again."""
    mask = (np.asarray(batch["clip_sim"]) > threshold).astype(np.int64)
    batch["mask"] = mask
    batch["anchor_caption"] = np.array([str(a) if m else str(t) for a, t, m in
                                        zip(batch["anchor_if_ablated"], batch["target_caption"], mask)], dtype=object)
    return batch


def _this_node_label(path: str) -> dict | None:
    """Shards in a local folder live on the driver's disk: on a cluster without shared storage, only
    the driver's node can read them, so reads are pinned there (their rows then travel by object store)."""
    import ray

    if "://" in path:
        return None
    return {"ray.io/node-id": ray.get_runtime_context().get_node_id()}


def read_training_data(path: str | Path, clip_threshold: float | None = None, num_cpus: float = 0.25):
    """The parquet shards of `build_training_data` as a Ray Dataset, re-masked at `clip_threshold`
    when given. Tasks take fractional CPUs: they share the machine with training workers."""
    import ray

    ds = ray.data.read_parquet(str(path), num_cpus=num_cpus, label_selector=_this_node_label(str(path)))
    if clip_threshold is not None:
        ds = ds.map_batches(apply_threshold, fn_kwargs={"threshold": float(clip_threshold)}, batch_format="numpy",
                            num_cpus=num_cpus)
    return ds


@dataclasses.dataclass(frozen=True)
class LocalShards:
    """Training shards in a folder every worker can read (this node's disk, on a one-node Ray), read
    by each worker itself: no Ray Data read tasks, no streaming split, no coordinator actor. That
    start-up cost 8-15 s of a 30-step job on 2 cores, for a hundred rows that a worker reads in
    milliseconds. Each rank takes every world_size-th row of the canonical order (`method.ShardCache`),
    re-masked at `clip_threshold` when given. `training_source` picks this or the Ray Data path."""

    path: str
    clip_threshold: float | None = None

    def rank_rows(self, rank: int, world_size: int) -> dict[str, np.ndarray]:
        """Rank `rank`'s rows as numpy columns, in the canonical order."""
        import pyarrow.parquet as pq

        from .method import ShardCache

        table = pq.read_table(self.path)
        cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        if self.clip_threshold is not None:
            cols = apply_threshold(cols, float(self.clip_threshold))
        cache = ShardCache(float("inf"))
        cache.add(cols)
        cache.finish()
        if cache.columns is None:
            return {k: v[:0] for k, v in cols.items()}
        return {k: v[rank::world_size] for k, v in cache.columns.items()}


LOCAL_SHARDS_ENV = "RAYABLATE_LOCAL_SHARDS"  # 0: always feed training through Ray Data's streaming split


def training_source(path: str | Path, clip_threshold: float | None = None, limit_mb: float | None = None):
    """What training reads: `LocalShards` when the shards sit in a local folder, Ray runs one node
    that this process started (no RAY_ADDRESS: every worker shares the driver's disk) and the data
    fits the workers' in-memory shard cache; else the Ray Dataset of `read_training_data`."""
    import ray

    from .train import SHARD_CACHE_MB

    path = Path(path)
    limit = SHARD_CACHE_MB if limit_mb is None else limit_mb
    local = ("://" not in str(path) and os.environ.get(LOCAL_SHARDS_ENV, "1") != "0"
             and not os.environ.get("RAY_ADDRESS") and ray.is_initialized()
             and sum(1 for n in ray.nodes() if n.get("Alive")) == 1
             and sum(f.stat().st_size for f in path.glob("*.parquet")) <= limit * 2**20)
    return LocalShards(str(path), clip_threshold) if local else read_training_data(path, clip_threshold)


def prompt_rows(cfg: AblationConfig, world, exclude=()) -> list[dict]:
    """Rows to generate: ablation candidates (c*, c) and preservation candidates (c_i, c_i).
    `exclude`: concepts no caption names, where the world can steer its captions (a batch's joint run)."""
    spec = cfg.concept
    pairs = world.caption_pairs(spec, cfg.num_anchor_images, cfg.seed, exclude=exclude)
    keep = world.preservation_captions(spec, cfg.num_preservation_images, cfg.seed + 1, exclude=exclude)
    rows = [{"target_caption": c_star, "anchor_caption": c, "anchor_if_ablated": c} for c_star, c in pairs]
    rows += [{"target_caption": c, "anchor_caption": c, "anchor_if_ablated": world.anchorize(c, spec)} for c in keep]
    for i, r in enumerate(rows):
        r.update(seed=int(cfg.seed * 100003 + i), source="generated")
    return rows


def read_user_pairs(path: str | Path, spec, world, resolution: int):
    """User image-text pairs as a Ray Dataset in the training schema (see `load_user_rows`)."""
    import ray

    return ray.data.from_items(load_user_rows(path, spec, world, resolution))


def load_user_rows(path: str | Path, spec, world, resolution: int) -> list[dict]:
    """Validated user image-text pairs: a parquet file/folder with `image` bytes and `caption`, or a
    folder of images with same-named .txt captions. Any bad row raises DataError naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"user data does not exist: {path}")
    if path.suffix == ".parquet" or (path.is_dir() and list(path.glob("*.parquet"))):
        import pyarrow.parquet as pq

        files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
        for f in files:
            try:
                names = pq.read_schema(f).names
            except Exception as e:
                raise DataError(f"{f} is not a readable parquet file: {e}") from e
            missing = [c for c in USER_COLUMNS if c not in names]
            if missing:
                raise DataError(f"{f} lacks column(s) {', '.join(missing)}; user pairs need columns "
                                f"{', '.join(USER_COLUMNS)}")
        rows = []
        for f in files:
            t = pq.read_table(f, columns=list(USER_COLUMNS)).to_pylist()
            rows += [dict(r, _where=f"{f.name} row {i}") for i, r in enumerate(t)]
    elif path.is_dir():
        rows = []
        for img in sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")):
            txt = img.with_suffix(".txt")
            if not txt.exists():
                raise DataError(f"{img.name} has no caption file {txt.name}")
            try:
                caption = txt.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{txt.name} is not UTF-8 text: {e}") from e
            rows.append({"image": img.read_bytes(), "caption": caption, "_where": img.name})
        if not rows:
            raise DataError(f"{path} holds no images (.png/.jpg/.jpeg/.webp with .txt captions)")
    else:
        raise DataError(f"{path}: expected a .parquet file or a folder")
    return [_user_row(r, spec, world, resolution, i) for i, r in enumerate(rows)]


def _user_row(r: dict, spec, world, resolution: int, i: int) -> dict:
    where = r.get("_where", f"row {i}")
    cap = r.get("caption")
    if not isinstance(cap, str) or not cap.strip():
        raise DataError(f"{where}: caption is empty or not text")
    if not isinstance(r.get("image"), (bytes, bytearray)):
        raise DataError(f"{where}: image is not bytes")
    try:
        img = decode_png(bytes(r["image"]))
    except ImageDecodeError as e:
        raise DataError(f"{where}: {e}") from e
    if img.shape[0] != resolution or img.shape[1] != resolution:
        raise DataError(f"{where}: image is {img.shape[1]}x{img.shape[0]}, the model's resolution is "
                        f"{resolution}x{resolution}; resize user images to the model's resolution")
    return {"image": encode_png(img), "target_caption": cap, "anchor_caption": cap,
            "anchor_if_ablated": world.anchorize(cap, spec), "seed": 10_000_000 + i, "source": "user"}


def build_training_data(cfg: AblationConfig, model_path: str, clip_name: str, out_dir: str | Path, world,
                        user_data: str | None = None, num_actors: int = 1, resolution: int = 32,
                        image_weight: float = 0.0, exclude=()) -> Path:
    """Generate anchor images, join user pairs, compute CLIP masks; write parquet shards to `out_dir`.
    `exclude`: concepts the generated captions do not name (see `prompt_rows`).

    Written to a temporary folder first and renamed at the end, so a failure leaves nothing behind.
    Returns the folder of parquet shards.
    """
    import ray

    from .image_cache import BaseImageCache
    from .resources import sampler_threads
    from .sampling import sample_dataset

    out_dir = Path(out_dir)
    if (out_dir / "_SUCCESS").exists():
        return out_dir
    rows = prompt_rows(cfg, world, exclude)
    if not rows:
        raise ConfigError("concept.prompts", "the prompt list is empty")
    # the frozen model's images drawn before are not drawn again; all of them: no sampler (rayablate/image_cache.py)
    cache = BaseImageCache.for_model(model_path, cfg.use_gpu, cfg.sample_precision)
    masker = masker_kwargs(cfg, world, clip_name, image_weight)
    kept = None if user_data else data_cache_dir(cache, rows, cfg, masker)
    cached = cache.pngs(rows, "anchor_caption", cfg.anchor_steps, cfg.guidance_scale) if cache else [None] * len(rows)
    hits = sum(p is not None for p in cached)
    if kept is not None and (kept / "_SUCCESS").exists():
        from .console import say

        say(f"[rayablate]     the data stage's shards came from the data cache (the same {len(rows)} rows, "
            "images and CLIP mask as an earlier job)")
        _copy_shards(kept, out_dir)
        if cache is not None and hits < len(rows):
            _remember_anchor_images(cache, rows, out_dir, cfg)
        return out_dir
    if hits:
        from .console import say

        say(f"[rayablate]     {hits} of the {len(rows)} anchor images came from the base-image cache")
        rows = [dict(r, image=png or b"") for r, png in zip(rows, cached)]  # the Sampler draws only the empty ones
    # Ablation and preservation rows interleaved, so every block, and so every worker's shard when
    # Ray Data splits them by blocks, holds both kinds: a seeded permutation of the rows before they
    # are drawn (each row keeps its own seed, so its image), where a `random_shuffle` after masking
    # cost an all-to-all exchange of the drawn images. (Training itself puts rows in a canonical order.)
    items = [rows[i] for i in np.random.default_rng(cfg.seed).permutation(len(rows))]
    if hits == len(rows):
        ds = ray.data.from_items(items)
    else:
        ds = sample_dataset(items, model_path, {"image": None}, steps=cfg.anchor_steps, guidance=cfg.guidance_scale,
                            use_gpu=cfg.use_gpu, num_actors=num_actors, prompt_column="anchor_caption",
                            batch_size=16, threads=sampler_threads(num_actors, cfg.use_gpu),
                            precision=cfg.sample_precision)
    if user_data:
        ds = ds.union(read_user_pairs(user_data, cfg.concept, world, resolution))
    ds = ds.map_batches(ClipMasker, fn_constructor_kwargs=masker, batch_size=128,
                        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=0.5)
    if user_data:  # user pairs come after the drawn rows: shuffled in with them
        ds = ds.random_shuffle(seed=cfg.seed)
    write_shards(ds, out_dir)
    if cache is not None and hits < len(rows):
        _remember_anchor_images(cache, rows, out_dir, cfg)
    if kept is not None:
        _keep_shards(out_dir, kept)
    return out_dir


# --- the data cache: a data stage's shards, kept for an exact rerun ---------------------------------
# Beside the base-image cache (under its folder, on the driver's disk, off with it): a job whose rows,
# anchor images, CLIP model, mask settings and shuffle seed are those of an earlier job copies that
# job's shards instead of starting Ray Data, a CLIP actor and its writers (about 7 s of a warm
# default job on 2 cores). The key names each anchor image by its base-image cache key (the model's
# bytes, prompt, seed, sampler steps, guidance, device, versions), so the first job stores its
# shards too. It also holds the CLIP folder's bytes, torch's and open_clip's versions and the
# source of the modules that mask rows: an edit to the masking code is another key, never stale
# data. Jobs with user image-text pairs, a model or CLIP that is not a local folder, or the image
# cache off (`--no-image-cache`) are not cached.
DATA_CACHE_FORMAT = "rayablate-data/1"
_MASKING_MODULES = ("data.py", "clip.py", "prompts.py", "memorized.py", "images.py")


def _plain(v):
    """JSON's `default=` for the key: arrays by their bytes' digest; anything unknown is an error
    (no key, no caching) rather than a lossy repr."""
    import hashlib

    if isinstance(v, np.ndarray):
        return ["ndarray", str(v.dtype), list(v.shape), hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"no cache key for {type(v).__name__}")


def data_cache_dir(cache, rows: list[dict], cfg: AblationConfig, masker: dict) -> Path | None:
    """The folder that holds (or will hold) these rows' masked shards, or None: not cacheable."""
    import hashlib
    import json
    from importlib.metadata import version

    from .image_cache import cache_root, model_fingerprint

    root = cache_root()
    clip_fp = model_fingerprint(masker["clip_name"])
    if cache is None or root is None or clip_fp is None:
        return None
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / m).read_bytes() for m in _MASKING_MODULES)).hexdigest()
    images = [cache._file(r["anchor_caption"], r["seed"], r.get("steps", cfg.anchor_steps),
                          r.get("guidance", cfg.guidance_scale)).name for r in rows]
    try:
        key = json.dumps([DATA_CACHE_FORMAT, code, version("torch"), version("open_clip_torch"), clip_fp, masker,
                          int(cfg.seed), [{k: v for k, v in r.items() if k != "image"} for r in rows], images],
                         sort_keys=True, default=_plain)
    except TypeError:
        return None
    return root / "data" / hashlib.sha256(key.encode()).hexdigest()


def _copy_shards(src: Path, out_dir: Path) -> None:
    """`src`'s shards into `out_dir`, atomically (a temporary folder, then a rename), as write_shards."""
    from .files import atomic_folder

    with atomic_folder(out_dir) as tmp:
        shutil.copytree(src, tmp)


def _keep_shards(out_dir: Path, kept: Path) -> None:
    """A copy of the written shards in the data cache; a full or read-only disk only costs a later job time."""
    if (kept / "_SUCCESS").exists():
        return
    tmp = kept.with_name(f"{kept.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out_dir, tmp)
        tmp.rename(kept)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _remember_anchor_images(cache, rows: list[dict], shards: Path, cfg: AblationConfig) -> None:
    """Keep the written shards' generated images in the base-image cache, matched to the rows they
    were drawn for by seed (the mask rewrites the captions; a replica filter may have dropped rows)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(shards), columns=["seed", "image", "source"]).to_pydict()
    by_seed = {int(s): img for s, img, src in zip(table["seed"], table["image"], table["source"]) if src == "generated"}
    kept = [r for r in rows if int(r["seed"]) in by_seed]
    cache.store(kept, [by_seed[int(r["seed"])] for r in kept], "anchor_caption", cfg.anchor_steps, cfg.guidance_scale)


def write_shards(ds, out_dir: Path) -> None:
    """Write `ds` as parquet shards into `out_dir` atomically: a temporary folder, `_SUCCESS`, a rename.

    The driver writes them, one file per block as the blocks stream in: the folder is on its own
    disk (see `_this_node_label`), where `Dataset.write_parquet`'s tasks had to be pinned anyway.
    Those tasks cannot fuse into the CLIP actors before them, so a cold job started a Ray worker
    process to write a hundred rows: 1.1 s of the data stage on 2 cores, against 0.04 s here.
    A dataset with no rows at all (every row dropped, e.g. by a memorized image's replica filter)
    raises DataError and leaves nothing behind."""
    import shutil

    import pyarrow.parquet as pq

    from .files import atomic_folder

    with atomic_folder(out_dir) as tmp:
        tmp.mkdir(parents=True)
        written = 0
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if block.num_rows:
                pq.write_table(block, str(tmp / f"part-{written:05d}.parquet"))
                written += 1
        if not written:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"the data stage kept no rows to write to {out_dir} (every row was dropped)")
        (tmp / "_SUCCESS").write_text("ok\n")


def data_summary(path: str | Path, clip_threshold: float | None = None) -> dict:
    """Counts of rows, ablation rows and preservation rows of written shards (reads two columns only),
    as masked when written, or re-masked at `clip_threshold`."""
    import pyarrow.parquet as pq

    if clip_threshold is None:
        mask = np.asarray(pq.read_table(str(path), columns=["mask"]).column("mask"))
    else:
        sim = np.asarray(pq.read_table(str(path), columns=["clip_sim"]).column("clip_sim"))
        mask = (sim > float(clip_threshold)).astype(np.int64)
    return {"rows": int(len(mask)), "ablation_rows": int(mask.sum()), "preservation_rows": int((1 - mask).sum())}
