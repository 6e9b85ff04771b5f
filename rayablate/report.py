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


def report_markdown(metrics: dict, groups: list, judge_note: str | None = None) -> str:
    """report.md of one concept. `judge_note` says what the judge's concept rate means (the world's)."""
    cfg = metrics["config"]
    rows = [[g.name, metrics[g.name]["concept"], *(metrics[g.name].get(k) for k in GROUP_KEYS)] for g in groups]
    has_rate = any("concept_rate_before" in metrics[g.name] for g in groups)
    rate = f"Concept rate: {judge_note}. " if judge_note else "Concept rate: by the world's judge. " if has_rate else ""
    lines = [f"# Ablation report: {cfg['concept']['target']!r} -> {cfg['concept']['anchor']!r}", "",
             f"model: `{cfg['model'] or 'bundled toy'}`, parameter group `{cfg['param_group']}`, "
             f"{cfg['steps']} steps, eval seed {cfg['eval_seed']}", "",
             markdown_table(GROUP_HEADERS, rows),
             "", rate + "CLIP accuracy: share of images CLIP ranks closer to the target than to the anchor.",
             "", "![before/after](grid.png)", ""]
    if "restarts" in metrics:
        n = metrics["restarts"]
        lines.append(f"Worker restarts during training: {n}" + (
            f" (a worker failed {n} time(s); Ray Train restarted the worker group from the latest checkpoint "
            "and the run completed)" if n else ""))
    return "\n".join(lines) + "\n"


def console_summary(metrics: dict) -> str:
    keys = ["concept_rate_before", "concept_rate_after", "clip_accuracy_before", "clip_accuracy_after", "kid"]
    rows = [[k, *(m.get(x) for x in keys)] for k, m in metrics.items()
            if isinstance(m, dict) and "concept_rate_before" in m]
    table = text_table(["group", "rate before", "after", "clip acc", "after", "KID"], rows, [24, 11, 7, 9, 7, 7])
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
