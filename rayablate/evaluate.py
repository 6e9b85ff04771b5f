"""Evaluation: before/after generations (Ray Data batch inference), metrics, report, grid, loss curve.

metrics.json holds one object per prompt group (`target`, `anchor`, `neighbours.<name>`,
`paraphrases`), each with concept_rate_before/after (toy world: by the attribute probe),
clip_accuracy_before/after (target name vs anchor name, as in the paper), clip_score_before/after,
and `kid` (before vs after, on CLIP image features) for anchor and neighbour groups.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import prompts as P
from .config import AblationConfig, to_dict
from .files import atomic, write_json, write_text
from .images import decode_png, encode_png, save_grid


class BeforeAfterGenerator:
    """Ray Data callable class: for each prompt, the base model's image and the ablated model's, same seed."""

    def __init__(self, model_path: str, delta_path: str | None, steps: int, guidance: float, use_gpu: bool = False):
        import torch

        from .pipeline import apply_delta, load_pipeline

        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.base = load_pipeline(model_path, device=self.device)
        self.ablated = None
        if delta_path:
            self.ablated = load_pipeline(model_path, device=self.device)
            apply_delta(self.ablated, delta_path)
        self.steps, self.guidance = steps, guidance

    def _gen(self, pipe, prompts, seeds):
        imgs = sample_images(pipe, prompts, seeds, self.steps, self.guidance, self.device)
        return np.array([encode_png(im) for im in imgs], dtype=object)

    def __call__(self, batch: dict) -> dict:
        prompts = [str(p) for p in batch["prompt"]]
        batch["before"] = self._gen(self.base, prompts, batch["seed"])
        if self.ablated is not None:
            batch["after"] = self._gen(self.ablated, prompts, batch["seed"])
        return batch


def sample_images(pipe, prompts: list[str], seeds, steps: int, guidance: float, device: str = "cpu") -> np.ndarray:
    """uint8 NxHxWx3 images of `pipe` for `prompts`, one seeded generator per image."""
    import torch

    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np")
    return np.round(out.images * 255).astype(np.uint8)


def prompt_seed(seed: int, i: int) -> int:
    """The noise seed of a group's i-th evaluation prompt (before and after share it)."""
    return seed * 7919 + i


def generate_before_after(groups: list[P.EvalGroup], model_path: str, delta_path: str | None, cfg: AblationConfig,
                          seed: int, num_actors: int = 1) -> dict[str, dict[str, np.ndarray]]:
    """{group name: {"before": uint8 NxHxWx3, "after": ...}} through a Ray Data actor pool."""
    import ray

    rows = [{"group": g.name, "prompt": p, "seed": prompt_seed(seed, i), "idx": i}
            for g in groups for i, p in enumerate(g.prompts)]
    res = {"num_gpus": 1, "num_cpus": 1} if cfg.use_gpu else {"num_cpus": 0.5}
    ds = ray.data.from_items(rows).map_batches(
        BeforeAfterGenerator, fn_constructor_kwargs=dict(model_path=model_path, delta_path=delta_path,
                                                        steps=cfg.eval_steps, guidance=cfg.guidance_scale,
                                                        use_gpu=cfg.use_gpu),
        batch_size=32, compute=ray.data.ActorPoolStrategy(size=num_actors), **res)
    out: dict[str, dict[str, list]] = {g.name: {"before": [None] * len(g.prompts), "after": [None] * len(g.prompts)}
                                       for g in groups}
    for r in ds.iter_rows():
        out[r["group"]]["before"][r["idx"]] = decode_png(r["before"])
        if "after" in r and r["after"] is not None:
            out[r["group"]]["after"][r["idx"]] = decode_png(r["after"])
    return {k: {w: np.stack(v) for w, v in d.items() if v and v[0] is not None} for k, d in out.items()}


def kid_clip(scorer, a: np.ndarray, b: np.ndarray) -> float:
    """Kernel Inception Distance (torchmetrics) with CLIP image features in place of Inception's."""
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    class ClipFeatures(torch.nn.Module):
        def forward(self, x):  # uint8 Nx3xHxW
            return scorer.encode_images(x.float() / 255.0)

    n = min(len(a), len(b))
    kid = KernelInceptionDistance(feature=ClipFeatures(), subset_size=max(2, min(50, n)), subsets=20)
    kid.update(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(), real=True)
    kid.update(torch.from_numpy(b).permute(0, 3, 1, 2).contiguous(), real=False)
    mean, _ = kid.compute()
    return float(mean)


def group_metrics(group: P.EvalGroup, imgs: dict[str, np.ndarray], cfg: AblationConfig, scorer, judge, toy: bool,
                  with_kid: bool) -> dict:
    spec = cfg.concept
    t_texts, a_texts = P.concept_texts(spec.target, toy), P.concept_texts(spec.anchor, toy)
    m: dict = {"concept": group.concept, "n": len(group.prompts)}
    for when in ("before", "after"):
        if when not in imgs:
            continue
        x = imgs[when]
        if judge is not None:
            m[f"concept_rate_{when}"] = judge.concept_rate(x, group.concept)
        m[f"clip_accuracy_{when}"] = scorer.clip_accuracy(x, t_texts, a_texts)
        m[f"clip_score_{when}"] = scorer.clip_score(x, group.prompts)
    if with_kid and "after" in imgs:
        m["kid"] = kid_clip(scorer, imgs["before"], imgs["after"])
    return m


def evaluate(cfg: AblationConfig, model_path: str, delta_path: str | None, clip_name: str, out_dir: str | Path,
             toy: bool, probe_path: str | None = None, train_history: list[dict] | None = None,
             num_actors: int = 1, seed: int | None = None, extra: dict | None = None) -> dict:
    """Generate, measure and write metrics.json, report.md, grid.png and loss_curve.png into `out_dir`."""
    from .clip import ClipScorer

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.eval_seed if seed is None else seed
    groups = P.eval_groups(cfg.concept, cfg.eval_images, seed, toy)
    print(f"[evaluate] generating {sum(len(g.prompts) for g in groups)} prompts x (before, after) "
          f"in {len(groups)} groups", flush=True)
    images = generate_before_after(groups, model_path, delta_path, cfg, seed, num_actors)
    scorer = ClipScorer.load(clip_name)
    judge = None
    if probe_path:
        from .toyworld.probe import ProbeJudge

        judge = ProbeJudge(probe_path)
    metrics: dict = {}
    for g in groups:
        with_kid = g.name == "anchor" or g.name.startswith("neighbours.")
        metrics[g.name] = group_metrics(g, images[g.name], cfg, scorer, judge, toy, with_kid)
    metrics["wall_seconds"] = time.time() - t0
    metrics["config"] = to_dict(cfg)
    if extra:
        metrics.update(extra)
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.md", report_markdown(metrics, groups))
    rows, labels = [], []
    for g in groups:
        for i in range(min(2, len(g.prompts))):
            row = [images[g.name]["before"][i]] + ([images[g.name]["after"][i]] if "after" in images[g.name] else [])
            rows.append(np.stack(row))
            labels.append(f"{g.name}: {g.prompts[i]}"[:44])
    save_grid(rows, out / "grid.png", scale=3, labels=labels)
    if train_history:
        plot_losses(train_history, out / "loss_curve.png")
    return metrics


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def report_markdown(metrics: dict, groups: list[P.EvalGroup]) -> str:
    cfg = metrics["config"]
    lines = [f"# Ablation report: {cfg['concept']['target']!r} -> {cfg['concept']['anchor']!r}", "",
             f"model: `{cfg['model'] or 'bundled toy'}`, parameter group `{cfg['param_group']}`, "
             f"{cfg['steps']} steps, eval seed {cfg['eval_seed']}", "",
             "| group | concept | concept rate before | after | CLIP acc before | after | CLIP score before | after | KID |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        m = metrics[g.name]
        lines.append(f"| {g.name} | {m['concept']} | {fmt(m.get('concept_rate_before'))} | "
                     f"{fmt(m.get('concept_rate_after'))} | {fmt(m.get('clip_accuracy_before'))} | "
                     f"{fmt(m.get('clip_accuracy_after'))} | {fmt(m.get('clip_score_before'))} | "
                     f"{fmt(m.get('clip_score_after'))} | {fmt(m.get('kid'))} |")
    lines += ["", "Concept rate: share of images the attribute probe reads as showing the group's concept "
              "(toy world). CLIP accuracy: share of images CLIP ranks closer to the target than to the anchor.",
              "", "![before/after](grid.png)", ""]
    if "restarts" in metrics:
        n = metrics["restarts"]
        lines.append(f"Worker restarts during training: {n}" + (
            f" (a worker failed {n} time(s); Ray Train restarted the worker group from the latest checkpoint "
            "and the run completed)" if n else ""))
    return "\n".join(lines) + "\n"


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for h in history for k in h if k.startswith("loss")})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h.get("step", i) for i, h in enumerate(history)]
    for k in keys:
        ax.plot(steps, [h.get(k, np.nan) for h in history], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
