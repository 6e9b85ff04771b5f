"""Tables and reports: the one formatter of numbers and tables that single runs, batches and Tune share."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic


def fmt(v, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; cells that are not text go through `fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list], widths: list[int] | None = None) -> str:
    """A console table: the first column left-aligned, the others right-aligned; cells through `fmt`."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = widths or [max(len(x) for x in col) for col in zip(headers, *cells)]

    def line(r):
        return " ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(headers)] + [line(r) for r in cells])


GROUP_HEADERS = ["group", "concept", "concept rate before", "after", "CLIP acc before", "after",
                 "CLIP score before", "after", "KID"]
GROUP_KEYS = ["concept_rate_before", "concept_rate_after", "clip_accuracy_before", "clip_accuracy_after",
              "clip_score_before", "clip_score_after", "kid"]
# without a judge (a real model: worlds.PromptWorld) there is no concept rate: CLIP's columns only
CLIP_HEADERS = ["group", "concept", "CLIP acc before", "after", "CLIP score before", "after", "KID"]
CLIP_KEYS = GROUP_KEYS[2:]
CLIP_NOTES = [
    "CLIP accuracy: share of images CLIP ranks closer to the target's name than to the anchor's name (each a "
    "prompt ensemble); ablation drives it down on the target and paraphrase groups.",
    "CLIP score: mean over images of 100 × max(0, cosine(image, its own prompt)); it should hold on the anchor "
    "and neighbour groups.",
    "KID: kernel inception distance between before- and after-images on CLIP image features, for the anchor and "
    "neighbour groups (whose images should not change); about 0 means unchanged.",
]


def group_metrics_of(metrics: dict) -> dict[str, dict]:
    """The per-group entries of a metrics dict (metrics.json also holds config, timings, ...)."""
    return {k: m for k, m in metrics.items() if isinstance(m, dict) and "clip_accuracy_before" in m}


def has_judge(metrics: dict) -> bool:
    """Whether a judge measured these groups: only then is there a concept rate to show."""
    return any("concept_rate_before" in m for m in group_metrics_of(metrics).values())


def _method_line(cfg: dict, metrics: dict) -> str:
    model = f"model: `{cfg['model'] or 'bundled toy'}`, "
    if cfg.get("method") == "closed-form":
        cf = metrics.get("closed_form", {})
        return (model + f"closed-form edit of the cross-attention keys/values (no training): {cf.get('pairs')} "
                f"caption pairs, {cf.get('preservation_captions')} preservation captions, {cf.get('tensors')} tensors "
                f"in {cf.get('edit_seconds')} s, eval seed {cfg['eval_seed']}")
    return model + f"parameter group `{cfg['param_group']}`, {cfg['steps']} steps, eval seed {cfg['eval_seed']}"


def report_markdown(metrics: dict, groups: list, judge_note: str | None = None) -> str:
    """report.md of one concept. `judge_note` says what the judge's concept rate means (the world's)."""
    cfg = metrics["config"]
    from .prompts import anchor_label

    c = cfg["concept"]
    lines = [f"# Ablation report: {c['target']!r} -> {anchor_label(c['anchor'], c.get('anchor_kind', 'text'))}", "",
             _method_line(cfg, metrics), ""]
    if has_judge(metrics):
        rows = [[g.name, metrics[g.name]["concept"], *(metrics[g.name].get(k) for k in GROUP_KEYS)] for g in groups]
        rate = f"Concept rate: {judge_note}. " if judge_note else "Concept rate: by the world's judge. "
        lines += [markdown_table(GROUP_HEADERS, rows), "",
                  rate + "CLIP accuracy: share of images CLIP ranks closer to the target than to the anchor."]
    else:
        rows = [[g.name, metrics[g.name]["concept"], *(metrics[g.name].get(k) for k in CLIP_KEYS)] for g in groups]
        lines += [markdown_table(CLIP_HEADERS, rows), "",
                  "No judge for this model (no attribute probe), so the concept is measured by CLIP:", "",
                  *(f"- {n}" for n in CLIP_NOTES)]
    draws = draws_line(metrics.get("target", {}))
    if draws:
        lines += ["", draws]
    lines += ["", "![before/after](grid.png)", ""]
    if "restarts" in metrics:
        n = metrics["restarts"]
        lines.append(f"Worker restarts during training: {n}" + (
            f" (a worker failed {n} time(s); Ray Train restarted the worker group from the latest checkpoint "
            "and the run completed)" if n else ""))
    return "\n".join(lines) + "\n"


def draws_line(target: dict) -> str:
    """What the target's prompts draw before and after, by the judge (the toy world's probe): the
    values of the target's attribute each image reads as, largest first."""
    if "draws_after" not in target:
        return ""

    def top(d):
        return ", ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v > 0)

    return (f"What the target's prompts draw ({target.get('concept')}'s attribute, by the judge): before: "
            f"{top(target['draws_before'])}; after: {top(target['draws_after'])}.")


def console_summary(metrics: dict) -> str:
    """The job's final console table: the judge's concept rate where there is one, else CLIP's metrics
    with one line on each."""
    groups = group_metrics_of(metrics)
    if has_judge(metrics):
        keys = ["concept_rate_before", "concept_rate_after", "clip_accuracy_before", "clip_accuracy_after", "kid"]
        rows = [[k, *(m.get(x) for x in keys)] for k, m in groups.items() if "concept_rate_before" in m]
        table = text_table(["group", "rate before", "after", "clip acc", "after", "KID"], rows, [24, 11, 7, 9, 7, 7])
    else:
        rows = [[k, *(m.get(x) for x in CLIP_KEYS)] for k, m in groups.items()]
        table = "\n".join([text_table(["group", "clip acc", "after", "clip score", "after", "KID"], rows,
                                       [24, 9, 7, 11, 7, 7]), *CLIP_NOTES])
    return table + f"\nwall time: {metrics.get('wall_seconds', 0):.0f}s"


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
