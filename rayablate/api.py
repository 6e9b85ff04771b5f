"""The in-process front end: ablate a concept from a pipeline you hold, with no Ray and no output folder.

    import rayablate
    pipe = rayablate.load_pipeline(path)              # or StableDiffusionPipeline.from_pretrained(path)
    concept = rayablate.Concept(target="striped", anchor="plain", neighbours=["dotted"])
    delta = rayablate.ablate(pipe, concept, steps=100)  # pipe itself is left as it was
    delta.save("striped.safetensors")
    after = rayablate.load_pipeline(path)
    delta.apply(after)                                  # or rayablate.apply_delta(after, "striped.safetensors")
    report = rayablate.evaluate(pipe, after, concept)   # the job's metrics, group by group
    delta.export("lora", "striped-lora", pipe)          # diffusers LoRA; also "kohya", "pipeline"

The same data, objective and step as the Ray job (`rayablate.method`), on the pipeline's device
with plain torch optimizers: the anchor images are generated in this process, the CLIP mask is
computed here, and the rows are visited in the order a single Ray Train worker visits them.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .config import AblationConfig, ConceptSpec, config_from_dict, to_dict

Concept = ConceptSpec


@dataclasses.dataclass
class Delta:
    """The matcher's changed tensors (full values, by qualified pipeline name) and their metadata."""

    tensors: dict
    metadata: dict

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors delta file that `rayablate.apply_delta`, the jobs and `--delta` read."""
        from .pipeline import save_delta_tensors

        return save_delta_tensors(self.tensors, path, self.metadata)

    def apply(self, pipe, scale: float | None = None):
        """Write the delta into `pipe` in place (refused for another architecture); returns `pipe`."""
        from .pipeline import apply_delta

        apply_delta(pipe, self, scale=scale)
        return pipe

    def export(self, kind: str, path: str | os.PathLike, base_pipe, rank: int | None = None) -> dict:
        """Write the delta for other tools: `lora` (a diffusers LoRA folder, `pipe.load_lora_weights`),
        `kohya` (one safetensors file for ComfyUI / A1111) or `pipeline` (a diffusers folder with the
        delta applied). `base_pipe`: the pipeline the delta was made from (its weights are the LoRA's
        base). `rank`: the LoRA rank (default: the lora group's own, exact; else 16, a truncated SVD).
        Returns {"kind", "path", "rank", "relative_error", "not_exported"} (see rayablate.export)."""
        from .export import export

        return export(kind, self, base_pipe, path, rank)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Delta":
        from .pipeline import read_delta

        tensors, meta = read_delta(path)
        return cls(tensors, meta)


class Report(dict):
    """Metrics by prompt group (`target`, `anchor`, `neighbours.<x>`, `paraphrases`), as in metrics.json."""

    def __str__(self) -> str:
        from .report import console_summary

        return console_summary(dict(self)).rsplit("\nwall time", 1)[0]


def _config(concept: ConceptSpec, config: AblationConfig | None, overrides: dict) -> AblationConfig:
    """The concept and settings as one validated config: ConfigError names a bad field."""
    data = to_dict(config) if config is not None else {}  # unset fields: defaults (and robust mode's)
    data["concept"] = dataclasses.asdict(concept)
    if concept.anchor_kind != "text" and concept.anchor == ConceptSpec.anchor:
        del data["concept"]["anchor"]  # Concept(target=..., anchor_kind="empty"): the default word is not given
    if concept.kind == "memorized" and concept.anchor == ConceptSpec.anchor:
        del data["concept"]["anchor"]  # the first anchor paraphrase, not the default word
    data.update(overrides)
    return config_from_dict(data)


def _world(concept: ConceptSpec, world):
    """The toy world for its own concepts (when no prompts are given), or for a memorized caption
    whose neighbours are its concepts; a PromptWorld otherwise. A memorized concept's world also
    judges replicas of its image (`memorized.MemorizedWorld`). `world` may also be a toy world's
    name: "v1" or "v2" (`toyworld/v2.py`, the bundle `--model toy:v2` names)."""
    from .memorized import world_for_spec

    if isinstance(world, str):
        from .toyworld.vocab import ToyWorld

        world = ToyWorld(world=world)
    if world is not None:
        return world_for_spec(world, concept)
    from .prompts import target_concept
    from .toyworld.vocab import ToyWorld
    from .worlds import PromptWorld

    toy = ToyWorld()
    explicit = concept.prompts or concept.templates or concept.prompt_file
    ours = (toy.knows(target_concept(concept)) or toy.memorized_here(concept)) and not explicit
    return world_for_spec(toy if ours else PromptWorld(), concept)


def _auto_neighbours(cfg: AblationConfig, world, pipe) -> AblationConfig:
    """`concept.auto_neighbours` resolved with `pipe`'s own text encoders (rayablate/neighbours.py)."""
    from .neighbours import TextSide, with_auto_neighbours

    return with_auto_neighbours(cfg, world, TextSide.of_pipe(pipe))[0] if cfg.concept.auto_neighbours else cfg


def _clip(clip: str | None, cfg: AblationConfig, world=None) -> str:
    """The CLIP to use: given, the config's, else the toy bundle's (of the world's toy world)."""
    if clip or cfg.clip:
        return clip or cfg.clip
    from .toyworld import bundle_paths

    return str(bundle_paths(world=getattr(world, "world_name", "v1"))["clip"])


def _progress(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not show, leave=False)


def training_rows(pipe, cfg: AblationConfig, world, clip: str, progress: bool = True) -> dict[str, np.ndarray]:
    """The job's training rows, made in this process: anchor images from `pipe` (the same prompts,
    seeds and batches of 16 as the Ray Data sampler), CLIP masks at the config's threshold."""
    from .data import ClipMasker, masker_kwargs, prompt_rows
    from .method import columns_of
    from .sampling import Sampler

    rows = prompt_rows(cfg, world)
    sampler = Sampler.of_pipes({"image": pipe}, "anchor_caption", cfg.anchor_steps, cfg.guidance_scale,
                               str(pipe.device), cfg.sample_precision)
    bar = _progress(len(rows), "anchor images", progress)
    parts = []
    for i in range(0, len(rows), 16):
        parts.append(sampler(columns_of(rows[i:i + 16])))
        bar.update(len(parts[-1]["seed"]))
    bar.close()
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return ClipMasker(**masker_kwargs(cfg, world, clip))(columns)


def ablate(pipe, concept: ConceptSpec, *, steps: int | None = None, config: AblationConfig | None = None,
           world=None, clip: str | None = None, progress: bool = True,
           callback: Callable[[int, dict], None] | None = None, **overrides) -> Delta:
    """Ablate `concept` from `pipe` in this process; returns the delta (`pipe` is not changed).

    `config`: the settings (an AblationConfig; its concept is replaced by `concept`); `steps` and
    any other AblationConfig field given as a keyword override it. `world`: where prompts and the
    judge come from (default: the toy world for its own concepts, else the concept's prompts and
    templates). `clip`: the CLIP of the mask (default: the config's, else the bundled toy CLIP).
    `callback(step, metrics)` is called after every step. `method="closed-form"` returns the
    closed-form edit instead (rayablate.closed_form: no anchor images, no training, about a second).
    """
    if steps is not None:
        overrides["steps"] = steps
    cfg = _config(concept, config, overrides)
    world = _world(cfg.concept, world)
    cfg = _auto_neighbours(cfg, world, pipe)
    if cfg.method == "closed-form":  # the one-shot least-squares edit: no rows, no training
        from .closed_form import GROUP, closed_form_edit
        from .pipeline import architecture_fingerprint, delta_metadata

        tensors, info = closed_form_edit(pipe, cfg, world)
        return Delta(tensors, delta_metadata(GROUP, architecture_fingerprint(pipe), {"method": "closed-form"}))
    return ablate_rows(pipe, cfg, training_rows(pipe, cfg, world, _clip(clip, cfg, world), progress), world, progress,
                       callback)


def ablate_rows(pipe, cfg: AblationConfig, rows: dict[str, np.ndarray], world=None, progress: bool = True,
                callback: Callable[[int, dict], None] | None = None) -> Delta:
    """The training half of `ablate`: train on `rows` (columns as `training_rows` returns them) with
    the full config `cfg`; returns the delta."""
    from .method import Ablation, PlainOptimizers, Position, ShardCache, epoch_seed, step_batches, train_step

    world = _world(cfg.concept, world)
    cache = ShardCache(float("inf"))
    cache.add(rows)
    cache.finish()
    ablation = Ablation(pipe, cfg, device=pipe.device, copy_modules=True, world=world)
    optim = PlainOptimizers(ablation)
    pos = Position()
    bar = _progress(cfg.steps, f"ablating {cfg.concept.target!r}", progress)
    epochs = lambda epoch: cache.batches(cfg.batch_size, epoch_seed(cfg.seed, 0, epoch))  # noqa: E731
    for raw in step_batches(cfg, epochs, pos):
        entry = train_step(ablation, optim, raw, pos.step + 1)
        pos.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.4g}")
        if callback is not None:
            callback(pos.step, entry)
    bar.close()
    ablation.sync_shadow()
    from .pipeline import architecture_fingerprint, delta_metadata

    meta = delta_metadata(cfg.param_group, architecture_fingerprint(ablation.shadow), ablation.delta_metadata(pos.step))
    return Delta(ablation.delta_tensors(), meta)


def evaluate(pipe_before, pipe_after, concept: ConceptSpec, *, world=None, clip: str | None = None,
             num_images: int | None = None, seed: int | None = None, steps: int | None = None,
             guidance: float | None = None, config: AblationConfig | None = None) -> Report:
    """Before/after images of every prompt group, measured as the job measures them (concept rate by
    the world's judge, CLIP accuracy, CLIP score, KID). Defaults come from `config` (AblationConfig())."""
    from .clip import ClipScorer
    from .evaluation import sample_groups
    from .metrics import measure_groups

    cfg = _config(concept, config, {})
    world = _world(cfg.concept, world)
    cfg = _auto_neighbours(cfg, world, pipe_before)  # the same choice as `ablate` made: one group each
    seed = cfg.eval_seed if seed is None else seed
    steps, guidance = steps or cfg.eval_steps, guidance or cfg.guidance_scale
    groups = world.eval_groups(cfg.concept, num_images or cfg.eval_images, seed)
    shots = {w: sample_groups(p, groups, seed, steps, guidance, str(p.device), cfg.sample_precision)
             for w, p in (("before", pipe_before), ("after", pipe_after))}
    images = {g.name: {w: shots[w][g.name] for w in shots} for g in groups}
    scorer = ClipScorer.load(_clip(clip, cfg, world))
    return Report(measure_groups(groups, images, cfg.concept, scorer, world.judge(), world))
