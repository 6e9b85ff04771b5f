"""Images from a pipeline: seeded sampling, and the one Ray Data actor that generates them.

The same `Sampler` makes the anchor images of the training data, the before/after images of an
evaluation and a batch's evaluation images: one image per row and seed, PNG-encoded.
"""
from __future__ import annotations

import numpy as np

from .config import SAMPLE_PRECISIONS


def prompt_seed(seed: int, i: int) -> int:
    """The noise seed of a group's i-th evaluation prompt (before and after share it)."""
    return seed * 7919 + i


# The precision images are drawn in (`sample_precision` of a job's config): "fp32", "bf16" (the
# pipeline's weights stay fp32; its forward passes run under bf16 autocast), or "auto": bf16 on a CPU
# that computes bf16 natively (AVX512-BF16 or AMX-BF16), fp32 elsewhere (GPUs included: set bf16 there
# yourself). On this project's 2-core AVX512-BF16 machine bf16 drew the toy model's images 1.8x as
# fast (1.06 against 1.90 s for 32 images on one thread), 0.5 of 255 apart on average, with the same
# probe rates in every group of the default job. Before- and after-images of one evaluation are
# always drawn in the same precision, and the base-image cache keys images by it. (SAMPLE_PRECISIONS)


def native_bf16_cpu() -> bool:
    """Whether this machine's CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    import torch

    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_sample_precision(precision: str, use_gpu: bool = False) -> str:
    """"fp32" or "bf16": `precision` with "auto" decided for this machine (see SAMPLE_PRECISIONS)."""
    if precision not in SAMPLE_PRECISIONS:
        raise ValueError(f"unknown sample precision {precision!r}; allowed: {', '.join(SAMPLE_PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if not use_gpu and native_bf16_cpu() else "fp32"


def sample_images(pipe, prompts: list[str], seeds, steps: int, guidance: float, device: str = "cpu",
                  precision: str = "fp32") -> np.ndarray:
    """uint8 NxHxWx3 images of `pipe` for `prompts`, one seeded generator per image, drawn in
    `precision` (SAMPLE_PRECISIONS)."""
    import contextlib

    import torch

    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    bf16 = resolve_sample_precision(precision, str(device).startswith("cuda")) == "bf16"
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="np")
    return np.round(out.images * 255).astype(np.uint8)


class Sampler:
    """Ray Data callable class: for each row's prompt and seed, one PNG column per key of `deltas`
    (None: the base model; else the model with that delta applied), all with the same seed.

    Rows may carry "steps" and "guidance" columns, which then override the constructor's values.
    `precision`: what the images are drawn in (SAMPLE_PRECISIONS).
    A row that already holds non-empty PNG bytes in an output column (an image from the base-image
    cache, rayablate/image_cache.py) keeps them: only the other rows are drawn, and a column's
    pipeline is loaded the first time one of its images has to be drawn.
    """

    def __init__(self, model_path: str, deltas: dict[str, str | None], prompt_column: str = "prompt",
                 steps: int | None = None, guidance: float | None = None, use_gpu: bool = False,
                 threads: int = 1, precision: str = "fp32"):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model_path, self.deltas, self.pipes = model_path, dict(deltas), {}
        self.prompt_column, self.steps, self.guidance, self.precision = prompt_column, steps, guidance, precision

    @classmethod
    def of_pipes(cls, pipes: dict, prompt_column: str = "prompt", steps: int | None = None,
                 guidance: float | None = None, device: str = "cpu", precision: str = "fp32") -> "Sampler":
        """The same sampler over pipelines already in this process (the in-process API): one output
        column per key of `pipes`; nothing is loaded and the process's thread count is left alone."""
        self = cls.__new__(cls)
        self.pipes, self.deltas, self.device = dict(pipes), {c: None for c in pipes}, device
        self.prompt_column, self.steps, self.guidance, self.precision = prompt_column, steps, guidance, precision
        return self

    def _pipe(self, column: str):
        if column not in self.pipes:
            from .pipeline import apply_delta, load_pipeline

            self.pipes[column] = load_pipeline(self.model_path, device=self.device)
            if self.deltas[column]:
                apply_delta(self.pipes[column], self.deltas[column])
        return self.pipes[column]

    def __call__(self, batch: dict) -> dict:
        from .images import encode_png

        prompts = [str(p) for p in batch[self.prompt_column]]
        n = len(prompts)
        steps = [int(s) for s in batch["steps"]] if "steps" in batch else [self.steps] * n
        guidance = [float(g) for g in batch["guidance"]] if "guidance" in batch else [self.guidance] * n
        for column in self.deltas:
            given = batch.get(column)
            pngs = [bytes(g) if g is not None and len(g) else None for g in given] if given is not None else [None] * n
            todo = [i for i in range(n) if pngs[i] is None]
            # one pipeline call per (steps, guidance): rows of one setting are sampled as one batch
            for s, g in sorted(set((steps[i], guidance[i]) for i in todo)):
                idx = [i for i in todo if (steps[i], guidance[i]) == (s, g)]
                imgs = sample_images(self._pipe(column), [prompts[i] for i in idx], [batch["seed"][i] for i in idx],
                                     s, g, self.device, self.precision)
                for i, im in zip(idx, imgs):
                    pngs[i] = encode_png(im)
            batch[column] = np.array(pngs, dtype=object)
        return batch


def balanced_batch_size(num_rows: int, num_actors: int, largest: int) -> int:
    """The batch size (<= `largest`) that splits `num_rows` into a multiple of `num_actors` batches
    of near-equal size: 160 rows on 2 actors in batches of 32 left one actor 3 batches and the other 2.
    One actor keeps batches of `largest`, the batches the in-process API draws anchor images in."""
    actors = max(1, num_actors)
    if actors == 1:
        return max(1, largest)
    rounds = -(-max(1, num_rows) // (actors * max(1, largest)))
    return max(1, -(-max(1, num_rows) // (actors * rounds)))


def sample_dataset(rows_or_ds, model_path: str, deltas: dict[str, str | None], *, steps: int | None = None,
                   guidance: float | None = None, use_gpu: bool = False, num_actors: int = 1,
                   prompt_column: str = "prompt", batch_size: int = 16, threads: int = 1, precision: str = "fp32"):
    """A Ray Dataset (rows as dicts, or a Dataset) with `Sampler` mapped over it in an actor pool.
    Rows given as dicts are batched evenly across the actors (`balanced_batch_size`, at most
    `batch_size` a batch). `threads`: torch threads of each sampler actor; `precision`: Sampler's,
    "auto" decided here (the driver), so every actor draws in the same one."""
    import ray

    from .resources import actor_resources

    if isinstance(rows_or_ds, ray.data.Dataset):
        ds = rows_or_ds
    else:
        rows = list(rows_or_ds)
        ds, batch_size = ray.data.from_items(rows), balanced_batch_size(len(rows), num_actors, batch_size)
    return ds.map_batches(Sampler, fn_constructor_kwargs=dict(
        model_path=model_path, deltas=deltas, prompt_column=prompt_column, steps=steps, guidance=guidance,
        use_gpu=use_gpu, threads=threads, precision=resolve_sample_precision(precision, use_gpu)),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors), **actor_resources(use_gpu))


def _collected(ds, columns, key) -> dict:
    """{key(row): {column: {idx: uint8 HxWx3}}} of a sampled dataset."""
    from .images import decode_png

    out: dict = {}
    for r in ds.iter_rows():
        slot = out.setdefault(key(r), {})
        for c in columns:
            slot.setdefault(c, {})[int(r["idx"])] = decode_png(r[c])
    return out


def _stacked(out: dict) -> dict:
    """{key: {column: uint8 NxHxWx3}}, each stack in the rows' "idx" order."""
    return {k: {c: np.stack([v[i] for i in sorted(v)]) for c, v in d.items()} for k, d in out.items()}


def draw_images(rows: list[dict], model_path: str, deltas: dict[str, str | None], key, *, steps: int | None = None,
                guidance: float | None = None, use_gpu: bool = False, num_actors: int = 1, batch_size: int = 16,
                prompt_column: str = "prompt", given: dict[str, list[bytes]] | None = None,
                precision: str = "fp32") -> tuple[dict, dict[str, int]]:
    """{key(row): {column: uint8 NxHxWx3}} (each stack in the rows' "idx" order) of `sample_dataset`,
    with the base model's columns (delta None) read from the image cache (rayablate/image_cache.py)
    row by row, and what had to be drawn kept there. Rows need "seed" and "idx". `given`: {column:
    one PNG per row} already drawn elsewhere with that column's delta (the training workers'
    after-images, `train.draw_after_images`): not drawn again. Returns (images, {column: images
    served from the cache}); when every column is served whole, no actor starts. `precision`: what
    the images are drawn in (SAMPLE_PRECISIONS), part of the cache's key."""
    from .image_cache import BaseImageCache
    from .images import decode_png, encode_png

    given = {c: list(p) for c, p in (given or {}).items() if c in deltas and len(p) == len(rows)}
    cache = BaseImageCache.for_model(model_path, use_gpu, precision) if None in deltas.values() else None
    found = {c: cache.pngs(rows, prompt_column, steps, guidance) for c, d in deltas.items()
             if cache and d is None and c not in given}
    hits = {c: sum(p is not None for p in got) for c, got in found.items()}
    served = {**{c: got for c, got in found.items() if hits[c] == len(rows)}, **given}
    partial = {c: got for c, got in found.items() if 0 < hits[c] < len(rows)}
    todo = {c: d for c, d in deltas.items() if c not in served}
    out = {}
    if todo:
        draw = [dict(r, **{c: got[i] or b"" for c, got in partial.items()}) for i, r in enumerate(rows)]
        ds = sample_dataset(draw, model_path, todo, steps=steps, guidance=guidance, use_gpu=use_gpu,
                            num_actors=num_actors, prompt_column=prompt_column, batch_size=batch_size,
                            precision=precision)
        out = _collected(ds, list(todo), key)
    for column, pngs in served.items():
        for r, png in zip(rows, pngs):
            out.setdefault(key(r), {}).setdefault(column, {})[int(r["idx"])] = decode_png(png)
    for column in (c for c, d in todo.items() if cache and d is None):
        drawn = [r for r, png in zip(rows, found[column]) if png is None]
        cache.store(drawn, [encode_png(out[key(r)][column][int(r["idx"])]) for r in drawn], prompt_column, steps,
                    guidance)
    return _stacked(out), {c: n for c, n in hits.items() if n}
