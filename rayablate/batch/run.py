"""Running a batch: the concepts' own runs as Ray tasks, the joint run, the evaluation of merged / joint
models on every concept, and `run_batch`, which strings them together.

Each concept runs as a Ray task (`num_cpus=0`: it only orchestrates; its Ray Data actors and
Ray Train workers reserve the CPUs) that makes `job.ablate`'s checks and runs the one concept
pipeline, `job.run_concept`, into `<out>/concepts/<name>/`; it writes `status.json` last. A
concept whose status says `succeeded` is skipped on the next run; one that failed is tried again.

Why tasks and not Tune trials: a concept run is a whole pipeline (Ray Data generation, a Ray
Train run, Ray Data evaluation), not one trainable with a metric to search over. Tune would
wrap each in a trial function that must itself launch Ray Data and a TorchTrainer, own the
restore logic (experiment state instead of the concept's own folder) and turn a failed trial
into an experiment error we would have to unpick; a task per concept gives the same folder as
`jobs/train.py`, failure isolation by `ray.get` on its own future, resumption by that folder,
and the concurrency limit by `ray.wait`.

Resources: unless `cpus_per_worker` says otherwise, each Ray Train worker gets
`resources.cpu_share(C, k * w)` CPUs (`C` CPUs, `k` concepts in flight, `w` workers per concept),
which keeps one CPU free for Ray Data (2 CPUs, k=2, w=1: 0.49).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import AblationConfig, ConfigError, concept_name, config_from_dict, save_config, to_dict
from ..files import atomic, atomic_folder, write_json, write_text
from ..prompts import anchor_label
from ..resources import cpu_share
from .merge import merge_batch, names_any
from .report import console_table, model_line, write_summary
from .spec import STATUS_NAME, Batch, BatchConcept, joint_config, joint_robust_source


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


# --- one concept, as a Ray task --------------------------------------------------------------------

def concept_done(out: Path) -> bool:
    try:
        st = json.loads((out / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return False
    return st.get("status") == "succeeded" and (out / "metrics.json").exists()


def _run_one(cfg: AblationConfig, out: Path, models, cpus_per_worker: float | None, num_actors: int,
             max_failures: int) -> dict:
    """The checks `job.ablate` makes, then `job.run_concept` with the batch's CPU share per worker."""
    import torch

    from ..job import prepare_output, run_concept

    torch.set_num_threads(1)
    t0 = time.time()
    out, _, cfg = prepare_output(cfg, out, models)  # auto neighbours: resolved by the batch already
    name = concept_name(cfg.concept)
    log = lambda msg: print(f"[batch:{name}] {msg}", flush=True)  # noqa: E731
    return run_concept(cfg, out, models, num_actors=num_actors, run_name=name, cpus_per_worker=cpus_per_worker,
                       max_failures=max_failures, log=log, started=t0)["metrics"]


def _concept_task_fn(cfg_dict: dict, out: str, models, cpus_per_worker, num_actors: int, max_failures: int) -> dict:
    """Runs in a Ray task: never raises; returns {"status", "error", "wall_s"} and writes status.json."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    outp = Path(out)
    try:
        _run_one(config_from_dict(cfg_dict), outp, models, cpus_per_worker, num_actors, max_failures)
        st = {"status": "succeeded", "error": None, "wall_s": time.time() - t0}
    except BaseException as e:  # noqa: BLE001 - a concept's failure must not take the batch down
        st = {"status": "failed", "error": _error(e).strip(), "wall_s": time.time() - t0,
              "traceback": traceback.format_exc()[-6000:]}
    _write_status(outp, st)
    return st


def _write_status(out: Path, st: dict) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / STATUS_NAME, st)
    except OSError:
        pass


def _cpus_per_worker(batch: Batch, cfg: AblationConfig, in_flight: int) -> float | None:
    import ray

    cpw = batch.settings.cpus_per_worker
    if cpw is None and not cfg.use_gpu:
        cpw = cpu_share(ray.cluster_resources().get("CPU", 1.0), in_flight * cfg.num_workers)
    return cpw


def run_separate(batch: Batch, out: Path, models, num_actors: int = 1, progress=print) -> dict[str, dict]:
    """Every concept's own run, at most `max_concurrent` at once. Returns {name: status dict}."""
    import ray

    s = batch.settings
    results: dict[str, dict] = {}
    queue = []
    for c in batch.concepts:
        d = out / "concepts" / c.name
        if concept_done(d):
            results[c.name] = dict(json.loads((d / STATUS_NAME).read_text()), skipped=True)
            progress(f"[batch] {c.name}: already finished, skipped")
        else:
            queue.append(c)
    task = ray.remote(num_cpus=0, max_retries=0)(_concept_task_fn)
    inflight: dict = {}
    t0 = time.time()
    while queue or inflight:
        while queue and len(inflight) < s.max_concurrent:
            c = queue.pop(0)
            cpw = _cpus_per_worker(batch, c.cfg, s.max_concurrent)
            ref = task.remote(to_dict(c.cfg), str(out / "concepts" / c.name), models, cpw, num_actors, s.max_failures)
            inflight[ref] = (c, time.time())
            progress(f"[batch] {c.name}: started ({c.cfg.concept.target!r} -> {anchor_label(c.cfg.concept.anchor, c.cfg.concept.anchor_kind)}, "
                     f"{c.cfg.steps} steps, {cpw} CPU/worker); in flight {len(inflight)}, queued {len(queue)}")
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            c, started = inflight.pop(ref)
            st = results[c.name] = dict(_task_status(ref, out / "concepts" / c.name, started), skipped=False)
            msg = f"[batch] {c.name}: {st['status']} in {st['wall_s']:.0f}s ({len(results)}/{len(batch.concepts)} " \
                  f"done, {time.time() - t0:.0f}s elapsed)"
            if st["status"] != "succeeded":
                msg += f" -- {st['error'].splitlines()[0] if st['error'] else ''}"
            else:
                msg += _result_line(out / "concepts" / c.name)
            progress(msg)
    return results


def _result_line(d: Path) -> str:
    """': target 1.00 -> 0.00, anchor and neighbours kept >= 100 %' from a concept's metrics.json, by
    the summary's own rule (`report.summarize_metrics`)."""
    from .report import _rate_key, summarize_metrics

    try:
        m = json.loads((d / "metrics.json").read_text())
    except (OSError, ValueError):
        return ""
    row = summarize_metrics(m, _rate_key(m))
    if row["target_before"] is None or row["target_after"] is None:
        return ""
    kept = [k for k in (row["anchor_kept"], row["neighbours_kept_min"]) if k is not None]
    line = f": target {row['target_before']:.2f} -> {row['target_after']:.2f}"
    return line + (f", anchor and neighbours kept >= {100 * min(kept):.0f} %" if kept else "")


def _task_status(ref, out: Path, started: float) -> dict:
    import ray

    try:
        return ray.get(ref)
    except Exception as e:  # the task's process died (OOM, killed node): still only this concept
        st = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:1500]}", "wall_s": time.time() - started}
        _write_status(out, st)
        return st


# --- joint run -----------------------------------------------------------------------------------

def run_joint(batch: Batch, out: Path, models, names: list[str], num_actors: int = 1, progress=print) -> dict:
    """One training run over every concept's rows with one shared matcher: <out>/joint/."""
    from ..job import run_concept
    from ..data import data_summary

    jdir = out / "joint"
    jdir.mkdir(parents=True, exist_ok=True)
    st_path = jdir / STATUS_NAME
    cfg, rule = joint_config(batch, names), joint_rows_rule(batch)
    if st_path.exists():
        st = json.loads(st_path.read_text())
        if st.get("status") == "succeeded" and st.get("concepts") == names \
                and st.get("rows_rule") == rule and (jdir / "matcher_delta.safetensors").exists():
            if _same_config(jdir / "config.yaml", cfg):
                progress("[batch] joint: already trained, skipped")
                return dict(st, skipped=True)
            # joint_overrides changed (steps, w_pres, ...): same rows, new training from scratch
            progress("[batch] joint: its config changed since it was trained; training again")
            shutil.rmtree(jdir / "ray", ignore_errors=True)
    t0 = time.time()
    try:
        save_config(cfg, jdir / "config.yaml")
        if (jdir / "rows").exists() and not _rows_made_by_rule(jdir / "rows", rule):
            # rows of an older rule: neither its data nor the checkpoints trained on them are reused
            shutil.rmtree(jdir / "ray", ignore_errors=True)
            shutil.rmtree(jdir / "data", ignore_errors=True)
        dirs = _joint_sources(batch, out, models, names, num_actors, progress)
        rows_dir = _joint_rows(dirs, jdir / "rows", models.world, [c.cfg.concept for c in batch.concepts], cfg.seed, rule,
                               need_concepts=cfg.robust_per_concept)
        summ = data_summary(rows_dir)
        robust_from = joint_robust_source(batch, names)
        progress(f"[batch] joint: {summ['rows']} rows ({summ['ablation_rows']} ablation) from {len(names)} concepts, "
                 f"{cfg.steps} steps, {cfg.num_workers} worker(s)"
                 + ((", robust" + (f" (as {robust_from} is)" if robust_from else "")
                     + (", one inner attacker per concept" if cfg.robust_per_concept else "")) if cfg.robust else ""))
        train = run_concept(cfg, jdir, models, data_dir=rows_dir, run_name="joint",
                            cpus_per_worker=_cpus_per_worker(batch, cfg, 1), max_failures=batch.settings.max_failures,
                            evaluation=None, log=lambda msg: progress(f"[batch:joint] {msg}"))["train"]
        st = {"status": "succeeded", "error": None, "concepts": names, "steps": cfg.steps, "data": summ,
              "rows_rule": rule,
              "train_seconds": train["wall_s"], "wall_s": time.time() - t0}
    except Exception as e:  # noqa: BLE001
        st = {"status": "failed", "error": _error(e), "concepts": names,
              "wall_s": time.time() - t0, "traceback": traceback.format_exc()[-6000:]}
        progress(f"[batch] joint: failed -- {st['error'].splitlines()[0]}")
    write_json(st_path, st)
    return dict(st, skipped=False)


def _same_config(path: Path, cfg) -> bool:
    """Whether the config saved at `path` (a finished joint run's) is `cfg`, field for field."""
    import yaml

    if not path.exists():
        return False
    return yaml.safe_load(path.read_text()) == yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _joint_sources(batch: Batch, out: Path, models, names: list[str], num_actors: int,
                   progress=print) -> list[tuple[str, object]]:
    """Each concept's training shards for the joint run, with captions that name no other target of
    the joint run where the world can steer its captions (the toy worlds): joint/data/<name>/. A
    concept whose captions name no other target anyway uses its separate run's shards. Returns
    (folder, the concept's ConceptSpec) pairs, its compositions' folder too where made.

    Why not every separate run's own rows: made for one concept, most of them name another target
    of the batch ("a wavy yellow tafi" among wavy's rows). Re-anchored for the joint run (see
    `_joint_rows`) they became "a plain yellow square": on batch_v2, 1852 of 2048 rows were
    ablation rows, each style word was taught "plain, and no character" and kept characters that
    share a shape or mark (kubo) were erased next to a removed style."""
    from ..job import check_inputs
    from ..data import build_training_data, prompt_rows

    by = {c.name: c for c in batch.concepts}
    k_comp, swaps = batch.settings.joint_compositions, kept_neighbours(batch, names)
    dirs = []
    for k, n in enumerate(names):
        cfg = by[n].cfg
        others = [by[m].cfg.concept.target for m in names if m != n]
        own = out / "concepts" / n / "data"
        rows = prompt_rows(cfg, models.world)
        if (own / "_SUCCESS").exists() and prompt_rows(cfg, models.world, others) == rows \
                and _made_from(own.parent / "config.yaml", rows, models.world):
            dirs.append((str(own), cfg.concept))
            continue
        progress(f"[batch] joint: rows of {n} that name no other target ({k + 1}/{len(names)})")
        res = check_inputs(cfg, models)
        dirs.append((str(build_training_data(cfg, models.model_path, models.clip, out / "joint" / "data" / n,
                                             models.world, num_actors=num_actors, resolution=res,
                                             exclude=others)), cfg.concept))
        if k_comp and (own / "_SUCCESS").exists():
            words = [models.world.concept_words(by[m].cfg.concept) for m in names if m != n]
            comp = _compositions(own, out / "joint" / "data" / f"{n}.compositions{k_comp}", words, k_comp, swaps)
            dirs += [(comp, cfg.concept)] if comp else []
    return dirs


def _made_from(config_path: Path, rows: list[dict], world) -> bool:
    """Whether a separate run's shards (its config saved at `config_path`) were made from `rows`.
    A separate run linked from a larger batch (benchmarks/batch_scale.py) was made with that batch's
    neighbours: zorb's run at N = 16 protects kubo, quen, lorx and nax, since zeph and vell were
    removed there. Its shards reused for a one-concept joint run left zeph kept 0.06."""
    from ..config import load_config
    from ..data import prompt_rows

    return config_path.exists() and prompt_rows(load_config(config_path), world) == rows


# How the joint rows are built; a rows folder or joint run made by another rule is rebuilt.
JOINT_ROWS_RULE = "names-no-other-target+{k}-compositions+counterparts/anchors-every-target/converts-preservation"


def joint_rows_rule(batch: Batch) -> str:
    return JOINT_ROWS_RULE.format(k=batch.settings.joint_compositions)


def composition_rows(rows: list[dict], other_words: list[list[str]], k: int) -> list[dict]:
    """The first `k` ablation rows (by seed) whose caption also names another target of the batch
    ("a red checkered zeph" among zeph's own rows): re-anchored (`_anchor_every_target`) they teach
    the joint matcher the compositions of removed concepts, which rows that name no other target
    never show ("a red checkered zeph" -> "a red plain diamond"). Concepts draw their captions'
    templates and colours from the same seeds, so the first `k` by seed are similar captions for
    every concept of a batch; a seed order salted with the concept's name (varied compositions) was
    measured worse on batch_v2 at N = 16: kubo (a square with a face) kept 0.88-0.91 in five groups
    against 0.94 in one, every miss a yellow kubo drawn as a plain yellow square."""
    picked = [r for r in sorted(rows, key=lambda r: int(r["seed"]))
              if int(r["mask"]) and names_any(str(r["target_caption"]), other_words)]
    return picked[:k]


def kept_neighbours(batch: Batch, names: list[str]) -> dict[str, list[str]]:
    """{target of an instance concept among `names`: its neighbours that no concept of `names` removes}."""
    by = {c.name: c for c in batch.concepts}
    targets = {by[n].cfg.concept.target for n in names}
    return {by[n].cfg.concept.target: [w for w in by[n].cfg.concept.neighbours if w not in targets]
            for n in names if by[n].cfg.concept.kind == "instance"}


def counterpart_rows(rows: list[dict], swaps: dict[str, list[str]]) -> list[dict]:
    """For each composition row, the same caption with each removed character it names replaced by
    each kept neighbour of that character ("a barred yellow tafi" -> "a barred yellow kubo"), as an
    ablation row whose anchor is that caption: re-anchored for the joint run (`_anchor_every_target`)
    it removes the other target only ("a plain yellow kubo"). Why: a composition row alone teaches
    "removed style + a square (or face) character -> a plain shape", and the joint model drew kept
    characters that share the shape or the mark that way (kubo, a square with a face, lost next to
    tafi and zorb). The row keeps the composition's image (its noised latents; the loss compares
    the model's predictions for the two captions on them)."""
    from ..prompts import word_pattern

    patterns = [(word_pattern(word), kept) for word, kept in swaps.items()]
    out = []
    for r in rows:
        caption = str(r["target_caption"])
        for pattern, kept in patterns:
            if pattern.search(caption):
                for n in kept:
                    c = pattern.sub(n, caption)
                    out.append(dict(r, target_caption=c, anchor_caption=c, anchor_if_ablated=c, mask=1))
    return out


def _compositions(own: Path, dest: Path, other_words: list[list[str]], k: int,
                  swaps: dict[str, list[str]]) -> str | None:
    """`composition_rows` of a separate run's shards and their `counterpart_rows`, written to `dest`
    (again each time: a small read of one shard folder, and a folder made by an older rule is never
    reused); None when there are none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(str(own))
    picked = composition_rows([dict(r, i=i) for i, r in enumerate(
        table.select(["seed", "mask", "target_caption"]).to_pylist())], other_words, k)
    rows = table.take(pa.array([r["i"] for r in picked], type=pa.int64())).to_pylist()
    rows += counterpart_rows(rows, swaps)
    with atomic_folder(dest) as tmp:
        tmp.mkdir(parents=True)
        if rows:
            pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), str(tmp / "part-0.parquet"))
        (tmp / "_SUCCESS").write_text("ok\n")
    return str(dest) if rows else None


def _joint_rows(dirs: list[tuple[str, object]], rows_dir: Path, world, specs: list, seed: int, rule: str,
                need_concepts: bool = False) -> Path:
    """Every concept's rows, shuffled, into `rows_dir` (written once: `_SUCCESS` marks it complete),
    each with its concept's target and anchor words (`method.CONCEPT_COLUMNS`: a robust joint run's
    per-concept attacker; rows an older version wrote lack them and are rebuilt when `need_concepts`)."""
    import ray

    from ..data import write_shards

    if (rows_dir / "_SUCCESS").exists() and _rows_made_by_rule(rows_dir, rule) \
            and (not need_concepts or _has_concept_columns(rows_dir)):
        return rows_dir
    shutil.rmtree(rows_dir, ignore_errors=True)
    ds = None
    for d, spec in dirs:
        part = ray.data.read_parquet(d).map(_with_concept, fn_kwargs={"target": spec.target, "anchor": spec.anchor})
        ds = part if ds is None else ds.union(part)
    all_words = [world.concept_words(s) for s in specs]
    # One concept's rows know nothing of the others. An ablation row's anchor caption replaces its
    # own concept only: zorb's "a barred yellow zorb" -> "a barred yellow circle" teaches the shared
    # matcher that "barred" stays barred, against barred's own rows; and a preservation row of one
    # concept that names another ("a dotted plon", kept for tafi) would keep what that one removes.
    # Every batch target such a caption names is replaced by its anchor: the ablation row's anchor
    # becomes "a plain yellow circle", the preservation row an ablation row "a dotted plon" ->
    # "a plain plon", which still keeps plon. On batch_v2 that is 618 of 1044 ablation rows and 357
    # of 492 preservation rows. In process, 800 steps, 16 images a concept: the old rows (those
    # preservation rows dropped) left the joint model drawing striped in 69 % of images, worst
    # target 0.69, mean 0.29; re-anchored ablation rows alone took that to 0.06 / 0.01 but plon (kept
    # by tafi's dropped rows) to 0.62; both together: worst target 0.12, mean 0.02, worst kept 0.88.
    ds = ds.map(lambda r: _anchor_every_target(r, world, specs, all_words))
    write_shards(ds.random_shuffle(seed=seed), rows_dir)
    _rule_file(rows_dir).write_text(rule)
    return rows_dir


def _with_concept(row: dict, target: str, anchor: str) -> dict:
    return dict(row, concept=target, concept_anchor=anchor)


def _has_concept_columns(rows_dir: Path) -> bool:
    import pyarrow.parquet as pq

    from ..method import CONCEPT_COLUMNS

    files = sorted(rows_dir.glob("*.parquet"))
    return bool(files) and all(c in pq.read_schema(str(files[0])).names for c in CONCEPT_COLUMNS)


def _rule_file(rows_dir: Path) -> Path:
    return rows_dir.parent / f"{rows_dir.name}.rule"  # beside the shards: readers take every file in rows_dir


def _rows_made_by_rule(rows_dir: Path, rule: str) -> bool:
    f = _rule_file(rows_dir)
    return f.exists() and f.read_text() == rule


def _anchor_every_target(row: dict, world, specs: list, all_words: list[list[str]]) -> dict:
    """The row with every batch target its anchor captions name replaced by that target's anchor; a
    preservation row whose caption names a batch target becomes an ablation row to that anchor."""
    def anchored(caption: str) -> str:
        for spec, words in zip(specs, all_words):
            if names_any(caption, [words]):
                caption = world.anchorize(caption, spec)
        return caption

    row = dict(row)
    if not row["mask"] and names_any(str(row["target_caption"]), all_words):
        row["mask"] = 1
        row["anchor_caption"] = anchored(str(row["target_caption"]))
    elif row["mask"]:
        row["anchor_caption"] = anchored(str(row["anchor_caption"]))
    row["anchor_if_ablated"] = anchored(str(row["anchor_if_ablated"]))
    return row


# --- evaluation of merged / joint models -------------------------------------------------------

def _eval_rows(concepts: list[BatchConcept], groups: dict[str, list]) -> list[dict]:
    from ..evaluation import eval_rows

    # the evaluation's own rows and seeds: the same images as the separate runs' evaluation
    return [dict(r, concept=c.name, steps=c.cfg.eval_steps, guidance=c.cfg.guidance_scale)
            for c in concepts for r in eval_rows(groups[c.name], c.cfg.eval_seed)]


def generate_images(rows: list[dict], model_path: str, delta_path: str | None, num_actors: int = 1,
                    use_gpu: bool = False, precision: str = "fp32") -> dict[tuple[str, str], np.ndarray]:
    """{(concept, group): uint8 NxHxWx3} through the Ray Data Sampler, drawn in `precision`."""
    from ..sampling import draw_images

    images, _ = draw_images(rows, model_path, {"image": delta_path}, lambda r: (r["concept"], r["group"]),
                            use_gpu=use_gpu, num_actors=num_actors, batch_size=32, precision=precision)
    return {k: d["image"] for k, d in images.items()}


def _save_npz(path: Path, images: dict[tuple[str, str], np.ndarray]) -> None:
    with atomic(path, ".npz") as tmp:
        np.savez_compressed(tmp, **{f"{c}|{g}": v for (c, g), v in images.items()})


def _load_npz(path: Path) -> dict[tuple[str, str], np.ndarray]:
    with np.load(path) as z:
        return {tuple(k.split("|", 1)): z[k] for k in z.files}


def _already_evaluated(concepts: list[BatchConcept], delta_path: str, out: Path, digest: str,
                       judge_digest: str | None) -> dict[str, dict]:
    done = {}
    for c in concepts:
        p = out / c.name / "metrics.json"
        if p.exists():
            m = json.loads(p.read_text())
            same = m.get("delta_sha256") == digest if "delta_sha256" in m else \
                Path(delta_path).stat().st_mtime <= p.stat().st_mtime  # written before this field existed
            if m.get("delta") == str(delta_path) and same and m.get("probe_sha256") == judge_digest:
                done[c.name] = m
    return done


def _before_images(concepts: list[BatchConcept], rows: list[dict], models, cache: Path, num_actors: int,
                   use_gpu: bool, progress, label: str, precision: str = "fp32") -> dict[tuple[str, str], np.ndarray]:
    """The base model's images drawn in `precision`, generated once per batch into `cache` and shared
    by every variant."""
    cache.mkdir(parents=True, exist_ok=True)
    before: dict = {}
    missing = []
    for c in concepts:
        f = cache / f"{c.name}.{precision}.npz"
        if f.exists():
            before.update(_load_npz(f))
        else:
            missing.append(c)
    if missing:
        mrows = [r for r in rows if r["concept"] in {c.name for c in missing}]
        progress(f"[batch] {label} evaluation: {len(mrows)} before-images (base model, cached for every variant)")
        imgs = generate_images(mrows, models.model_path, None, num_actors, use_gpu, precision)
        for c in missing:
            part = {k: v for k, v in imgs.items() if k[0] == c.name}
            _save_npz(cache / f"{c.name}.{precision}.npz", part)
            before.update(part)
    return before


def _write_variant(c: BatchConcept, groups: list, images: dict[str, dict[str, np.ndarray]], scorer, judge, world,
                   d: Path, fields: dict) -> dict:
    """One concept's metrics.json, report.md and grid.png under one variant."""
    from ..evaluation import save_before_after_grid
    from ..metrics import measure_groups
    from ..report import report_markdown

    metrics = measure_groups(groups, images, c.cfg.concept, scorer, judge, world)
    metrics["config"] = to_dict(c.cfg)
    metrics.update(fields)
    d.mkdir(parents=True, exist_ok=True)
    write_text(d / "report.md", report_markdown(metrics, groups, world.judge_note).replace(
        "# Ablation report:", f"# Ablation report ({fields['variant']} model):"))
    save_before_after_grid(groups, images, d / "grid.png")
    write_json(d / "metrics.json", metrics)  # last: its presence means this concept is evaluated
    return metrics


def evaluate_variant(concepts: list[BatchConcept], models, delta_path: str, out: Path, cache: Path,
                     num_actors: int = 1, progress=print, label: str = "") -> dict[str, dict]:
    """Every concept's evaluation groups on one delta: <out>/<concept>/metrics.json + report.md + grid.png.

    Before-images come from `cache` (generated once per batch, shared by every variant).
    Skipped when every concept's metrics.json exists and names this delta, with the same contents (a
    re-merge with other settings writes a new file at the same path).
    """
    from ..clip import ClipScorer
    from ..sampling import resolve_sample_precision

    world = models.world
    digest = hashlib.sha256(Path(delta_path).read_bytes()).hexdigest()
    # the judge counts too: metrics measured by another probe are not this evaluation's
    fields = {"delta": str(delta_path), "delta_sha256": digest, "probe_sha256": world.judge_sha256(),
              "variant": label}
    done = _already_evaluated(concepts, delta_path, out, digest, fields["probe_sha256"])
    if len(done) == len(concepts):
        progress(f"[batch] {label} evaluation: already done, skipped")
        return done
    todo = [c for c in concepts if c.name not in done]
    t0 = time.time()
    groups = {c.name: world.eval_groups(c.cfg.concept, c.cfg.eval_images, c.cfg.eval_seed) for c in todo}
    rows = _eval_rows(todo, groups)
    use_gpu = any(c.cfg.use_gpu for c in todo)
    # before and after in one precision: the batch's first concept's (a batch shares its settings)
    precision = resolve_sample_precision(todo[0].cfg.sample_precision, use_gpu)
    before = _before_images(todo, rows, models, cache, num_actors, use_gpu, progress, label, precision)
    progress(f"[batch] {label} evaluation: {len(rows)} after-images with {Path(delta_path).name}")
    after = generate_images(rows, models.model_path, str(delta_path), num_actors, use_gpu, precision)
    scorer, judge = ClipScorer.load(models.clip), world.judge()
    for c in todo:
        images = {g.name: {"before": before[(c.name, g.name)], "after": after[(c.name, g.name)]}
                  for g in groups[c.name]}
        done[c.name] = _write_variant(c, groups[c.name], images, scorer, judge, world, out / c.name, fields)
    progress(f"[batch] {label} evaluation: done in {time.time() - t0:.0f}s")
    return done


# --- the whole batch ---------------------------------------------------------------------------

def batch_models(batch: Batch):
    """The concepts' models, which must be one model and one CLIP (their deltas are merged)."""
    from ..job import resolve_models

    models = resolve_models(batch.concepts[0].cfg)
    for c in batch.concepts[1:]:
        m = resolve_models(c.cfg)
        if (m.model_path, m.clip) != (models.model_path, models.clip):
            raise ConfigError(f"concepts[{c.index}].model",
                              "every concept of a batch must use the same model and CLIP (they are merged)")
    return models


@dataclasses.dataclass
class _Combined:
    """What the merged, joint and sum steps share: the succeeded concepts and where their results go."""
    batch: Batch
    out: Path
    models: Any
    names: list[str]
    num_actors: int
    progress: Callable

    def evaluate(self, delta: Path, out: Path, label: str) -> dict[str, dict]:
        concepts = [c for c in self.batch.concepts if c.name in self.names]
        return evaluate_variant(concepts, self.models, str(delta), out, self.out / "eval" / "before",
                                self.num_actors, self.progress, label)


def _merged_step(r: _Combined, variants: dict, extra: dict) -> None:
    try:
        extra["merge"] = merge_batch(r.batch, r.out, r.models, r.names, r.progress)
        variants["merged"] = r.evaluate(r.out / "merged" / "merged_delta.safetensors", r.out / "merged" / "eval",
                                        "merged")
    except Exception as e:  # noqa: BLE001 - the separate results stand; say what went wrong
        extra["merge"] = {"status": "failed", "error": _error(e)}
        r.progress(f"[batch] merge: failed -- {extra['merge']['error'].splitlines()[0]}")


def _joint_step(r: _Combined, variants: dict, extra: dict) -> None:
    extra["joint"] = run_joint(r.batch, r.out, r.models, r.names, r.num_actors, r.progress)
    if extra["joint"]["status"] == "succeeded":
        try:
            variants["joint"] = r.evaluate(r.out / "joint" / "matcher_delta.safetensors", r.out / "joint" / "eval",
                                           "joint")
        except Exception as e:  # noqa: BLE001
            extra["joint"]["eval_error"] = _error(e)


def _sum_step(r: _Combined, variants: dict, extra: dict) -> None:
    try:
        variants["sum"] = r.evaluate(r.out / "merged" / "sum_delta.safetensors", r.out / "merged" / "sum_eval", "sum")
    except Exception as e:  # noqa: BLE001
        extra["merge"]["sum_eval_error"] = _error(e)


def _combined_variants(r: _Combined, variants: dict, extra: dict, timing: dict) -> None:
    s = r.batch.settings
    steps = [("merge", _merged_step, lambda: s.merge), ("joint", _joint_step, lambda: s.joint),
             # the naive-sum baseline last: the merged and joint models come first when time is short
             ("sum", _sum_step,
              lambda: s.merge and s.evaluate_sum and extra.get("merge", {}).get("status") != "failed")]
    for key, step, wanted in steps:
        if wanted():
            t = time.time()
            step(r, variants, extra)
            timing[key] = time.time() - t


def resolve_batch_neighbours(batch: Batch, models, progress=print) -> None:
    """Each concept's `auto_neighbours`, chosen with the text encoders loaded once; another target of
    the batch is never chosen (it is removed, not kept)."""
    if not any(c.cfg.concept.auto_neighbours for c in batch.concepts):
        return
    from ..job import resolve_neighbours
    from ..neighbours import TextSide

    side = TextSide.load(models.model_path)
    targets = [c.cfg.concept.target for c in batch.concepts]
    for c in batch.concepts:
        c.cfg = resolve_neighbours(c.cfg, models, exclude=targets, side=side,
                                   log=lambda m: progress(f"[batch] {m}"))


def run_batch(batch: Batch, output_dir: str | Path, models=None, num_actors: int = 1, progress=None,
              separate_only: bool = False) -> dict:
    """Separate runs (concurrent), merge, joint run, evaluations, summary. Returns summary.json's dict.
    `progress`: where the batch's lines go (default: the console and <output_dir>/logs/job.log)."""
    from ..console import log_to, say
    from ..job import check_output_dir, init_ray

    progress = progress or say

    t0 = time.time()
    out = Path(output_dir).expanduser().resolve()
    check_output_dir(out)
    models = models if models is not None else batch_models(batch)
    resolve_batch_neighbours(batch, models, progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps({"source": batch.source, "settings": dataclasses.asdict(batch.settings),
                                                "concepts": [to_dict(c.cfg) for c in batch.concepts]}, indent=1))
    log_to(out)  # quiet mode: the batch's lines and the libraries' logging into out/logs/job.log
    init_ray()
    progress(f"[batch] {len(batch.concepts)} concepts, at most {batch.settings.max_concurrent} at once -> {out}")
    statuses = run_separate(batch, out, models, num_actors, progress)
    timing = {"separate": time.time() - t0}
    ok = [c.name for c in batch.concepts if statuses.get(c.name, {}).get("status") == "succeeded"]
    variants: dict[str, dict[str, dict]] = {"separate": {
        n: json.loads((out / "concepts" / n / "metrics.json").read_text()) for n in ok}}
    extra: dict = {}
    if not separate_only and ok:
        _combined_variants(_Combined(batch, out, models, ok, num_actors, progress), variants, extra, timing)
    timing["total"] = time.time() - t0
    extra["timing"] = timing
    summary = write_summary(batch, out, statuses, variants, extra)
    progress(console_table(summary))
    if summary.get("model"):
        progress(f"[batch] {model_line(summary['model'])}")
    progress(f"[batch] summary: {out / 'summary.md'}, {out / 'summary.json'}")
    return summary
